//! The sparse policies on CUDA (feature `cuda`): page bounds kept on the device beside the paged
//! cache, and every sparse layer's plan (score + top-k) and fused decode run by `retro-kernels`.
//! Same semantics as the CPU path, which is the reference (`retro-gpu-check` tests each kernel
//! against it); dense layers with one query row per sequence keep upstream's paged kernel.
//!
//! What still goes through the host, per sparse layer and step: the plan's two small per-sequence
//! arrays and retro's per-sequence row table (uploaded). Retro's output and lse values and its rows'
//! seen-page bitsets stay on the device (`DeviceOutputCache`), so a window step reads nothing back;
//! only the steps where a row of the window has no cached entry (the first w − 1 steps after a
//! prefill, rows after a trim) read the selection back and build the masks on the host, syncing
//! the rows' bitsets both ways.

use std::sync::{Arc, Mutex};

use candle_core::{bail, DType, Result, Tensor};
use mistralrs_core::kv_policy::{CacheAllocation, CacheWrite, DecodeAttention};
use retro_kernels::cuda as gpu;
use retro_kernels::DecodePlan;

use retro_kernels::{device_budgets, longest_lists, selected_len, PaddedLists};
use retro_kernels::{all_rows_mask, PageSelection};

/// CUDA blocks the sparse decode aims for (4 per SM of an H200, where it was tuned: docs/gpu.md)
/// and the fewest pages a split holds.
const SPLIT_TARGET: (usize, usize) = (132 * 4, 4);

/// Decode plans kept between layers of a step (see `DeviceSummaries::plans`).
const PLANS_KEPT: usize = 2;

/// Per layer, `[num_blocks, kv_heads, 2, head_dim]` in the cache's dtype: each block's min and max
/// key per channel (exact: a min or max of cache values is a cache value).
pub struct DeviceSummaries {
    pub block_size: usize,
    pub kv_heads: usize,
    layers: Vec<Tensor>,
    /// The step's decode plans, newest first: every sparse layer of a step asks for the same ones
    /// (vLLM-style metadata built once per step), so their per-sequence arrays are uploaded once.
    /// Two, because retro alternates a selection plan (budget) and a decode plan (longest lists).
    plans: Mutex<Vec<Arc<gpu::DevicePlan>>>,
}

impl DeviceSummaries {
    pub fn for_cache(alloc: &CacheAllocation<'_>) -> Result<Self> {
        let Some((key_cache, _)) = alloc.caches.first() else { bail!("no KV cache layers") };
        if !matches!(alloc.dtype, DType::F32 | DType::F16 | DType::BF16) {
            bail!("the sparse CUDA kernels take f32/f16/bf16 KV caches, not {:?}", alloc.dtype);
        }
        let (num_blocks, kv_heads, chunks, block_size, x) = key_cache.dims5()?;
        let head_dim = chunks * x;
        if !matches!(head_dim, 64 | 128) || !matches!(block_size, 16 | 32) {
            bail!("the sparse CUDA kernels are built for head dim 64/128 and --pa-block-size 16/32, not {head_dim}/{block_size}");
        }
        let layers = alloc
            .caches
            .iter()
            .map(|(k, _)| Tensor::zeros((num_blocks, kv_heads, 2, head_dim), k.dtype(), k.device()))
            .collect::<Result<_>>()?;
        Ok(Self { block_size, kv_heads, layers, plans: Mutex::new(Vec::with_capacity(PLANS_KEPT)) })
    }

