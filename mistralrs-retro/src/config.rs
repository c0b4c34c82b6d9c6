//! Policy configuration: defaults ← the `--kv-policy-config` TOML file ← command-line flags.
//!
//! The file format:
//!
//! ```toml
//! # Applies to every model unless a [[models]] entry matches.
//! [kv_policy]
//! policy = "quest"          # full | quest | retro
//! budget_ratio = 0.15       # or budget_tokens = 2048
//! budget_min_tokens = 256
//! dense_layers = 2
//! window = 2                # retro only
//! output_cache_blocks = 16  # retro only; default --max-seqs
//! refresh_every = 0         # retro only; 0 = never, else a dense replay of that many tokens every that many steps
//! prompt_attention = "auto" # auto | ours | upstream: which kernel computes a prompt's attention
//! linear_rows = "auto"      # auto | ours | upstream: linear layers over a sparse step's few rows
//!
//! [[models]]                # first match wins; match by model id (path or name) and/or architecture
//! model_id = "SmolLM2-135M-Instruct"
//! arch = "llama"
//! [models.kv_policy]
//! policy = "retro"
//! ```
//!
//! Unknown keys and out-of-range values are errors that name the key, the value and what is allowed.

use std::fmt;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

/// A policy a user can select with `--kv-policy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Every cached token: upstream behaviour, the correctness baseline.
    Full,
    /// Per KV head, the top-k pages by an upper bound of q·k from per-page key min/max.
    Quest,
    /// Quest plus RetroAttention: the last w−1 rows are corrected with later steps' pages.
    Retro,
}

impl PolicyKind {
    /// Every policy this build registers, by the name users type.
    pub const ALL: &'static [PolicyKind] = &[PolicyKind::Full, PolicyKind::Quest, PolicyKind::Retro];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Full => "full",
            PolicyKind::Quest => "quest",
            PolicyKind::Retro => "retro",
        }
    }

    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|k| k.name()).collect()
    }

    pub fn from_name(name: &str) -> anyhow::Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.name() == name)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown KV policy `{name}`; this build provides: {}",
                    Self::names().join(", ")
                )
            })
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How many tokens a sparse step may read.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// A fixed number of tokens.
    Tokens(usize),
    /// A fraction of the context, never below `min_tokens`.
    Ratio { ratio: f64, min_tokens: usize },
}

impl Budget {
    /// Pages a step over `context` tokens may read, the always-selected first and last pages
    /// included. The selection's list length follows `retro_kernels::selected_len`, which also
    /// keeps those two pages when the budget is smaller.
    pub fn pages(&self, context: usize, block_size: usize) -> usize {
        let tokens = match *self {
            Budget::Tokens(n) => n,
            Budget::Ratio { ratio, min_tokens } => ((ratio * context as f64).ceil() as usize).max(min_tokens),
        };
        tokens.div_ceil(block_size)
    }
}

/// Which of two implementations of the same math a policy's step uses: ours (`retro-kernels`) or
/// upstream's. `auto` picks per policy and device (see [`PolicyConfig::prompt_attention`] and
/// [`PolicyConfig::linear_rows`]). The results differ by float rounding only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KernelChoice {
    #[default]
    Auto,
    Ours,
    Upstream,
}

