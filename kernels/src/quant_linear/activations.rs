//! Input rows quantized once per product to 8 bits, one scale per weight block (llama.cpp's q8_0
//! for 32-weight blocks, q8_K for 256), plus the sum of each 32 quantized values for the min term.

/// Up to this many rows are quantized on the calling thread.
const SERIAL_ROWS: usize = 8;

/// `m` rows of `k` values.
pub struct QuantizedRows {
    pub k: usize,
    pub block_len: usize,
    /// `[m][k]`, each in -127..=127.
    pub q: Vec<i8>,
    /// `[m][k / block_len]`: a row's value ≈ `d · q`.
    pub d: Vec<f32>,
    /// `[m][k / 32]`: the sum of each 32 consecutive `q`.
    pub sums: Vec<i32>,
}

impl QuantizedRows {
    /// `x` is `[m][k]`, `k` a multiple of `block_len` (itself a multiple of 32). Rows are
    /// quantized in parallel (a prompt's rows are many).
    pub fn new(x: &[f32], k: usize, block_len: usize) -> Self {
        use rayon::prelude::*;
        let m = x.len() / k;
        let mut out = QuantizedRows {
            k,
            block_len,
            q: vec![0; m * k],
            d: vec![0.0; m * k / block_len],
            sums: vec![0; m * k / 32],
        };
        let blocks = k / block_len;
        if m <= SERIAL_ROWS {
            // Decode: a few rows take less time than handing them to the thread pool.
            for (((q, d), sums), x) in out.q.chunks_mut(k).zip(out.d.chunks_mut(blocks)).zip(out.sums.chunks_mut(k / 32)).zip(x.chunks(k)) {
                quantize_row(x, block_len, q, d, sums);
            }
            return out;
        }
        out.q
            .par_chunks_mut(k)
            .zip(out.d.par_chunks_mut(blocks))
            .zip(out.sums.par_chunks_mut(k / 32))
            .zip(x.par_chunks(k))
            .for_each(|(((q, d), sums), x)| quantize_row(x, block_len, q, d, sums));
        out
    }

    pub fn rows(&self) -> usize {
        self.q.len() / self.k
    }

    pub fn row(&self, i: usize) -> RowRef<'_> {
        let (k, b) = (self.k, self.block_len);
        RowRef {
            q: &self.q[i * k..(i + 1) * k],
            d: &self.d[i * k / b..(i + 1) * k / b],
            sums: &self.sums[i * k / 32..(i + 1) * k / 32],
        }
    }
}

/// One quantized input row.
#[derive(Clone, Copy)]
pub struct RowRef<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub sums: &'a [i32],
}

fn quantize_row(x: &[f32], block_len: usize, q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the feature was detected.
        return unsafe { quantize_row_avx2(x, block_len, q, d, sums) };
    }
    quantize_row_any(x, block_len, q, d, sums)
}

/// The same code compiled for AVX2, so that the loops vectorize.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_row_avx2(x: &[f32], block_len: usize, q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    quantize_row_any(x, block_len, q, d, sums)
}

/// `q = round(x / d)` with `d = max |x| / 127` per block (ties to even), and the sums of 32.
#[inline(always)]
fn quantize_row_any(x: &[f32], block_len: usize, q: &mut [i8], d: &mut [f32], sums: &mut [i32]) {
    for ((xb, qb), d) in x.chunks_exact(block_len).zip(q.chunks_exact_mut(block_len)).zip(d.iter_mut()) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        *d = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (q, v) in qb.iter_mut().zip(xb) {
            *q = (v * inv).round_ties_even() as i8;
        }
    }
    for (s, qc) in sums.iter_mut().zip(q.chunks_exact(32)) {
        *s = qc.iter().map(|&v| v as i32).sum();
    }
}
