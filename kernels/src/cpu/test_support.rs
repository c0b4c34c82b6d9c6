//! Deterministic random data, paged batches and a dense f64 attention: helpers for the tests of
//! these kernels and of the policies built on them (public for those, not an API).

use super::write_kv;
use candle_core::{DType, Device, Tensor};

pub use crate::rng::Rng;

pub fn key_chunk(dtype: DType) -> usize {
    16 / dtype.size_in_bytes()
}

/// Caches full of random values, so a missed or misplaced write shows up.
pub fn garbage_caches(
    rng: &mut Rng,
    num_blocks: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    dtype: DType,
) -> (Tensor, Tensor) {
    let x = key_chunk(dtype);
    let key_cache = rng.tensor(
        &[num_blocks, kv_heads, head_dim / x, block_size, x],
        5.0,
        dtype,
    );
    let value_cache = rng.tensor(&[num_blocks, kv_heads, head_dim, block_size], 5.0, dtype);
    (key_cache, value_cache)
}

pub fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Sequences written with `write_kv` into randomly permuted blocks, plus their original K/V.
pub struct PagedBatch {
    pub key_cache: Tensor,
    pub value_cache: Tensor,
    pub block_tables: Tensor,
    pub context_lens: Tensor,
    pub lens: Vec<usize>,
    /// Per sequence `[tokens][kv_heads][head_dim]`, exactly as stored (rounded to the cache dtype).
    pub keys: Vec<Vec<f32>>,
    pub values: Vec<Vec<f32>>,
    pub kv_heads: usize,
}

pub fn paged_batch(
    rng: &mut Rng,
    lens: &[usize],
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    dtype: DType,
) -> PagedBatch {
    let pages: Vec<usize> = lens.iter().map(|l| l.div_ceil(block_size)).collect();
    let num_blocks = pages.iter().sum::<usize>() + 3;
    let mut free_blocks: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut free_blocks);
    // One spare column, padded with an invalid block id that must never be read.
    let max_pages = pages.iter().copied().max().unwrap_or(0) + 1;
    let mut tables = vec![u32::MAX; lens.len() * max_pages];
    let mut next_free = free_blocks.into_iter();
    for (seq, &n) in pages.iter().enumerate() {
        for page in 0..n {
            tables[seq * max_pages + page] = next_free.next().unwrap();
        }
    }

    let (key_cache, value_cache) =
        garbage_caches(rng, num_blocks, kv_heads, head_dim, block_size, dtype);
    let total: usize = lens.iter().sum();
    let keys = rng.tensor(&[total, kv_heads, head_dim], 1.0, dtype);
    let values = rng.tensor(&[total, kv_heads, head_dim], 1.0, dtype);
    let mut slots = Vec::with_capacity(total);
    for (seq, &len) in lens.iter().enumerate() {
        for t in 0..len {
            let block = tables[seq * max_pages + t / block_size] as i64;
            slots.push(block * block_size as i64 + (t % block_size) as i64);
        }
    }
    let slots = Tensor::from_vec(slots, total, &Device::Cpu).unwrap();
    write_kv(&keys, &values, &key_cache, &value_cache, &slots).unwrap();

    let token_len = kv_heads * head_dim;
    let split_per_seq = |all: Vec<f32>| {
        let mut start = 0;
        lens.iter()
            .map(|&len| {
                start += len;
                all[(start - len) * token_len..start * token_len].to_vec()
            })
            .collect::<Vec<_>>()
    };
    PagedBatch {
        key_cache,
        value_cache,
        block_tables: Tensor::from_vec(tables, (lens.len(), max_pages), &Device::Cpu).unwrap(),
        context_lens: Tensor::from_vec(
            lens.iter().map(|&l| l as u32).collect::<Vec<_>>(),
            lens.len(),
            &Device::Cpu,
        )
        .unwrap(),
        lens: lens.to_vec(),
        keys: split_per_seq(to_f32_vec(&keys)),
        values: split_per_seq(to_f32_vec(&values)),
        kv_heads,
    }
}

/// Decode attention from the original (unpaged) K/V in f64, independent of the cache layout.
pub fn dense_decode(
    batch: &PagedBatch,
    query: &Tensor,
    scale: f32,
    softcap: Option<f32>,
) -> Vec<f32> {
    dense_attention(batch, query, scale, softcap, |_, _, _, _| true).0
}

/// Like [`dense_decode`], restricted to the tokens `t` with `allowed(seq, row, kv_head, t)` (within
/// the row's causal limit), and also returning the log-sum-exp per (seq, row, head), `-inf` for
/// rows that attend to nothing.
pub fn dense_attention(
    batch: &PagedBatch,
    query: &Tensor,
    scale: f32,
    softcap: Option<f32>,
    allowed: impl Fn(usize, usize, usize, usize) -> bool,
) -> (Vec<f32>, Vec<f32>) {
    let (query_rows, heads, head_dim) = query.dims3().unwrap();
    let rows = query_rows / batch.lens.len();
    let group = heads / batch.kv_heads;
    let q_all = to_f32_vec(query);
    let mut out = vec![0f32; q_all.len()];
    let mut lse = vec![f32::NEG_INFINITY; query_rows * heads];
    for (seq, &len) in batch.lens.iter().enumerate() {
        for row in 0..rows {
            let visible = len.saturating_sub(rows - 1 - row);
            for head in 0..heads {
                let kv_head = head / group;
                let tokens: Vec<usize> = (0..visible)
                    .filter(|&t| allowed(seq, row, kv_head, t))
                    .collect();
                if tokens.is_empty() {
                    continue;
                }
                let q_at = ((seq * rows + row) * heads + head) * head_dim;
                let q = &q_all[q_at..q_at + head_dim];
                let kv_at = |t: usize| (t * batch.kv_heads + kv_head) * head_dim;
                let scores: Vec<f64> = tokens
                    .iter()
                    .map(|&t| {
                        let k = &batch.keys[seq][kv_at(t)..kv_at(t) + head_dim];
                        let s = scale as f64
                            * q.iter()
                                .zip(k)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>();
                        softcap.map_or(s, |c| c as f64 * (s / c as f64).tanh())
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for d in 0..head_dim {
                    let o: f64 = tokens
                        .iter()
                        .zip(&weights)
                        .map(|(&t, w)| w * batch.values[seq][kv_at(t) + d] as f64)
                        .sum();
                    out[q_at + d] = (o / total) as f32;
                }
                lse[(seq * rows + row) * heads + head] = (max + total.ln()) as f32;
            }
        }
    }
    (out, lse)
}

/// `|actual - expected| <= rel_tol * max|expected|` element-wise (floor 1e-6 on the scale).
pub fn assert_close(actual: &[f32], expected: &[f32], rel_tol: f32, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    let scale = expected.iter().fold(0f32, |m, e| m.max(e.abs())).max(1e-6);
    let (worst, err) = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .enumerate()
        .fold((0, 0f32), |best, (i, err)| {
            if err > best.1 || err.is_nan() {
                (i, err)
            } else {
                best
            }
        });
    assert!(
        err <= rel_tol * scale,
        "{what}: |actual - expected| = {err} at {worst} (actual {}, expected {}) exceeds {rel_tol} * {scale}",
        actual[worst],
        expected[worst]
    );
}
