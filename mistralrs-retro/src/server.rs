//! `mistralrs-server`: upstream's OpenAI-compatible server (mistralrs-server-core) over a mistral.rs
//! engine whose paged attention runs the selected KV policy.
//!
//! Flag names follow upstream's `mistralrs serve` where a flag exists there.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use mistralrs_core::{
    get_auto_device_map_params, get_model_dtype, AutoDeviceMapParams, DeviceMapSetting,
    LoaderBuilder, MemoryGpuConfig, MistralRsBuilder, ModelDType, ModelSelected,
    PagedAttentionConfig, PagedCacheType, SchedulerConfig, DefaultSchedulerMethod, TokenSource,
};
use mistralrs_server_core::mistralrs_server_router_builder::MistralRsServerRouterBuilder;
use tracing::{info, warn};

use crate::config::{PolicyConfig, PolicyFile, PolicySettings};
use crate::{metrics, validate};
use crate::policy::{PolicyKind, ServedPolicy};
use crate::tp::RingRank;

/// Architectures (config.json `model_type`, GGUF `general.architecture`) whose decode path was
/// checked to take a replay window (docs/design.md §8): no recurrent state, no MLA decode.
pub const REPLAY_ARCHITECTURES: [&str; 4] = ["llama", "mistral", "qwen2", "phi3"];

/// Block sizes the paged KV cache (upstream's and ours) supports.
pub const SUPPORTED_BLOCK_SIZES: [usize; 3] = [8, 16, 32];

/// Where `scripts/fetch-smollm2.sh` puts the embedded test model, relative to the workspace root.
pub const EMBEDDED_MODEL_DIR: &str = "models/smollm2-135m-instruct-f32";

#[derive(Parser, Debug, Clone)]
#[command(name = "mistralrs-server", version, args_override_self = true, about = "OpenAI-compatible mistral.rs server with selectable KV policies (full, quest, retro)")]
pub struct ServerArgs {
    /// Model to serve: a Hugging Face-style directory (config.json, *.safetensors, tokenizer.json)
    /// or a `.gguf` file. Defaults to the embedded SmolLM2-135M-Instruct (see README).
    #[arg(long, short = 'm')]
    pub model: Option<PathBuf>,

    /// KV policy for paged attention [default: the config file's, else full].
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(PolicyKind::names()))]
    pub kv_policy: Option<String>,

    /// TOML file with per-model policy settings (see configs/); flags override it.
    #[arg(long)]
    pub kv_policy_config: Option<PathBuf>,

    /// Sparse budget in tokens per step (exclusive with --kv-budget-ratio).
    #[arg(long)]
    pub kv_budget_tokens: Option<usize>,

    /// Sparse budget as a fraction of the context [default: 0.15].
    #[arg(long)]
    pub kv_budget_ratio: Option<f64>,

    /// Floor of a ratio budget, in tokens [default: 256].
    #[arg(long)]
    pub kv_budget_min_tokens: Option<usize>,

    /// Leading layers that always attend to everything [default: 2].
    #[arg(long)]
    pub kv_dense_layers: Option<usize>,

    /// RetroAttention window w (retro only) [default: 2].
    #[arg(long)]
    pub kv_window: Option<usize>,

    /// Retro output-cache blocks, one per decoding sequence; a sequence that finds none runs as
    /// quest [default: --max-seqs].
    #[arg(long)]
    pub kv_output_cache_blocks: Option<usize>,

    /// Retro only: every N decode steps, replay the last N tokens with dense attention at every
    /// layer, rewriting their K/V as full attention would (0: never; CPU only) [default: 0].
    #[arg(long)]
    pub kv_refresh_every: Option<usize>,

    /// Address to bind. Loopback unless you say otherwise.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Port to listen on (0 picks a free port; the chosen one is logged).
    #[arg(long, short = 'p', default_value_t = 1234)]
    pub port: u16,

    /// On SIGTERM or Ctrl-C: seconds in-flight requests may take to finish before the rest are
    /// ended (a stream with an error event and [DONE]); no new connections meanwhile.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,

    /// Maximum number of sequences running at once.
    #[arg(long, default_value_t = 16)]
    pub max_seqs: usize,

    /// Paged-attention block (page) size in tokens.
    #[arg(long, default_value_t = 32)]
    pub pa_block_size: usize,

    /// KV cache size, in tokens of context across all sequences.
    #[arg(long)]
    pub pa_context_len: Option<usize>,

    /// KV cache size in MB (ignored when --pa-context-len is given).
    #[arg(long)]
    pub pa_memory_mb: Option<usize>,

    /// Disable paged attention: upstream's eager KV cache and attention (the policy is not used).
    #[arg(long)]
    pub no_paged_attn: bool,

    /// Run on the CPU even when a GPU is available.
    #[arg(long)]
    pub cpu: bool,

    /// Model dtype: auto, f32, f16, bf16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,

    /// Disable the prefix cache.
    #[arg(long)]
    pub no_prefix_cache: bool,

    /// Seed for sampling.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Maximum sequence length used for automatic device mapping.
    #[arg(long, default_value_t = AutoDeviceMapParams::DEFAULT_MAX_SEQ_LEN)]
    pub max_seq_len: usize,

    /// CPU linear layers: `ours` (GGUF weights, and f16/bf16 weights at decode: each weight row
    /// read once per product on every core, AVX2 or AVX-512 VNNI where the CPU has them) or
    /// `upstream` (candle's).
    #[arg(long, value_enum, default_value_t = crate::linear::CpuLinear::Ours)]
    pub cpu_linear: crate::linear::CpuLinear,
}

