//! `quest`: per KV head, the top pages by their key bounds (Quest, ICML 2024), on CPU and (feature
//! `cuda`) on CUDA through `device.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use candle_core::{bail, DType, Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, GatherKv, KvPolicy};
use tracing::{debug, info};

use retro_kernels::cpu::{pages_read, select_pages, PageSummaries, PlanInputs};
use super::PromptAttention;
use crate::config::{Budget, KernelChoice, PolicyKind};
use retro_kernels::{cpu, PageSelection};

/// Counters since startup, summed over layers and sequences.
#[derive(Debug, Default)]
pub struct SparseStats {
    /// Pages the sparse layers read.
    pub pages_loaded: AtomicU64,
    /// Pages those layers would have read under `full`.
    pub pages_total: AtomicU64,
}

pub struct QuestPolicy {
    pub(super) budget: Budget,
    pub(super) dense_layers: usize,
    summaries: RwLock<Option<Summaries>>,
    /// Budgets that replace `budget` for single sequences (the quality harness, `crate::eval`,
    /// runs several budgets in one batch). Empty when serving.
    sequence_budgets: RwLock<HashMap<usize, Budget>>,
    pub stats: SparseStats,
    /// (page, KV head) pairs each sequence's sparse layers read, once `keep_sequence_reads` is on
    /// (the quality harness compares bytes per step; CPU caches only). `None` when serving.
    sequence_reads: std::sync::Mutex<Option<HashMap<usize, u64>>>,
    prompt: PromptAttention,
}

/// Where the page bounds live: beside a CPU cache, or on the device beside a CUDA one.
#[derive(Clone)]
pub(super) enum Summaries {
    Host(Arc<PageSummaries>),
    #[cfg(feature = "cuda")]
    Device(Arc<super::device::DeviceSummaries>),
}

impl Summaries {
    pub fn block_size(&self) -> usize {
        match self {
            Self::Host(s) => s.block_size,
            #[cfg(feature = "cuda")]
            Self::Device(s) => s.block_size,
        }
    }

    pub fn kv_heads(&self) -> usize {
        match self {
            Self::Host(s) => s.kv_heads,
            #[cfg(feature = "cuda")]
            Self::Device(s) => s.kv_heads,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Self::Host(s) => s.num_layers(),
            #[cfg(feature = "cuda")]
            Self::Device(s) => s.num_layers(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::Host(s) => s.bytes(),
            #[cfg(feature = "cuda")]
            Self::Device(s) => s.bytes(),
        }
    }
}

impl QuestPolicy {
    pub fn new(budget: Budget, dense_layers: usize) -> Self {
        Self {
            budget,
            dense_layers,
            summaries: RwLock::new(None),
            sequence_budgets: RwLock::new(HashMap::new()),
            stats: SparseStats::default(),
            sequence_reads: std::sync::Mutex::new(None),
            prompt: PromptAttention::new(PolicyKind::Quest, KernelChoice::Auto),
        }
    }

    pub fn with_prompt_attention(mut self, choice: KernelChoice) -> Self {
        self.prompt = PromptAttention::new(PolicyKind::Quest, choice);
        self
    }

    /// Count the sparse layers' reads per sequence from now on (see [`Self::sequence_reads`]).
    pub fn keep_sequence_reads(&self) {
        self.sequence_reads.lock().expect("lock poisoned").get_or_insert_with(HashMap::new);
    }

    /// (page, KV head) pairs sequence `seq_id`'s sparse layers have read, if counted.
    pub fn sequence_reads(&self, seq_id: usize) -> Option<u64> {
        self.sequence_reads.lock().expect("lock poisoned").as_ref()?.get(&seq_id).copied()
    }

    /// Add `reads(i)` to the count of the batch's i-th sequence, when counting.
    pub(super) fn count_sequence_reads(&self, seq_ids: &[usize], reads: impl Fn(usize) -> u64) {
        if let Some(counts) = self.sequence_reads.lock().expect("lock poisoned").as_mut() {
            for (i, &id) in seq_ids.iter().enumerate() {
                *counts.entry(id).or_default() += reads(i);
            }
        }
    }

    /// Give sequence `seq_id` its own budget (instead of the policy's).
    pub fn set_sequence_budget(&self, seq_id: usize, budget: Budget) {
        self.sequence_budgets.write().expect("lock poisoned").insert(seq_id, budget);
    }

    pub(super) fn summaries(&self) -> Result<Summaries> {
        match &*self.summaries.read().expect("lock poisoned") {
            Some(s) => Ok(s.clone()),
            None => bail!("quest: the KV cache was not allocated through the policy seam"),
        }
    }

    /// Pages each sequence of the batch may read.
    pub(super) fn budget_pages(&self, seq_ids: &[usize], context_lens: &[usize], block_size: usize) -> Vec<usize> {
        let own = self.sequence_budgets.read().expect("lock poisoned");
        context_lens
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let budget = seq_ids.get(i).and_then(|id| own.get(id)).unwrap_or(&self.budget);
                budget.pages(c, block_size)
            })
            .collect()
    }
}

