//! The dot products of one unpacked weight row with up to four quantized input rows. The weight
//! bytes are loaded once per 32 weights and multiplied with every input row while in registers.
//! AVX2 (byte products summed to 16 then 32 bits, scales applied as integers, one float
//! multiply-add per block) when the CPU has it, else portable code with the same integer sums.

use super::activations::RowRef;
use super::formats::UnpackedRow;

/// Most input rows one call multiplies (four 8-lane accumulator pairs fit the 16 vector registers).
pub const MAX_ROWS: usize = 4;

/// `out[r] = w · x[r]` for every `r` (`x.len()` ≤ [`MAX_ROWS`]).
#[inline]
pub fn dot_rows(w: &UnpackedRow, signed: bool, has_min: bool, block_len: usize, x: &[RowRef], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the features were detected.
        unsafe {
            return match (x.len(), signed, has_min) {
                (1, s, m) => avx2_dispatch::<1>(w, s, m, block_len, x, out),
                (2, s, m) => avx2_dispatch::<2>(w, s, m, block_len, x, out),
                (3, s, m) => avx2_dispatch::<3>(w, s, m, block_len, x, out),
                (_, s, m) => avx2_dispatch::<4>(w, s, m, block_len, x, out),
            };
        }
    }
    dot_rows_portable(w, has_min, block_len, x, out)
}

/// Whether the AVX2 path runs on this CPU.
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The portable path (also the reference the AVX2 path is tested against).
pub fn dot_rows_portable(w: &UnpackedRow, has_min: bool, block_len: usize, x: &[RowRef], out: &mut [f32]) {
    let blocks = w.d.len();
    for (r, xr) in x.iter().enumerate() {
        let mut acc = 0f32;
        for b in 0..blocks {
            let mut isum = 0i32;
            for s in b * block_len / 16..(b + 1) * block_len / 16 {
                let p: i32 = (16 * s..16 * s + 16).map(|i| w.q[i] as i32 * xr.q[i] as i32).sum();
                isum += p * w.sc[s] as i32;
            }
            acc += w.d[b] * xr.d[b] * isum as f32;
            if has_min {
                let m: i32 = (b * block_len / 32..(b + 1) * block_len / 32).map(|t| w.mn[t] as i32 * xr.sums[t]).sum();
                acc -= w.dmin[b] * xr.d[b] * m as f32;
            }
        }
        out[r] = acc;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_dispatch<const R: usize>(w: &UnpackedRow, signed: bool, has_min: bool, block_len: usize, x: &[RowRef], out: &mut [f32]) {
    match (signed, has_min) {
        (true, true) => dot_avx2::<R, true, true>(w, block_len, x, out),
        (true, false) => dot_avx2::<R, true, false>(w, block_len, x, out),
        (false, true) => dot_avx2::<R, false, true>(w, block_len, x, out),
        (false, false) => dot_avx2::<R, false, false>(w, block_len, x, out),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_avx2<const R: usize, const SIGNED: bool, const MIN: bool>(w: &UnpackedRow, block_len: usize, x: &[RowRef], out: &mut [f32]) {
    use std::arch::x86_64::*;
    let x: [RowRef; R] = std::array::from_fn(|r| x[r]);
    let blocks = w.d.len();
    let chunks = block_len / 32;
    let mut facc = [_mm256_setzero_ps(); R];
    let mut min_acc = [0f32; R];
    let (wq, sc) = (w.q.as_ptr(), w.sc.as_ptr());
    for b in 0..blocks {
        let mut iacc = [_mm256_setzero_si256(); R];
        for c in 0..chunks {
            let at = b * block_len + 32 * c;
            let wv = _mm256_loadu_si256(wq.add(at) as *const __m256i);
            // The byte product takes an unsigned first operand: for signed weights multiply |w| by
            // x with w's sign.
            let wa = if SIGNED { _mm256_abs_epi8(wv) } else { wv };
            // Products of weights 0..16 land in the low 8 lanes, 16..32 in the high 8.
            let s = at / 16;
            let scale = _mm256_set_m128i(_mm_set1_epi16(*sc.add(s + 1)), _mm_set1_epi16(*sc.add(s)));
            for r in 0..R {
                let xv = _mm256_loadu_si256(x[r].q.as_ptr().add(at) as *const __m256i);
                let xs = if SIGNED { _mm256_sign_epi8(xv, wv) } else { xv };
                let p = _mm256_maddubs_epi16(wa, xs);
                iacc[r] = _mm256_add_epi32(iacc[r], _mm256_madd_epi16(p, scale));
            }
        }
        for r in 0..R {
            let dd = _mm256_set1_ps(w.d[b] * x[r].d[b]);
            facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), dd, facc[r]);
            if MIN {
                let mut m = 0i32;
                for t in b * chunks..(b + 1) * chunks {
                    m += w.mn[t] as i32 * x[r].sums[t];
                }
                min_acc[r] += w.dmin[b] * x[r].d[b] * m as f32;
            }
        }
    }
    for r in 0..R {
        let v = facc[r];
        let s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
        out[r] = _mm_cvtss_f32(s1) - min_acc[r];
    }
}
