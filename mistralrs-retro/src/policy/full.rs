//! `full`: attention over every cached token.
//!
//! On CUDA/Metal it leaves every call to upstream's paged kernels, so GPU behaviour is upstream's
//! byte for byte. On CPU, where upstream has no paged kernels, it runs ours (`retro_kernels::cpu`).

use candle_core::{Result, Tensor};
use mistralrs_core::kv_policy::{
    BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, GatherKv, KvPolicy, StepInfo,
};
use tracing::info;

use retro_kernels::cpu;

use super::PromptAttention;
use crate::config::{KernelChoice, PolicyKind};

#[derive(Debug)]
pub struct FullPolicy {
    prompt: PromptAttention,
}

impl Default for FullPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl FullPolicy {
    pub fn new() -> Self {
        Self { prompt: PromptAttention::new(PolicyKind::Full, KernelChoice::Auto) }
    }

    pub fn with_prompt_attention(self, choice: KernelChoice) -> Self {
        Self { prompt: PromptAttention::new(PolicyKind::Full, choice) }
    }
}

/// Our CPU kernels implement scale and softcap; refuse what they do not, rather than ignore it.
pub(super) fn check_supported(attn: &DecodeAttention<'_>) -> Result<()> {
    if attn.alibi_slopes.is_some() {
        candle_core::bail!("CPU paged attention does not support ALiBi slopes");
    }
    if attn.sinks.is_some() {
        candle_core::bail!("CPU paged attention does not support attention sinks");
    }
    Ok(())
}

/// CPU decode over every cached token: `full`, and the dense layers of the sparse policies.
pub(super) fn decode_every_page(attn: &DecodeAttention<'_>) -> Result<Tensor> {
    check_supported(attn)?;
    cpu::paged_decode(
        attn.query,
        attn.key_cache,
        attn.value_cache,
        attn.block_tables,
        attn.context_lens,
        attn.softmax_scale,
        attn.softcap,
    )
}

impl KvPolicy for FullPolicy {
    fn name(&self) -> &str {
        "full"
    }

    fn provides_cpu_kernels(&self) -> bool {
        true
    }

    fn cache_allocated(&self, alloc: &CacheAllocation<'_>) -> Result<()> {
        if let Some((key_cache, _)) = alloc.caches.first() {
            info!(
                "kv-policy=full: paged KV cache on {:?}: {} layers, {} blocks of {} tokens, {:?}",
                key_cache.device().location(),
                alloc.caches.len(),
                alloc.num_blocks,
                alloc.block_size,
                alloc.dtype,
            );
            info!("{}", self.prompt.describe(key_cache.device()));
        }
        Ok(())
    }

    fn begin_step(&self, step: &StepInfo<'_>) -> Result<()> {
        super::step_began(step);
        Ok(())
    }

    fn write_kv(&self, batch: &BatchInfo<'_>, write: &CacheWrite<'_>) -> Result<bool> {
        super::step_timing::cache_written(batch, write.key_cache.device())?;
        if !write.key_cache.device().is_cpu() {
            return Ok(false);
        }
        cpu::write_kv(write.key, write.value, write.key_cache, write.value_cache, write.slot_mapping)?;
        Ok(true)
    }

    fn decode_attention(
        &self,
        _batch: &BatchInfo<'_>,
        attn: &DecodeAttention<'_>,
    ) -> Result<Option<Tensor>> {
        if !attn.key_cache.device().is_cpu() {
            return Ok(None);
        }
        decode_every_page(attn).map(Some)
    }

    fn sequence_freed(&self, seq_id: usize) {
        super::note_freed(seq_id);
    }

    fn sequence_preempted(&self, seq_id: usize) {
        super::note_preempted(seq_id);
    }

    fn prompt_attention(&self, q: &Tensor, k: &Tensor, v: &Tensor, softmax_scale: f32) -> Result<Option<Tensor>> {
        self.prompt.attend(q, k, v, softmax_scale)
    }
    fn prompt_attention_replaces_mask(&self, device: &candle_core::Device) -> bool {
        self.prompt.replaces_mask(device)
    }

    fn gather_kv(&self, _batch: &BatchInfo<'_>, gather: &GatherKv<'_>) -> Result<Option<(Tensor, Tensor)>> {
        if !gather.key_cache.device().is_cpu() {
            return Ok(None);
        }
        cpu::gather_kv(
            gather.key_cache,
            gather.value_cache,
            gather.block_tables,
            gather.cu_seqlens_kv,
            gather.out_dtype,
        )
        .map(Some)
    }
}

impl super::PolicyMetrics for FullPolicy {
    fn metrics(&self) -> Vec<super::Metric> {
        Vec::new()
    }
}