/// One sparse layer's plan: the step's host tables and the newest rows' page selection (every
/// row's mask bit set).
pub(crate) struct StepPlan {
    pub block_size: usize,
    pub kv_heads: usize,
    pub tables: StepTables,
    pub selection: PageSelection,
}

impl QuestPolicy {
    /// Plan a sparse layer's step. A budget that covers a sequence still goes through plan + run
    /// (select_pages keeps every page), so "budget >= context equals full" tests the sparse path itself.
    pub(super) fn plan(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, layer: usize) -> Result<StepPlan> {
        super::full::check_supported(attn)?;
        let summaries = match self.summaries()? {
            Summaries::Host(s) => s,
            #[cfg(feature = "cuda")]
            Summaries::Device(d) => {
                // Host copies of the lengths come with the batch: no read-back of the device tables.
                let tables = StepTables { context_lens: batch.seq_context_lens.to_vec(), block_tables: Vec::new() };
                let budget_pages = self.budget_pages(batch.seq_ids, &tables.context_lens, d.block_size);
                let selection = super::device::select_to_host(&d, layer, attn, &tables.context_lens, &budget_pages)?;
                return Ok(StepPlan { block_size: d.block_size, kv_heads: d.kv_heads, tables, selection });
            }
        };
        let tables = StepTables::read(attn)?;
        let budget_pages = self.budget_pages(batch.seq_ids, &tables.context_lens, summaries.block_size);
        let (rows_total, heads, _) = attn.query.dims3()?;
        let rows = rows_total / tables.context_lens.len();
        let queries = attn.query.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let selection = {
            let bounds = summaries.layer(layer);
            select_pages(
                &PlanInputs {
                    queries: &queries,
                    rows,
                    heads,
                    context_lens: &tables.context_lens,
                    block_tables: &tables.block_tables,
                    budget_pages: &budget_pages,
                },
                &summaries,
                &bounds,
            )
        };
        Ok(StepPlan { block_size: summaries.block_size, kv_heads: summaries.kv_heads, tables, selection })
    }

    /// Attention over every page: the dense layers, on CPU by our kernel; on CUDA by upstream's
    /// when each sequence has one query row, else (a replay window) by ours with every page selected.
    pub(super) fn decode_dense(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Option<Tensor>> {
        if attn.key_cache.device().is_cpu() {
            return super::full::decode_every_page(attn).map(Some);
        }
        if attn.query.dim(0)? == attn.context_lens.dim(0)? {
            #[cfg(feature = "cuda")]
            if super::trace::enabled() {
                // What upstream's kernel will return, against the CPU reference (see trace.rs).
                let upstream = mistralrs_paged_attn::paged_attention(
                    attn.query, None, None, attn.key_cache, attn.value_cache, attn.block_tables, attn.context_lens,
                    None, attn.max_context_len, attn.softmax_scale, attn.softcap.unwrap_or(1.0), None,
                )?;
                super::trace::rows("upstream", batch.layer.unwrap_or(0), &upstream)?;
            }
            return Ok(None);
        }
        #[cfg(feature = "cuda")]
        if let Summaries::Device(d) = self.summaries()? {
            let everything = vec![usize::MAX; batch.seq_context_lens.len()];
            let (out, _) = super::device::selected_decode(&d, batch.layer.unwrap_or(0), attn, batch.seq_context_lens, &everything)?;
            return Ok(Some(out));
        }
        let _ = batch;
        bail!("{}: no decode kernel for a replay window on {:?}", self.name(), attn.key_cache.device().location())
    }

    /// Count a sparse layer's reads against what full attention would have read.
    pub(super) fn record_pages(&self, layer: usize, loaded: u64, tables: &StepTables, block_size: usize, kv_heads: usize) {
        let total = tables.context_lens.iter().map(|c| c.div_ceil(block_size)).sum::<usize>() * kv_heads;
        self.stats.pages_loaded.fetch_add(loaded, Ordering::Relaxed);
        self.stats.pages_total.fetch_add(total as u64, Ordering::Relaxed);
        debug!("sparse layer {layer}: read {loaded} of {total} (page, kv head) pairs");
    }
}

/// Host copies of the decode step's tables.
pub(crate) struct StepTables {
    pub context_lens: Vec<usize>,
    /// Read only where the plan runs on the host (CPU caches).
    pub block_tables: Vec<Vec<u32>>,
}

impl StepTables {
    pub fn read(attn: &DecodeAttention<'_>) -> Result<Self> {
        let context_lens = attn.context_lens.to_vec1::<u32>()?.into_iter().map(|c| c as usize).collect();
        let block_tables = attn.block_tables.to_vec2::<u32>()?;
        Ok(Self { context_lens, block_tables })
    }
}

impl QuestPolicy {
    /// Page summaries for the cache just allocated (`policy` names the policy in logs and errors:
    /// retro allocates through this too).
    pub(super) fn cache_allocated_for(&self, alloc: &CacheAllocation<'_>, policy: &str) -> Result<()> {
        let Some((key_cache, _)) = alloc.caches.first() else { return Ok(()) };
        let summaries = match key_cache.device() {
            candle_core::Device::Cpu => Summaries::Host(Arc::new(PageSummaries::for_cache(key_cache, alloc.caches.len())?)),
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(_) => Summaries::Device(Arc::new(super::device::DeviceSummaries::for_cache(alloc)?)),
            other => bail!(
                "kv-policy={policy} has no kernels for {:?} in this build (CPU{}); use --cpu or --kv-policy full",
                other.location(),
                if cfg!(feature = "cuda") { " and CUDA" } else { " only" }
            ),
        };
        info!(
            "kv-policy={policy}: paged KV cache on {:?}: {} layers, {} blocks of {} tokens, {:?}; page summaries {:.1} MB",
            key_cache.device().location(),
            alloc.caches.len(),
            alloc.num_blocks,
            alloc.block_size,
            alloc.dtype,
            summaries.bytes() as f64 / 1e6
        );
        *self.summaries.write().expect("lock poisoned") = Some(summaries);
        Ok(())
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
        self.cache_allocated_for(alloc, self.name())?;
        if let Some((key_cache, _)) = alloc.caches.first() {
            info!("{}", self.prompt.describe(key_cache.device()));
        }
        Ok(())
    }

