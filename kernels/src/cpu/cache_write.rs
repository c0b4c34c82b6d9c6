//! Scatter of new key/value rows into the paged caches.

use super::access::{ensure_cpu, ensure_float_dtype, CacheElem, CacheGeometry};
use candle_core::{bail, CpuStorage, DType, InplaceOp3, Layout, Result, Tensor};
use rayon::prelude::*;

/// Below this many rows the rayon fan-out costs more than the copies.
const PARALLEL_MIN_ROWS: usize = 64;

/// Writes rows `key`/`value` `[N, kv_heads, head_dim]` into the paged caches at `slot_mapping`
/// `[N]` (i64; a negative slot skips its row). Rows are converted to the cache dtype first. All
/// shapes and slots are validated before anything is written.
pub fn write_kv(
    key: &Tensor,
    value: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    slot_mapping: &Tensor,
) -> Result<()> {
    let geometry = CacheGeometry::of(key_cache, value_cache)?;
    for (t, what) in [
        (key, "key"),
        (value, "value"),
        (slot_mapping, "slot_mapping"),
    ] {
        ensure_cpu(t, what)?;
    }
    ensure_float_dtype(key.dtype(), "key")?;
    ensure_float_dtype(value.dtype(), "value")?;
    let (rows, kv_heads, head_dim) = key.dims3()?;
    if value.dims() != key.dims() {
        bail!(
            "value shape {:?} differs from key shape {:?}",
            value.dims(),
            key.dims()
        );
    }
    if (kv_heads, head_dim) != (geometry.kv_heads, geometry.head_dim) {
        bail!(
            "key rows have {kv_heads} heads x {head_dim} dims, the caches {} x {}",
            geometry.kv_heads,
            geometry.head_dim
        );
    }
    if slot_mapping.dtype() != DType::I64 {
        bail!("slot_mapping must be i64, got {:?}", slot_mapping.dtype());
    }
    if slot_mapping.dims() != [rows] {
        bail!(
            "slot_mapping shape {:?} does not match {rows} rows",
            slot_mapping.dims()
        );
    }
    // Slots are range-checked inside the op, before its first write; the key write fails first,
    // so a bad slot leaves both caches untouched.
    let slots = slot_mapping.contiguous()?;
    let key = key.to_dtype(geometry.dtype)?.contiguous()?;
    let value = value.to_dtype(geometry.dtype)?.contiguous()?;
    key_cache.inplace_op3(
        &key,
        &slots,
        &WriteRows {
            geometry,
            target: CacheKind::Key,
        },
    )?;
    value_cache.inplace_op3(
        &value,
        &slots,
        &WriteRows {
            geometry,
            target: CacheKind::Value,
        },
    )
}

/// One cache block and the (slot, row) writes that land in it.
type BlockWrites<'a, T> = (&'a mut [T], &'a [(usize, usize)]);

#[derive(Clone, Copy)]
enum CacheKind {
    Key,
    Value,
}

/// In-place op: `cache.inplace_op3(rows, slots)`, rows already in the cache dtype.
struct WriteRows {
    geometry: CacheGeometry,
    target: CacheKind,
}

impl InplaceOp3 for WriteRows {
    fn name(&self) -> &'static str {
        match self.target {
            CacheKind::Key => "retro-cpu-write-key-cache",
            CacheKind::Value => "retro-cpu-write-value-cache",
        }
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        cache_layout: &Layout,
        rows: &CpuStorage,
        rows_layout: &Layout,
        slots: &CpuStorage,
        slots_layout: &Layout,
    ) -> Result<()> {
        match self.geometry.dtype {
            DType::F32 => {
                self.write::<f32>(cache, cache_layout, rows, rows_layout, slots, slots_layout)
            }
            DType::F16 => {
                self.write::<half::f16>(cache, cache_layout, rows, rows_layout, slots, slots_layout)
            }
            DType::BF16 => self.write::<half::bf16>(
                cache,
                cache_layout,
                rows,
                rows_layout,
                slots,
                slots_layout,
            ),
            other => bail!("{}: unsupported cache dtype {other:?}", self.name()),
        }
    }
}

