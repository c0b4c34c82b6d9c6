//! The sparse engine both sparse policies run on (Quest, ICML 2024): page summaries beside the
//! paged cache, per-sequence budgets, page selection and the fused decode, on one [`Backend`] (CPU,
//! or CUDA under the feature `cuda`). `quest` is this engine as a policy; `retro` holds one too,
//! with its window and output cache around it.
//!
//! A decode step, FlashInfer's plan / run split: [`SparseEngine::begin_step`] builds the step once
//! ([`SparseStep`]: lengths, block tables, budgets, device plans); every sparse layer then selects
//! its pages ([`SparseEngine::select`], the plan) and attends to them (the run); dense layers
//! attend to every page ([`SparseEngine::decode_dense`]).

#[cfg(feature = "cuda")]
pub(super) mod cuda;
mod step;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use candle_core::{bail, DType, Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, GatherKv, StepInfo};
use retro_kernels::cpu::{self, pages_read, select_pages, PageSummaries, PlanInputs};
use retro_kernels::PageSelection;
use tracing::{debug, info};

use super::{Metric, PolicyMetrics};
use crate::config::Budget;
pub(crate) use step::SparseStep;

/// Counters since startup, summed over layers and sequences.
#[derive(Debug, Default)]
pub struct SparseStats {
    /// Pages the sparse layers read.
    pub pages_loaded: AtomicU64,
    /// Pages those layers would have read under `full`.
    pub pages_total: AtomicU64,
}

/// Where the page bounds live and the kernels run: beside a CPU cache, or on the device beside a
/// CUDA one.
#[derive(Clone)]
pub(super) enum Backend {
    Cpu(Arc<PageSummaries>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<cuda::DeviceSummaries>),
}

impl Backend {
    pub fn block_size(&self) -> usize {
        match self {
            Self::Cpu(s) => s.block_size,
            #[cfg(feature = "cuda")]
            Self::Cuda(s) => s.block_size,
        }
    }

    pub fn kv_heads(&self) -> usize {
        match self {
            Self::Cpu(s) => s.kv_heads,
            #[cfg(feature = "cuda")]
            Self::Cuda(s) => s.kv_heads,
        }
    }

    pub fn num_layers(&self) -> usize {
        match self {
            Self::Cpu(s) => s.num_layers(),
            #[cfg(feature = "cuda")]
            Self::Cuda(s) => s.num_layers(),
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            Self::Cpu(s) => s.bytes(),
            #[cfg(feature = "cuda")]
            Self::Cuda(s) => s.bytes(),
        }
    }
}

pub struct SparseEngine {
    pub(super) budget: Budget,
    pub(super) dense_layers: usize,
    backend: RwLock<Option<Backend>>,
    /// Budgets that replace `budget` for single sequences (the quality harness, `crate::eval`,
    /// runs several budgets in one batch). Empty when serving.
    sequence_budgets: RwLock<HashMap<usize, Budget>>,
    pub stats: SparseStats,
    /// (page, KV head) pairs each sequence's sparse layers read, once `keep_sequence_reads` is on
    /// (the quality harness compares bytes per step). `None` when serving.
    sequence_reads: Mutex<Option<HashMap<usize, u64>>>,
    /// The decode step running now, built by `begin_step`.
    step: Mutex<Option<Arc<SparseStep>>>,
}

/// One sparse layer's plan: the newest rows' page selection (every row's mask bit set).
pub(crate) struct StepPlan {
    pub block_size: usize,
    pub kv_heads: usize,
    pub selection: PageSelection,
}

