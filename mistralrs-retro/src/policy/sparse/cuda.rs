//! The sparse engine on CUDA (feature `cuda`): page bounds kept on the device beside the paged
//! cache, and every sparse layer's plan (score + top-k) and fused decode run by `retro-kernels`.
//! Same semantics as the CPU path, which is the reference (`retro-gpu-check` tests each kernel
//! against it); dense layers with one query row per sequence keep upstream's paged kernel.
//!
//! What goes through the host: once per step, the plan's small per-sequence arrays (uploaded by the
//! first sparse layer that needs the plan, `SparseStep`) and retro's per-sequence row table
//! (`RetroStep`). Retro's output and lse values and its rows' seen-page bitsets stay on the device
//! (`retro/cuda.rs`), so a window step reads nothing back; only the steps where a row of the window
//! has no cached entry (the first w − 1 steps after a prefill, rows after a trim) read the selection
//! back and build the masks on the host, syncing the rows' bitsets both ways.

use std::sync::Arc;

use candle_core::{bail, DType, Result, Tensor};
use mistralrs_core::kv_policy::{CacheAllocation, CacheWrite, DecodeAttention};
use retro_kernels::cuda as gpu;
use retro_kernels::DecodePlan;

use retro_kernels::{all_rows_mask, device_budgets, longest_lists, selected_len, PaddedLists, PageSelection};

use super::SparseStep;

/// CUDA blocks the sparse decode aims for (4 per SM of an H200, where it was tuned: docs/gpu.md)
/// and the fewest pages a split holds.
const SPLIT_TARGET: (usize, usize) = (132 * 4, 4);

/// Per layer, `[num_blocks, kv_heads, 2, head_dim]` in the cache's dtype: each block's min and max
/// key per channel (exact: a min or max of cache values is a cache value).
pub struct DeviceSummaries {
    pub block_size: usize,
    pub kv_heads: usize,
    pub(in crate::policy) layers: Vec<Tensor>,
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
        Ok(Self { block_size, kv_heads, layers })
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

/// The call's query rows must be the step's.
fn check_rows(attn: &DecodeAttention<'_>, step: &SparseStep) -> Result<()> {
    let rows_total = attn.query.dim(0)?;
    if rows_total != step.rows * step.context_lens.len() {
        bail!("decode attention got {rows_total} query rows for {} sequences of {} rows", step.context_lens.len(), step.rows);
    }
    Ok(())
}

impl DeviceSummaries {
    /// A plan for these lengths, budgets and rows, uploaded.
    fn upload_plan(&self, context_lens: &[usize], budget_pages: &[usize], rows: usize, device: &candle_core::Device) -> Result<Arc<gpu::DevicePlan>> {
        let ctx: Vec<u32> = context_lens.iter().map(|&c| c as u32).collect();
        let budgets = device_budgets(context_lens, budget_pages, self.block_size);
        let plan = DecodePlan::new(&ctx, &budgets, rows, self.kv_heads, self.block_size, SPLIT_TARGET.0, SPLIT_TARGET.1);
        Ok(Arc::new(gpu::DevicePlan::upload(plan, device)?))
    }

    /// The step's plan with its budgets (`dense == false`) or with every page: uploaded by the
    /// first layer that asks, then shared by the step's other layers.
    pub(in crate::policy) fn step_plan(&self, step: &SparseStep, dense: bool, device: &candle_core::Device) -> Result<Arc<gpu::DevicePlan>> {
        let mut kept = step.plans[usize::from(dense)].lock().expect("plan lock poisoned");
        if let Some(plan) = &*kept {
            return Ok(plan.clone());
        }
        let everything;
        let budgets = if dense {
            everything = vec![usize::MAX; step.context_lens.len()];
            &everything
        } else {
            &step.budget_pages
        };
        let plan = self.upload_plan(&step.context_lens, budgets, step.rows, device)?;
        *kept = Some(plan.clone());
        Ok(plan)
    }
}

/// Quest on the device: select, then decode every row of each sequence over its selection; with
/// `dense`, every page (dense layers with a replay window). Returns the output and the (page, KV
/// head) pairs read, known on the host from the budget rule.
pub fn selected_decode(
    summaries: &DeviceSummaries,
    layer: usize,
    attn: &DecodeAttention<'_>,
    step: &SparseStep,
    dense: bool,
) -> Result<(Tensor, u64)> {
    check_rows(attn, step)?;
    let plan = summaries.step_plan(step, dense, attn.query.device())?;
    let selection = gpu::select_pages(&plan, attn.query, &summaries.layers[layer], attn.block_tables)?;
    let (out, _lse) = gpu::selected_decode(
        &plan, attn.query, attn.key_cache, attn.value_cache, attn.block_tables, &selection, attn.softmax_scale, attn.softcap,
    )?;
    let read = step
        .context_lens
        .iter()
        .zip(&step.budget_pages)
        .map(|(&c, &b)| selected_len(c, if dense { usize::MAX } else { b }, summaries.block_size))
        .sum::<usize>();
    Ok((out, (read * summaries.kv_heads) as u64))
}

/// The newest rows' selection, read back to the host (retro builds its row masks there).
pub fn select_to_host(summaries: &DeviceSummaries, layer: usize, attn: &DecodeAttention<'_>, step: &SparseStep) -> Result<PageSelection> {
    check_rows(attn, step)?;
    let plan = summaries.step_plan(step, false, attn.query.device())?;
    let selection = gpu::select_pages(&plan, attn.query, &summaries.layers[layer], attn.block_tables)?;
    let stride = plan.plan.stride.max(1);
    let padded = PaddedLists {
        stride,
        pages: selection.pages.flatten_all()?.to_vec1::<u32>()?,
        counts: selection.counts.to_vec1::<u32>()?,
        masks: vec![all_rows_mask(step.rows); plan.plan.lists() * stride],
    };
    Ok(padded.to_selection(summaries.kv_heads))
}

/// The fused decode over a host-built selection with row masks: output (on the device, query
/// dtype) and lse `[rows, heads]` f32, both left on the device, as `cpu::paged_decode_selected`
/// returns them on the host.
pub fn decode_selection_on_device(
    summaries: &DeviceSummaries,
    attn: &DecodeAttention<'_>,
    step: &SparseStep,
    selection: &PageSelection,
) -> Result<(Tensor, Tensor)> {
    check_rows(attn, step)?;
    let batch = step.context_lens.len();
    // A budget equal to each sequence's longest list gives a plan whose stride fits every list.
    // Lists differ per layer: this plan is the layer's own (these are the steps where a row of the
    // window has no cached entry, the first w − 1 after a prefill).
    let budgets = longest_lists(selection, batch);
    let dev = attn.query.device();
    let plan = summaries.upload_plan(&step.context_lens, &budgets, step.rows, dev)?;
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
