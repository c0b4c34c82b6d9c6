//! CPU linear layers over GGUF-quantized weights: `y = x · Wᵀ` with `W` in its GGUF blocks.
//!
//! - [`formats`]: each block type unpacked, one weight row at a time, into one integer form;
//! - [`activations`]: the input rows quantized once per product to 8 bits;
//! - [`simd`]: with AVX2, each block type's weights expanded in registers and multiplied with up
//!   to four input rows (runtime-detected, so one binary runs on any x86-64);
//! - [`dot`]: without AVX2, an unpacked weight row against the same rows, with the same integer sums.
//!
//! Work is split over output columns (weight rows) and, for prompts, blocks of input rows, so each
//! weight row is read from memory once per product and its block scales (or, without SIMD, its
//! unpacked form) serve [`ROWS_PER_TASK`] input rows; every core takes tasks. Decode (a few rows) is
//! bound by reading the weights once.

mod activations;
mod dot;
mod formats;
#[cfg(target_arch = "x86_64")]
mod simd;

pub use activations::QuantizedRows;
pub use crate::cpu_features::avx2;
pub use formats::{block_header, unpack_row, BlockHeader, UnpackedRow, WeightType};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Result, Tensor};
use rayon::prelude::*;

/// The instruction set the products run on, for logs: `AVX-512 VNNI`, `AVX2` or `portable`.
pub fn isa() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        return if simd::vnni() { "AVX-512 VNNI" } else { "AVX2" };
    }
    "portable"
}

/// Input rows one task multiplies with its weight rows.
pub const ROWS_PER_TASK: usize = 64;

impl WeightType {
    /// The GGUF type, if this module multiplies with it.
    pub fn from_ggml(dtype: GgmlDType) -> Option<Self> {
        Some(match dtype {
            GgmlDType::Q4_0 => WeightType::Q4_0,
            GgmlDType::Q4_1 => WeightType::Q4_1,
            GgmlDType::Q5_0 => WeightType::Q5_0,
            GgmlDType::Q5_1 => WeightType::Q5_1,
            GgmlDType::Q8_0 => WeightType::Q8_0,
            GgmlDType::Q4K => WeightType::Q4K,
            GgmlDType::Q5K => WeightType::Q5K,
            GgmlDType::Q6K => WeightType::Q6K,
            _ => return None,
        })
    }
}

/// `x · Wᵀ` for a CPU `QTensor` `W` `[n, k]` and `x` `[.., k]` (any float dtype; the result has
/// `x`'s dtype). `None` when this module does not take the product (other devices or types, a
/// `k` that is not a whole number of blocks); the caller then runs its own.
pub fn qmatmul(w: &QTensor, x: &Tensor) -> Result<Option<Tensor>> {
    let Some(ty) = WeightType::from_ggml(w.dtype()) else { return Ok(None) };
    if !matches!(w.device(), Device::Cpu) || !x.device().is_cpu() || w.rank() != 2 {
        return Ok(None);
    }
    let (n, k) = w.shape().dims2()?;
    if k % ty.block_len() != 0 || x.dims().last() != Some(&k) {
        return Ok(None);
    }
    let bytes = w.data()?;
    let dtype = x.dtype();
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let y = matmul(ty, &bytes, n, k, &xs);
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    Tensor::from_vec(y, dims, &Device::Cpu)?.to_dtype(dtype).map(Some)
}

