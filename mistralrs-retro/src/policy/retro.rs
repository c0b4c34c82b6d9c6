//! `retro`: Quest plus RetroAttention (arXiv 2508.09001), on CPU and CUDA (the output cache's
//! bookkeeping by position is host memory on both; on CUDA its values and the rows' seen-page
//! bitsets live on the device, so a window step reads nothing back, see `device.rs`).
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

use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, CacheAllocation, CacheWrite, DecodeAttention, GatherKv, KvPolicy};
use tracing::{debug, warn};

use super::output_cache::{OutputCachePool, SequenceState};
use super::quest::{QuestPolicy, StepPlan, StepTables};
use super::{Metric, PolicyMetrics};
use super::PromptAttention;
use crate::config::{Budget, KernelChoice, PolicyKind};
use retro_kernels::{merge_partial, PageSelection};

pub struct RetroPolicy {
    quest: QuestPolicy,
    window: usize,
    /// Every `refresh_every` decode steps (0: never) the step replays that many tokens densely
    /// ([`Self::decode_refresh`]).
    refresh_every: usize,
    /// Decode steps since the last refresh step.
    steps_since_refresh: AtomicUsize,
    pool: OutputCachePool,
    /// Numbers of finished sequences, by sequence id, when `keep_sequence_numbers` is on (the
    /// quality harness reads exposure per sequence).
    finished: std::sync::Mutex<Option<std::collections::HashMap<usize, super::output_cache::SequenceNumbers>>>,
    prompt: PromptAttention,
    /// On CUDA: the output cache's values, made at the first sparse window step (see `device.rs`).
    #[cfg(feature = "cuda")]
    device_cache: std::sync::Mutex<Option<std::sync::Arc<super::device::DeviceOutputCache>>>,
    /// On CUDA: the step's row tables for the masks and the output-cache merge, uploaded by the
    /// first sparse layer and reused by the others.
    #[cfg(feature = "cuda")]
    step_tables: (super::device::UploadedTable, super::device::UploadedTable),
}

/// What a past row of the window needs this step.
#[derive(Clone, Copy, Debug, PartialEq)]
enum PastRow {
    /// The sequence runs as quest (no output-cache block): nothing.
    Skip,
    /// Cached: correct it with the selected pages it has not seen.
    Cached,
    /// A prompt row not cached yet: it attends to everything before it, once.
    Dense,
    /// A generated row not cached (e.g. its sequence was trimmed): it attends to this selection.
    Fresh,
}

impl RetroPolicy {
    pub fn new(budget: Budget, dense_layers: usize, window: usize, output_cache_blocks: usize) -> Self {
        Self {
            quest: QuestPolicy::new(budget, dense_layers),
            window,
            refresh_every: 0,
            steps_since_refresh: AtomicUsize::new(0),
            pool: OutputCachePool::new(output_cache_blocks, window),
            finished: std::sync::Mutex::new(None),
            prompt: PromptAttention::new(PolicyKind::Retro, KernelChoice::Auto),
            #[cfg(feature = "cuda")]
            device_cache: std::sync::Mutex::new(None),
            #[cfg(feature = "cuda")]
            step_tables: Default::default(),
        }
    }

