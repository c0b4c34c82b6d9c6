//! `mistralrs-server`: upstream's OpenAI-compatible server (mistralrs-server-core) over a mistral.rs
//! engine whose paged attention runs the selected KV policy. Flag names follow upstream's
//! `mistralrs serve` where a flag exists there.
//!
//! In the order a server starts:
//! - [`args`]: the command line, checked before anything loads, resolved with the policy file
//!   (`crate::config`) into a `PolicyConfig`;
//! - [`model_source`]: what `--model` names (a model directory or a GGUF file);
//! - [`tp`]: this process's tensor-parallel rank, if any (ring backend);
//! - [`engine`]: the mistral.rs engine, built from [`EngineSettings`] with the policy registered;
//! - [`validate`]: requests checked against the model's limits, sampling defaults filled in;
//! - [`metrics`]: `GET /metrics`;
//! - here: the HTTP app, and shutdown with a deadline.

mod args;
pub mod engine;
pub mod metrics;
mod model_source;
pub mod tp;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;
use tracing::{info, warn};

pub use args::{ServerArgs, EMBEDDED_MODEL_DIR, REPLAY_ARCHITECTURES, SUPPORTED_BLOCK_SIZES};
pub use engine::{build_engine, CacheSize, EngineSettings, PagedCache};
pub use model_source::ModelSource;

use crate::config::PolicyConfig;
use crate::policy::ServedPolicy;
use tp::RingRank;

/// The policy the flags and config file select (`None` with --no-paged-attn).
fn install_policy(args: &ServerArgs, policy_config: &PolicyConfig) -> Option<Arc<dyn ServedPolicy>> {
    // `policy::build` also sets the linear layers' paths for the policy; `build_engine` registers it.
    (!args.no_paged_attn).then(|| {
        info!("{}", policy_config.describe());
        crate::policy::build(policy_config)
    })
}

async fn bind(args: &ServerArgs) -> Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot bind --host {} --port {}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// A ring rank other than 0. Upstream's engine there takes its requests from rank 0 and never
/// returns, so this process serves only its own `/metrics` (its heads' policy numbers and KV pool)
/// and `/health`, on --host/--port, from before the model loads.
async fn serve_worker(args: &ServerArgs, policy_config: &PolicyConfig, source: &ModelSource, ring: RingRank) -> Result<()> {
    let policy = install_policy(args, policy_config);
    let (listener, addr) = bind(args).await?;
    let app = axum::Router::new()
        .route("/metrics", metrics::metrics_route(Arc::default(), policy.clone(), Some(ring.clone())))
        .route("/health", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    info!("tensor-parallel worker rank {} of {}: its metrics on http://{addr}/metrics", ring.rank, ring.world_size);
    println!("mistralrs-server rank {} of {}: worker, metrics on http://{addr}/metrics", ring.rank, ring.world_size);
    build_engine(&args.engine_settings(source)?, policy).await?;
    bail!("tensor-parallel worker rank {}: the engine returned, which upstream's worker never does", ring.rank)
}

/// Serve until SIGINT/SIGTERM.
pub async fn serve(args: ServerArgs) -> Result<()> {
    // Once: it re-reads the policy file and, for a GGUF, the file's metadata.
    let (policy_config, source) = args.validate()?;
    let ring = tp::ring_rank()?;
    if let Some(ring) = &ring {
        tp::check_model(ring, &source)?;
        info!("tensor parallel: rank {} of {} (ring backend, {})", ring.rank, ring.world_size, ring.config.display());
        if ring.rank != 0 {
            return serve_worker(&args, &policy_config, &source, ring.clone()).await;
        }
    }
    let policy = install_policy(&args, &policy_config);
    let (engine, installed) = build_engine(&args.engine_settings(&source)?, policy).await?;
    let limits = Arc::new(validate::request_limits(&source, args.max_sequence_tokens(), &engine));
    let stop = engine_stop(engine.clone(), Duration::from_secs(args.shutdown_timeout));
    let http = Arc::new(metrics::HttpMetrics::default());
    let counted = http.clone();
    let app = MistralRsServerRouterBuilder::new()
        .with_mistralrs(engine)
        .build()
        .await?
        .route("/metrics", metrics::metrics_route(http, installed, ring))
        .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let limits = limits.clone();
            async move { validate::check_request(request, next, &limits).await }
        }))
        .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let counted = counted.clone();
            async move {
                let path = request.uri().path().to_owned();
                let start = std::time::Instant::now();
                let response = next.run(request).await;
                counted.record(&path, response.status().as_u16(), start.elapsed());
                response
            }
        }));
    let (listener, addr) = bind(&args).await?;
    info!("listening on http://{addr}");
    println!("mistralrs-server ready on http://{addr}");
    // Greedy: the embedded 135M model samples a French-looking non-answer to this question about a
    // third of the time even at its model card's temperature 0.2, and always answers it greedily.
    println!(
        "  try: curl http://{addr}/v1/chat/completions -H 'Content-Type: application/json' \\\n         -d '{{\"model\":\"default\",\"messages\":[{{\"role\":\"user\",\"content\":\"What is the capital of France?\"}}],\"max_tokens\":32,\"temperature\":0}}'"
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            let _ = stop.send(());
        })
        .await?;
    info!("shut down");
    Ok(())
}

/// Once the returned sender fires (the shutdown signal), waits `deadline`, then stops the engine:
/// its sequences are dropped, so each stream still open ends with an error event and `[DONE]`
/// (patch mistralrs-server-core/0001) and each waiting non-streaming request with an error,
/// which lets the graceful shutdown finish. A server whose requests all finish in time exits first.
fn engine_stop(engine: mistralrs_server_core::types::SharedMistralRsState, deadline: Duration) -> tokio::sync::oneshot::Sender<()> {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        if rx.await.is_err() {
            return;
        }
        info!("shutting down: no new connections; requests in flight have {} s to finish (--shutdown-timeout)", deadline.as_secs());
        tokio::time::sleep(deadline).await;
        warn!("shutdown deadline of {} s passed: ending the requests still in flight", deadline.as_secs());
        match engine.get_sender(None) {
            Ok(sender) => {
                let _ = sender.send(mistralrs_core::Request::Terminate).await;
            }
            Err(e) => warn!("cannot reach the engine to stop it: {e}"),
        }
    });
    tx
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}
