//! The KV policies this build provides, and the registry that installs one into mistral.rs.
//!
//! Data flow: a [`PolicyConfig`] (from flags and config files, `crate::config`) → [`install`]
//! registers the policy object with mistral.rs's `kv_policy` seam → paged attention calls it for
//! every cache write, decode step and prefix gather. Sparse policies split each decode step into a
//! plan (`retro_kernels::cpu::select_pages` over `PageSummaries`) and a run (`retro_kernels::cpu`).

#[cfg(feature = "cuda")]
mod device;
mod full;
pub mod output_cache;
mod quest;
mod retro;
#[cfg(test)]
mod retro_tests;
mod step_timing;
mod trace;

use std::sync::Arc;

pub use full::FullPolicy;
use mistralrs_core::kv_policy::KvPolicy;
pub use quest::QuestPolicy;
pub use retro::RetroPolicy;

pub use crate::config::{PolicyConfig, PolicyKind};

/// One number a policy reports on `/metrics` (Prometheus text format, prefixed `mistralrs_kv_`).
#[derive(Clone, Debug, PartialEq)]
pub struct Metric {
    pub name: &'static str,
    pub help: &'static str,
    /// `counter` or `gauge`.
    pub kind: &'static str,
    pub value: f64,
}

impl Metric {
    pub fn counter(name: &'static str, help: &'static str, value: f64) -> Self {
        Self { name, help, kind: "counter", value }
    }

    pub fn gauge(name: &'static str, help: &'static str, value: f64) -> Self {
        Self { name, help, kind: "gauge", value }
    }
}

/// Preemptions that threw computed work away: sequences the scheduler preempted after their
/// prefill. (Upstream's prompt bucketing also "preempts" prompts it defers before computing them;
/// those cost nothing and are not counted.) Every policy reports its lifecycle hooks here.
#[derive(Default)]
struct Preemptions {
    prefilled: std::sync::Mutex<std::collections::HashSet<usize>>,
    count: std::sync::atomic::AtomicU64,
}

static PREEMPTIONS: std::sync::LazyLock<Preemptions> = std::sync::LazyLock::new(Preemptions::default);

/// From `write_kv`: a prompt step's sequences now hold computed K/V.
pub(crate) fn note_write(batch: &mistralrs_core::kv_policy::BatchInfo<'_>) {
    if batch.is_prompt && batch.layer == Some(0) {
        PREEMPTIONS.prefilled.lock().expect("lock poisoned").extend(batch.seq_ids.iter().copied());
    }
}

