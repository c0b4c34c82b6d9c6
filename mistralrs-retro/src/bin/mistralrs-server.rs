use clap::Parser;
use mistralrs_retro::server::{serve, ServerArgs};

fn main() {
    let args = ServerArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Runtime::new().expect("cannot start the tokio runtime");
    if let Err(err) = runtime.block_on(serve(args)) {
        eprintln!("error: {err:#}");
        std::process::exit(2);
    }
}
