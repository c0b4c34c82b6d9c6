//! A sparse layer's partial results and what the output cache does with them.

use candle_core::{DType, Result, Tensor};
use mistralrs_core::kv_policy::DecodeAttention;
use retro_kernels::merge_partial;

use super::output_cache;
use super::RetroPolicy;

/// One sparse layer's partial results and what the output cache does with them: on the host each
/// row is merged or stored as it comes; on the device the rows are collected into one batched call.
pub(super) enum RowValues {
    Host { out: Vec<f32>, lse: Vec<f32>, shape: (usize, usize, usize) },
    #[cfg(feature = "cuda")]
    Device {
        cache: std::sync::Arc<super::cuda::DeviceOutputCache>,
        out: Tensor,
        lse: Tensor,
        /// Per pool row: the partial row merged into it / replacing it (-1 none).
        merge: Vec<i64>,
        replace: Vec<i64>,
    },
}

impl RowValues {
    /// `out` [rows, heads, head_dim] and `lse` [rows * heads] on the host.
    pub fn host(out: &Tensor, lse: Vec<f32>) -> Result<Self> {
        let shape = out.dims3()?;
        Ok(Self::Host { out: out.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, lse, shape })
    }

    #[cfg(feature = "cuda")]
    pub fn device(cache: std::sync::Arc<super::cuda::DeviceOutputCache>, out: Tensor, lse: Tensor) -> Result<Self> {
        let pool_rows = cache.rows()?;
        Ok(Self::Device { cache, out, lse, merge: vec![-1; pool_rows], replace: vec![-1; pool_rows] })
    }

    /// Where the output cache lives for this query, with `out` [rows, heads, head_dim] and `lse`
    /// [rows, heads] (f32) as the step's partial results.
    pub fn from_tensors(retro: &RetroPolicy, attn: &DecodeAttention<'_>, out: Tensor, lse: Tensor) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if let Some(cache) = retro.device_output_cache(attn, retro.engine.backend()?.num_layers())? {
            return Self::device(cache, out, lse);
        }
        let _ = (retro, attn);
        Self::host(&out, lse.flatten_all()?.to_vec1::<f32>()?)
    }

    /// A cached row absorbs its partial result (merged exactly through the log-sum-exp); the step
    /// outputs the corrected row.
    pub fn merge(&mut self, at: usize, row: &mut output_cache::RowEntry, pool_row: usize) {
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
    pub fn enter<'b>(
        &mut self,
        at: usize,
        block: &'b mut output_cache::OutputCacheBlock,
        numbers: Option<&mut output_cache::SequenceNumbers>,
        layer: usize,
        pos: usize,
        kv_heads: usize,
        pages: usize,
    ) -> &'b mut output_cache::RowEntry {
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
    pub fn finish(self, attn: &DecodeAttention<'_>) -> Result<Tensor> {
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