impl KernelChoice {
    pub const NAMES: [&'static str; 3] = ["auto", "ours", "upstream"];

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    fn from_key(value: &str, key: &str, source: &str) -> Result<Self> {
        match value {
            "auto" => Ok(Self::Auto),
            "ours" => Ok(Self::Ours),
            "upstream" => Ok(Self::Upstream),
            other => bail!("{source}: key `{key}` = \"{other}\": must be one of auto, ours, upstream"),
        }
    }

    /// Ours for every policy (`ours`), for none (`upstream`), or where `auto` says.
    pub fn ours(self, auto: bool) -> bool {
        match self {
            Self::Auto => auto,
            Self::Ours => true,
            Self::Upstream => false,
        }
    }
}

/// A fully resolved policy selection.
#[derive(Clone, Debug, PartialEq)]
pub struct PolicyConfig {
    pub kind: PolicyKind,
    pub budget: Budget,
    /// The first `dense_layers` layers always attend to everything (as in Quest).
    pub dense_layers: usize,
    /// RetroAttention window w: the newest row plus w-1 corrected past rows. 1 is plain Quest.
    pub window: usize,
    /// Output-cache blocks (one per decoding retro sequence); the server defaults it to --max-seqs.
    pub output_cache_blocks: usize,
    /// Every `refresh_every` decode steps, retro replays that many tokens with dense attention at
    /// every layer, rewriting their K/V as full attention would (0: never). See docs/retro.md.
    pub refresh_every: usize,
    /// A prompt's causal attention with nothing cached. `auto`: on CPU ours (a tiled kernel) for a
    /// batch of one prompt under every policy; on CUDA ours (tensor cores, no score matrix) for
    /// `quest` and `retro`, upstream's for `full`, which then stays upstream's bit for bit.
    pub prompt_attention: KernelChoice,
    /// Linear layers over the few rows per sequence of a sparse decode step. `auto`: ours for
    /// `quest` and `retro` (CPU: 2..=8-row products read each weight row once; CUDA: a batch's rows
    /// folded into one product), upstream's for `full`.
    pub linear_rows: KernelChoice,
}

pub const DEFAULT_BUDGET_RATIO: f64 = 0.15;
pub const DEFAULT_BUDGET_MIN_TOKENS: usize = 256;
pub const DEFAULT_DENSE_LAYERS: usize = 2;
pub const DEFAULT_WINDOW: usize = 2;
/// Row masks in the kernels are 32-bit; the paper ablates up to 8.
pub const MAX_WINDOW: usize = 16;
/// Longest refresh replay: a refresh step runs that many rows through the whole model at once.
pub const MAX_REFRESH: usize = 256;
/// Used when neither the file nor the server says (the server passes --max-seqs).
pub const DEFAULT_OUTPUT_CACHE_BLOCKS: usize = 16;

impl PolicyConfig {
    pub fn new(kind: PolicyKind) -> Self {
        Self {
            kind,
            budget: Budget::Ratio { ratio: DEFAULT_BUDGET_RATIO, min_tokens: DEFAULT_BUDGET_MIN_TOKENS },
            dense_layers: DEFAULT_DENSE_LAYERS,
            window: DEFAULT_WINDOW,
            output_cache_blocks: DEFAULT_OUTPUT_CACHE_BLOCKS,
            refresh_every: 0,
            prompt_attention: KernelChoice::Auto,
            linear_rows: KernelChoice::Auto,
        }
    }

    /// One line for the startup log: the policy and every parameter it runs with.
    pub fn describe(&self) -> String {
        let budget = match self.budget {
            Budget::Tokens(n) => format!("budget_tokens={n}"),
            Budget::Ratio { ratio, min_tokens } => format!("budget_ratio={ratio} budget_min_tokens={min_tokens}"),
        };
        let kernels = format!("prompt_attention={} linear_rows={}", self.prompt_attention.name(), self.linear_rows.name());
        match self.kind {
            PolicyKind::Full => format!("kv-policy=full (attends to every cached token) {kernels}"),
            PolicyKind::Quest => format!("kv-policy=quest {budget} dense_layers={} {kernels}", self.dense_layers),
            PolicyKind::Retro => format!(
                "kv-policy=retro {budget} dense_layers={} window={} output_cache_blocks={} refresh_every={} {kernels}",
                self.dense_layers, self.window, self.output_cache_blocks, self.refresh_every
            ),
        }
    }
}

/// The optional parts of a policy, as a file or the flags give them.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicySettings {
    pub policy: Option<String>,
    pub budget_tokens: Option<usize>,
    pub budget_ratio: Option<f64>,
    pub budget_min_tokens: Option<usize>,
    pub dense_layers: Option<usize>,
    pub window: Option<usize>,
    pub output_cache_blocks: Option<usize>,
    pub refresh_every: Option<usize>,
    /// `auto`, `ours` or `upstream` ([`PolicyConfig::prompt_attention`]).
    pub prompt_attention: Option<String>,
    /// `auto`, `ours` or `upstream` ([`PolicyConfig::linear_rows`]).
    pub linear_rows: Option<String>,
    /// Must equal the paged-attention block size when given (pages are blocks).
    pub page_size: Option<usize>,
}

impl PolicySettings {
    /// `self` with every value `over` sets replacing ours.
    pub fn overridden_by(&self, over: &PolicySettings) -> PolicySettings {
        PolicySettings {
            policy: over.policy.clone().or_else(|| self.policy.clone()),
            budget_tokens: over.budget_tokens.or(self.budget_tokens),
            budget_ratio: over.budget_ratio.or(self.budget_ratio),
            budget_min_tokens: over.budget_min_tokens.or(self.budget_min_tokens),
            dense_layers: over.dense_layers.or(self.dense_layers),
            window: over.window.or(self.window),
            output_cache_blocks: over.output_cache_blocks.or(self.output_cache_blocks),
            refresh_every: over.refresh_every.or(self.refresh_every),
            prompt_attention: over.prompt_attention.clone().or_else(|| self.prompt_attention.clone()),
            linear_rows: over.linear_rows.clone().or_else(|| self.linear_rows.clone()),
            page_size: over.page_size.or(self.page_size),
        }
    }