pub(crate) fn note_preempted(seq_id: usize) {
    if PREEMPTIONS.prefilled.lock().expect("lock poisoned").remove(&seq_id) {
        PREEMPTIONS.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

pub(crate) fn note_freed(seq_id: usize) {
    PREEMPTIONS.prefilled.lock().expect("lock poisoned").remove(&seq_id);
}

/// Preemptions of prefilled sequences since startup.
pub fn preemptions() -> u64 {
    PREEMPTIONS.count.load(std::sync::atomic::Ordering::Relaxed)
}

/// The numbers a policy exposes while it serves.
pub trait PolicyMetrics {
    fn metrics(&self) -> Vec<Metric>;
}

/// A policy the server can install and report on.
pub trait ServedPolicy: KvPolicy + PolicyMetrics {}
impl<T: KvPolicy + PolicyMetrics> ServedPolicy for T {}

impl PolicyConfig {
    pub fn build(&self) -> Arc<dyn ServedPolicy> {
        match self.kind {
            PolicyKind::Full => Arc::new(FullPolicy::new()),
            PolicyKind::Quest => Arc::new(QuestPolicy::new(self.budget, self.dense_layers)),
            PolicyKind::Retro => Arc::new(
                RetroPolicy::new(self.budget, self.dense_layers, self.window, self.output_cache_blocks)
                    .with_refresh(self.refresh_every),
            ),
        }
    }
}

/// Every policy's prompt attention (patch 0009's hook) for a batch of prompts with nothing cached:
/// - on CPU, for a batch of one prompt, our tiled causal kernel (`cpu::causal_prompt_attention`)
///   instead of upstream's row-at-a-time loop, for every policy. The result differs from upstream's
///   by float reassociation only. RETRO_CPU_PROMPT_ATTENTION=upstream keeps upstream's, for
///   side-by-side benches.
/// - on CUDA, our tensor-core kernel (`retro_kernels::cuda::causal_prompt_attention`, checked
///   against the CPU's by retro-gpu-check) instead of upstream's SDPA without flash-attn, which
///   materializes the score matrix (a 32K prompt 44 s on the H200 against 3 s, 128K out of reach):
///   for `quest` and `retro` by default, for `full` only with RETRO_CUDA_PROMPT_ATTENTION=1 (so by
///   default `full` stays exactly what upstream produces; `=1` makes long-context runs compare like
///   with like), for none with `=0` ([`cuda_prompt_attention_enabled`]). A batch of prompts (padded
///   at the end, masked causally only) runs prompt by prompt, and the model builds no causal mask for
///   it ([`prompt_attention_replaces_mask`]).
pub(crate) fn prompt_attention(
    kind: PolicyKind,
    q: &candle_core::Tensor,
    k: &candle_core::Tensor,
    v: &candle_core::Tensor,
    softmax_scale: f32,
) -> candle_core::Result<Option<candle_core::Tensor>> {
    #[cfg(not(feature = "cuda"))]
    let _ = kind;
    if q.device().is_cpu() {
        static UPSTREAM: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if q.dim(0)? != 1 || *UPSTREAM.get_or_init(|| std::env::var("RETRO_CPU_PROMPT_ATTENTION").is_ok_and(|v| v == "upstream")) {
            return Ok(None);
        }
        return retro_kernels::cpu::causal_prompt_attention(q, k, v, softmax_scale).map(Some);
    }
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && cuda_prompt_attention_enabled(kind) {
        let d = q.dim(candle_core::D::Minus1)?;
        if matches!(q.dtype(), candle_core::DType::F16 | candle_core::DType::BF16) && matches!(d, 64 | 128) {
            let batch = q.dim(0)?;
            if batch == 1 {
                return retro_kernels::cuda::causal_prompt_attention(q, k, v, softmax_scale).map(Some);
            }
            let one = |t: &candle_core::Tensor, b| t.narrow(0, b, 1);
            let outs = (0..batch)
                .map(|b| retro_kernels::cuda::causal_prompt_attention(&one(q, b)?, &one(k, b)?, &one(v, b)?, softmax_scale))
                .collect::<candle_core::Result<Vec<_>>>()?;
            return candle_core::Tensor::cat(&outs, 0).map(Some);
        }
    }
    Ok(None)
}

/// Patch 0009's question: does [`prompt_attention`] mask every causal prompt on `device` by
/// itself, so the model can skip building the `[n, n]` mask? Only on CUDA where our kernel is on: a
/// 128K prompt's mask is 32 GB and past candle's 32-bit element indexing. (Where our kernel then
/// declines a prompt, f32 or another head size, the hook builds upstream's mask after all.)
pub(crate) fn prompt_attention_replaces_mask(kind: PolicyKind, device: &candle_core::Device) -> bool {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return cuda_prompt_attention_enabled(kind);
    }
    let _ = (kind, device);
    false
}

/// Which prompt attention a policy's CUDA prompts get, in the startup log.
pub(crate) fn log_prompt_attention(policy: &str, device: &candle_core::Device) {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let kind = PolicyKind::from_name(policy).unwrap_or(PolicyKind::Full);
        tracing::info!(
            "kv-policy={policy}: CUDA prompt attention: {}",
            match (cuda_prompt_attention_enabled(kind), kind) {
                (true, PolicyKind::Full) => "ours (tensor-core causal kernel; RETRO_CUDA_PROMPT_ATTENTION=1)",
                (true, _) => "ours (tensor-core causal kernel; RETRO_CUDA_PROMPT_ATTENTION=0 for upstream's)",
                (false, PolicyKind::Full) => "upstream's (RETRO_CUDA_PROMPT_ATTENTION=1 for ours; without flash-attn a 32K prompt takes ~44 s on an H200 and 64K or more fail)",
                (false, _) => "upstream's (RETRO_CUDA_PROMPT_ATTENTION=0)",
            }
        );
    }
    let _ = (policy, device);
}

/// RETRO_CUDA_PROMPT_ATTENTION, read once: see [`prompt_kernel_setting`].
#[cfg(feature = "cuda")]
pub(crate) fn cuda_prompt_attention_enabled(kind: PolicyKind) -> bool {
    static SETTING: std::sync::OnceLock<Option<bool>> = std::sync::OnceLock::new();
    let setting = *SETTING.get_or_init(|| {
        let value = std::env::var("RETRO_CUDA_PROMPT_ATTENTION").ok();
        let setting = prompt_kernel_setting(value.as_deref());
        if let (Some(v), None) = (&value, setting) {
            tracing::warn!("RETRO_CUDA_PROMPT_ATTENTION={v:?} is neither 0 nor 1: ignored (quest and retro use our CUDA prompt kernel, full upstream's)");
        }
        setting
    });
    prompt_kernel_for(kind, setting)
}

/// RETRO_CUDA_PROMPT_ATTENTION's value: `1` our CUDA prompt kernel for every policy, `0` for none,
/// anything else (or unset) `None`: the default of [`prompt_kernel_for`].
#[cfg(any(feature = "cuda", test))]
fn prompt_kernel_setting(value: Option<&str>) -> Option<bool> {
    match value {
        Some("1") => Some(true),
        Some("0") => Some(false),
        _ => None,
    }
}

