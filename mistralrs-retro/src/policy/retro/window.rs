//! One sparse layer of a window step on the host (CPU, and CUDA steps where a row of the window has
//! no cached entry): the newest row's selection, the past rows' supplements as one fused
//! selection with row masks, one decode, then each row merged into or entered in the output cache.
//! And the refresh step, whose rows attend to everything.

use candle_core::{DType, Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, DecodeAttention};
use retro_kernels::PageSelection;

use super::output_cache;
use super::row_values::RowValues;
use super::RetroPolicy;
use crate::policy::sparse::{SparseStep, StepPlan};

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
    /// One sparse layer's attention for a window of `rows` rows per sequence.
    pub(super) fn decode_window(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, layer: usize, rows: usize) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(out) = self.decode_window_on_device(batch, attn, layer, rows)? {
            return Ok(out);
        }
        let step = self.engine.step_for(batch, attn)?;
        let StepPlan { block_size, kv_heads, selection: plan } = self.engine.select(&step, attn, layer)?;
        let batch_len = step.context_lens.len();

        let mut inner = self.pool.lock();
        // On CUDA the rows' seen pages live on the device: bring the window's cached rows here.
        #[cfg(feature = "cuda")]
        let device_seen = self.device_seen_cache(attn)?;
        #[cfg(feature = "cuda")]
        if let Some(cache) = &device_seen {
            super::cuda::sync_window_seen(cache, &mut inner, batch.seq_ids, &step.context_lens, layer, rows, (block_size, kv_heads), false)?;
        }
        let past = rows - 1;
        let newest = 1u32 << past;
        let mut kinds = vec![PastRow::Skip; batch_len * past];
        let mut fused = PageSelection::new(kv_heads);
        let mut reads = Vec::with_capacity(batch_len);
        for seq in 0..batch_len {
            let ctx = step.context_lens[seq];
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
        self.engine.count_sequence_reads(batch.seq_ids, |seq| reads[seq]);

        self.engine.record_pages(layer, fused.entries.len() as u64, &step, block_size, kv_heads);

        let mut values = self.step_values(attn, &step, &fused)?;
        for seq in 0..batch_len {
            let ctx = step.context_lens[seq];
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
            super::cuda::sync_window_seen(cache, &mut inner, batch.seq_ids, &step.context_lens, layer, rows, (block_size, kv_heads), true)?;
        }
        drop(inner);
        values.finish(attn)
    }

    /// This step's partial results, where the output cache's values live: the device cache (CUDA)
    /// or host rows (CPU).
    fn step_values(&self, attn: &DecodeAttention<'_>, step: &SparseStep, fused: &PageSelection) -> Result<RowValues> {
        #[cfg(feature = "cuda")]
        if let crate::policy::sparse::Backend::Cuda(d) = self.engine.backend()? {
            if let Some(cache) = self.device_output_cache(attn, d.num_layers())? {
                let (out, lse) = crate::policy::sparse::cuda::decode_selection_on_device(&d, attn, step, fused)?;
                return RowValues::device(cache, out, lse);
            }
        }
        // On the CPU: the fused decode over the selection with row masks.
        let _ = step; // the CPU kernel reads the lengths from `attn`
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
    pub(super) fn decode_refresh(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, rows: usize) -> Result<Option<Tensor>> {
        let out = self.engine.decode_dense(batch, attn)?;
        let (Some(dense), Some(layer)) = (&out, batch.layer.filter(|&l| l >= self.engine.dense_layers)) else { return Ok(out) };
        let out = dense.clone();
        let summaries = self.engine.backend()?;
        let (block_size, kv_heads) = (summaries.block_size(), summaries.kv_heads());
        let step = self.engine.step_for(batch, attn)?;
        let reads: Vec<u64> = step.context_lens.iter().map(|c| (c.div_ceil(block_size) * kv_heads) as u64).collect();
        self.engine.record_pages(layer, reads.iter().sum(), &step, block_size, kv_heads);
        self.engine.count_sequence_reads(batch.seq_ids, |seq| reads[seq]);
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
            let ctx = step.context_lens[seq];
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

}

/// Mark the plan's pages up to the row's own page as seen; returns how many were marked.
fn mark_selected(
    row: &mut output_cache::RowEntry,
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
