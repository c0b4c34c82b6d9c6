//! `quest`: per KV head, the top pages by their key bounds (Quest, ICML 2024): the sparse engine
//! (`super::sparse`) as a policy, on CPU and (feature `cuda`) on CUDA.

use candle_core::{Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, GatherKv, KvPolicy, StepInfo};
use tracing::info;

use super::sparse::SparseEngine;
use super::{Metric, PolicyMetrics, PromptAttention};
use crate::config::{Budget, KernelChoice, PolicyKind};

pub struct QuestPolicy {
    engine: SparseEngine,
    prompt: PromptAttention,
}

impl QuestPolicy {
    pub fn new(budget: Budget, dense_layers: usize) -> Self {
        Self { engine: SparseEngine::new(budget, dense_layers), prompt: PromptAttention::new(PolicyKind::Quest, KernelChoice::Auto) }
    }

    pub fn with_prompt_attention(mut self, choice: KernelChoice) -> Self {
        self.prompt = PromptAttention::new(PolicyKind::Quest, choice);
        self
    }

    /// The engine (budgets per sequence, reads per sequence).
    pub fn engine(&self) -> &SparseEngine {
        &self.engine
    }
}

impl KvPolicy for QuestPolicy {
    fn name(&self) -> &str {
        "quest"
    }

    fn provides_cpu_kernels(&self) -> bool {
        true
    }

    fn cache_allocated(&self, alloc: &CacheAllocation<'_>) -> Result<()> {
        self.engine.cache_allocated(alloc, self.name())?;
        if let Some((key_cache, _)) = alloc.caches.first() {
            info!("{}", self.prompt.describe(key_cache.device()));
        }
        Ok(())
    }

    /// The sparse kernel takes per-sequence context lengths: no length buckets (patch 0004).
    fn ragged_decode(&self) -> bool {
        true
    }

    fn begin_step(&self, step: &StepInfo<'_>) -> Result<()> {
        super::step_began(step);
        self.engine.begin_step(step)
    }

    fn write_kv(&self, batch: &BatchInfo<'_>, write: &CacheWrite<'_>) -> Result<bool> {
        super::step_timing::cache_written(batch, write.key_cache.device())?;
        self.engine.write_kv(batch, write)?;
        Ok(true)
    }

    fn decode_attention(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Option<Tensor>> {
        self.engine.decode(batch, attn)
    }

    fn sequence_freed(&self, seq_id: usize) {
        super::note_freed(seq_id);
        self.engine.sequence_freed(seq_id);
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
        self.engine.gather_kv(gather)
    }
}

impl PolicyMetrics for QuestPolicy {
    fn metrics(&self) -> Vec<Metric> {
        self.engine.metrics()
    }
}
