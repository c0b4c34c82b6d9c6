//! The sparse policies on CUDA (feature `cuda`): page bounds kept on the device beside the paged
//! cache, and every sparse layer's plan (score + top-k) and fused decode run by `retro-kernels`.
//! Same semantics as the CPU path, which is the reference (`retro-gpu-check` tests each kernel
//! against it); dense layers with one query row per sequence keep upstream's paged kernel.
//!
//! What still goes through the host, per sparse layer and step: the plan's two small per-sequence
//! arrays (uploaded), and under `retro` w > 1 the selected lists (read back: the row masks are built
//! from the host's seen-page sets, then uploaded). Retro's output and lse values stay on the device
//! (`DeviceOutputCache`); `RETRO_HOST_OUTPUT_CACHE=1` keeps them on the host as the CPU path does
//! (one more read-back per sparse layer), for comparisons.

use std::sync::{Arc, Mutex};

use candle_core::{bail, DType, Result, Tensor};
use mistralrs_core::kv_policy::{CacheAllocation, CacheWrite, DecodeAttention};
use retro_kernels::cuda as gpu;
use retro_kernels::DecodePlan;

use super::plan::{device_budgets, longest_lists, selected_len, PaddedLists};
use crate::cpu::{all_rows_mask, PageSelection};

/// CUDA blocks the sparse decode aims for (4 per SM of an H200, where it was tuned: docs/gpu.md)
/// and the fewest pages a split holds.
const SPLIT_TARGET: (usize, usize) = (132 * 4, 4);

/// Decode plans kept between layers of a step (see `DeviceSummaries::plans`).
const PLANS_KEPT: usize = 2;

/// Per layer, f32 `[num_blocks, kv_heads, 2, head_dim]`: each block's min and max key per channel.
pub struct DeviceSummaries {
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
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
            .map(|(k, _)| Tensor::zeros((num_blocks, kv_heads, 2, head_dim), DType::F32, k.device()))
            .collect::<Result<_>>()?;
        Ok(Self { block_size, kv_heads, head_dim, num_blocks, layers, plans: Mutex::new(Vec::with_capacity(PLANS_KEPT)) })
    }

    pub fn bytes(&self) -> usize {
        self.layers.len() * self.num_blocks * self.kv_heads * 2 * self.head_dim * 4
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
/// dtype) and lse per (row, head) on the host, as `cpu::paged_decode_selected` returns them.
pub fn decode_selection(
    summaries: &DeviceSummaries,
    attn: &DecodeAttention<'_>,
    context_lens: &[usize],
    selection: &PageSelection,
) -> Result<(Tensor, Vec<f32>)> {
    let (out, lse) = decode_selection_on_device(summaries, attn, context_lens, selection)?;
    Ok((out, lse.flatten_all()?.to_vec1::<f32>()?))
}

/// [`decode_selection`] with the lse left on the device, `[rows, heads]` f32.
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

/// Retro's output cache values on the device: f32 `o [rows, heads, head_dim]` and `lse [rows, heads]`
/// for every row slot of the pool (`OutputCacheBlock::device_row`); the bookkeeping (positions, seen
/// pages) stays with the host blocks. A step then needs no read-back of the decode's output.
pub struct DeviceOutputCache {
    o: Tensor,
    lse: Tensor,
}

impl DeviceOutputCache {
    pub fn new(rows: usize, heads: usize, head_dim: usize, device: &candle_core::Device) -> Result<Self> {
        Ok(Self {
            o: Tensor::zeros((rows, heads, head_dim), DType::F32, device)?,
            lse: Tensor::full(f32::NEG_INFINITY, (rows, heads), device)?,
        })
    }

    pub fn rows(&self) -> Result<usize> {
        self.o.dim(0)
    }

    pub fn fits(&self, rows: usize, heads: usize, head_dim: usize) -> bool {
        self.o.dims() == [rows, heads, head_dim]
    }

    /// One step of a sparse layer, on the stream, in this order: cached rows absorb their partial
    /// results (`merge[cache row]` = partial row, -1 none); the step's output takes row `gather[i]`
    /// of `[partials; cache]` (a corrected row reads its merged cache row, before the next part can
    /// overwrite it: the newest row takes the slot of the row leaving the window); then the rows
    /// entering the window replace their slots (`replace[cache row]` = partial row, -1 none).
    pub fn step(&self, out: &Tensor, lse: &Tensor, merge: &[i64], gather: &[u32], replace: &[i64]) -> Result<Tensor> {
        let dev = out.device();
        let encode = |rows: &[i64], replace: bool| -> Vec<i64> {
            rows.iter().map(|&r| if r < 0 { -1 } else if replace { -2 - r } else { r }).collect()
        };
        if merge.iter().any(|&r| r >= 0) {
            gpu::merge_rows(&self.o, &self.lse, out, lse, &Tensor::new(encode(merge, false).as_slice(), dev)?)?;
        }
        let stepped = if gather.iter().enumerate().any(|(i, &g)| g as usize != i) {
            let index = Tensor::new(gather, dev)?;
            Tensor::cat(&[&out.to_dtype(DType::F32)?, &self.o], 0)?.index_select(&index, 0)?.to_dtype(out.dtype())?
        } else {
            out.clone()
        };
        if replace.iter().any(|&r| r >= 0) {
            gpu::merge_rows(&self.o, &self.lse, out, lse, &Tensor::new(encode(replace, true).as_slice(), dev)?)?;
        }
        Ok(stepped)
    }
}
