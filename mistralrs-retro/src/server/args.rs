//! The server's command line: every flag, its `--help` line, and the checks that run before
//! anything loads (a bad value fails fast, naming its flag).

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use mistralrs_core::{AutoDeviceMapParams, ModelDType};

use super::engine::{CacheSize, EngineSettings, PagedCache};
use super::model_source::ModelSource;
use crate::config::{KernelChoice, PolicyConfig, PolicyFile, PolicyKind, PolicySettings};

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

    /// A prompt's attention: `ours` (a tiled CPU kernel; a tensor-core CUDA kernel that never
    /// builds the score matrix), `upstream` (candle's), or `auto` (ours, except `full` on CUDA,
    /// which stays upstream's bit for bit) [default: auto].
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(KernelChoice::NAMES))]
    pub prompt_attention: Option<String>,

    /// Linear layers over a sparse step's few rows per sequence: `ours` (CPU: 2..=8-row products
    /// read each weight row once; CUDA: a batch's rows folded into one product), `upstream`, or
    /// `auto` (ours for quest and retro, upstream's for full) [default: auto].
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(KernelChoice::NAMES))]
    pub linear_rows: Option<String>,

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
            prompt_attention: self.prompt_attention.clone(),
            linear_rows: self.linear_rows.clone(),
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
            policy = PolicyConfig { prompt_attention: policy.prompt_attention, linear_rows: policy.linear_rows, ..PolicyConfig::new(PolicyKind::Full) };
        }
        Ok((policy, source))
    }

    /// The engine these flags describe, for the model `validate` returned.
    pub fn engine_settings(&self, source: &ModelSource) -> Result<EngineSettings> {
        let size = match (self.pa_context_len, self.pa_memory_mb) {
            (Some(tokens), _) => CacheSize::Tokens(tokens),
            (None, Some(mb)) => CacheSize::Megabytes(mb),
            (None, None) => CacheSize::Tokens(DEFAULT_PA_CONTEXT_LEN),
        };
        Ok(EngineSettings {
            source: source.clone(),
            cpu: self.cpu,
            dtype: self.dtype.parse().map_err(|e: String| anyhow::anyhow!("--dtype {}: {e}", self.dtype))?,
            paged: (!self.no_paged_attn).then_some(PagedCache { block_size: self.pa_block_size, size }),
            max_seqs: self.max_seqs,
            prefix_cache: !self.no_prefix_cache,
            seed: self.seed,
            max_seq_len: self.max_seq_len,
            cpu_linear: self.cpu_linear,
        })
    }

    /// The longest sequence a request may ask for: the KV cache's size in tokens.
    pub fn max_sequence_tokens(&self) -> usize {
        self.pa_context_len.unwrap_or(DEFAULT_PA_CONTEXT_LEN)
    }
}