impl SparseEngine {
    pub fn new(budget: Budget, dense_layers: usize) -> Self {
        Self {
            budget,
            dense_layers,
            backend: RwLock::new(None),
            sequence_budgets: RwLock::new(HashMap::new()),
            stats: SparseStats::default(),
            sequence_reads: Mutex::new(None),
            step: Mutex::new(None),
        }
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

    pub(super) fn backend(&self) -> Result<Backend> {
        match &*self.backend.read().expect("lock poisoned") {
            Some(b) => Ok(b.clone()),
            None => bail!("sparse policy: the KV cache was not allocated through the policy seam"),
        }
    }

    /// Pages each sequence of the batch may read.
    fn budget_pages(&self, seq_ids: &[usize], context_lens: &[usize], block_size: usize) -> Vec<usize> {
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

    /// A decode step begins: its tables and budgets, built once for every layer.
    pub(super) fn begin_step(&self, info: &StepInfo<'_>) -> Result<()> {
        let step = match (&*self.backend.read().expect("lock poisoned"), info.rows) {
            (Some(backend), rows) if rows > 0 => {
                let budget_pages = self.budget_pages(info.seq_ids, info.seq_context_lens, backend.block_size());
                // Only the host plan reads block tables; on CUDA the kernels take the device's.
                let host_tables = matches!(backend, Backend::Cpu(_));
                Some(Arc::new(SparseStep::new(info, budget_pages, host_tables)))
            }
            _ => None,
        };
        *self.step.lock().expect("lock poisoned") = step;
        Ok(())
    }

    /// The step `batch` belongs to. A call from outside a step the engine announced (a test driving
    /// the policy by hand) gets one built from the call's own tables.
    pub(super) fn step_for(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Arc<SparseStep>> {
        if let Some(step) = &*self.step.lock().expect("lock poisoned") {
            if step.step == batch.step && batch.step != 0 && step.agrees_with(attn)? {
                return Ok(step.clone());
            }
        }
        let backend = self.backend()?;
        let mut step = SparseStep::from_call(batch, attn)?;
        step.budget_pages = self.budget_pages(batch.seq_ids, &step.context_lens, backend.block_size());
        let step = Arc::new(step);
        *self.step.lock().expect("lock poisoned") = Some(step.clone());
        Ok(step)
    }

    /// Select a sparse layer's pages for the step's newest rows (on CUDA read back to the host). A
    /// budget that covers a sequence still goes through plan + run (select_pages keeps every page),
    /// so "budget >= context equals full" tests the sparse path itself.
    pub(super) fn select(&self, step: &SparseStep, attn: &DecodeAttention<'_>, layer: usize) -> Result<StepPlan> {
        super::full::check_supported(attn)?;
        let summaries = match self.backend()? {
            Backend::Cpu(s) => s,
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => {
                let selection = cuda::select_to_host(&d, layer, attn, step)?;
                return Ok(StepPlan { block_size: d.block_size, kv_heads: d.kv_heads, selection });
            }
        };
        let (_, heads, _) = attn.query.dims3()?;
        let queries = attn.query.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let selection = {
            let bounds = summaries.layer(layer);
            select_pages(
                &PlanInputs {
                    queries: &queries,
                    rows: step.rows,
                    heads,
                    context_lens: &step.context_lens,
                    block_tables: &step.block_tables,
                    budget_pages: &step.budget_pages,
                },
                &summaries,
                &bounds,
            )
        };
        Ok(StepPlan { block_size: summaries.block_size, kv_heads: summaries.kv_heads, selection })
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
        if let Backend::Cuda(d) = self.backend()? {
            let step = self.step_for(batch, attn)?;
            let (out, _) = cuda::selected_decode(&d, batch.layer.unwrap_or(0), attn, &step, true)?;
            return Ok(Some(out));
        }
        let _ = batch;
        bail!("sparse policy: no decode kernel for a replay window on {:?}", attn.key_cache.device().location())
    }

    /// Quest's sparse layer: select, then decode every row of each sequence over the selection.
    pub(super) fn decode_selected(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, layer: usize) -> Result<Tensor> {
        let step = self.step_for(batch, attn)?;
        #[cfg(feature = "cuda")]
        if let Backend::Cuda(d) = self.backend()? {
            super::full::check_supported(attn)?;
            let (out, read) = cuda::selected_decode(&d, layer, attn, &step, false)?;
            self.record_pages(layer, read, &step, d.block_size, d.kv_heads);
            return Ok(out);
        }
        let StepPlan { block_size, kv_heads, selection } = self.select(&step, attn, layer)?;
        self.record_pages(layer, pages_read(&selection) as u64, &step, block_size, kv_heads);
        self.count_sequence_reads(batch.seq_ids, |seq| (0..kv_heads).map(|h| selection.list(seq, h).len() as u64).sum());
        let result = cpu::paged_decode_selected(
            attn.query, attn.key_cache, attn.value_cache, attn.block_tables, attn.context_lens,
            &selection, attn.softmax_scale, attn.softcap,
        )?;
        Ok(result.out)
    }

    /// Dense layers attend to everything; the others select pages.
    pub(super) fn decode(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Option<Tensor>> {
        match batch.layer {
            Some(layer) if layer >= self.dense_layers => self.decode_selected(batch, attn, layer).map(Some),
            _ => self.decode_dense(batch, attn),
        }
    }

    /// Count a sparse layer's reads against what full attention would have read.
    pub(super) fn record_pages(&self, layer: usize, loaded: u64, step: &SparseStep, block_size: usize, kv_heads: usize) {
        let total = step.context_lens.iter().map(|c| c.div_ceil(block_size)).sum::<usize>() * kv_heads;
        self.stats.pages_loaded.fetch_add(loaded, Ordering::Relaxed);
        self.stats.pages_total.fetch_add(total as u64, Ordering::Relaxed);
        debug!("sparse layer {layer}: read {loaded} of {total} (page, kv head) pairs");
    }

    /// Page summaries for the cache just allocated (`policy` names the policy in logs and errors).
    pub(super) fn cache_allocated(&self, alloc: &CacheAllocation<'_>, policy: &str) -> Result<()> {
        let Some((key_cache, _)) = alloc.caches.first() else { return Ok(()) };
        let backend = match key_cache.device() {
            candle_core::Device::Cpu => Backend::Cpu(Arc::new(PageSummaries::for_cache(key_cache, alloc.caches.len())?)),
            #[cfg(feature = "cuda")]
            candle_core::Device::Cuda(_) => Backend::Cuda(Arc::new(cuda::DeviceSummaries::for_cache(alloc)?)),
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
            backend.bytes() as f64 / 1e6
        );
        *self.backend.write().expect("lock poisoned") = Some(backend);
        Ok(())
    }

    /// Write K/V into the cache and refresh the bounds of every page written.
    pub(super) fn write_kv(&self, batch: &BatchInfo<'_>, write: &CacheWrite<'_>) -> Result<()> {
        match self.backend()? {
            Backend::Cpu(summaries) => {
                cpu::write_kv(write.key, write.value, write.key_cache, write.value_cache, write.slot_mapping)?;
                if let Some(layer) = batch.layer {
                    summaries.refresh_written(layer, write.key_cache, write.slot_mapping)?;
                }
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(d) => d.write(batch.layer, write)?,
        }
        Ok(())
    }

    /// Prefix-cache gathers read whole sequences: on CUDA, upstream's kernel.
    pub(super) fn gather_kv(&self, gather: &GatherKv<'_>) -> Result<Option<(Tensor, Tensor)>> {
        if !gather.key_cache.device().is_cpu() {
            return Ok(None);
        }
        cpu::gather_kv(gather.key_cache, gather.value_cache, gather.block_tables, gather.cu_seqlens_kv, gather.out_dtype)
            .map(Some)
    }

    pub(super) fn sequence_freed(&self, seq_id: usize) {
        self.sequence_budgets.write().expect("lock poisoned").remove(&seq_id);
    }
}

impl PolicyMetrics for SparseEngine {
    fn metrics(&self) -> Vec<Metric> {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64;
        let backend = self.backend.read().expect("lock poisoned").clone();
        let (kv_heads, summary_bytes) = backend.map_or((0.0, 0.0), |s| (s.kv_heads() as f64, s.bytes() as f64));
        vec![
            Metric::counter("pages_loaded_total", "(page, KV head) pairs the sparse layers read", load(&self.stats.pages_loaded)),
            Metric::counter("pages_full_total", "(page, KV head) pairs full attention would have read in those layers", load(&self.stats.pages_total)),
            Metric::gauge("cache_kv_heads", "KV heads per layer in this process's paged cache (a tensor-parallel rank's share)", kv_heads),
            Metric::gauge("page_summary_bytes", "Bytes of the page summaries (per-page key bounds) this process keeps", summary_bytes),
        ]
    }
}