/// `x` `[m, k]` times `W` `[n, k]` (GGUF blocks of type `ty`, rows contiguous): `[m, n]`.
pub fn matmul(ty: WeightType, w: &[u8], n: usize, k: usize, x: &[f32]) -> Vec<f32> {
    let m = x.len() / k;
    let row_bytes = k / ty.block_len() * ty.block_bytes();
    assert_eq!(w.len(), n * row_bytes, "weight bytes for [{n}, {k}] {ty:?}");
    let xq = QuantizedRows::new(x, k, ty.block_len());
    let mut y = vec![0f32; m * n];
    // Enough weight-row chunks that every core gets several (the last ones finish unevenly), each
    // large enough (~32 KiB of weights) that starting it costs little next to reading it.
    let min_cols = ((32 << 10) / row_bytes.max(1)).clamp(1, 64);
    let cols_per_task = (n / (rayon::current_num_threads() * 8)).clamp(min_cols, 64);
    let col_tasks = n.div_ceil(cols_per_task);
    let row_tasks = m.div_ceil(ROWS_PER_TASK);
    let out = OutPtr(y.as_mut_ptr());
    let simd = avx2();
    let tasks = col_tasks * row_tasks;
    let init = || (UnpackedRow::default(), [Vec::new(), Vec::new()]);
    let task = |(wrow, headers): &mut (UnpackedRow, [Vec<BlockHeader>; 2]), t: usize| {
        let (cols, rows) = (t / row_tasks, t % row_tasks);
        let rows = rows * ROWS_PER_TASK..((rows + 1) * ROWS_PER_TASK).min(m);
        let cols = cols * cols_per_task..((cols + 1) * cols_per_task).min(n);
        // The task's input rows, located once (not per weight row).
        let row_refs: Vec<_> = rows.clone().map(|r| xq.row(r)).collect();
        // K blocks' scales are worth computing once per weight row when several tiles of input
        // rows (a prompt) reuse them; otherwise the SIMD path reads them in place (an empty list).
        let precompute_scales = simd && ty.block_len() == 256 && rows.len() > dot::MAX_ROWS;
        headers.iter_mut().for_each(Vec::clear);
        // With SIMD, two weight rows at a time: they share each input load and, for one input row,
        // give the core two independent chains of sums.
        let pair = if simd { 2 } else { 1 };
        let mut j = cols.start;
        while j < cols.end {
            let cnt = pair.min(cols.end - j);
            let wrow_at = |v: usize| &w[(j + v.min(cnt - 1)) * row_bytes..(j + v.min(cnt - 1) + 1) * row_bytes];
            let ws: [&[u8]; 2] = [wrow_at(0), wrow_at(1)];
            let ws = &ws[..cnt];
            if precompute_scales {
                #[cfg(target_arch = "x86_64")]
                for (h, wj) in headers.iter_mut().zip(ws) {
                    // SAFETY: `simd` is true only when `avx2()` detected AVX2, FMA and F16C.
                    unsafe { simd::block_headers(ty, wj, h) };
                }
            } else if !simd {
                wrow.resize(k, ty.block_len());
                unpack_row(ty, ws[0], wrow);
            }
            let hs: [&[BlockHeader]; 2] = [&headers[0], &headers[1]];
            let mut dots = [[0f32; dot::MAX_ROWS]; 2];
            for r0 in rows.clone().step_by(dot::MAX_ROWS) {
                let r1 = (r0 + dot::MAX_ROWS).min(rows.end);
                let xr = &row_refs[r0 - rows.start..r1 - rows.start];
                dot_rows(ty, simd, ws, &hs[..cnt], wrow, xr, &mut dots[..cnt]);
                for (v, j) in (j..j + cnt).enumerate() {
                    for (i, r) in (r0..r1).enumerate() {
                        // SAFETY: each (r, j) is written by exactly one task, inside `y`.
                        unsafe { out.write(r * n + j, dots[v][i]) };
                    }
                }
            }
            j += cnt;
        }
    };
    if n * row_bytes * m.min(dot::MAX_ROWS) <= SERIAL_BYTES {
        // Small products finish sooner on the calling thread than the pool can be woken.
        let mut scratch = init();
        (0..tasks).for_each(|t| task(&mut scratch, t));
    } else {
        (0..tasks).into_par_iter().for_each_init(init, task);
    }
    y
}

/// Products that read at most this many weight bytes (times their input rows, up to four) run on
/// the calling thread.
const SERIAL_BYTES: usize = 192 << 10;

/// `out[v][r] = w[v] · x[r]`: in place with AVX2 (`simd`; `headers[v]` are `w[v]`'s block
/// scales, or empty; one or two weight rows), else one weight row unpacked into `wrow`.
#[inline]
fn dot_rows(ty: WeightType, simd: bool, w: &[&[u8]], headers: &[&[BlockHeader]], wrow: &UnpackedRow, x: &[activations::RowRef], out: &mut [[f32; 4]]) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is true only when `avx2()` detected AVX2, FMA and F16C.
        return unsafe { simd::dot_rows(ty, w, headers, x, out) };
    }
    let _ = (simd, w, headers);
    dot::dot_rows_portable(wrow, ty.has_min(), ty.block_len(), x, &mut out[0])
}

/// The output buffer, shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);

impl OutPtr {
    /// SAFETY: `at` is inside the buffer and no other task writes it.
    unsafe fn write(&self, at: usize, v: f32) {
        *self.0.add(at) = v;
    }
}
// SAFETY: tasks write disjoint elements and `matmul` waits for all of them.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

#[cfg(test)]
mod tests;
