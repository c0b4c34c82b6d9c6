//! Slow, direct implementations of [`super::paged_decode`] and [`super::paged_decode_selected`],
//! the yardsticks for tests and fuzzing.

use super::decode::{check_softcap, AttentionWithLse, DecodeInputs};
use crate::selection::PageSelection;
use candle_core::{DType, Result, Tensor};

/// Same contract as [`super::paged_decode`]: gathers each sequence's keys and values into dense
/// f32 arrays straight from the cache layout, then applies the textbook softmax.
pub fn paged_decode_reference(
    query: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    softmax_scale: f32,
    softcap: Option<f32>,
) -> Result<Tensor> {
    check_softcap(softcap)?;
    let inputs = DecodeInputs::read(query, key_cache, value_cache, block_tables, context_lens)?;
    let head_dim = inputs.geometry.head_dim;
    let caches = DenseCaches::read(key_cache, value_cache)?;

    let mut out = vec![0f32; inputs.output_len()];
    for seq in 0..inputs.batch {
        let (keys, values) = caches.sequence(&inputs, seq);
        for row in 0..inputs.rows {
            let visible = inputs.visible_tokens(seq, row);
            if visible == 0 {
                continue;
            }
            for head in 0..inputs.heads {
                let kv_head = head / inputs.group;
                let q_at = inputs.query_index(seq, row, head);
                let q = &inputs.queries[q_at..q_at + head_dim];
                let scores: Vec<f32> = (0..visible)
                    .map(|t| {
                        let k = keys.token(t, kv_head);
                        let score =
                            softmax_scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>();
                        match softcap {
                            Some(cap) => cap * (score / cap).tanh(),
                            None => score,
                        }
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let weights: Vec<f32> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f32 = weights.iter().sum();
                let o = &mut out[q_at..q_at + head_dim];
                for (t, w) in weights.iter().enumerate() {
                    for (o, v) in o.iter_mut().zip(values.token(t, kv_head)) {
                        *o += w / total * v;
                    }
                }
            }
        }
    }
    inputs.output_tensor(out)
}

/// Same contract as [`super::paged_decode_selected`]: lists each row's allowed tokens explicitly
/// (selected pages with the row's bit, cut at its causal limit) and applies the textbook softmax
/// in f64.
#[allow(clippy::too_many_arguments)]
pub fn paged_decode_selected_reference(
    query: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    context_lens: &Tensor,
    selection: &PageSelection,
    softmax_scale: f32,
    softcap: Option<f32>,
) -> Result<AttentionWithLse> {
    check_softcap(softcap)?;
    let inputs = DecodeInputs::read(query, key_cache, value_cache, block_tables, context_lens)?;
    inputs.check_selection(selection)?;
    let (head_dim, block_size) = (inputs.geometry.head_dim, inputs.geometry.block_size);
    let caches = DenseCaches::read(key_cache, value_cache)?;

    let mut out = vec![0f32; inputs.output_len()];
    let mut lse = vec![f32::NEG_INFINITY; inputs.lse_len()];
    for seq in 0..inputs.batch {
        let (keys, values) = caches.sequence(&inputs, seq);
        for row in 0..inputs.rows {
            let visible = inputs.visible_tokens(seq, row);
            for head in 0..inputs.heads {
                let kv_head = head / inputs.group;
                let allowed: Vec<usize> = selection
                    .list(seq, kv_head)
                    .iter()
                    .filter(|u| (u.rows >> row) & 1 == 1)
                    .flat_map(|u| {
                        let start = u.page as usize * block_size;
                        start..(start + block_size).min(visible)
                    })
                    .collect();
                if allowed.is_empty() {
                    continue;
                }
                let q_at = inputs.query_index(seq, row, head);
                let q = &inputs.queries[q_at..q_at + head_dim];
                let scores: Vec<f64> = allowed
                    .iter()
                    .map(|&t| {
                        let k = keys.token(t, kv_head);
                        let score = softmax_scale as f64
                            * q.iter()
                                .zip(k)
                                .map(|(&a, &b)| a as f64 * b as f64)
                                .sum::<f64>();
                        softcap.map_or(score, |cap| cap as f64 * (score / cap as f64).tanh())
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for (d, o) in out[q_at..q_at + head_dim].iter_mut().enumerate() {
                    let weighted: f64 = allowed
                        .iter()
                        .zip(&weights)
                        .map(|(&t, w)| w * values.token(t, kv_head)[d] as f64)
                        .sum();
                    *o = (weighted / total) as f32;
                }
                lse[(seq * inputs.rows + row) * inputs.heads + head] = (max + total.ln()) as f32;
            }
        }
    }
    Ok(AttentionWithLse {
        out: inputs.output_tensor(out)?,
        lse,
    })
}

/// Both caches as flat f32, indexed straight from the upstream layout.
struct DenseCaches {
    keys: Vec<f32>,
    values: Vec<f32>,
}

/// One sequence's keys or values, `[tokens][kv_heads][head_dim]`.
struct Tokens {
    data: Vec<f32>,
    kv_heads: usize,
    head_dim: usize,
}

impl Tokens {
    fn token(&self, t: usize, kv_head: usize) -> &[f32] {
        &self.data[(t * self.kv_heads + kv_head) * self.head_dim..][..self.head_dim]
    }
}

impl DenseCaches {
    fn read(key_cache: &Tensor, value_cache: &Tensor) -> Result<Self> {
        let flat = |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
        Ok(Self {
            keys: flat(key_cache)?,
            values: flat(value_cache)?,
        })
    }

    /// Gathers sequence `seq`'s context into `(keys, values)`.
    fn sequence(&self, inputs: &DecodeInputs, seq: usize) -> (Tokens, Tokens) {
        let g = inputs.geometry;
        let (kv_heads, head_dim, block_size, x) = (g.kv_heads, g.head_dim, g.block_size, g.chunk);
        let tokens = inputs.context_lens[seq];
        let table = inputs.tables.of(seq);
        let mut keys = vec![0f32; tokens * kv_heads * head_dim];
        let mut values = vec![0f32; tokens * kv_heads * head_dim];
        for t in 0..tokens {
            let (block, off) = (table[t / block_size] as usize, t % block_size);
            for h in 0..kv_heads {
                for d in 0..head_dim {
                    let key_at =
                        (((block * kv_heads + h) * (head_dim / x) + d / x) * block_size + off) * x
                            + d % x;
                    let value_at = ((block * kv_heads + h) * head_dim + d) * block_size + off;
                    keys[(t * kv_heads + h) * head_dim + d] = self.keys[key_at];
                    values[(t * kv_heads + h) * head_dim + d] = self.values[value_at];
                }
            }
        }
        let wrap = |data| Tokens {
            data,
            kv_heads,
            head_dim,
        };
        (wrap(keys), wrap(values))
    }
}
