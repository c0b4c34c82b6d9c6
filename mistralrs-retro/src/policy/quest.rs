//! `quest`: per KV head, the top pages by their key bounds (Quest, ICML 2024), on CPU.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use candle_core::{bail, DType, Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, GatherKv, KvPolicy};
use tracing::{debug, info};

use super::plan::{pages_read, select_pages, PlanInputs};
use super::summaries::PageSummaries;
use crate::config::Budget;
use crate::cpu::{self, PageSelection};

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
    summaries: RwLock<Option<Arc<PageSummaries>>>,
    /// Budgets that replace `budget` for single sequences (the quality harness, `crate::eval`,
    /// runs several budgets in one batch). Empty when serving.
    sequence_budgets: RwLock<HashMap<usize, Budget>>,
    pub stats: SparseStats,
}

impl QuestPolicy {
    pub fn new(budget: Budget, dense_layers: usize) -> Self {
        Self {
            budget,
            dense_layers,
            summaries: RwLock::new(None),
            sequence_budgets: RwLock::new(HashMap::new()),
            stats: SparseStats::default(),
        }
    }

    /// Give sequence `seq_id` its own budget (instead of the policy's).
    pub fn set_sequence_budget(&self, seq_id: usize, budget: Budget) {
        self.sequence_budgets.write().expect("lock poisoned").insert(seq_id, budget);
    }

    pub(super) fn summaries(&self) -> Result<Arc<PageSummaries>> {
        match &*self.summaries.read().expect("lock poisoned") {
            Some(s) => Ok(s.clone()),
            None => bail!("quest: the KV cache was not allocated through the policy seam"),
        }
    }
}

/// One sparse layer's plan: the step's host tables and the newest rows' page selection (every
/// row's mask bit set).
pub(crate) struct StepPlan {
    pub summaries: Arc<PageSummaries>,
    pub tables: StepTables,
    pub selection: PageSelection,
}

impl QuestPolicy {
    /// Plan a sparse layer's step. A budget that covers a sequence still goes through plan + run
    /// (select_pages keeps every page), so "budget >= context equals full" tests the sparse path itself.
    pub(super) fn plan(&self, seq_ids: &[usize], attn: &DecodeAttention<'_>, layer: usize) -> Result<StepPlan> {
        super::full::check_supported(attn)?;
        let summaries = self.summaries()?;
        let tables = StepTables::read(attn)?;
        let budget_pages: Vec<usize> = {
            let own = self.sequence_budgets.read().expect("lock poisoned");
            tables
                .context_lens
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    let budget = seq_ids.get(i).and_then(|id| own.get(id)).unwrap_or(&self.budget);
                    budget.pages(c, summaries.block_size)
                })
                .collect()
        };
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
        Ok(StepPlan { summaries, tables, selection })
    }

    /// Count a sparse layer's reads against what full attention would have read.
    pub(super) fn record_pages(&self, layer: usize, loaded: u64, tables: &StepTables, summaries: &PageSummaries) {
        let total = tables.context_lens.iter().map(|c| c.div_ceil(summaries.block_size)).sum::<usize>() * summaries.kv_heads;
        self.stats.pages_loaded.fetch_add(loaded, Ordering::Relaxed);
        self.stats.pages_total.fetch_add(total as u64, Ordering::Relaxed);
        debug!("sparse layer {layer}: read {loaded} of {total} (page, kv head) pairs");
    }
}

/// Host copies of the decode step's tables.
pub(crate) struct StepTables {
    pub context_lens: Vec<usize>,
    pub block_tables: Vec<Vec<u32>>,
}

impl StepTables {
    pub fn read(attn: &DecodeAttention<'_>) -> Result<Self> {
        let context_lens = attn.context_lens.to_vec1::<u32>()?.into_iter().map(|c| c as usize).collect();
        let block_tables = attn.block_tables.to_vec2::<u32>()?;
        Ok(Self { context_lens, block_tables })
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
        let Some((key_cache, _)) = alloc.caches.first() else { return Ok(()) };
        if !key_cache.device().is_cpu() {
            bail!("kv-policy=quest has CPU kernels only in this build; use --cpu or --kv-policy full");
        }
        let summaries = PageSummaries::for_cache(alloc)?;
        info!(
            "kv-policy=quest: paged KV cache: {} layers, {} blocks of {} tokens, {:?}; page summaries {:.1} MB",
            alloc.caches.len(),
            alloc.num_blocks,
            alloc.block_size,
            alloc.dtype,
            summaries.bytes() as f64 / 1e6
        );
        *self.summaries.write().expect("lock poisoned") = Some(Arc::new(summaries));
        Ok(())
    }

    /// The sparse kernel takes per-sequence context lengths: no length buckets (patch 0004).
    fn ragged_decode(&self) -> bool {
        true
    }

    fn write_kv(&self, batch: &BatchInfo<'_>, write: &CacheWrite<'_>) -> Result<bool> {
        super::note_write(batch);
        cpu::write_kv(write.key, write.value, write.key_cache, write.value_cache, write.slot_mapping)?;
        if let Some(layer) = batch.layer {
            self.summaries()?.refresh_written(layer, write.key_cache, write.slot_mapping)?;
        }
        Ok(true)
    }

    fn decode_attention(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Option<Tensor>> {
        if batch.layer.is_none_or(|l| l < self.dense_layers) {
            return super::full::decode_every_page(attn).map(Some);
        }
        let layer = batch.layer.expect("sparse layers have an index");
        let StepPlan { summaries, tables, selection } = self.plan(batch.seq_ids, attn, layer)?;
        self.record_pages(layer, pages_read(&selection) as u64, &tables, &summaries);
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
        super::cpu_prompt_attention(q, k, v, softmax_scale)
    }

    fn gather_kv(&self, _batch: &BatchInfo<'_>, gather: &GatherKv<'_>) -> Result<Option<(Tensor, Tensor)>> {
        cpu::gather_kv(gather.key_cache, gather.value_cache, gather.block_tables, gather.cu_seqlens_kv, gather.out_dtype)
            .map(Some)
    }
}

impl super::PolicyMetrics for QuestPolicy {
    fn metrics(&self) -> Vec<super::Metric> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let summaries = self.summaries.read().expect("lock poisoned").clone();
        let (kv_heads, summary_bytes) = summaries.map_or((0.0, 0.0), |s| (s.kv_heads as f64, s.bytes() as f64));
        vec![
            super::Metric::counter("pages_loaded_total", "(page, KV head) pairs the sparse layers read", load(&self.stats.pages_loaded)),
            super::Metric::counter("pages_full_total", "(page, KV head) pairs full attention would have read in those layers", load(&self.stats.pages_total)),
            super::Metric::gauge("cache_kv_heads", "KV heads per layer in this process's paged cache (a tensor-parallel rank's share)", kv_heads),
            super::Metric::gauge("page_summary_bytes", "Bytes of the page summaries (per-page key bounds) this process keeps", summary_bytes),
        ]
    }
}