fn contiguous_range(layout: &Layout, what: &str) -> Result<std::ops::Range<usize>> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(start..end),
        None => bail!("{what} must be contiguous"),
    }
}

impl WriteRows {
    fn write<T: CacheElem>(
        &self,
        cache: &mut CpuStorage,
        cache_layout: &Layout,
        rows: &CpuStorage,
        rows_layout: &Layout,
        slots: &CpuStorage,
        slots_layout: &Layout,
    ) -> Result<()> {
        let g = &self.geometry;
        let Some(cache) = T::cpu_slice_mut(cache) else {
            bail!("{}: cache storage is not {:?}", self.name(), T::DTYPE);
        };
        let cache = &mut cache[contiguous_range(cache_layout, "cache")?];
        let rows = &rows.as_slice::<T>()?[contiguous_range(rows_layout, "rows")?];
        let slots = &slots.as_slice::<i64>()?[contiguous_range(slots_layout, "slot_mapping")?];
        let row_len = g.kv_heads * g.head_dim;
        if cache.len() != g.num_blocks * g.block_len() || rows.len() != slots.len() * row_len {
            bail!(
                "{}: storage sizes do not match the validated shapes",
                self.name()
            );
        }

        // (slot, row) sorted by slot, so each block's rows are adjacent; ties keep row order, so a
        // duplicated slot ends up holding its last row, as a serial scatter would leave it.
        let mut targets: Vec<(usize, usize)> = Vec::with_capacity(slots.len());
        for (row, &slot) in slots.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            let slot = slot as usize;
            if slot >= g.capacity_tokens() {
                bail!(
                    "slot {slot} is out of range: the caches hold {} tokens",
                    g.capacity_tokens()
                );
            }
            targets.push((slot, row));
        }
        let row_of = |row: usize| &rows[row * row_len..(row + 1) * row_len];

        if targets.len() <= PARALLEL_MIN_ROWS {
            for &(slot, row) in &targets {
                let block = slot / g.block_size;
                let block_data = &mut cache[block * g.block_len()..(block + 1) * g.block_len()];
                self.write_row(block_data, slot % g.block_size, row_of(row));
            }
            return Ok(());
        }