/// Default KV cache when neither --pa-context-len nor --pa-memory-mb is given.
const DEFAULT_PA_CONTEXT_LEN: usize = 16 * 1024;

/// The model a path names.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    SafetensorsDir(PathBuf),
    GgufFile(PathBuf),
}

impl ModelSource {
    pub fn from_path(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "--model {}: no such file or directory (run scripts/fetch-smollm2.sh for the embedded model)",
                path.display()
            );
        }
        if path.is_dir() {
            for needed in ["config.json", "tokenizer.json"] {
                if !path.join(needed).is_file() {
                    bail!("--model {}: directory has no {needed}", path.display());
                }
            }
            return Ok(Self::SafetensorsDir(path.to_path_buf()));
        }
        let mut magic = [0u8; 4];
        use std::io::Read;
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .with_context(|| format!("--model {}: cannot read", path.display()))?;
        if &magic != b"GGUF" {
            bail!("--model {}: not a GGUF file and not a model directory", path.display());
        }
        Ok(Self::GgufFile(path.to_path_buf()))
    }

    /// The architecture (`model_type` of config.json, `general.architecture` of a GGUF), for
    /// matching `[[models]]` entries; `None` when it cannot be read.
    pub fn architecture(&self) -> Option<String> {
        match self {
            ModelSource::SafetensorsDir(dir) => {
                let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
                let config: serde_json::Value = serde_json::from_str(&text).ok()?;
                config["model_type"].as_str().map(str::to_owned)
            }
            ModelSource::GgufFile(file) => {
                let mut reader = std::fs::File::open(file).ok()?;
                let content = candle_core::quantized::gguf_file::Content::read(&mut reader).ok()?;
                content.metadata.get("general.architecture")?.to_string().ok().cloned()
            }
        }
    }

    /// The attention window of a sliding-window model (config.json `sliding_window`, and for
    /// Qwen2 only with `use_sliding_window`); `None` for GGUF files and full-attention models.
    pub fn sliding_window(&self) -> Option<usize> {
        let ModelSource::SafetensorsDir(dir) = self else { return None };
        let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
        let config: serde_json::Value = serde_json::from_str(&text).ok()?;
        if config["use_sliding_window"] == serde_json::Value::Bool(false) {
            return None;
        }
        config["sliding_window"].as_u64().map(|w| w as usize)
    }

    fn selected(&self, dtype: ModelDType, max_seq_len: usize) -> Result<ModelSelected> {
        let utf8 = |p: &Path| {
            p.to_str()
                .map(str::to_owned)
                .with_context(|| format!("model path {} is not UTF-8", p.display()))
        };
        Ok(match self {
            ModelSource::SafetensorsDir(dir) => ModelSelected::Plain {
                model_id: utf8(dir)?,
                tokenizer_json: None,
                arch: None,
                dtype,
                topology: None,
                organization: None,
                write_uqff: None,
                from_uqff: None,
                imatrix: None,
                calibration_file: None,
                max_seq_len,
                max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
                hf_cache_path: None,
                matformer_config_path: None,
                matformer_slice_name: None,
            },
            ModelSource::GgufFile(file) => {
                let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
                let name = file.file_name().context("GGUF path has no file name")?;
                ModelSelected::GGUF {
                    tok_model_id: None,
                    quantized_model_id: utf8(dir)?,
                    quantized_filename: utf8(Path::new(name))?,
                    dtype,
                    topology: None,
                    max_seq_len,
                    max_batch_size: AutoDeviceMapParams::DEFAULT_MAX_BATCH_SIZE,
                }
            }
        })
    }
}

