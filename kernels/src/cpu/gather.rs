//! Gather of whole sequences out of the paged caches into dense `[tokens, kv_heads, head_dim]`.

use super::access::{
    ensure_float_dtype, small_u32_vec, BlockTables, CacheElem, CacheGeometry, CpuRead,
};
use candle_core::{bail, DType, Device, Result, Tensor};
use half::{bf16, f16};
use rayon::prelude::*;

/// Gathers sequence `b`'s tokens `0..len_b` (`len_b = cu[b + 1] - cu[b]`, pages from
/// `block_tables[b]`) into rows `cu[b]..cu[b + 1]` of the outputs. Returns `(keys, values)`, each
/// `[cu[B], kv_heads, head_dim]` in `out_dtype`.
pub fn gather_kv(
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    cu_seqlens_kv: &Tensor,
    out_dtype: DType,
) -> Result<(Tensor, Tensor)> {
    let geometry = CacheGeometry::of(key_cache, value_cache)?;
    ensure_float_dtype(out_dtype, "gather_kv out_dtype")?;
    let cu: Vec<usize> = small_u32_vec(cu_seqlens_kv, "cu_seqlens_kv", 1)?
        .into_iter()
        .map(|c| c as usize)
        .collect();
    if cu.first() != Some(&0) {
        bail!("cu_seqlens_kv must start at 0, got {:?}", cu.first());
    }
    if cu.windows(2).any(|w| w[1] < w[0]) {
        bail!("cu_seqlens_kv must be non-decreasing");
    }
    let batch = cu.len() - 1;
    let tables = BlockTables::read(block_tables, batch)?;
    for seq in 0..batch {
        tables.check_sequence(seq, cu[seq + 1] - cu[seq], &geometry)?;
    }

    let keys = CpuRead::new(key_cache, "key_cache")?;
    let values = CpuRead::new(value_cache, "value_cache")?;
    let job = GatherJob {
        geometry: &geometry,
        tables: &tables,
        cu: &cu,
    };
    match geometry.dtype {
        DType::F32 => job.to_out_dtype::<f32>(keys.slice()?, values.slice()?, out_dtype),
        DType::F16 => job.to_out_dtype::<f16>(keys.slice()?, values.slice()?, out_dtype),
        DType::BF16 => job.to_out_dtype::<bf16>(keys.slice()?, values.slice()?, out_dtype),
        other => bail!("gather_kv: unsupported cache dtype {other:?}"),
    }
}

struct GatherJob<'a> {
    geometry: &'a CacheGeometry,
    tables: &'a BlockTables,
    cu: &'a [usize],
}

/// One page of one sequence and the output rows it fills.
struct PageCopy<'a, O> {
    block: usize,
    tokens: usize,
    keys_out: &'a mut [O],
    values_out: &'a mut [O],
}

impl GatherJob<'_> {
    fn to_out_dtype<T: CacheElem>(
        &self,
        key_cache: &[T],
        value_cache: &[T],
        out_dtype: DType,
    ) -> Result<(Tensor, Tensor)> {
        match out_dtype {
            DType::F32 => self.run::<T, f32>(key_cache, value_cache),
            DType::F16 => self.run::<T, f16>(key_cache, value_cache),
            DType::BF16 => self.run::<T, bf16>(key_cache, value_cache),
            other => bail!("gather_kv: unsupported out_dtype {other:?}"),
        }
    }

    fn run<T: CacheElem, O: CacheElem>(
        &self,
        key_cache: &[T],
        value_cache: &[T],
    ) -> Result<(Tensor, Tensor)> {
        let g = self.geometry;
        let token_len = g.kv_heads * g.head_dim;
        let total = self.cu[self.cu.len() - 1];
        let zero = O::from_f64(0.0);
        let mut keys_out = vec![zero; total * token_len];
        let mut values_out = vec![zero; total * token_len];

        // Carve the outputs into per-page row ranges, in order, so pages fill them in parallel.
        let mut copies = Vec::new();
        let (mut keys_rest, mut values_rest) = (&mut keys_out[..], &mut values_out[..]);
        for seq in 0..self.cu.len() - 1 {
            let tokens = self.cu[seq + 1] - self.cu[seq];
            let table = self.tables.of(seq);
            for (page, first_token) in (0..tokens).step_by(g.block_size).enumerate() {
                let page_tokens = g.block_size.min(tokens - first_token);
                let (keys_page, k_rest) = keys_rest.split_at_mut(page_tokens * token_len);
                let (values_page, v_rest) = values_rest.split_at_mut(page_tokens * token_len);
                (keys_rest, values_rest) = (k_rest, v_rest);
                copies.push(PageCopy {
                    block: table[page] as usize,
                    tokens: page_tokens,
                    keys_out: keys_page,
                    values_out: values_page,
                });
            }
        }

        let staging_len = if T::DTYPE == DType::F32 {
            0
        } else {
            g.page_len()
        };
        copies.into_par_iter().for_each_init(
            || (vec![0f32; staging_len], vec![0f32; g.page_len()]),
            |(staging, rows), copy| {
                for kv_head in 0..g.kv_heads {
                    let page_at = g.page_offset(copy.block, kv_head);
                    let page = page_at..page_at + g.page_len();
                    g.key_page_to_rows(
                        T::as_f32_slice(&key_cache[page.clone()], staging),
                        copy.tokens,
                        rows,
                    );
                    scatter_head_rows(rows, copy.keys_out, kv_head, g.head_dim, token_len);
                    g.value_page_to_rows(
                        T::as_f32_slice(&value_cache[page], staging),
                        copy.tokens,
                        rows,
                    );
                    scatter_head_rows(rows, copy.values_out, kv_head, g.head_dim, token_len);
                }
            },
        );

        let shape = (total, g.kv_heads, g.head_dim);
        Ok((
            Tensor::from_vec(keys_out, shape, &Device::Cpu)?,
            Tensor::from_vec(values_out, shape, &Device::Cpu)?,
        ))
    }
}