    /// The sparse kernel takes per-sequence context lengths: no length buckets (patch 0004).
    fn ragged_decode(&self) -> bool {
        true
    }

    fn write_kv(&self, batch: &BatchInfo<'_>, write: &CacheWrite<'_>) -> Result<bool> {
        super::note_write(batch);
        super::step_timing::cache_written(batch, write.key_cache.device())?;
        match self.summaries()? {
            Summaries::Host(summaries) => {
                cpu::write_kv(write.key, write.value, write.key_cache, write.value_cache, write.slot_mapping)?;
                if let Some(layer) = batch.layer {
                    summaries.refresh_written(layer, write.key_cache, write.slot_mapping)?;
                }
            }
            #[cfg(feature = "cuda")]
            Summaries::Device(d) => d.write(batch.layer, write)?,
        }
        Ok(true)
    }

    fn decode_attention(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Option<Tensor>> {
        if batch.layer.is_none_or(|l| l < self.dense_layers) {
            return self.decode_dense(batch, attn);
        }
        let layer = batch.layer.expect("sparse layers have an index");
        #[cfg(feature = "cuda")]
        if let Summaries::Device(d) = self.summaries()? {
            super::full::check_supported(attn)?;
            let context_lens = batch.seq_context_lens;
            let budget_pages = self.budget_pages(batch.seq_ids, context_lens, d.block_size);
            let (out, read) = super::device::selected_decode(&d, layer, attn, context_lens, &budget_pages)?;
            let tables = StepTables { context_lens: context_lens.to_vec(), block_tables: Vec::new() };
            self.record_pages(layer, read, &tables, d.block_size, d.kv_heads);
            return Ok(Some(out));
        }
        let StepPlan { block_size, kv_heads, tables, selection } = self.plan(batch, attn, layer)?;
        self.record_pages(layer, pages_read(&selection) as u64, &tables, block_size, kv_heads);
        self.count_sequence_reads(batch.seq_ids, |seq| (0..kv_heads).map(|h| selection.list(seq, h).len() as u64).sum());
        let result = cpu::paged_decode_selected(
            attn.query, attn.key_cache, attn.value_cache, attn.block_tables, attn.context_lens,
            &selection, attn.softmax_scale, attn.softcap,
        )?;
        Ok(Some(result.out))
    }

    fn sequence_freed(&self, seq_id: usize) {
        super::note_freed(seq_id);
        self.sequence_budgets.write().expect("lock poisoned").remove(&seq_id);
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

    /// Prefix-cache gathers read whole sequences: on CUDA, upstream's kernel.
    fn gather_kv(&self, _batch: &BatchInfo<'_>, gather: &GatherKv<'_>) -> Result<Option<(Tensor, Tensor)>> {
        if !gather.key_cache.device().is_cpu() {
            return Ok(None);
        }
        cpu::gather_kv(gather.key_cache, gather.value_cache, gather.block_tables, gather.cu_seqlens_kv, gather.out_dtype)
            .map(Some)
    }
}

impl super::PolicyMetrics for QuestPolicy {
    fn metrics(&self) -> Vec<super::Metric> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let summaries = self.summaries.read().expect("lock poisoned").clone();
        let (kv_heads, summary_bytes) = summaries.map_or((0.0, 0.0), |s| (s.kv_heads() as f64, s.bytes() as f64));
        vec![
            super::Metric::counter("pages_loaded_total", "(page, KV head) pairs the sparse layers read", load(&self.stats.pages_loaded)),
            super::Metric::counter("pages_full_total", "(page, KV head) pairs full attention would have read in those layers", load(&self.stats.pages_total)),
            super::Metric::gauge("cache_kv_heads", "KV heads per layer in this process's paged cache (a tensor-parallel rank's share)", kv_heads),
            super::Metric::gauge("page_summary_bytes", "Bytes of the page summaries (per-page key bounds) this process keeps", summary_bytes),
        ]
    }
}
