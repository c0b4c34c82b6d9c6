//! Slow, direct implementation of [`super::paged_decode`], the yardstick for tests and fuzzing.

use super::decode::{check_softcap, DecodeInputs};
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
    let g = inputs.geometry;
    let (kv_heads, head_dim, block_size, x) = (g.kv_heads, g.head_dim, g.block_size, g.chunk);
    let key_cache = key_cache
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let value_cache = value_cache
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;

    let mut out = vec![0f32; inputs.output_len()];
    for seq in 0..inputs.batch {
        let tokens = inputs.context_lens[seq];
        let table = inputs.tables.of(seq);
        // keys[t][kv_head][d], values[t][kv_head][d]
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
                    keys[(t * kv_heads + h) * head_dim + d] = key_cache[key_at];
                    values[(t * kv_heads + h) * head_dim + d] = value_cache[value_at];
                }
            }
        }

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
                        let k = &keys[(t * kv_heads + kv_head) * head_dim..][..head_dim];
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
                    let v = &values[(t * kv_heads + kv_head) * head_dim..][..head_dim];
                    for (o, v) in o.iter_mut().zip(v) {
                        *o += w / total * v;
                    }
                }
            }
        }
    }
    inputs.output_tensor(out)
}