    /// The device-resident output cache for this query shape, unless the cache is on the host.
    #[cfg(feature = "cuda")]
    fn device_output_cache(&self, attn: &DecodeAttention<'_>, layers: usize) -> Result<Option<std::sync::Arc<super::device::DeviceOutputCache>>> {
        if attn.query.device().is_cpu() {
            return Ok(None);
        }
        let (_, heads, head_dim) = attn.query.dims3()?;
        let rows = self.pool.capacity() * layers * self.pool.slots();
        let (kv_heads, blocks) = (self.quest.summaries()?.kv_heads(), self.pool.capacity());
        let mut cache = self.device_cache.lock().expect("lock poisoned");
        match &*cache {
            Some(c) if c.fits(rows, heads, head_dim, kv_heads, blocks) => Ok(Some(c.clone())),
            _ => {
                let made = std::sync::Arc::new(super::device::DeviceOutputCache::new(
                    rows, heads, head_dim, kv_heads, blocks, attn.query.device(),
                )?);
                *cache = Some(made.clone());
                Ok(Some(made))
            }
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

    /// The Quest policy underneath (page plan, budgets).
    pub fn quest(&self) -> &QuestPolicy {
        &self.quest
    }

    /// Keep each finished sequence's numbers for [`Self::sequence_numbers`].
    pub fn keep_sequence_numbers(&self) {
        self.finished.lock().expect("lock poisoned").get_or_insert_with(Default::default);
    }

    /// A finished sequence's numbers (exposure, supplement pages), if kept.
    pub fn sequence_numbers(&self, seq_id: usize) -> Option<super::output_cache::SequenceNumbers> {
        self.finished.lock().expect("lock poisoned").as_ref()?.get(&seq_id).copied()
    }

    /// Prompt steps record how much of each sequence is dense; a sequence's first decode step
    /// takes its output-cache block. Returns, per batch row, whether the row's K/V write is kept.
    fn track_write(&self, batch: &BatchInfo<'_>, rows_total: usize) -> Result<Option<Vec<bool>>> {
        let mut inner = self.pool.lock();
        if batch.is_prompt {
            for (&seq_id, &len) in batch.seq_ids.iter().zip(batch.seq_context_lens) {
                self.settle_numbers(&mut inner, seq_id);
                if let Some(old) = self.pool.release(&mut inner, seq_id) {
                    debug!("kv-policy=retro: sequence {seq_id} prefilled again; its output cache starts over ({:?})", old.numbers);
                }
                inner.sequences.insert(
                    seq_id,
                    SequenceState { dense_kv_len: len, decoding: false, block: None, numbers: Default::default() },
                );
            }
            return Ok(None);
        }
        let layers = self.quest.summaries()?.num_layers();
        let batch_len = batch.seq_ids.len();
        let rows = rows_total.checked_div(batch_len).unwrap_or(1);
        let mut keep = None::<Vec<bool>>;
        for (seq, (&seq_id, &len)) in batch.seq_ids.iter().zip(batch.seq_context_lens).enumerate() {
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

    /// One sparse layer's attention for a window of `rows` rows per sequence.
    fn decode_window(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, layer: usize, rows: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(out) = self.decode_window_on_device(batch, attn, layer, rows)? {
            return Ok(out);
        }
        let StepPlan { block_size, kv_heads, tables, selection: plan } = self.quest.plan(batch, attn, layer)?;
        let batch_len = tables.context_lens.len();

        let mut inner = self.pool.lock();
        // On CUDA the rows' seen pages live on the device: bring the window's cached rows here.
        #[cfg(feature = "cuda")]
        let device_seen = self.device_seen_cache(attn)?;
        #[cfg(feature = "cuda")]
        if let Some(cache) = &device_seen {
            sync_window_seen(cache, &mut inner, batch.seq_ids, &tables.context_lens, layer, rows, (block_size, kv_heads), false)?;
        }
        let past = rows - 1;
        let newest = 1u32 << past;
        let mut kinds = vec![PastRow::Skip; batch_len * past];
        let mut fused = PageSelection::new(kv_heads);
        let mut reads = Vec::with_capacity(batch_len);
        for seq in 0..batch_len {
            let ctx = tables.context_lens[seq];
            let pages = ctx.div_ceil(block_size);
            let first_pos = ctx - rows;
            let state = inner.sequences.get_mut(&batch.seq_ids[seq]);
            let dense_kv_len = state.as_ref().map_or(0, |s| s.dense_kv_len);
            let mut block = state.and_then(|s| s.block.as_mut());
            let kinds = &mut kinds[seq * past..(seq + 1) * past];
            let mut dense_rows = 0u32;
            if let Some(block) = block.as_deref_mut() {
                for (j, kind) in kinds.iter_mut().enumerate() {
                    let pos = first_pos + j;
                    *kind = if block.row(layer, pos).is_some() {
                        PastRow::Cached
                    } else if pos < dense_kv_len {
                        dense_rows |= 1 << j;
                        PastRow::Dense
                    } else {
                        PastRow::Fresh
                    };
                }
            }
            let before = fused.entries.len();
            let mut supplements = 0u64;
            for kv_head in 0..kv_heads {
                let chosen = plan.list(seq, kv_head);
                let mut row_mask = |page: usize| -> u32 {
                    let mut mask = newest;
                    for (j, kind) in kinds.iter().enumerate() {
                        let pos = first_pos + j;
                        if page * block_size > pos {
                            continue;
                        }
                        let unseen = match kind {
                            PastRow::Cached => {
                                let row = block.as_deref_mut().and_then(|b| b.row(layer, pos));
                                !row.is_some_and(|r| r.has_seen(kv_head, page))
                            }
                            PastRow::Fresh => true,
                            PastRow::Skip | PastRow::Dense => false,
                        };
                        if unseen {
                            mask |= 1 << j;
                            supplements += u64::from(*kind == PastRow::Cached);
                        }
                    }
                    mask
                };
                if dense_rows == 0 {
                    for entry in chosen {
                        let mask = row_mask(entry.page as usize);
                        fused.push(entry.page, mask);
                    }
                } else {
                    // Prompt rows read every page once; the selected ones serve the others too.
                    let mut next = chosen.iter().peekable();
                    for page in 0..pages as u32 {
                        let selected = next.next_if(|e| e.page == page).is_some();
                        let mask = dense_rows | if selected { row_mask(page as usize) } else { 0 };
                        fused.push(page, mask);
                    }
                }
                fused.finish_list();
            }
            reads.push((fused.entries.len() - before) as u64);
            if let Some(state) = inner.sequences.get_mut(&batch.seq_ids[seq]) {
                state.numbers.pages_loaded += reads[seq];
                state.numbers.supplement_pages += supplements;
            }
        }
        self.quest.count_sequence_reads(batch.seq_ids, |seq| reads[seq]);

        self.quest.record_pages(layer, fused.entries.len() as u64, &tables, block_size, kv_heads);

        let mut values = self.step_values(attn, &tables, &fused)?;
        for seq in 0..batch_len {
            let ctx = tables.context_lens[seq];
            let pages = ctx.div_ceil(block_size);
            let first_pos = ctx - rows;
            let Some(state) = inner.sequences.get_mut(&batch.seq_ids[seq]) else { continue };
            let Some(block) = state.block.as_mut() else { continue };
            for j in 0..rows {
                let (pos, at) = (first_pos + j, seq * rows + j);
                match if j == past { PastRow::Fresh } else { kinds[seq * past + j] } {
                    PastRow::Skip => {}
                    PastRow::Cached => {
                        let pool_row = block.device_row(layer, pos);
                        let row = block.row(layer, pos).expect("classified as cached");
                        values.merge(at, row, pool_row);
                        mark_selected(row, &plan, seq, kv_heads, pos, block_size);
                    }
                    kind @ (PastRow::Dense | PastRow::Fresh) => {
                        let slot = values.enter(at, block, Some(&mut state.numbers), layer, pos, kv_heads, pages);
                        if kind == PastRow::Dense {
                            slot.seen_all = true;
                        } else {
                            slot.own_pages = mark_selected(slot, &plan, seq, kv_heads, pos, block_size);
                        }
                    }
                }
            }
        }
        #[cfg(feature = "cuda")]
        if let Some(cache) = &device_seen {
            sync_window_seen(cache, &mut inner, batch.seq_ids, &tables.context_lens, layer, rows, (block_size, kv_heads), true)?;
        }
        drop(inner);
        values.finish(attn)
    }

    /// The device output cache when the rows' seen bitsets are kept there (CUDA, values on the
    /// device), else `None`.
    #[cfg(feature = "cuda")]
    fn device_seen_cache(&self, attn: &DecodeAttention<'_>) -> Result<Option<std::sync::Arc<super::device::DeviceOutputCache>>> {
        match self.quest.summaries()? {
            super::quest::Summaries::Device(d) => self.device_output_cache(attn, d.num_layers()),
            _ => Ok(None),
        }
    }

    /// [`Self::decode_window`] with nothing read back (CUDA): the selection, the row masks (from the
    /// rows' seen bitsets on the device) and the decode stay on the device; the host does the
    /// bookkeeping that depends on positions only. `None` (the host path runs) when some row of the
    /// window has no cached entry (a prompt row or a row after a trim: their lists differ).
    #[cfg(feature = "cuda")]
    fn decode_window_on_device(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, layer: usize, rows: usize) -> Result<Option<Tensor>> {
        let super::quest::Summaries::Device(d) = self.quest.summaries()? else { return Ok(None) };
        let Some(cache) = self.device_output_cache(attn, d.num_layers())? else { return Ok(None) };
        let (block_size, kv_heads) = (d.block_size, d.kv_heads);
        let context_lens = batch.seq_context_lens.to_vec();
        let batch_len = context_lens.len();
        let (past, width) = (rows - 1, 2 * rows + 1);
        // Pool rows are written relative to this layer's place in the pool, so every sparse layer of
        // a step builds the same tables and only the first one uploads them.
        let row_offset = layer * self.pool.slots();
        let mut inner = self.pool.lock();
        // Per sequence: past rows' states, every row's pool row, the counter slot, whether the row
        // leaving the window counts toward exposure (retro_row_masks in kernels/cuda/plan.cu).
        let mut meta = vec![0u32; batch_len * width];
        // Per cached row: [pool row, partial row merged into it, partial row replacing it] (merge_step).
        let mut entries: Vec<u32> = Vec::with_capacity(batch_len * past * 3);
        for (seq, &ctx) in context_lens.iter().enumerate() {
            let m = &mut meta[seq * width..(seq + 1) * width];
            m[past..].fill(u32::MAX);
            m[2 * rows] = 0;
            let Some(block) = inner.sequences.get_mut(&batch.seq_ids[seq]).and_then(|s| s.block.as_mut()) else { continue };
            let first_pos = ctx - rows;
            let newest = (block.device_row(layer, ctx - 1) - row_offset) as u32;
            let mut newest_placed = false;
            for j in 0..past {
                let pool_row = (block.device_row(layer, first_pos + j) - row_offset) as u32;
                let Some(row) = block.row(layer, first_pos + j) else { return Ok(None) };
                m[j] = u32::from(!row.seen_all);
                m[past + j] = pool_row;
                let replaced_by = if pool_row == newest && !newest_placed {
                    newest_placed = true;
                    (seq * rows + past) as u32
                } else {
                    u32::MAX
                };
                entries.extend([pool_row, (seq * rows + j) as u32, replaced_by]);
            }
            if !newest_placed {
                entries.extend([newest, u32::MAX, (seq * rows + past) as u32]);
            }
            m[2 * rows - 2] = newest;
            m[2 * rows - 1] = block.id() as u32;
        }
        let budget_pages = self.quest.budget_pages(batch.seq_ids, &context_lens, block_size);
        // Every listed page of the newest row is within its prefix: it marks the whole list.
        let reads: Vec<u64> = context_lens
            .iter()
            .zip(&budget_pages)
            .map(|(&c, &b)| (retro_kernels::selected_len(c, b, block_size) * kv_heads) as u64)
            .collect();
        for (seq, &ctx) in context_lens.iter().enumerate() {
            let Some(state) = inner.sequences.get_mut(&batch.seq_ids[seq]) else { continue };
            state.numbers.pages_loaded += reads[seq];
            let Some(block) = state.block.as_mut() else { continue };
            // The leaving row's own pages are counted here, the pages it saw by the kernel; then
            // the newest row takes its slot.
            meta[seq * width + 2 * rows] = u32::from(state.numbers.close_row_own(block.slot(layer, ctx - 1)));
            let slot = block.slot(layer, ctx - 1);
            slot.reset(ctx - 1, kv_heads, ctx.div_ceil(block_size), &[], &[]);
            slot.own_pages = reads[seq];
        }
        drop(inner);
        self.quest.count_sequence_reads(batch.seq_ids, |seq| reads[seq]);
        let tables = StepTables { context_lens, block_tables: Vec::new() };
        self.quest.record_pages(layer, reads.iter().sum(), &tables, block_size, kv_heads);

        let dev = attn.query.device();
        let meta = self.step_tables.0.get(meta, (batch_len, width), dev)?;
        let entries_len = entries.len() / 3;
        let entries = self.step_tables.1.get(entries, (entries_len, 3), dev)?;
        let (out, lse) = super::device::retro_decode_on_device(&d, layer, attn, &tables.context_lens, &budget_pages, &cache, (&meta, row_offset))?;
        cache.step(&out, &lse, &entries, row_offset).map(Some)
    }

    /// Before a sequence's state goes: on CUDA, what its rows saw is on the device; bring the open
    /// rows' bitsets and the block's counters to the host so its numbers are complete.
    fn settle_numbers(&self, inner: &mut super::output_cache::PoolInner, seq_id: usize) {
        #[cfg(feature = "cuda")]
        {
            let cache = self.device_cache.lock().expect("lock poisoned").clone();
            let Some(cache) = cache else { return };
            let Some(state) = inner.sequences.get_mut(&seq_id) else { return };
            let Some(block) = state.block.as_mut() else { return };
            let kv_heads = cache.kv_heads();
            let settled = (|| -> Result<()> {
                let open: Vec<(usize, u32)> = (0..block.len())
                    .filter(|&i| block.at(i).pos.is_some() && !block.at(i).seen_all)
                    .map(|i| (i, (block.id() * block.len() + i) as u32))
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

    /// This step's partial results, where the output cache's values live: the device cache (CUDA)
    /// or host rows (CPU).
    fn step_values(&self, attn: &DecodeAttention<'_>, tables: &StepTables, fused: &PageSelection) -> Result<RowValues> {
        #[cfg(feature = "cuda")]
        if let super::quest::Summaries::Device(d) = self.quest.summaries()? {
            if let Some(cache) = self.device_output_cache(attn, d.num_layers())? {
                let (out, lse) = super::device::decode_selection_on_device(&d, attn, &tables.context_lens, fused)?;
                return RowValues::device(cache, out, lse);
            }
        }
        // On the CPU: the fused decode over the selection with row masks.
        let _ = tables; // the CPU kernel reads the lengths from `attn`
        let result = retro_kernels::cpu::paged_decode_selected(
            attn.query, attn.key_cache, attn.value_cache, attn.block_tables, attn.context_lens,
            fused, attn.softmax_scale, attn.softcap,
        )?;
        RowValues::host(&result.out, result.lse)
    }

    /// A refresh step (`refresh_every`): every row of the replay attends to every page at every
    /// layer, so the K/V the replay rewrites are what full attention builds over the same tokens (the
    /// drift of older decoded tokens, which the window alone never repairs, is gone). The rows that
    /// stay in the next steps' window enter the output cache as having seen everything.
    fn decode_refresh(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, rows: usize) -> Result<Option<Tensor>> {
        let out = self.quest.decode_dense(batch, attn)?;
        let (Some(dense), Some(layer)) = (&out, batch.layer.filter(|&l| l >= self.quest.dense_layers)) else { return Ok(out) };
        let out = dense.clone();
        let summaries = self.quest.summaries()?;
        let (block_size, kv_heads) = (summaries.block_size(), summaries.kv_heads());
        let tables = StepTables { context_lens: batch.seq_context_lens.to_vec(), block_tables: Vec::new() };
        let reads: Vec<u64> = tables.context_lens.iter().map(|c| (c.div_ceil(block_size) * kv_heads) as u64).collect();
        self.quest.record_pages(layer, reads.iter().sum(), &tables, block_size, kv_heads);
        self.quest.count_sequence_reads(batch.seq_ids, |seq| reads[seq]);
        let stay = (self.window - 1).min(rows);
        let mut inner = self.pool.lock();
        for (seq, &seq_id) in batch.seq_ids.iter().enumerate() {
            if let Some(state) = inner.sequences.get_mut(&seq_id) {
                state.numbers.refresh_pages += reads[seq];
            }
        }
        if stay == 0 {
            return Ok(Some(out));
        }
        let (rows_total, heads, _) = attn.query.dims3()?;
        let lse = Tensor::zeros((rows_total, heads), DType::F32, out.device())?;
        let mut values = RowValues::from_tensors(self, attn, out, lse)?;
        for (seq, &seq_id) in batch.seq_ids.iter().enumerate() {
            let ctx = tables.context_lens[seq];
            let Some(state) = inner.sequences.get_mut(&seq_id) else { continue };
            let Some(block) = state.block.as_mut() else { continue };
            for j in rows - stay..rows {
                let (pos, at) = (ctx - rows + j, seq * rows + j);
                values.enter(at, block, Some(&mut state.numbers), layer, pos, kv_heads, ctx.div_ceil(block_size)).seen_all = true;
            }
        }
        drop(inner);
        values.finish(attn).map(Some)
    }

    /// Whether this step is a refresh step: only those replay more rows than the window.
    fn is_refresh(&self, rows: usize) -> bool {
        self.refresh_every > 0 && rows > self.window
    }
}

/// One sparse layer's partial results and what the output cache does with them: on the host each
/// row is merged or stored as it comes; on the device the rows are collected into one batched call.
enum RowValues {
    Host { out: Vec<f32>, lse: Vec<f32>, shape: (usize, usize, usize) },
    #[cfg(feature = "cuda")]
    Device {
        cache: std::sync::Arc<super::device::DeviceOutputCache>,
        out: Tensor,
        lse: Tensor,
        /// Per pool row: the partial row merged into it / replacing it (-1 none).
        merge: Vec<i64>,
        replace: Vec<i64>,
    },
}

impl RowValues {
    /// `out` [rows, heads, head_dim] and `lse` [rows * heads] on the host.
    fn host(out: &Tensor, lse: Vec<f32>) -> Result<Self> {
        let shape = out.dims3()?;
        Ok(Self::Host { out: out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, lse, shape })
    }

    #[cfg(feature = "cuda")]
    fn device(cache: std::sync::Arc<super::device::DeviceOutputCache>, out: Tensor, lse: Tensor) -> Result<Self> {
        let pool_rows = cache.rows()?;
        Ok(Self::Device { cache, out, lse, merge: vec![-1; pool_rows], replace: vec![-1; pool_rows] })
    }

    /// Where the output cache lives for this query, with `out` [rows, heads, head_dim] and `lse`
    /// [rows, heads] (f32) as the step's partial results.
    fn from_tensors(retro: &RetroPolicy, attn: &DecodeAttention<'_>, out: Tensor, lse: Tensor) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Some(cache) = retro.device_output_cache(attn, retro.quest.summaries()?.num_layers())? {
            return Self::device(cache, out, lse);
        }
        let _ = (retro, attn);
        Self::host(&out, lse.flatten_all()?.to_vec1::<f32>()?)
    }

    /// A cached row absorbs its partial result (merged exactly through the log-sum-exp); the step
    /// outputs the corrected row.
    fn merge(&mut self, at: usize, row: &mut super::output_cache::RowEntry, pool_row: usize) {
        match self {
            Self::Host { out, lse, shape: (_, heads, head_dim) } => {
                let (heads, head_dim) = (*heads, *head_dim);
                let row_len = heads * head_dim;
                let (o, l) = (&mut out[at * row_len..(at + 1) * row_len], &lse[at * heads..(at + 1) * heads]);
                for h in 0..heads {
                    let span = h * head_dim..(h + 1) * head_dim;
                    merge_partial(&mut row.out[span.clone()], &mut row.lse[h], &o[span], l[h]);
                }
                o.copy_from_slice(&row.out);
            }
            #[cfg(feature = "cuda")]
            Self::Device { merge, .. } => {
                let _ = row; // its values are the device cache's row `pool_row`
                merge[pool_row] = at as i64;
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = pool_row;
    }

    /// Row `at` (position `pos`) enters the window with this step's result, having seen nothing
    /// yet; the entry its slot held has left the window (its exposure is counted). Returns the slot.
    #[allow(clippy::too_many_arguments)]
    fn enter<'b>(
        &mut self,
        at: usize,
        block: &'b mut super::output_cache::OutputCacheBlock,
        numbers: Option<&mut super::output_cache::SequenceNumbers>,
        layer: usize,
        pos: usize,
        kv_heads: usize,
        pages: usize,
    ) -> &'b mut super::output_cache::RowEntry {
        let pool_row = block.device_row(layer, pos);
        let slot = block.slot(layer, pos);
        // `None`: the caller has counted the leaving row already.
        if let Some(numbers) = numbers {
            numbers.close_row(slot);
        }
        match self {
            Self::Host { out, lse, shape: (_, heads, head_dim) } => {
                let row_len = *heads * *head_dim;
                slot.reset(pos, kv_heads, pages, &out[at * row_len..(at + 1) * row_len], &lse[at * *heads..(at + 1) * *heads]);
            }
            #[cfg(feature = "cuda")]
            Self::Device { replace, .. } => {
                replace[pool_row] = at as i64;
                slot.reset(pos, kv_heads, pages, &[], &[]);
            }
        }
        #[cfg(not(feature = "cuda"))]
        let _ = pool_row;
        slot
    }

    /// The layer's attention output, in the query's dtype.
    fn finish(self, attn: &DecodeAttention<'_>) -> Result<Tensor> {
        match self {
            Self::Host { out, shape, .. } => Tensor::from_vec(out, shape, attn.query.device())?.to_dtype(attn.query.dtype()),
            #[cfg(feature = "cuda")]
            Self::Device { cache, out, lse, merge, replace } => {
                let code = |r: i64| if r < 0 { u32::MAX } else { r as u32 };
                let entries: Vec<u32> = merge
                    .iter()
                    .zip(&replace)
                    .enumerate()
                    .filter(|(_, (&m, &r))| m >= 0 || r >= 0)
                    .flat_map(|(row, (&m, &r))| [row as u32, code(m), code(r)])
                    .collect();
                let k = entries.len() / 3;
                cache.step(&out, &lse, &Tensor::from_vec(entries, (k, 3), out.device())?, 0)
            }
        }
    }
}

impl RetroPolicy {
    fn decode_attention_rows(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, rows: usize) -> Result<Option<Tensor>> {
        match batch.layer {
            _ if self.is_refresh(rows) => self.decode_refresh(batch, attn, rows),
            Some(layer) if layer >= self.quest.dense_layers && rows > 1 => {
                self.decode_window(batch, attn, layer, rows).map(Some)
            }
            // Dense layers recompute every row exactly; a window of one is plain quest.
            Some(layer) if layer >= self.quest.dense_layers => self.quest.decode_attention(batch, attn),
            _ => self.quest.decode_dense(batch, attn),
        }
    }
}

#[cfg(test)]
impl RetroPolicy {
    pub(super) fn pool_totals(&self) -> &super::output_cache::PoolTotals {
        &self.pool.totals
    }
}

/// Mark the plan's pages up to the row's own page as seen; returns how many were marked.
fn mark_selected(
    row: &mut super::output_cache::RowEntry,
    plan: &PageSelection,
    seq: usize,
    kv_heads: usize,
    pos: usize,
    block_size: usize,
) -> u64 {
    let mut marked = 0;
    for kv_head in 0..kv_heads {
        for entry in plan.list(seq, kv_head).iter().filter(|e| e.page as usize * block_size <= pos) {
            row.mark_seen(kv_head, entry.page as usize);
            marked += 1;
        }
    }
    marked
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
        self.quest.cache_allocated_for(alloc, self.name())?;
        if let Some((key_cache, _)) = alloc.caches.first() {
            tracing::info!("{}", self.prompt.describe(key_cache.device()));
        }
        Ok(())
    }

    fn write_kv(&self, batch: &BatchInfo<'_>, write: &CacheWrite<'_>) -> Result<bool> {
        let rows_total = write.slot_mapping.dim(0)?;
        if !batch.is_prompt {
            if batch.layer == Some(0) {
                super::trace::next_step();
                if self.is_refresh(rows_total / batch.seq_ids.len().max(1)) {
                    self.steps_since_refresh.store(0, Ordering::Relaxed);
                } else {
                    self.steps_since_refresh.fetch_add(1, Ordering::Relaxed);
                }
            }
            if super::trace::enabled() {
                super::trace::rows("key", batch.layer.unwrap_or(0), write.key)?;
                super::trace::rows("value", batch.layer.unwrap_or(0), write.value)?;
            }
        }
        // The prompt is recorded once per step (layer 0); decode steps need the row filter at every layer.
        let keep = match batch.layer {
            Some(layer) if layer == 0 || !batch.is_prompt => self.track_write(batch, rows_total)?,
            _ => None,
        };
        let Some(keep) = keep else { return self.quest.write_kv(batch, write) };
        // Sequences running as quest keep their older rows' K/V as they are.
        let slots: Vec<i64> = write
            .slot_mapping
            .to_dtype(DType::I64)?
            .to_vec1::<i64>()?
            .into_iter()
            .zip(&keep)
            .map(|(slot, &keep)| if keep { slot } else { -1 })
            .collect();
        let slot_mapping = Tensor::from_vec(slots, rows_total, write.slot_mapping.device())?;
        self.quest.write_kv(batch, &CacheWrite { slot_mapping: &slot_mapping, ..*write })
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

    fn gather_kv(&self, batch: &BatchInfo<'_>, gather: &GatherKv<'_>) -> Result<Option<(Tensor, Tensor)>> {
        self.quest.gather_kv(batch, gather)
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

/// The host path's side of the device bitsets (CUDA): before the host builds a step's masks
/// (`upload == false`), copy the window's cached rows' bitsets from the device into their entries;
/// after it (`upload == true`), copy every row of the window back, so whichever path runs next sees
/// the same sets. Rows that have seen everything carry no bits.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
fn sync_window_seen(
    cache: &super::device::DeviceOutputCache,
    inner: &mut super::output_cache::PoolInner,
    seq_ids: &[usize],
    context_lens: &[usize],
    layer: usize,
    rows: usize,
    (block_size, kv_heads): (usize, usize),
    upload: bool,
) -> Result<()> {
    // Before the step only the past rows hold entries worth reading; after it every row does.
    let window = if upload { rows } else { rows - 1 };
    let mut at = Vec::new();
    for (seq, (&seq_id, &ctx)) in seq_ids.iter().zip(context_lens).enumerate() {
        let Some(block) = inner.sequences.get_mut(&seq_id).and_then(|s| s.block.as_mut()) else { continue };
        for pos in ctx - rows..ctx - rows + window {
            if block.row(layer, pos).is_some_and(|r| !r.seen_all) {
                at.push((seq, pos, block.device_row(layer, pos) as u32));
            }
        }
    }
    if at.is_empty() {
        return Ok(());
    }
    fn block_of<'a>(inner: &'a mut super::output_cache::PoolInner, seq_id: usize) -> &'a mut super::output_cache::OutputCacheBlock {
        inner.sequences.get_mut(&seq_id).and_then(|s| s.block.as_mut()).expect("listed above")
    }
    if upload {
        let words = context_lens.iter().map(|c| c.div_ceil(block_size).div_ceil(64) * 2).max().unwrap_or(2).max(2);
        let mut rows_bits = Vec::with_capacity(at.len());
        for &(seq, pos, pool_row) in &at {
            let row = block_of(inner, seq_ids[seq]).row(layer, pos).expect("listed above");
            rows_bits.push((pool_row, row.seen_words32(kv_heads, words)));
        }
        cache.set_seen_rows(&rows_bits, words)
    } else {
        let (bits, words) = cache.seen_rows(&at.iter().map(|a| a.2).collect::<Vec<_>>())?;
        for (&(seq, pos, _), bits) in at.iter().zip(&bits) {
            block_of(inner, seq_ids[seq]).row(layer, pos).expect("listed above").set_seen_words32(kv_heads, words, bits);
        }
        Ok(())
    }
}

impl PolicyMetrics for RetroPolicy {
    fn metrics(&self) -> Vec<Metric> {
        let t = &self.pool.totals;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
        let (seen, own) = (load(&t.exposure_seen), load(&t.exposure_own));
        let mut metrics = self.quest.metrics();
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