    /// Validate and fill in defaults. `source` names where the values came from, for errors.
    pub fn resolve(&self, block_size: usize, source: &str) -> Result<PolicyConfig> {
        let name = self.policy.as_deref().unwrap_or("full");
        let kind = PolicyKind::from_name(name).with_context(|| format!("{source}: key `policy` = \"{name}\""))?;
        let mut config = PolicyConfig::new(kind);
        if let Some(size) = self.page_size {
            if size != block_size {
                bail!("{source}: key `page_size` = {size}: must equal the paged-attention block size ({block_size}, --pa-block-size)");
            }
        }
        match (self.budget_tokens, self.budget_ratio) {
            (Some(_), Some(_)) => bail!("{source}: keys `budget_tokens` and `budget_ratio` are exclusive: give one"),
            (Some(0), None) => bail!("{source}: key `budget_tokens` = 0: must be at least 1"),
            (Some(n), None) => config.budget = Budget::Tokens(n),
            (None, ratio) => {
                let ratio = ratio.unwrap_or(DEFAULT_BUDGET_RATIO);
                if !(ratio > 0.0 && ratio <= 1.0) {
                    bail!("{source}: key `budget_ratio` = {ratio}: must be in (0, 1]");
                }
                let min_tokens = self.budget_min_tokens.unwrap_or(DEFAULT_BUDGET_MIN_TOKENS);
                config.budget = Budget::Ratio { ratio, min_tokens };
            }
        }
        if self.budget_min_tokens.is_some() && self.budget_tokens.is_some() {
            bail!("{source}: key `budget_min_tokens` only applies with `budget_ratio`");
        }
        if let Some(layers) = self.dense_layers {
            config.dense_layers = layers;
        }
        if let Some(window) = self.window {
            if window == 0 || window > MAX_WINDOW {
                bail!("{source}: key `window` = {window}: must be in 1..={MAX_WINDOW}");
            }
            config.window = window;
        }
        if let Some(blocks) = self.output_cache_blocks {
            if blocks == 0 {
                bail!("{source}: key `output_cache_blocks` = 0: must be at least 1");
            }
            config.output_cache_blocks = blocks;
        }
        if let Some(every) = self.refresh_every {
            if every != 0 && (every <= config.window || every > MAX_REFRESH) {
                bail!(
                    "{source}: key `refresh_every` = {every}: must be 0 (off) or in {}..={MAX_REFRESH} (more than the window, {})",
                    config.window + 1,
                    config.window
                );
            }
            config.refresh_every = every;
        }
        if let Some(value) = &self.prompt_attention {
            config.prompt_attention = KernelChoice::from_key(value, "prompt_attention", source)?;
        }
        if let Some(value) = &self.linear_rows {
            config.linear_rows = KernelChoice::from_key(value, "linear_rows", source)?;
        }
        Ok(config)
    }
}

/// One `[[models]]` entry: upstream's `mistralrs from-config` model entry plus our `kv_policy` table.
/// Upstream's keys are accepted (and left to upstream's tools); any other key is an error.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    pub model_id: Option<String>,
    pub arch: Option<String>,
    #[serde(default)]
    pub kv_policy: Option<PolicySettings>,
    // Upstream's own keys (mistralrs-cli 0.8.1 `ModelEntry`), not used by this server.
    kind: Option<toml::Value>,
    tokenizer: Option<toml::Value>,
    dtype: Option<toml::Value>,
    chat_template: Option<toml::Value>,
    jinja_explicit: Option<toml::Value>,
    format: Option<toml::Value>,
    adapter: Option<toml::Value>,
    quantization: Option<toml::Value>,
    device: Option<toml::Value>,
    multimodal: Option<toml::Value>,
    matformer_config_path: Option<toml::Value>,
    matformer_slice_name: Option<toml::Value>,
}