impl ServerArgs {
    /// Check every flag before anything is loaded, so a bad value fails fast with its name.
    pub fn validate(&self) -> Result<(PolicyConfig, ModelSource)> {
        if !SUPPORTED_BLOCK_SIZES.contains(&self.pa_block_size) {
            bail!(
                "--pa-block-size {}: must be one of {:?}",
                self.pa_block_size,
                SUPPORTED_BLOCK_SIZES
            );
        }
        if self.max_seqs == 0 {
            bail!("--max-seqs 0: must be at least 1");
        }
        if self.pa_context_len == Some(0) {
            bail!("--pa-context-len 0: must be at least one block");
        }
        if self.pa_memory_mb == Some(0) {
            bail!("--pa-memory-mb 0: must be at least 1");
        }
        self.dtype
            .parse::<ModelDType>()
            .map_err(|e| anyhow::anyhow!("--dtype {}: {e} (allowed: auto, f32, f16, bf16)", self.dtype))?;
        let model = self.model.clone().unwrap_or_else(|| PathBuf::from(EMBEDDED_MODEL_DIR));
        let source = ModelSource::from_path(&model)?;
        let file = match &self.kv_policy_config {
            Some(path) => PolicyFile::load(path)?,
            None => PolicyFile::default(),
        };
        let from_file = file.settings_for(&model.to_string_lossy(), source.architecture().as_deref());
        let flags = PolicySettings {
            policy: self.kv_policy.clone(),
            budget_tokens: self.kv_budget_tokens,
            budget_ratio: self.kv_budget_ratio,
            budget_min_tokens: self.kv_budget_min_tokens,
            dense_layers: self.kv_dense_layers,
            window: self.kv_window,
            output_cache_blocks: self.kv_output_cache_blocks,
            refresh_every: self.kv_refresh_every,
            page_size: None,
        };
        // A budget flag replaces the file's budget of the other kind rather than clashing with it.
        let mut from_file = from_file;
        if flags.budget_tokens.is_some() {
            from_file.budget_ratio = None;
            from_file.budget_min_tokens = None;
        }
        if flags.budget_ratio.is_some() {
            from_file.budget_tokens = None;
        }
        if from_file.output_cache_blocks.is_none() {
            from_file.output_cache_blocks = Some(self.max_seqs);
        }
        let mut policy = from_file
            .overridden_by(&flags)
            .resolve(self.pa_block_size, "kv policy (flags --kv-*, --kv-policy-config)")?;
        let arch = source.architecture();
        if policy.kind == PolicyKind::Retro
            && (policy.window > 1 || policy.refresh_every > 0)
            && !arch.as_deref().is_some_and(|a| REPLAY_ARCHITECTURES.contains(&a))
        {
            bail!(
                "kv-policy=retro with window {} and refresh_every {} replays the last tokens through the model, which is \
                 checked for the architectures {REPLAY_ARCHITECTURES:?}; this model's is {}: use --kv-window 1 \
                 --kv-refresh-every 0 (quest) or --kv-policy quest",
                policy.window,
                policy.refresh_every,
                arch.as_deref().unwrap_or("unknown")
            );
        }
        if policy.kind == PolicyKind::Retro && policy.refresh_every > 0 && cfg!(feature = "cuda") && !self.cpu {
            // decode_dense's CUDA kernel serves at most 64 query vectors per KV head and block.
            bail!(
                "kv-policy=retro refresh_every = {} runs on CPU only in this build: add --cpu, or set refresh_every = 0 \
                 (--kv-refresh-every 0)",
                policy.refresh_every
            );
        }
        if let (Some(window), true) = (source.sliding_window(), policy.kind != PolicyKind::Full) {
            // Windowed block tables shift logical pages as the window moves: the page plan and
            // retro's seen-sets would be wrong. Every layer of these models is windowed.
            tracing::warn!(
                "the model uses sliding-window attention (window {window}): kv-policy={} does not support it; every layer runs kv-policy=full",
                policy.kind
            );
            policy = PolicyConfig::new(PolicyKind::Full);
        }
        Ok((policy, source))
    }