/// Copies per-token rows `[tokens][head_dim]` of one kv head into `[tokens][kv_heads][head_dim]`.
fn scatter_head_rows<O: CacheElem>(
    rows: &[f32],
    out: &mut [O],
    kv_head: usize,
    head_dim: usize,
    token_len: usize,
) {
    for (out_token, row) in out
        .chunks_exact_mut(token_len)
        .zip(rows.chunks_exact(head_dim))
    {
        O::from_f32_slice(
            row,
            &mut out_token[kv_head * head_dim..(kv_head + 1) * head_dim],
        );
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{paged_batch, to_f32_vec, Rng};
    use super::*;

    fn cu_seqlens(lens: &[usize]) -> Tensor {
        let cu: Vec<u32> = std::iter::once(0)
            .chain(lens.iter().scan(0, |acc, &l| {
                *acc += l as u32;
                Some(*acc)
            }))
            .collect();
        Tensor::new(cu.as_slice(), &Device::Cpu).unwrap()
    }

    #[test]
    fn gather_returns_the_original_rows() {
        let mut rng = Rng::new(30);
        for cache_dtype in [DType::F32, DType::F16, DType::BF16] {
            for block_size in [8, 16, 32] {
                let lens = [1, block_size - 1, 0, block_size, block_size + 1, 300];
                let batch = paged_batch(&mut rng, &lens, 3, 64, block_size, cache_dtype);
                let original_keys: Vec<f32> = batch.keys.concat();
                let original_values: Vec<f32> = batch.values.concat();
                // Every stored value is exact in f32 and in its own dtype.
                for out_dtype in [cache_dtype, DType::F32] {
                    let (keys, values) = gather_kv(
                        &batch.key_cache,
                        &batch.value_cache,
                        &batch.block_tables,
                        &cu_seqlens(&lens),
                        out_dtype,
                    )
                    .unwrap();
                    let total: usize = lens.iter().sum();
                    assert_eq!(keys.dims(), &[total, 3, 64]);
                    assert_eq!(keys.dtype(), out_dtype);
                    let what =
                        format!("{cache_dtype:?} cache, block {block_size}, {out_dtype:?} out");
                    assert!(to_f32_vec(&keys) == original_keys, "keys: {what}");
                    assert!(to_f32_vec(&values) == original_values, "values: {what}");
                }
            }
        }
    }

    #[test]
    fn gather_converts_to_a_narrower_dtype() {
        let mut rng = Rng::new(31);
        let lens = [40, 7];
        let batch = paged_batch(&mut rng, &lens, 2, 128, 16, DType::F32);
        let (keys, values) = gather_kv(
            &batch.key_cache,
            &batch.value_cache,
            &batch.block_tables,
            &cu_seqlens(&lens),
            DType::BF16,
        )
        .unwrap();
        let expected = |rows: &[Vec<f32>]| {
            let t = Tensor::new(rows.concat(), &Device::Cpu).unwrap();
            to_f32_vec(&t.to_dtype(DType::BF16).unwrap())
        };
        assert!(to_f32_vec(&keys) == expected(&batch.keys));
        assert!(to_f32_vec(&values) == expected(&batch.values));
    }

    #[test]
    fn gather_rejects_bad_cumulative_lengths() {
        let mut rng = Rng::new(32);
        let batch = paged_batch(&mut rng, &[20, 9], 2, 64, 8, DType::F16);
        let gather = |cu: &[u32]| {
            let cu = Tensor::new(cu, &Device::Cpu).unwrap();
            gather_kv(
                &batch.key_cache,
                &batch.value_cache,
                &batch.block_tables,
                &cu,
                DType::F16,
            )
        };
        assert!(gather(&[0, 20, 29]).is_ok());
        assert!(gather(&[1, 20, 29]).is_err(), "must start at 0");
        assert!(gather(&[0, 20, 19]).is_err(), "decreasing");
        assert!(gather(&[0, 20]).is_err(), "batch mismatch");
        assert!(gather(&[0, 40, 49]).is_err(), "past the table");
        assert!(gather(&[]).is_err(), "empty");
    }
}