impl ModelEntry {
    /// Whether this entry names the model at `model_id` (a path or hub id) with architecture `arch`:
    /// the entry's `model_id`, or its last path segment (`org/Name` matches a local `.../name-f32`
    /// only through `Name`), is contained in the model's id, case-insensitively; `arch`, if given,
    /// equals the model's.
    fn matches(&self, model_id: &str, arch: Option<&str>) -> bool {
        let id = model_id.to_lowercase();
        let id_ok = self.model_id.as_ref().is_none_or(|m| {
            let m = m.to_lowercase();
            let last = m.rsplit('/').next().unwrap_or(&m);
            id.contains(&m) || (!last.is_empty() && id.contains(last))
        });
        let arch_ok = self.arch.as_ref().is_none_or(|a| arch.is_some_and(|arch| arch.eq_ignore_ascii_case(a)));
        id_ok && arch_ok
    }
}

/// A `--kv-policy-config` file: ours (`[kv_policy]` and `[[models]]` with `kv_policy` tables) or an
/// upstream `mistralrs from-config` file extended with them, which keeps working upstream (it
/// ignores keys it does not know).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    #[serde(default)]
    pub kv_policy: PolicySettings,
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    // Upstream's top-level keys, not used by this server.
    command: Option<toml::Value>,
    global: Option<toml::Value>,
    runtime: Option<toml::Value>,
    server: Option<toml::Value>,
    paged_attn: Option<toml::Value>,
    default_model_id: Option<toml::Value>,
    thinking: Option<toml::Value>,
    enable_thinking: Option<toml::Value>,
    sandbox: Option<toml::Value>,
}

