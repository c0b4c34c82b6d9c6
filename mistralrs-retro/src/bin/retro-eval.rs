//! `retro-eval`: the quality evaluation of the KV policies (issue 5; docs/quality.md).
//!
//! `cargo run --release -p mistralrs-retro --bin retro-eval` (default grid, run from the workspace
//! root after scripts/setup.sh), `--quick` for the CI grid, `--help` for every option.

use clap::Parser;
use mistralrs_retro::eval::{run, EvalArgs};

#[tokio::main]
async fn main() {
    let args = EvalArgs::parse();
    if let Err(e) = run(args).await {
        eprintln!("retro-eval: {e:#}");
        std::process::exit(1);
    }
}
