//! CPU linear layers over f16 / bf16 weights for decode: `y = x · Wᵀ` for 1..=8 input rows, each
//! weight row read once (converted to f32 in registers) and multiplied with every input row, in
//! parallel over weight rows. gemm's packed path, which serves these shapes upstream, repacks the
//! weights on every call and runs well below memory bandwidth for so few rows.

use candle_core::{CpuStorage, DType, Device, Result, Storage, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Most input rows a product takes here (retro's replay window fits); prompts use gemm.
pub const MAX_ROWS: usize = 8;
/// Input rows one pass over a weight row multiplies (two 8-lane accumulators each stay in registers).
const ROWS_PER_PASS: usize = 4;
/// Weight rows per parallel task.
const WEIGHT_ROWS_PER_TASK: usize = 32;

/// `x` `[.., k]` (any float dtype) times `w` `[n, k]` (f16 or bf16, contiguous, CPU), when `x` has
/// 1..=[`MAX_ROWS`] rows: `[.., n]` in `x`'s dtype. `None` otherwise.
pub fn matmul(w: &Tensor, x: &Tensor) -> Result<Option<Tensor>> {
    if !w.device().is_cpu() || !x.device().is_cpu() || w.rank() != 2 || x.rank() == 0 {
        return Ok(None);
    }
    let (n, k) = w.dims2()?;
    if x.dims().last() != Some(&k) || k == 0 {
        return Ok(None);
    }
    let m = x.elem_count() / k;
    if !(1..=MAX_ROWS).contains(&m) {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Some((start, end)) = layout.contiguous_offsets() else { return Ok(None) };
    let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let y = match &*storage {
        Storage::Cpu(CpuStorage::F16(w)) => rows_times(Half::F16(&w[start..end]), n, k, &xs),
        Storage::Cpu(CpuStorage::BF16(w)) => rows_times(Half::BF16(&w[start..end]), n, k, &xs),
        _ => return Ok(None),
    };
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("rank >= 1") = n;
    Tensor::from_vec(y, dims, &Device::Cpu)?.to_dtype(x.dtype()).map(Some)
}

/// Weights in one of the two half types.
#[derive(Clone, Copy)]
pub enum Half<'a> {
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// `x` `[m, k]` (f32) times `w` `[n, k]`: `[m, n]`.
pub fn rows_times(w: Half<'_>, n: usize, k: usize, x: &[f32]) -> Vec<f32> {
    let m = x.len() / k;
    // [n][m] so that each task writes one contiguous run; transposed at the end (m·n is small).
    let mut yt = vec![0f32; n * m];
    yt.par_chunks_mut(WEIGHT_ROWS_PER_TASK * m).enumerate().for_each(|(t, out)| {
        for (i, out) in out.chunks_exact_mut(m).enumerate() {
            let j = t * WEIGHT_ROWS_PER_TASK + i;
            for r0 in (0..m).step_by(ROWS_PER_PASS) {
                let r1 = (r0 + ROWS_PER_PASS).min(m);
                let xr = &x[r0 * k..r1 * k];
                match w {
                    Half::F16(w) => row_dot(&w[j * k..(j + 1) * k], xr, &mut out[r0..r1]),
                    Half::BF16(w) => row_dot(&w[j * k..(j + 1) * k], xr, &mut out[r0..r1]),
                }
            }
        }
    });
    let mut y = vec![0f32; m * n];
    for j in 0..n {
        for r in 0..m {
            y[r * n + j] = yt[j * m + r];
        }
    }
    y
}

/// A half type the kernels read.
pub trait HalfWeight: Copy + Send + Sync {
    fn to_f32(self) -> f32;
    #[cfg(target_arch = "x86_64")]
    /// Eight weights at `p` as f32 lanes.
    ///
    /// # Safety
    /// `p` points at eight values; AVX2, FMA and F16C are present.
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

impl HalfWeight for f16 {
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}

impl HalfWeight for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // A bf16 is the high half of an f32.
        let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
        _mm256_castsi256_ps(_mm256_slli_epi32(v, 16))
    }
}

/// `out[r] = w · x[r]` for the `out.len()` (1..=4) rows of `x`.
fn row_dot<T: HalfWeight>(w: &[T], x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::cpu_features::avx2() {
        // SAFETY: the features were detected.
        unsafe {
            return match out.len() {
                1 => row_dot_avx2::<T, 1>(w, x, out),
                2 => row_dot_avx2::<T, 2>(w, x, out),
                3 => row_dot_avx2::<T, 3>(w, x, out),
                _ => row_dot_avx2::<T, 4>(w, x, out),
            };
        }
    }
    row_dot_portable(w, x, out)
}

/// The portable path (and the SIMD path's reference in the tests).
pub fn row_dot_portable<T: HalfWeight>(w: &[T], x: &[f32], out: &mut [f32]) {
    let k = w.len();
    for (r, o) in out.iter_mut().enumerate() {
        *o = w.iter().zip(&x[r * k..(r + 1) * k]).map(|(a, b)| a.to_f32() * b).sum();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot_avx2<T: HalfWeight, const R: usize>(w: &[T], x: &[f32], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = w.len();
    let body = k / 16 * 16;
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let (wp, xp) = (w.as_ptr(), x.as_ptr());
    // The caller's next calls read the following weight rows (contiguous): fetching the row two
    // ahead while this one is read keeps decode from waiting on each line's first touch.
    let ahead = wp.wrapping_add(2 * k);
    let mut c = 0;
    while c < body {
        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(c) as *const i8);
        let w0 = T::load8(wp.add(c));
        let w1 = T::load8(wp.add(c + 8));
        for r in 0..R {
            let xr = xp.add(r * k + c);
            acc[r][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr.add(8)), acc[r][1]);
        }
        c += 16;
    }
    for r in 0..R {
        let v = _mm256_add_ps(acc[r][0], acc[r][1]);
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        let tail: f32 = (body..k).map(|t| w[t].to_f32() * x[r * k + t]).sum();
        out[r] = _mm_cvtss_f32(s1) + tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Against an f64 product of the same (half-rounded) weights, for both half types, every row
    /// count, widths with and without a tail of the 16-wide loop, and more weight rows than a task.
    #[test]
    fn half_weight_products_match_an_f64_reference() {
        for (n, k) in [(1, 16), (7, 5), (70, 45), (33, 576), (65, 1536)] {
            let wf = data(n * k, 3);
            for m in 1..=MAX_ROWS {
                let x = data(m * k, 5 + m as u32);
                for dtype in [DType::F16, DType::BF16] {
                    let w = Tensor::from_vec(wf.clone(), (n, k), &Device::Cpu).unwrap().to_dtype(dtype).unwrap();
                    let wr = w.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
                    let xt = Tensor::from_vec(x.clone(), (1, m, k), &Device::Cpu).unwrap();
                    let y = matmul(&w, &xt).unwrap().expect("taken");
                    assert_eq!(y.dims(), &[1, m, n]);
                    let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    for r in 0..m {
                        for j in 0..n {
                            let want: f64 = (0..k).map(|t| wr[j][t] as f64 * x[r * k + t] as f64).sum();
                            let abs: f64 = (0..k).map(|t| (wr[j][t] as f64 * x[r * k + t] as f64).abs()).sum();
                            let got = y[r * n + j] as f64;
                            assert!((got - want).abs() <= 1e-5 * abs + 1e-6, "{dtype:?} n {n} k {k} m {m}: [{r}][{j}] {got} vs {want}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn declines_f32_weights_and_prompts() {
        let dev = Device::Cpu;
        let w = Tensor::zeros((4, 32), DType::F16, &dev).unwrap();
        assert!(matmul(&w.to_dtype(DType::F32).unwrap(), &Tensor::zeros((1, 32), DType::F32, &dev).unwrap()).unwrap().is_none());
        assert!(matmul(&w, &Tensor::zeros((9, 32), DType::F32, &dev).unwrap()).unwrap().is_none());
        assert!(matmul(&w, &Tensor::zeros((1, 31), DType::F32, &dev).unwrap()).unwrap().is_none());
        assert_eq!(matmul(&w, &Tensor::zeros((2, 32), DType::F16, &dev).unwrap()).unwrap().unwrap().dtype(), DType::F16);
    }
}