        targets.sort_unstable();
        // Hand each touched block's slice to one task; blocks are disjoint, so no locking.
        let mut per_block: Vec<BlockWrites<T>> = Vec::new();
        let mut rest = cache;
        let mut rest_first_block = 0;
        let mut remaining = &targets[..];
        while let Some(&(first_slot, _)) = remaining.first() {
            let block = first_slot / g.block_size;
            let in_block = remaining.partition_point(|&(slot, _)| slot / g.block_size == block);
            let (block_targets, later) = remaining.split_at(in_block);
            let (_, tail) = rest.split_at_mut((block - rest_first_block) * g.block_len());
            let (block_data, after) = tail.split_at_mut(g.block_len());
            per_block.push((block_data, block_targets));
            rest = after;
            rest_first_block = block + 1;
            remaining = later;
        }
        per_block
            .into_par_iter()
            .for_each(|(block_data, block_targets)| {
                for &(slot, row) in block_targets {
                    self.write_row(block_data, slot % g.block_size, row_of(row));
                }
            });
        Ok(())
    }

    /// Writes one token's `[kv_heads, head_dim]` row at offset `off` of one block.
    fn write_row<T: CacheElem>(&self, block_data: &mut [T], off: usize, row: &[T]) {
        let g = &self.geometry;
        let pages = block_data.chunks_exact_mut(g.page_len());
        for (page, head_row) in pages.zip(row.chunks_exact(g.head_dim)) {
            match self.target {
                CacheKind::Key => {
                    for (c, chunk) in head_row.chunks_exact(g.chunk).enumerate() {
                        let at = g.key_in_page(off, c * g.chunk);
                        page[at..at + g.chunk].copy_from_slice(chunk);
                    }
                }
                CacheKind::Value => {
                    for (d, &v) in head_row.iter().enumerate() {
                        page[g.value_in_page(off, d)] = v;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::{garbage_caches, key_chunk, to_f32_vec, Rng};
    use super::*;
    use candle_core::Device;

    /// Applies the writes with the layout formulas spelled out, to flat f32 copies of the caches.
    #[allow(clippy::too_many_arguments)]
    fn expected_caches(
        key_cache: &[f32],
        value_cache: &[f32],
        keys: &[f32],
        values: &[f32],
        slots: &[i64],
        kv_heads: usize,
        head_dim: usize,
        block_size: usize,
        x: usize,
    ) -> (Vec<f32>, Vec<f32>) {
        let (mut key_cache, mut value_cache) = (key_cache.to_vec(), value_cache.to_vec());
        for (row, &slot) in slots.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            let (block, off) = (slot as usize / block_size, slot as usize % block_size);
            for h in 0..kv_heads {
                for d in 0..head_dim {
                    let src = (row * kv_heads + h) * head_dim + d;
                    let key_at =
                        (((block * kv_heads + h) * (head_dim / x) + d / x) * block_size + off) * x
                            + d % x;
                    let value_at = ((block * kv_heads + h) * head_dim + d) * block_size + off;
                    key_cache[key_at] = keys[src];
                    value_cache[value_at] = values[src];
                }
            }
        }
        (key_cache, value_cache)
    }

    /// Rows `[rows, kv_heads, head_dim]` as a non-contiguous view of a `[kv_heads, rows, head_dim]`
    /// tensor.
    fn strided_rows(
        rng: &mut Rng,
        rows: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
    ) -> Tensor {
        let rows_view = rng
            .tensor(&[kv_heads, rows, head_dim], 2.0, dtype)
            .transpose(0, 1)
            .unwrap();
        assert!(!rows_view.is_contiguous() || kv_heads == 1 || rows == 1);
        rows_view
    }

    #[test]
    fn write_kv_places_every_element_and_leaves_the_rest() {
        let mut rng = Rng::new(1);
        // 30 blocks of 8 still hold the largest write (200 rows).
        let (kv_heads, head_dim, num_blocks) = (3, 64, 30);
        for cache_dtype in [DType::F32, DType::F16, DType::BF16] {
            for block_size in [8, 16, 32] {
                for (rows, source_dtype) in [
                    (5, cache_dtype),
                    (40, DType::F32),
                    (150, cache_dtype),
                    (200, DType::F32),
                ] {
                    let (key_cache, value_cache) = garbage_caches(
                        &mut rng,
                        num_blocks,
                        kv_heads,
                        head_dim,
                        block_size,
                        cache_dtype,
                    );
                    let (key_before, value_before) =
                        (to_f32_vec(&key_cache), to_f32_vec(&value_cache));
                    let keys = strided_rows(&mut rng, rows, kv_heads, head_dim, source_dtype);
                    let values = strided_rows(&mut rng, rows, kv_heads, head_dim, source_dtype);
                    let mut free_slots: Vec<i64> = (0..(num_blocks * block_size) as i64).collect();
                    rng.shuffle(&mut free_slots);
                    let slots: Vec<i64> = (0..rows)
                        .map(|r| if rng.below(5) == 0 { -1 } else { free_slots[r] })
                        .collect();
                    let slot_tensor = Tensor::from_vec(slots.clone(), rows, &Device::Cpu).unwrap();

                    write_kv(&keys, &values, &key_cache, &value_cache, &slot_tensor).unwrap();

                    // Rounded to the cache dtype first: that is what the cache can hold.
                    let rounded = |t: &Tensor| to_f32_vec(&t.to_dtype(cache_dtype).unwrap());
                    let (key_expected, value_expected) = expected_caches(
                        &key_before,
                        &value_before,
                        &rounded(&keys),
                        &rounded(&values),
                        &slots,
                        kv_heads,
                        head_dim,
                        block_size,
                        key_chunk(cache_dtype),
                    );
                    let what = format!(
                        "{cache_dtype:?} cache, block {block_size}, {rows} {source_dtype:?} rows"
                    );
                    assert!(
                        to_f32_vec(&key_cache) == key_expected,
                        "key cache differs: {what}"
                    );
                    assert!(
                        to_f32_vec(&value_cache) == value_expected,
                        "value cache differs: {what}"
                    );
                }
            }
        }
    }

    #[test]
    fn write_kv_duplicate_slot_keeps_the_last_row() {
        let mut rng = Rng::new(2);
        for rows in [4, 100] {
            let (key_cache, value_cache) = garbage_caches(&mut rng, 16, 2, 64, 16, DType::F32);
            let keys = rng.tensor(&[rows, 2, 64], 1.0, DType::F32);
            let values = rng.tensor(&[rows, 2, 64], 1.0, DType::F32);
            let mut slots: Vec<i64> = (0..rows as i64)
                .map(|r| if r == 1 { 7 } else { r + 20 })
                .collect();
            slots[rows - 1] = 7;
            write_kv(
                &keys,
                &values,
                &key_cache,
                &value_cache,
                &Tensor::new(slots.as_slice(), &Device::Cpu).unwrap(),
            )
            .unwrap();
            // Slot 7 = block 0, offset 7: value element d of head 0 sits at d * 16 + 7.
            let last_values = to_f32_vec(&values.get(rows - 1).unwrap());
            let cached = to_f32_vec(&value_cache);
            for d in 0..64 {
                assert_eq!(cached[d * 16 + 7], last_values[d], "rows {rows}, d {d}");
            }
        }
    }

    #[test]
    fn write_kv_rejects_bad_arguments_without_writing() {
        let mut rng = Rng::new(3);
        let (key_cache, value_cache) = garbage_caches(&mut rng, 4, 2, 64, 8, DType::F16);
        let (key_before, value_before) = (to_f32_vec(&key_cache), to_f32_vec(&value_cache));
        let keys = rng.tensor(&[3, 2, 64], 1.0, DType::F16);
        let slots = |s: &[i64]| Tensor::new(s, &Device::Cpu).unwrap();

        let out_of_range = write_kv(&keys, &keys, &key_cache, &value_cache, &slots(&[0, 32, 1]));
        assert!(out_of_range
            .unwrap_err()
            .to_string()
            .contains("out of range"));

        let wrong_heads = rng.tensor(&[3, 4, 64], 1.0, DType::F16);
        assert!(write_kv(
            &wrong_heads,
            &wrong_heads,
            &key_cache,
            &value_cache,
            &slots(&[0, 1, 2])
        )
        .is_err());

        let wrong_dim = rng.tensor(&[3, 2, 32], 1.0, DType::F16);
        assert!(write_kv(
            &wrong_dim,
            &wrong_dim,
            &key_cache,
            &value_cache,
            &slots(&[0, 1, 2])
        )
        .is_err());

        let short_slots = slots(&[0, 1]);
        assert!(write_kv(&keys, &keys, &key_cache, &value_cache, &short_slots).is_err());

        let u32_slots = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
        assert!(write_kv(&keys, &keys, &key_cache, &value_cache, &u32_slots).is_err());

        let (_, f32_value_cache) = garbage_caches(&mut rng, 4, 2, 64, 8, DType::F32);
        assert!(write_kv(
            &keys,
            &keys,
            &key_cache,
            &f32_value_cache,
            &slots(&[0, 1, 2])
        )
        .is_err());

        let wrong_chunk = rng.tensor(&[4, 2, 16, 8, 4], 1.0, DType::F16);
        assert!(write_kv(&keys, &keys, &wrong_chunk, &value_cache, &slots(&[0, 1, 2])).is_err());

        assert!(to_f32_vec(&key_cache) == key_before && to_f32_vec(&value_cache) == value_before);
    }
}
