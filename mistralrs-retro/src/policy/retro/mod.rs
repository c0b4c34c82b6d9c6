//! `retro`: the sparse engine plus RetroAttention (arXiv 2508.09001), on CPU and CUDA (the output
//! cache's bookkeeping by position is host memory on both; on CUDA its values and the rows'
//! seen-page bitsets live on the device, so a window step reads nothing back, see `cuda.rs`).
//! docs/design.md §3 is the algorithm.
//!
//! The core patch `0003-replay-window` makes every decode step feed each sequence's last w tokens;
//! this policy turns those rows into RetroAttention:
//! - the newest row selects its pages (the Quest plan) and attends to them;
//! - each older row keeps its output in the output cache and is corrected with the selected pages
//!   it has not seen yet (its supplement), merged exactly through the log-sum-exp;
//! - one fused kernel call (`cpu::paged_decode_selected`) loads each page once per (sequence, KV
//!   head) and uses it for every row whose mask bit is set;
//! - the corrected rows flow on through the model, so their K/V slots are rewritten by the next
//!   layers' cache writes, except rows from the dense prefill, whose slots the replay leaves alone.
//!
//! A sequence whose first decode step finds the output-cache pool dry runs as `quest`: its older
//! rows are neither attended for nor written.
//!
//! In the order of a step: `begin_step` decides per sequence (blocks taken, rows kept) into a
//! [`step::RetroStep`]; each sparse layer runs [`window`] (host) or `cuda` (device) and updates the
//! [`output_cache`] through [`row_values`].

#[cfg(feature = "cuda")]
mod cuda;
pub mod output_cache;
mod row_values;
mod step;
#[cfg(test)]
mod tests;
mod window;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, GatherKv, KvPolicy, StepInfo};
use tracing::{debug, warn};

use output_cache::{OutputCachePool, SequenceState};
pub use output_cache::SequenceNumbers;
use step::RetroStep;

use super::sparse::SparseEngine;
use super::{Metric, PolicyMetrics, PromptAttention};
use crate::config::{Budget, KernelChoice, PolicyKind};

pub struct RetroPolicy {
    engine: SparseEngine,
    window: usize,
    /// Every `refresh_every` decode steps (0: never) the step replays that many tokens densely
    /// ([`Self::decode_refresh`]).
    refresh_every: usize,
    /// Decode steps since the last refresh step.
    steps_since_refresh: AtomicUsize,
    pool: OutputCachePool,
    /// Numbers of finished sequences, by sequence id, when `keep_sequence_numbers` is on (the
    /// quality harness reads exposure per sequence).
    finished: std::sync::Mutex<Option<std::collections::HashMap<usize, output_cache::SequenceNumbers>>>,
    prompt: PromptAttention,
    /// On CUDA: the output cache's values, made at the first sparse window step (see `cuda.rs`).
    #[cfg(feature = "cuda")]
    device_cache: Mutex<Option<Arc<cuda::DeviceOutputCache>>>,
    /// The step the engine announced last (`begin_step`).
    step: Mutex<Option<Arc<RetroStep>>>,
}

impl RetroPolicy {
    pub fn new(budget: Budget, dense_layers: usize, window: usize, output_cache_blocks: usize) -> Self {
        Self {
            engine: SparseEngine::new(budget, dense_layers),
            window,
            refresh_every: 0,
            steps_since_refresh: AtomicUsize::new(0),
            pool: OutputCachePool::new(output_cache_blocks, window),
            finished: std::sync::Mutex::new(None),
            prompt: PromptAttention::new(PolicyKind::Retro, KernelChoice::Auto),
            #[cfg(feature = "cuda")]
            device_cache: Mutex::new(None),
            step: Mutex::new(None),
        }
    }

    /// Refresh every `every` decode steps (0: never; else it must exceed the window, which
    /// `PolicySettings::resolve` checks for the server).
    pub fn with_refresh(mut self, every: usize) -> Self {
        assert!(every == 0 || every > self.window, "refresh_every {every} must exceed the window {}", self.window);
        self.refresh_every = every;
        self
    }

    pub fn with_prompt_attention(mut self, choice: KernelChoice) -> Self {
        self.prompt = PromptAttention::new(PolicyKind::Retro, choice);
        self
    }

