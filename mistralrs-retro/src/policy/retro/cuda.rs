//! Retro on CUDA (feature `cuda`): the output cache's values and its rows' seen-page bitsets live
//! on the device (`DeviceOutputCache`), so a window step whose rows are all cached builds its row
//! masks, decodes and merges with nothing read back; the host keeps the bookkeeping by position.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Result, Tensor};
use mistralrs_core::kv_policy::{BatchInfo, DecodeAttention};
use retro_kernels::cuda as gpu;

use super::output_cache;
use super::RetroPolicy;
use crate::policy::sparse::cuda::DeviceSummaries;
use crate::policy::sparse::{Backend, SparseStep};

impl RetroPolicy {
    /// The device-resident output cache for this query shape, unless the cache is on the host.
    #[cfg(feature = "cuda")]
    pub(super) fn device_output_cache(&self, attn: &DecodeAttention<'_>, layers: usize) -> Result<Option<Arc<DeviceOutputCache>>> {
        if attn.query.device().is_cpu() {
            return Ok(None);
        }
        let (_, heads, head_dim) = attn.query.dims3()?;
        let rows = self.pool.capacity() * layers * self.pool.slots();
        let (kv_heads, blocks) = (self.engine.backend()?.kv_heads(), self.pool.capacity());
        let mut cache = self.device_cache.lock().expect("lock poisoned");
        match &*cache {
            Some(c) if c.fits(rows, heads, head_dim, kv_heads, blocks) => Ok(Some(c.clone())),
            _ => {
                let made = Arc::new(DeviceOutputCache::new(
                    rows, heads, head_dim, kv_heads, blocks, attn.query.device(),
                )?);
                *cache = Some(made.clone());
                Ok(Some(made))
            }
        }
    }

    /// The device output cache when the rows' seen bitsets are kept there (CUDA, values on the
    /// device), else `None`.
    #[cfg(feature = "cuda")]
    pub(super) fn device_seen_cache(&self, attn: &DecodeAttention<'_>) -> Result<Option<Arc<DeviceOutputCache>>> {
        match self.engine.backend()? {
            Backend::Cuda(d) => self.device_output_cache(attn, d.num_layers()),
            _ => Ok(None),
        }
    }

    /// [`Self::decode_window`] with nothing read back (CUDA): the selection, the row masks (from the
    /// rows' seen bitsets on the device) and the decode stay on the device; the host does the
    /// bookkeeping that depends on positions only. `None` (the host path runs) when some row of the
    /// window has no cached entry (a prompt row or a row after a trim: their lists differ).
    #[cfg(feature = "cuda")]
    pub(super) fn decode_window_on_device(&self, batch: &BatchInfo<'_>, attn: &DecodeAttention<'_>, layer: usize, rows: usize) -> Result<Option<Tensor>> {
        let Backend::Cuda(d) = self.engine.backend()? else { return Ok(None) };
        let Some(cache) = self.device_output_cache(attn, d.num_layers())? else { return Ok(None) };
        let (block_size, kv_heads) = (d.block_size, d.kv_heads);
        let step = self.engine.step_for(batch, attn)?;
        let context_lens = &step.context_lens;
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
        // Every listed page of the newest row is within its prefix: it marks the whole list.
        let reads: Vec<u64> = context_lens
            .iter()
            .zip(&step.budget_pages)
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
        self.engine.count_sequence_reads(batch.seq_ids, |seq| reads[seq]);
        self.engine.record_pages(layer, reads.iter().sum(), &step, block_size, kv_heads);

        // The first sparse layer of the step uploads the row tables; they are relative to the
        // layer's place in the pool, so the step's other layers reuse them.
        let (meta, entries) = self.current_step(batch)?.row_tables(|| {
            let dev = attn.query.device();
            let entries_len = entries.len() / 3;
            Ok((Tensor::from_vec(meta, (batch_len, width), dev)?, Tensor::from_vec(entries, (entries_len, 3), dev)?))
        })?;
        let (out, lse) = retro_decode_on_device(&d, layer, attn, &step, &cache, (&meta, row_offset))?;
        cache.step(&out, &lse, &entries, row_offset).map(Some)
    }

}

/// The host path's side of the device bitsets (CUDA): before the host builds a step's masks
/// (`upload == false`), copy the window's cached rows' bitsets from the device into their entries;
/// after it (`upload == true`), copy every row of the window back, so whichever path runs next sees
/// the same sets. Rows that have seen everything carry no bits.
#[cfg(feature = "cuda")]
#[allow(clippy::too_many_arguments)]
pub(super) fn sync_window_seen(
    cache: &DeviceOutputCache,
    inner: &mut output_cache::PoolInner,
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
    fn block_of<'a>(inner: &'a mut output_cache::PoolInner, seq_id: usize) -> &'a mut output_cache::OutputCacheBlock {
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