    pub fn bytes(&self) -> usize {
        self.layers.iter().map(|b| b.elem_count() * b.dtype().size_in_bytes()).sum()
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Upstream's cache write, then the bounds of every block it touched (slots of -1 are skipped
    /// by both).
    pub fn write(&self, layer: Option<usize>, write: &CacheWrite<'_>) -> Result<()> {
        mistralrs_paged_attn::reshape_and_cache(
            write.key, write.value, None, None, write.key_cache, write.value_cache, write.slot_mapping,
        )?;
        if let Some(layer) = layer {
            let Some(bounds) = self.layers.get(layer) else {
                bail!("page summaries: layer {layer} out of range ({} layers)", self.layers.len())
            };
            gpu::refresh_page_bounds(write.key_cache, &write.slot_mapping.to_dtype(DType::I64)?, bounds)?;
        }
        Ok(())
    }
}

fn rows_per_sequence(attn: &DecodeAttention<'_>, batch: usize) -> Result<usize> {
    let rows_total = attn.query.dim(0)?;
    if batch == 0 || rows_total % batch != 0 {
        bail!("decode attention got {rows_total} query rows for {batch} sequences");
    }
    Ok(rows_total / batch)
}

impl DeviceSummaries {
    /// The step's plan for these lengths, budgets and rows: a kept one if it matches.
    fn plan(&self, context_lens: &[usize], budget_pages: &[usize], rows: usize, device: &candle_core::Device) -> Result<Arc<gpu::DevicePlan>> {
        let ctx: Vec<u32> = context_lens.iter().map(|&c| c as u32).collect();
        let budgets = device_budgets(context_lens, budget_pages, self.block_size);
        let mut plans = self.plans.lock().expect("plan lock poisoned");
        if let Some(at) = plans.iter().position(|p| p.plan.rows == rows && p.plan.context_lens == ctx && p.plan.budget_pages == budgets) {
            let plan = plans.remove(at);
            plans.insert(0, plan.clone());
            return Ok(plan);
        }
        let plan = DecodePlan::new(&ctx, &budgets, rows, self.kv_heads, self.block_size, SPLIT_TARGET.0, SPLIT_TARGET.1);
        let plan = Arc::new(gpu::DevicePlan::upload(plan, device)?);
        plans.truncate(PLANS_KEPT - 1);
        plans.insert(0, plan.clone());
        Ok(plan)
    }
}

/// Quest on the device: select, then decode every row of each sequence over its selection.
/// Budgets that cover a sequence select every page (dense layers with a replay window use that).
/// Returns the output and the (page, KV head) pairs read, known on the host from the budget rule.
pub fn selected_decode(
    summaries: &DeviceSummaries,
    layer: usize,
    attn: &DecodeAttention<'_>,
    context_lens: &[usize],
    budget_pages: &[usize],
) -> Result<(Tensor, u64)> {
    let rows = rows_per_sequence(attn, context_lens.len())?;
    let plan = summaries.plan(context_lens, budget_pages, rows, attn.query.device())?;
    let selection = gpu::select_pages(&plan, attn.query, &summaries.layers[layer], attn.block_tables)?;
    let (out, _lse) = gpu::selected_decode(
        &plan, attn.query, attn.key_cache, attn.value_cache, attn.block_tables, &selection, attn.softmax_scale, attn.softcap,
    )?;
    let read = context_lens.iter().zip(budget_pages).map(|(&c, &b)| selected_len(c, b, summaries.block_size)).sum::<usize>();
    Ok((out, (read * summaries.kv_heads) as u64))
}

/// The newest rows' selection, read back to the host (retro builds its row masks there).
pub fn select_to_host(
    summaries: &DeviceSummaries,
    layer: usize,
    attn: &DecodeAttention<'_>,
    context_lens: &[usize],
    budget_pages: &[usize],
) -> Result<PageSelection> {
    let rows = rows_per_sequence(attn, context_lens.len())?;
    let plan = summaries.plan(context_lens, budget_pages, rows, attn.query.device())?;
    let selection = gpu::select_pages(&plan, attn.query, &summaries.layers[layer], attn.block_tables)?;
    let stride = plan.plan.stride.max(1);
    let padded = PaddedLists {
        stride,
        pages: selection.pages.flatten_all()?.to_vec1::<u32>()?,
        counts: selection.counts.to_vec1::<u32>()?,
        masks: vec![all_rows_mask(rows); plan.plan.lists() * stride],
    };
    Ok(padded.to_selection(summaries.kv_heads))
}

/// The fused decode over a host-built selection with row masks: output (on the device, query
/// dtype) and lse `[rows, heads]` f32, both left on the device, as `cpu::paged_decode_selected`
/// returns them on the host.
pub fn decode_selection_on_device(
    summaries: &DeviceSummaries,
    attn: &DecodeAttention<'_>,
    context_lens: &[usize],
    selection: &PageSelection,
) -> Result<(Tensor, Tensor)> {
    let batch = context_lens.len();
    let rows = rows_per_sequence(attn, batch)?;
    // A budget equal to each sequence's longest list gives a plan whose stride fits every list.
    let budgets = longest_lists(selection, batch);
    let dev = attn.query.device();
    let plan = summaries.plan(context_lens, &budgets, rows, dev)?;
    let (lists, stride) = (plan.plan.lists(), plan.plan.stride.max(1));
    let padded = PaddedLists::from_selection(selection, batch, stride);
    if padded.stride != stride {
        bail!("retro: decode plan stride {stride} is shorter than the selection's {}", padded.stride);
    }
    let on_device = gpu::Selection {
        pages: Tensor::from_vec(padded.pages, (lists, stride), dev)?,
        counts: Tensor::from_vec(padded.counts, lists, dev)?,
        masks: Some(Tensor::from_vec(padded.masks, (lists, stride), dev)?),
    };
    let (out, lse) = gpu::selected_decode(
        &plan, attn.query, attn.key_cache, attn.value_cache, attn.block_tables, &on_device, attn.softmax_scale, attn.softcap,
    )?;
    let (rows_total, heads, _) = out.dims3()?;
    Ok((out, lse.reshape((rows_total, heads))?))
}

/// Retro's window step with the row masks built on the device: select, masks from the device
/// bitsets (`DeviceOutputCache::seen`), decode, with no read-back. `meta` is `retro_row_masks`'s
/// per-sequence row table (uploaded once per step, pool rows relative to `row_offset`). The plan
/// is the one a host-built selection of the same lists would get (same stride and splits), so the
/// output is the host path's bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn retro_decode_on_device(
    summaries: &DeviceSummaries,
    layer: usize,
    attn: &DecodeAttention<'_>,
    context_lens: &[usize],
    budget_pages: &[usize],
    cache: &DeviceOutputCache,
    (meta, row_offset): (&Tensor, usize),
) -> Result<(Tensor, Tensor)> {
    let rows = rows_per_sequence(attn, context_lens.len())?;
    let dev = attn.query.device();
    let plan = summaries.plan(context_lens, budget_pages, rows, dev)?;
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

/// A host table uploaded once and reused while it does not change (retro's per-step row tables:
/// every sparse layer of a step builds the same one).
#[derive(Default)]
pub struct UploadedTable(Mutex<Option<(Vec<u32>, Tensor)>>);

impl UploadedTable {
    pub fn get(&self, host: Vec<u32>, shape: (usize, usize), device: &candle_core::Device) -> Result<Tensor> {
        let mut kept = self.0.lock().expect("table lock poisoned");
        if let Some((h, t)) = &*kept {
            if *h == host && t.dims2()? == shape && t.device().same_device(device) {
                return Ok(t.clone());
            }
        }
        let t = Tensor::from_vec(host.clone(), shape, device)?;
        *kept = Some((host, t.clone()));
        Ok(t)
    }
}