    fn paged_attn_config(&self) -> Result<Option<PagedAttentionConfig>> {
        if self.no_paged_attn {
            return Ok(None);
        }
        let mem = match (self.pa_context_len, self.pa_memory_mb) {
            (Some(ctx), _) => MemoryGpuConfig::ContextSize(ctx),
            (None, Some(mb)) => MemoryGpuConfig::MbAmount(mb),
            (None, None) => MemoryGpuConfig::ContextSize(DEFAULT_PA_CONTEXT_LEN),
        };
        Ok(Some(PagedAttentionConfig::new(Some(self.pa_block_size), mem, PagedCacheType::Auto)?))
    }
}

fn device(force_cpu: bool) -> Result<Device> {
    if force_cpu {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        return Ok(Device::cuda_if_available(0)?);
    }
    #[allow(unreachable_code)]
    Ok(Device::Cpu)
}

/// The policy the flags and config file select, installed (`None` with --no-paged-attn).
fn install_policy(args: &ServerArgs, policy_config: &PolicyConfig) -> Option<Arc<dyn ServedPolicy>> {
    // `policy::install` also sets the CPU row-split limit of the linear layers for the policy.
    (!args.no_paged_attn).then(|| {
        info!("{}", policy_config.describe());
        crate::policy::install(policy_config)
    })
}

/// The `/metrics` text: HTTP numbers, the policy's, the KV pool's and the tensor-parallel rank.
fn metrics_text(http: &metrics::HttpMetrics, policy: Option<&dyn ServedPolicy>, ring: Option<&RingRank>) -> String {
    let mut text = metrics::render(http, policy, mistralrs_core::kv_policy::free_kv_blocks());
    text.push_str(&crate::tp::metrics_text(ring));
    text
}