/// Retro's window step with the row masks built on the device: select, masks from the device
/// bitsets (`DeviceOutputCache::seen`), decode, with no read-back. `meta` is `retro_row_masks`'s
/// per-sequence row table (uploaded once per step, pool rows relative to `row_offset`). The plan
/// is the one a host-built selection of the same lists would get (same stride and splits), so the
/// output is the host path's bit for bit.
fn retro_decode_on_device(
    summaries: &DeviceSummaries,
    layer: usize,
    attn: &DecodeAttention<'_>,
    step: &SparseStep,
    cache: &DeviceOutputCache,
    (meta, row_offset): (&Tensor, usize),
) -> Result<(Tensor, Tensor)> {
    let plan = summaries.step_plan(step, false, attn.query.device())?;
    let mut selection = gpu::select_pages(&plan, attn.query, &summaries.layers[layer], attn.block_tables)?;
    let seen = cache.seen_for(plan.plan.max_pages)?;
    gpu::retro_row_masks(&plan, &mut selection, &seen, meta, &cache.counters, row_offset)?;
    let (out, lse) = gpu::selected_decode(
        &plan, attn.query, attn.key_cache, attn.value_cache, attn.block_tables, &selection, attn.softmax_scale, attn.softcap,
    )?;
    let (rows_total, heads, _) = out.dims3()?;
    Ok((out, lse.reshape((rows_total, heads))?))
}

/// Retro's output cache on the device: f32 `o [rows, heads, head_dim]` and `lse [rows, heads]` for
/// every row slot of the pool (`OutputCacheBlock::device_row`), each row's seen-page bitsets, and
/// per block the counts the host needs for exposure; the host keeps the rest of the bookkeeping
/// (positions, which rows are cached). A step then needs no read-back.
pub struct DeviceOutputCache {
    o: Tensor,
    lse: Tensor,
    kv_heads: usize,
    /// u32 `[rows, kv_heads, words]`, widened as contexts grow (`seen_for`).
    seen: Mutex<Tensor>,
    /// i64 `[blocks, 2]`: supplement pages read and pages seen by rows whose window closed.
    counters: Tensor,
}

impl DeviceOutputCache {
    pub fn new(rows: usize, heads: usize, head_dim: usize, kv_heads: usize, blocks: usize, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            o: Tensor::zeros((rows, heads, head_dim), DType::F32, device)?,
            lse: Tensor::full(f32::NEG_INFINITY, (rows, heads), device)?,
            kv_heads,
            seen: Mutex::new(Tensor::zeros((rows, kv_heads, 1), DType::U32, device)?),
            counters: Tensor::zeros((blocks.max(1), 2), DType::I64, device)?,
        })
    }

    pub fn rows(&self) -> Result<usize> {
        self.o.dim(0)
    }

    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    pub fn fits(&self, rows: usize, heads: usize, head_dim: usize, kv_heads: usize, blocks: usize) -> bool {
        self.o.dims() == [rows, heads, head_dim] && self.kv_heads == kv_heads && self.counters.dims()[0] == blocks.max(1)
    }

    /// The bitsets, at least `pages` bits wide (doubling, bits kept).
    pub fn seen_for(&self, pages: usize) -> Result<Tensor> {
        let mut seen = self.seen.lock().expect("seen lock poisoned");
        let (rows, kv_heads, words) = seen.dims3()?;
        let want = pages.div_ceil(32).max(1);
        if want > words {
            let wider = want.max(2 * words);
            let extra = Tensor::zeros((rows, kv_heads, wider - words), DType::U32, seen.device())?;
            *seen = Tensor::cat(&[&*seen, &extra], 2)?;
        }
        Ok(seen.clone())
    }

    /// Copy pool rows' bitsets to the host: `kv_heads × words` u32 per row, and `words`.
    pub fn seen_rows(&self, pool_rows: &[u32]) -> Result<(Vec<Vec<u32>>, usize)> {
        let seen = self.seen.lock().expect("seen lock poisoned").clone();
        let words = seen.dim(2)?;
        if pool_rows.is_empty() {
            return Ok((Vec::new(), words));
        }
        let index = Tensor::new(pool_rows, seen.device())?;
        let bits = seen.index_select(&index, 0)?.flatten_from(1)?.to_vec2::<u32>()?;
        Ok((bits, words))
    }

    /// Overwrite pool rows' bitsets (`kv_heads × words` u32 each, `words` as [`Self::seen_rows`]
    /// gave or wider than the device's, which then grows).
    pub fn set_seen_rows(&self, rows: &[(u32, Vec<u32>)], words: usize) -> Result<()> {
        let seen = self.seen_for(words * 32)?;
        let device_words = seen.dim(2)?;
        for (row, bits) in rows {
            let mut padded = vec![0u32; self.kv_heads * device_words];
            for h in 0..self.kv_heads {
                padded[h * device_words..h * device_words + words].copy_from_slice(&bits[h * words..(h + 1) * words]);
            }
            let src = Tensor::from_vec(padded, (1, self.kv_heads, device_words), seen.device())?;
            seen.slice_set(&src, 0, *row as usize)?;
        }
        Ok(())
    }

    /// A block's counters (supplement pages, pages seen by closed rows), which then start over.
    pub fn take_counters(&self, block: usize) -> Result<(u64, u64)> {
        let row = self.counters.narrow(0, block, 1)?.flatten_all()?.to_vec1::<i64>()?;
        self.counters.slice_set(&Tensor::zeros((1, 2), DType::I64, self.counters.device())?, 0, block)?;
        Ok((row[0] as u64, row[1] as u64))
    }

    /// One sparse layer's step on the stream (`merge_step`): each entry `[cached row, merged partial
    /// row, replacing partial row]` (rows relative to `row_offset`, -1 none) merges, writing the
    /// corrected row over its partial row, then lets the row entering the window take the slot.
    /// Returns `out`, now the layer's output.
    pub fn step(&self, out: &Tensor, lse: &Tensor, entries: &Tensor, row_offset: usize) -> Result<Tensor> {
        gpu::merge_step(&self.o, &self.lse, out, lse, entries, row_offset)?;
        Ok(out.clone())
    }
}

