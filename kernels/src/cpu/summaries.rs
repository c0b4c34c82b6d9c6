//! Per-page key bounds (Quest's page summaries): for every block, KV head and channel, the min and
//! max key over the block's slots. Kept beside the paged KV cache, one table per layer.
//!
//! A block's bounds are recomputed from the cache whenever any of its slots is written (prefill,
//! decode, retro overwrites, a reused block), so they always describe the block's current content.
//! Slots not yet written in a partial block make its bounds loose, which does not matter: the
//! partial (last) page of a sequence is always selected and never scored.

use std::sync::{RwLock, RwLockReadGuard};

use candle_core::{bail, CpuStorage, Result, Storage, Tensor};
use half::{bf16, f16};

pub struct PageSummaries {
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub num_blocks: usize,
    /// Per layer: `[num_blocks][kv_heads][2][head_dim]`, min then max.
    layers: Vec<RwLock<Vec<f32>>>,
}

impl PageSummaries {
    /// Sized for `num_layers` key caches shaped like `key_cache` (upstream layout
    /// `[blocks, kv_heads, head_dim / x, block_size, x]`).
    pub fn for_cache(key_cache: &Tensor, num_layers: usize) -> Result<Self> {
        let (num_blocks, kv_heads, chunks, block_size, x) = key_cache.dims5()?;
        let head_dim = chunks * x;
        let per_layer = num_blocks * kv_heads * 2 * head_dim;
        let layers = (0..num_layers).map(|_| RwLock::new(vec![0f32; per_layer])).collect();
        Ok(Self { block_size, kv_heads, head_dim, num_blocks, layers })
    }

    pub fn bytes(&self) -> usize {
        self.layers.len() * self.num_blocks * self.kv_heads * 2 * self.head_dim * 4
    }

    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Offset of (block, kv_head)'s `[2][head_dim]` bounds in a layer table.
    #[inline]
    pub fn offset(&self, block: usize, kv_head: usize) -> usize {
        (block * self.kv_heads + kv_head) * 2 * self.head_dim
    }

    pub fn layer(&self, layer: usize) -> RwLockReadGuard<'_, Vec<f32>> {
        self.layers[layer].read().expect("page summaries lock poisoned")
    }

    /// Recompute the bounds of the blocks that `slot_mapping` (i64, -1 = none) writes.
    pub fn refresh_written(&self, layer: usize, key_cache: &Tensor, slot_mapping: &Tensor) -> Result<()> {
        let slots = slot_mapping.flatten_all()?.to_vec1::<i64>()?;
        let mut blocks: Vec<usize> = slots.iter().filter(|&&s| s >= 0).map(|&s| s as usize / self.block_size).collect();
        blocks.sort_unstable();
        blocks.dedup();
        self.refresh(layer, key_cache, &blocks)
    }

    pub fn refresh(&self, layer: usize, key_cache: &Tensor, blocks: &[usize]) -> Result<()> {
        if layer >= self.layers.len() {
            bail!("page summaries: layer {layer} out of range ({} layers)", self.layers.len());
        }
        let (storage, cache_layout) = key_cache.storage_and_layout();
        if !cache_layout.is_contiguous() {
            bail!("page summaries: key cache must be contiguous");
        }
        let start = cache_layout.start_offset();
        let mut table = self.layers[layer].write().expect("page summaries lock poisoned");
        match &*storage {
            Storage::Cpu(CpuStorage::F32(data)) => self.refresh_typed(&data[start..], blocks, &mut table, |v| v),
            Storage::Cpu(CpuStorage::F16(data)) => self.refresh_typed(&data[start..], blocks, &mut table, f16::to_f32),
            Storage::Cpu(CpuStorage::BF16(data)) => self.refresh_typed(&data[start..], blocks, &mut table, bf16::to_f32),
            _ => bail!("page summaries: key cache must be an f32/f16/bf16 CPU tensor"),
        }
    }

    fn refresh_typed<T: Copy>(&self, cache: &[T], blocks: &[usize], table: &mut [f32], to_f32: impl Fn(T) -> f32) -> Result<()> {
        let (bs, d) = (self.block_size, self.head_dim);
        let page = bs * d;
        // x: channels per 16-byte chunk in the upstream key layout.
        let x = 16 / std::mem::size_of::<T>();
        for &block in blocks {
            if block >= self.num_blocks {
                bail!("page summaries: block {block} out of range ({} blocks)", self.num_blocks);
            }
            for kv_head in 0..self.kv_heads {
                let src = &cache[(block * self.kv_heads + kv_head) * page..][..page];
                let at = self.offset(block, kv_head);
                let (mins, maxs) = table[at..at + 2 * d].split_at_mut(d);
                mins.fill(f32::INFINITY);
                maxs.fill(f32::NEG_INFINITY);
                // src is [d / x][bs][x]: walk it in memory order.
                for (chunk, chunk_data) in src.chunks_exact(bs * x).enumerate() {
                    for token in chunk_data.chunks_exact(x) {
                        for (i, &v) in token.iter().enumerate() {
                            let v = to_f32(v);
                            let c = chunk * x + i;
                            mins[c] = mins[c].min(v);
                            maxs[c] = maxs[c].max(v);
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn bounds_are_the_min_and_max_of_each_written_block() -> Result<()> {
        let (blocks, kv_heads, head_dim, bs) = (4, 2, 8, 4);
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            let x = 16 / dtype.size_in_bytes();
            let key_cache = Tensor::zeros((blocks, kv_heads, head_dim / x, bs, x), dtype, &Device::Cpu)?;
            let value_cache = Tensor::zeros((blocks, kv_heads, head_dim, bs), dtype, &Device::Cpu)?;
            let summaries = PageSummaries::for_cache(&key_cache, 1)?;
            // Write 4 tokens of block 2 (slots 8..12) with known values.
            let n = 4;
            let keys: Vec<f32> = (0..n * kv_heads * head_dim).map(|i| ((i * 37 % 23) as f32) - 11.0).collect();
            let key = Tensor::from_vec(keys.clone(), (n, kv_heads, head_dim), &Device::Cpu)?;
            let slots = Tensor::new(&[8i64, 9, 10, 11], &Device::Cpu)?;
            crate::cpu::write_kv(&key, &key, &key_cache, &value_cache, &slots)?;
            summaries.refresh_written(0, &key_cache, &slots)?;
            let table = summaries.layer(0);
            for h in 0..kv_heads {
                let at = summaries.offset(2, h);
                for c in 0..head_dim {
                    let vals: Vec<f32> = (0..n).map(|t| keys[(t * kv_heads + h) * head_dim + c]).collect();
                    let (lo, hi) = vals.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
                    assert_eq!(table[at + c], lo, "{dtype:?} min h{h} c{c}");
                    assert_eq!(table[at + head_dim + c], hi, "{dtype:?} max h{h} c{c}");
                }
            }
        }
        Ok(())
    }
}