fn metrics_route(
    http: Arc<metrics::HttpMetrics>,
    policy: Option<Arc<dyn ServedPolicy>>,
    ring: Option<RingRank>,
) -> axum::routing::MethodRouter {
    axum::routing::get(move || {
        let text = metrics_text(&http, policy.as_deref(), ring.as_ref());
        async move { ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], text) }
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
        .route("/metrics", metrics_route(Arc::default(), policy.clone(), Some(ring.clone())))
        .route("/health", axum::routing::get(|| async { "ok" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    info!("tensor-parallel worker rank {} of {}: its metrics on http://{addr}/metrics", ring.rank, ring.world_size);
    println!("mistralrs-server rank {} of {}: worker, metrics on http://{addr}/metrics", ring.rank, ring.world_size);
    build_engine_with_policy(args, source, policy).await?;
    bail!("tensor-parallel worker rank {}: the engine returned, which upstream's worker never does", ring.rank)
}

/// Load the model from `source` (what `args.validate()` returned) with `policy` registered, and
/// build the engine; also returns the policy, for `/metrics`. The server passes the one its flags
/// select, the quality harness one that it can swap between runs; `None` or --no-paged-attn:
/// upstream's eager attention.
pub async fn build_engine_with_policy(
    args: &ServerArgs,
    source: &ModelSource,
    policy: Option<Arc<dyn ServedPolicy>>,
) -> Result<(mistralrs_server_core::types::SharedMistralRsState, Option<Arc<dyn ServedPolicy>>)> {
    // Never reach for the hub: models are local paths.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    crate::linear::install(args.cpu_linear);

    let paged = args.paged_attn_config()?;
    let installed = match (&paged, policy) {
        (Some(_), Some(policy)) => {
            mistralrs_core::kv_policy::register_kv_policy(policy.clone());
            Some(policy)
        }
        _ => {
            info!("paged attention disabled (--no-paged-attn): upstream eager attention, kv-policy unused");
            None
        }
    };

    let dtype: ModelDType = args.dtype.parse().map_err(|e: String| anyhow::anyhow!(e))?;
    let selected = source.selected(dtype, args.max_seq_len)?;
    let model_dtype = get_model_dtype(&selected)?;
    let mapper = DeviceMapSetting::Auto(get_auto_device_map_params(&selected)?);
    let device = device(args.cpu)?;
    if let Some(seed) = args.seed {
        device.set_seed(seed)?;
    }

    let loader = LoaderBuilder::new(selected).build()?;
    info!("loading {:?} on {:?}", source, device.location());
    let pipeline = loader.load_model_from_hf(
        None,
        TokenSource::None,
        &model_dtype,
        &device,
        false,
        mapper,
        None,
        paged,
    )?;

    let cache_config = pipeline.lock().await.get_metadata().cache_config.clone();
    let scheduler = match cache_config {
        Some(config) => SchedulerConfig::PagedAttentionMeta { max_num_seqs: args.max_seqs, config },
        None => SchedulerConfig::DefaultScheduler {
            method: DefaultSchedulerMethod::Fixed(
                args.max_seqs.try_into().context("--max-seqs must be at least 1")?,
            ),
        },
    };
    let engine = MistralRsBuilder::new(pipeline, scheduler, true, None)
        .with_no_prefix_cache(args.no_prefix_cache)
        .build()
        .await;
    Ok((engine, installed))
}

/// Serve until SIGINT/SIGTERM.
pub async fn serve(args: ServerArgs) -> Result<()> {
    // Once: it re-reads the policy file and, for a GGUF, the file's metadata.
    let (policy_config, source) = args.validate()?;
    let ring = crate::tp::ring_rank()?;
    if let Some(ring) = &ring {
        crate::tp::check_model(ring, &source)?;
        info!("tensor parallel: rank {} of {} (ring backend, {})", ring.rank, ring.world_size, ring.config.display());
        if ring.rank != 0 {
            return serve_worker(&args, &policy_config, &source, ring.clone()).await;
        }
    }
    let policy = install_policy(&args, &policy_config);
    let (engine, installed) = build_engine_with_policy(&args, &source, policy).await?;
    let limits = Arc::new(request_limits(&args, &source, &engine));
    let stop = engine_stop(engine.clone(), Duration::from_secs(args.shutdown_timeout));
    let http = Arc::new(metrics::HttpMetrics::default());
    let counted = http.clone();
    let app = MistralRsServerRouterBuilder::new()
        .with_mistralrs(engine)
        .build()
        .await?
        .route("/metrics", metrics_route(http, installed, ring))
        .layer(axum::middleware::from_fn(move |request: axum::extract::Request, next: axum::middleware::Next| {
            let limits = limits.clone();
            async move { check_request(request, next, &limits).await }
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

/// What `validate::check` holds requests against.
fn request_limits(args: &ServerArgs, source: &ModelSource, engine: &mistralrs_core::MistralRs) -> validate::RequestLimits {
    let (tokenizer, sampling_defaults) = match source {
        ModelSource::SafetensorsDir(dir) => {
            (tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).ok(), validate::SamplingDefaults::from_model_dir(dir))
        }
        _ => (None, validate::SamplingDefaults::default()),
    };
    if !sampling_defaults.is_empty() {
        info!("requests that set none of temperature, top_p, top_k get the model's generation_config.json: {sampling_defaults}");
    }
    validate::RequestLimits {
        model_ids: engine.list_models().unwrap_or_default(),
        max_sequence_tokens: args.pa_context_len.unwrap_or(DEFAULT_PA_CONTEXT_LEN),
        tokenizer,
        sampling_defaults,
    }
}

/// Refuse bad generation requests with a 4xx naming the field (see `validate`); pass the rest on.
async fn check_request(
    request: axum::extract::Request,
    next: axum::middleware::Next,
    limits: &validate::RequestLimits,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = request.uri().path().to_owned();
    if request.method() != axum::http::Method::POST || !matches!(path.as_str(), "/v1/chat/completions" | "/v1/completions") {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let mut bytes = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(bytes) => bytes,
        Err(e) => return (axum::http::StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}")).into_response(),
    };
    if let Ok(mut json) = serde_json::from_slice::<serde_json::Value>(&bytes) {
        if let Err((status, message)) = validate::check(&path, &json, limits) {
            return (status, axum::Json(serde_json::json!({ "message": message }))).into_response();
        }
        if limits.sampling_defaults.apply(&mut json) {
            bytes = serde_json::to_vec(&json).expect("a parsed JSON value serializes").into();
            parts.headers.insert(axum::http::header::CONTENT_LENGTH, bytes.len().into());
        }
    }
    next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
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