/// Whether `kind`'s CUDA prompts use our kernel: by default `quest` and `retro` do and `full` keeps
/// upstream's attention (so `full` stays upstream's, bit for bit).
#[cfg(any(feature = "cuda", test))]
fn prompt_kernel_for(kind: PolicyKind, setting: Option<bool>) -> bool {
    setting.unwrap_or(kind != PolicyKind::Full)
}

/// Largest row count of a CPU linear layer computed row by row under the sparse policies: above
/// it gemm's packed path is as fast (measured on SmolLM2-135M's shapes, see patches/README.md).
const CPU_ROW_SPLIT_LIMIT: usize = 8;

/// Set how linear layers treat the few rows per sequence of a policy about to run. Sparse decode
/// steps feed 1..=window rows per sequence through every linear layer:
/// - on CPU gemm's packed path makes 2..8-row products several times slower than the one-row path,
///   so those run row by row (patch mistralrs-quant/0001; RETRO_CPU_ROW_SPLIT_LIMIT overrides the
///   limit, 0 = upstream's single matmul);
/// - on CUDA upstream multiplies `[batch, rows, k]` as `batch` products against a broadcast weight,
///   reading the weights once per sequence, so the batch's rows are folded into one matrix (patch
///   mistralrs-quant/0004; RETRO_CUDA_FOLD_BATCH_ROWS=0 turns it off).
/// `full` keeps upstream's arithmetic. The overrides are for side-by-side benches.
pub fn set_linear_paths_for(kind: PolicyKind) {
    let limit = match std::env::var("RETRO_CPU_ROW_SPLIT_LIMIT").ok().and_then(|v| v.parse().ok()) {
        Some(limit) => limit,
        None if kind == PolicyKind::Full => 0,
        None => CPU_ROW_SPLIT_LIMIT,
    };
    mistralrs_quant::set_cpu_row_split_limit(limit);
    let fold = kind != PolicyKind::Full && std::env::var("RETRO_CUDA_FOLD_BATCH_ROWS").map_or(true, |v| v != "0");
    mistralrs_quant::set_cuda_fold_batch_rows(fold);
}

/// The policy `config` selects, with the linear layers' paths set for it. The engine registers it
/// with mistral.rs (`server::build_engine`) before the model and its KV cache load.
pub fn build(config: &PolicyConfig) -> Arc<dyn ServedPolicy> {
    set_linear_paths_for(config.kind);
    config.build()
}

#[cfg(test)]
mod prompt_kernel_tests {
    use super::{prompt_kernel_for, prompt_kernel_setting, PolicyKind};

    /// RETRO_CUDA_PROMPT_ATTENTION: unset (or a value that is neither 0 nor 1) keeps `full` on
    /// upstream's prompt attention and sends `quest`/`retro` to ours; `1` all to ours; `0` none.
    #[test]
    fn cuda_prompt_kernel_defaults_and_overrides() {
        for (value, full, sparse) in [(None, false, true), (Some("yes"), false, true), (Some(""), false, true), (Some("1"), true, true), (Some("0"), false, false)] {
            let setting = prompt_kernel_setting(value);
            assert_eq!(prompt_kernel_for(PolicyKind::Full, setting), full, "full with {value:?}");
            for kind in [PolicyKind::Quest, PolicyKind::Retro] {
                assert_eq!(prompt_kernel_for(kind, setting), sparse, "{kind:?} with {value:?}");
            }
        }
    }
}

#[cfg(test)]
mod linear_tests {
    use candle_core::{Device, Tensor};
    use mistralrs_quant::{QuantMethod, QuantMethodConfig, UnquantLinear};

    /// Patch mistralrs-quant/0001: with the limit on, 2..=8-row CPU products (each weight row read
    /// once for all rows) equal one matmul up to float reassociation, bias included; 1 row and
    /// 9 rows take upstream's path.
    #[test]
    fn small_row_linear_products_match_one_matmul() {
        let dev = Device::Cpu;
        let (n, k) = (70, 45);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        mistralrs_quant::set_cpu_row_split_limit(8);
        // f32 only: candle has no CPU matmul for half types, so no CPU model runs them through here.
        let layer = UnquantLinear::new(QuantMethodConfig::Unquantized(candle_nn::Linear::new(w.clone(), Some(b.clone())))).unwrap();
        for m in 1..=9 {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap();
            let got = layer.forward(&x).unwrap();
            assert_eq!(got.dims(), &[1, m, n]);
            let want = x.matmul(&w.t().unwrap().unsqueeze(0).unwrap()).unwrap().broadcast_add(&b).unwrap();
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-4, "{m} rows: max error {err}");
        }
        mistralrs_quant::set_cpu_row_split_limit(0);
    }
}
