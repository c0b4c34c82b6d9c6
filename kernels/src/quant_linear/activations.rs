//! Input rows quantized once per product to 8 bits, one scale per weight block (llama.cpp's q8_0
//! for 32-weight blocks, q8_K for 256), plus the sum of each 32 quantized values for the min term.

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
    /// `x` is `[m][k]`, `k` a multiple of `block_len` (itself a multiple of 32).
    pub fn new(x: &[f32], k: usize, block_len: usize) -> Self {
        let m = x.len() / k;
        let mut out = QuantizedRows {
            k,
            block_len,
            q: vec![0; m * k],
            d: vec![0.0; m * k / block_len],
            sums: vec![0; m * k / 32],
        };
        for ((xb, qb), d) in x.chunks_exact(block_len).zip(out.q.chunks_exact_mut(block_len)).zip(&mut out.d) {
            let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
            *d = amax / 127.0;
            let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
            for (q, v) in qb.iter_mut().zip(xb) {
                *q = (v * inv).round() as i8;
            }
        }
        for (s, qc) in out.sums.iter_mut().zip(out.q.chunks_exact(32)) {
            *s = qc.iter().map(|&v| v as i32).sum();
        }
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