    /// The sparse engine underneath (page plan, budgets per sequence, reads per sequence).
    pub fn engine(&self) -> &SparseEngine {
        &self.engine
    }

    /// Keep each finished sequence's numbers for [`Self::sequence_numbers`].
    pub fn keep_sequence_numbers(&self) {
        self.finished.lock().expect("lock poisoned").get_or_insert_with(Default::default);
    }

    /// A finished sequence's numbers (exposure, supplement pages), if kept.
    pub fn sequence_numbers(&self, seq_id: usize) -> Option<output_cache::SequenceNumbers> {
        self.finished.lock().expect("lock poisoned").as_ref()?.get(&seq_id).copied()
    }

    /// The step the engine announced: what retro decided for it at `begin_step`.
    fn begin_retro_step(&self, info: &StepInfo<'_>) -> Result<()> {
        let keep = if info.is_prompt {
            self.track_prompt(info);
            None
        } else if info.rows > 0 {
            if self.is_refresh(info.rows) {
                self.steps_since_refresh.store(0, Ordering::Relaxed);
            } else {
                self.steps_since_refresh.fetch_add(1, Ordering::Relaxed);
            }
            self.track_decode(info)?
        } else {
            None
        };
        *self.step.lock().expect("lock poisoned") = Some(Arc::new(RetroStep::new(info.step, keep)));
        Ok(())
    }

    /// The announced step `batch` belongs to.
    fn current_step(&self, batch: &BatchInfo<'_>) -> Result<Arc<RetroStep>> {
        match &*self.step.lock().expect("lock poisoned") {
            Some(step) if step.step == batch.step => Ok(step.clone()),
            _ => candle_core::bail!("kv-policy=retro: step {} was not announced (begin_step)", batch.step),
        }
    }

    /// A prompt step records how much of each sequence is dense (its output cache starts over).
    fn track_prompt(&self, info: &StepInfo<'_>) {
        let mut inner = self.pool.lock();
        for (&seq_id, &len) in info.seq_ids.iter().zip(info.seq_context_lens) {
            self.settle_numbers(&mut inner, seq_id);
            if let Some(old) = self.pool.release(&mut inner, seq_id) {
                debug!("kv-policy=retro: sequence {seq_id} prefilled again; its output cache starts over ({:?})", old.numbers);
            }
            inner.sequences.insert(
                seq_id,
                SequenceState { dense_kv_len: len, decoding: false, block: None, numbers: Default::default() },
            );
        }
    }