impl PolicyFile {
    pub fn parse(text: &str, source: &str) -> Result<Self> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| anyhow::anyhow!("{source}: {}", e.to_string().trim()))?;
        for (i, entry) in file.models.iter().enumerate() {
            if entry.model_id.is_none() && entry.arch.is_none() {
                bail!("{source}: models[{i}] needs `model_id` or `arch` to match on");
            }
        }
        Ok(file)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("--kv-policy-config {}: cannot read", path.display()))?;
        Self::parse(&text, &format!("--kv-policy-config {}", path.display()))
    }

    /// The settings for a model: the first `[[models]]` entry with a `kv_policy` table that
    /// [matches](ModelEntry::matches) the model, layered over the file-wide `[kv_policy]`.
    pub fn settings_for(&self, model_id: &str, arch: Option<&str>) -> PolicySettings {
        let matched = self
            .models
            .iter()
            .filter(|entry| entry.kv_policy.is_some())
            .find(|entry| entry.matches(model_id, arch));
        match matched.and_then(|entry| entry.kv_policy.as_ref()) {
            Some(settings) => self.kv_policy.overridden_by(settings),
            None => self.kv_policy.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        let file = PolicyFile::parse(text, "cfg");
        match file {
            Err(e) => format!("{e:#}"),
            Ok(f) => format!("{:#}", f.kv_policy.resolve(16, "cfg").unwrap_err()),
        }
    }

    #[test]
    fn bad_values_name_key_value_and_range() {
        let cases = [
            ("[kv_policy]\npolicy = \"quest\"\nwindow = 0", &["window", "0", "1..="][..]),
            ("[kv_policy]\npolicy = \"quest\"\nbudget_tokens = 0", &["budget_tokens", "0"][..]),
            ("[kv_policy]\nbudget_ratio = 1.5", &["budget_ratio", "1.5", "(0, 1]"][..]),
            ("[kv_policy]\npage_size = 32", &["page_size", "32", "16"][..]),
            ("[kv_policy]\npolicy = \"sparse\"", &["policy", "sparse", "full"][..]),
            ("[kv_policy]\nbudget = 3", &["budget", "unknown field"][..]),
            ("[kv_policy]\nbudget_tokens = 64\nbudget_ratio = 0.1", &["budget_tokens", "budget_ratio"][..]),
            ("[kv_policy]\npolicy = \"retro\"\nwindow = 4\nrefresh_every = 4", &["refresh_every", "= 4", "5..=256", "window, 4"][..]),
            ("[kv_policy]\npolicy = \"retro\"\nrefresh_every = 1000", &["refresh_every", "1000", "3..=256"][..]),
            ("[kv_policy]\nprompt_attention = \"fast\"", &["prompt_attention", "fast", "auto, ours, upstream"][..]),
            ("[kv_policy]\nlinear_rows = \"\"", &["linear_rows", "\"\"", "auto, ours, upstream"][..]),
        ];
        for (text, needles) in cases {
            let msg = err(text);
            for needle in needles {
                assert!(msg.contains(needle), "`{text}` -> `{msg}` lacks `{needle}`");
            }
        }
    }

    #[test]
    fn kernel_choices_resolve_from_the_file_and_show_in_the_startup_line() {
        let file = PolicyFile::parse("[kv_policy]\npolicy = \"quest\"\nprompt_attention = \"upstream\"\nlinear_rows = \"ours\"", "cfg").unwrap();
        let config = file.kv_policy.resolve(16, "cfg").unwrap();
        assert_eq!((config.prompt_attention, config.linear_rows), (KernelChoice::Upstream, KernelChoice::Ours));
        assert!(config.describe().contains("prompt_attention=upstream linear_rows=ours"), "{}", config.describe());
        let defaults = PolicySettings::default().resolve(16, "cfg").unwrap();
        assert_eq!((defaults.prompt_attention, defaults.linear_rows), (KernelChoice::Auto, KernelChoice::Auto));
        for (choice, auto) in [(KernelChoice::Auto, true), (KernelChoice::Auto, false)] {
            assert_eq!(choice.ours(auto), auto);
        }
        assert!(KernelChoice::Ours.ours(false) && !KernelChoice::Upstream.ours(true));
    }

    #[test]
    fn models_entries_match_by_id_and_arch_and_override_the_default() {
        let file = PolicyFile::parse(
            r#"
            [kv_policy]
            policy = "quest"
            budget_tokens = 512
            [[models]]
            model_id = "smollm2"
            arch = "llama"
            [models.kv_policy]
            dense_layers = 3
            [[models]]
            arch = "qwen2"
            [models.kv_policy]
            policy = "full"
            "#,
            "cfg",
        )
        .unwrap();
        let smol = file.settings_for("/m/SmolLM2-135M", Some("llama")).resolve(16, "x").unwrap();
        assert_eq!((smol.kind, smol.budget, smol.dense_layers), (PolicyKind::Quest, Budget::Tokens(512), 3));
        let smol_other_arch = file.settings_for("/m/SmolLM2-135M", Some("mistral")).resolve(16, "x").unwrap();
        assert_eq!(smol_other_arch.dense_layers, DEFAULT_DENSE_LAYERS);
        let qwen = file.settings_for("qwen", Some("QWEN2")).resolve(16, "x").unwrap();
        assert_eq!(qwen.kind, PolicyKind::Full);
    }

    #[test]
    fn an_upstream_from_config_file_with_kv_policy_tables_parses_and_matches() {
        // upstream's examples/cli-config.toml (mistral.rs 0.8.1), with kv_policy tables added.
        let file = PolicyFile::parse(
            r#"
            command = "serve"
            [server]
            host = "0.0.0.0"
            port = 1234
            [runtime]
            max_seqs = 32
            [paged_attn]
            mode = "auto"
            [[models]]
            kind = "auto"
            model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
            [models.quantization]
            in_situ_quant = "4"
            [models.kv_policy]
            policy = "retro"
            window = 4
            [[models]]
            kind = "multimodal"
            model_id = "Qwen/Qwen2-VL-2B-Instruct"
            "#,
            "cfg",
        )
        .unwrap();
        let smol = file.settings_for("models/smollm2-135m-instruct-f32", Some("llama")).resolve(16, "x").unwrap();
        assert_eq!((smol.kind, smol.window), (PolicyKind::Retro, 4));
        let other = file.settings_for("models/qwen2-vl-2b-instruct", None).resolve(16, "x").unwrap();
        assert_eq!(other.kind, PolicyKind::Full, "an entry without kv_policy changes nothing");
        let msg = format!("{:#}", PolicyFile::parse("[[models]]\nmodel_id = \"x\"\nkv_polcy = 1\n", "cfg").unwrap_err());
        assert!(msg.contains("kv_polcy"), "{msg}");
    }

    #[test]
    fn every_shipped_config_file_parses_and_resolves() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let file = PolicyFile::load(&path).unwrap();
                for arch in ["llama", "mistral", "qwen2", "phi3"] {
                    file.settings_for("models/smollm2-135m-instruct-f32", Some(arch))
                        .resolve(16, &path.display().to_string())
                        .unwrap();
                }
                seen += 1;
            }
        }
        assert!(seen >= 5, "only {seen} config files");
    }

    #[test]
    fn budget_pages_round_up_and_keep_first_and_last() {
        assert_eq!(Budget::Tokens(256).pages(10_000, 16), 16);
        assert_eq!(Budget::Tokens(1).pages(10_000, 16), 1);
        assert_eq!(retro_kernels::selected_len(10_000, Budget::Tokens(1).pages(10_000, 16), 16), 2, "first and last page");
        let ratio = Budget::Ratio { ratio: 0.125, min_tokens: 256 };
        assert_eq!(ratio.pages(2048, 16), 16); // max(256, 256) tokens
        assert_eq!(ratio.pages(8192, 16), 64);
    }
}
