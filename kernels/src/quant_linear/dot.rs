//! The portable dot products: one unpacked weight row against up to four quantized input rows,
//! with the same integer sums as the SIMD path (which is tested against this one).

use super::activations::RowRef;
use super::formats::UnpackedRow;

/// Most input rows one call multiplies (the SIMD path keeps two 8-lane accumulators per row in the
/// 16 vector registers).
pub const MAX_ROWS: usize = 4;

/// `out[r] = w · x[r]` for every `r`.
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