    /// A sequence's first decode step takes its output-cache block. Returns, per batch row, whether
    /// the row's K/V write is kept (`None`: every row's).
    fn track_decode(&self, info: &StepInfo<'_>) -> Result<Option<Vec<bool>>> {
        let mut inner = self.pool.lock();
        let layers = self.engine.backend()?.num_layers();
        let rows = info.rows;
        let rows_total = rows * info.seq_ids.len();
        let mut keep = None::<Vec<bool>>;
        for (seq, (&seq_id, &len)) in info.seq_ids.iter().zip(info.seq_context_lens).enumerate() {
            if !inner.sequences.get(&seq_id).is_some_and(|s| s.decoding) {
                let block = if self.window > 1 { self.pool.take(&mut inner, layers) } else { None };
                if block.is_none() && self.window > 1 {
                    self.pool.totals.degraded_sequences.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        "kv-policy=retro: output-cache pool is dry ({} blocks in use); sequence {seq_id} runs as quest",
                        self.pool.capacity()
                    );
                }
                let state = inner.sequences.entry(seq_id).or_insert_with(|| SequenceState {
                    // Never saw its prompt (cannot happen through the engine): treat it all as dense.
                    dense_kv_len: len.saturating_sub(1),
                    decoding: false,
                    block: None,
                    numbers: Default::default(),
                });
                state.decoding = true;
                state.block = block;
            }
            // A refresh step rewrites every decoded row, block or not.
            if rows > 1 && !self.is_refresh(rows) && inner.sequences[&seq_id].block.is_none() {
                let keep = keep.get_or_insert_with(|| vec![true; rows_total]);
                keep[seq * rows..seq * rows + rows - 1].fill(false);
            }
        }
        Ok(keep)
    }

    /// Before a sequence's state goes: on CUDA, what its rows saw is on the device; bring the open
    /// rows' bitsets and the block's counters to the host so its numbers are complete.
    fn settle_numbers(&self, inner: &mut output_cache::PoolInner, seq_id: usize) {
        #[cfg(feature = "cuda")]
        {
            let cache = self.device_cache.lock().expect("lock poisoned").clone();
            let Some(cache) = cache else { return };
            let Some(state) = inner.sequences.get_mut(&seq_id) else { return };
            let Some(block) = state.block.as_mut() else { return };
            let kv_heads = cache.kv_heads();
            let settled = (|| -> Result<()> {
                let open: Vec<(usize, u32)> = (0..block.row_slots())
                    .filter(|&i| block.at(i).pos.is_some() && !block.at(i).seen_all)
                    .map(|i| (i, (block.id() * block.row_slots() + i) as u32))
                    .collect();
                let (bits, words) = cache.seen_rows(&open.iter().map(|&(_, r)| r).collect::<Vec<_>>())?;
                for ((i, _), bits) in open.iter().zip(&bits) {
                    block.at_mut(*i).set_seen_words32(kv_heads, words, bits);
                }
                let (supplements, seen) = cache.take_counters(block.id())?;
                state.numbers.supplement_pages += supplements;
                state.numbers.exposure_seen += seen;
                Ok(())
            })();
            if let Err(e) = settled {
                // At process exit the engine frees its sequences after CUDA has shut down: the
                // counts are gone with the process, nothing a user can act on.
                if e.to_string().contains("CUDA_ERROR_DEINITIALIZED") {
                    debug!("kv-policy=retro: sequence {seq_id} freed after the device shut down: {e}");
                    return;
                }
                warn!("kv-policy=retro: sequence {seq_id}: could not read its exposure counts from the device: {e}");
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = (inner, seq_id);
    }

    /// Whether this step is a refresh step: only those replay more rows than the window.
    fn is_refresh(&self, rows: usize) -> bool {
        self.refresh_every > 0 && rows > self.window
    }
}

impl RetroPolicy {
    fn decode_attention_rows(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, rows: usize) -> Result<Option<Tensor>> {
        match batch.layer {
            _ if self.is_refresh(rows) => self.decode_refresh(batch, attn, rows),
            Some(layer) if layer >= self.engine.dense_layers && rows > 1 => {
                self.decode_window(batch, attn, layer, rows).map(Some)
            }
            // Dense layers recompute every row exactly; a window of one is plain quest.
            Some(layer) if layer >= self.engine.dense_layers => self.engine.decode_selected(batch, attn, layer).map(Some),
            _ => self.engine.decode_dense(batch, attn),
        }
    }
}

#[cfg(test)]
impl RetroPolicy {
    pub(super) fn pool_totals(&self) -> &output_cache::PoolTotals {
        &self.pool.totals
    }
}

impl KvPolicy for RetroPolicy {
    fn name(&self) -> &str {
        "retro"
    }

    fn provides_cpu_kernels(&self) -> bool {
        true
    }

    fn replay_window(&self) -> usize {
        // Asked once per decode step's inputs (and by trims, which only compare it with 1).
        if self.refresh_every > 0 && self.steps_since_refresh.load(Ordering::Relaxed) + 1 >= self.refresh_every {
            self.refresh_every
        } else {
            self.window
        }
    }

    fn dense_kv_len(&self, seq_id: usize) -> usize {
        // Unknown sequences (none reach here through the engine) keep every slot.
        self.pool.lock().sequences.get(&seq_id).map_or(usize::MAX, |s| s.dense_kv_len)
    }

    fn ragged_decode(&self) -> bool {
        true
    }

    fn cache_allocated(&self, alloc: &CacheAllocation<'_>) -> Result<()> {
        self.engine.cache_allocated(alloc, self.name())?;
        if let Some((key_cache, _)) = alloc.caches.first() {
            tracing::info!("{}", self.prompt.describe(key_cache.device()));
        }
        Ok(())
    }

    fn begin_step(&self, step: &StepInfo<'_>) -> Result<()> {
        super::step_began(step);
        self.engine.begin_step(step)?;
        self.begin_retro_step(step)
    }

    fn write_kv(&self, batch: &BatchInfo<'_>, write: &CacheWrite<'_>) -> Result<bool> {
        super::step_timing::cache_written(batch, write.key_cache.device())?;
        if !batch.is_prompt && super::trace::enabled() {
            super::trace::rows("key", batch.layer.unwrap_or(0), write.key)?;
            super::trace::rows("value", batch.layer.unwrap_or(0), write.value)?;
        }
        // Sequences running as quest keep their older rows' K/V as they are.
        let filtered = match batch.layer {
            Some(_) => self.current_step(batch)?.slot_mapping(write.slot_mapping)?,
            None => None,
        };
        let write = match &filtered {
            Some(slot_mapping) => CacheWrite { slot_mapping, ..*write },
            None => CacheWrite { ..*write },
        };
        self.engine.write_kv(batch, &write)?;
        Ok(true)
    }

    fn decode_attention(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>) -> Result<Option<Tensor>> {
        let rows = attn.query.dim(0)? / attn.context_lens.dim(0)?.max(1);
        let out = self.decode_attention_rows(batch, attn, rows)?;
        if super::trace::enabled() {
            let layer = batch.layer.unwrap_or(0);
            super::trace::rows("query", layer, attn.query)?;
            if let Err(e) = super::trace::reference(layer, attn, batch.seq_context_lens) {
                eprintln!("trace reference failed: {e}");
            }
            if let Some(out) = &out {
                super::trace::rows("out", layer, out)?;
            }
        }
        Ok(out)
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

    fn sequence_preempted(&self, seq_id: usize) {
        super::note_preempted(seq_id);
    }

    fn sequence_freed(&self, seq_id: usize) {
        super::note_freed(seq_id);
        let mut inner = self.pool.lock();
        self.settle_numbers(&mut inner, seq_id);
        if let Some(state) = self.pool.release(&mut inner, seq_id) {
            let n = state.numbers;
            if let Some(kept) = self.finished.lock().expect("lock poisoned").as_mut() {
                kept.insert(seq_id, n);
            }
            debug!(
                "kv-policy=retro: sequence {seq_id} done: {} pages loaded, {} supplement pages, exposure {}",
                n.pages_loaded,
                n.supplement_pages,
                n.exposure().map_or("n/a".into(), |e| format!("{e:.3}"))
            );
        }
    }

    fn sequence_trimmed(&self, seq_id: usize, num_tokens: usize) {
        if let Some(state) = self.pool.lock().sequences.get_mut(&seq_id) {
            state.dense_kv_len = state.dense_kv_len.min(num_tokens);
            if let Some(block) = state.block.as_mut() {
                block.forget_from(num_tokens);
            }
        }
    }
}

impl PolicyMetrics for RetroPolicy {
    fn metrics(&self) -> Vec<Metric> {
        let t = &self.pool.totals;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        let (seen, own) = (load(&t.exposure_seen), load(&t.exposure_own));
        let mut metrics = self.engine.metrics();
        metrics.extend([
            Metric::gauge("retro_window", "RetroAttention window w", self.window as f64),
            Metric::counter("retro_supplement_pages_total", "(row, page, KV head) triples read to correct past rows, finished sequences", load(&t.supplement_pages)),
            Metric::gauge(
                "retro_effective_exposure",
                "Pages a row attended to once its window closed over the pages it selected itself (finished sequences; 0 before any)",
                if own > 0.0 { seen / own } else { 0.0 },
            ),
            Metric::gauge("retro_output_cache_blocks_capacity", "Output-cache blocks in the pool", self.pool.capacity() as f64),
            Metric::gauge("retro_output_cache_blocks_in_use", "Output-cache blocks held by sequences", t.blocks_in_use.load(Ordering::Acquire) as f64),
            Metric::gauge("retro_output_cache_bytes", "Heap bytes of the output-cache blocks created (this process's query heads only)", self.pool.bytes() as f64),
            Metric::counter("retro_degraded_sequences_total", "Sequences that found the pool dry and ran as quest", load(&t.degraded_sequences)),
        ]);
        metrics
    }
}
