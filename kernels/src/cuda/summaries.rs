//! Page summaries on the device: each block's min and max key per channel, refreshed after a
//! cache write (`page_summaries.cu`).

use super::*;

/// Recompute the page bounds (`[num_blocks, kv_heads, 2, head_dim]` in the cache's dtype, min then
/// max: exact, a min or max of cache values is a cache value) of every block `slot_mapping` (i64,
/// -1 = no write) touches, from the key cache. Run after each cache write.
pub fn refresh_page_bounds(key_cache: &Tensor, slot_mapping: &Tensor, bounds: &Tensor) -> Result<()> {
    let dev = cuda_device(key_cache, "key_cache")?;
    let (blocks, kv_heads, chunks, block_size, x) = key_cache.dims5()?;
    let head_dim = chunks * x;
    check_dims(bounds, &[blocks, kv_heads, 2, head_dim], "page bounds")?;
    check_dtype(bounds, key_cache.dtype(), "page bounds")?;
    check_dtype(slot_mapping, DType::I64, "slot_mapping")?;
    let slots = slot_mapping.elem_count();
    if slots == 0 {
        return Ok(());
    }
    let name = format!("refresh_page_bounds_{}", suffix(key_cache.dtype(), "key_cache")?);
    let func = function(&dev, "page_summaries", &name)?;
    let (ks, kl) = key_cache.storage_and_layout();
    let (ss, sl) = slot_mapping.storage_and_layout();
    let (bs, bl) = bounds.storage_and_layout();
    let (kv_heads_i, head_dim_i, block_size_i, blocks_i) = (kv_heads as i32, head_dim as i32, block_size as i32, blocks as i32);
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&func);
    macro_rules! go {
        ($t:ty) => {{
            let k = view::<$t>(&ks, kl, "key_cache")?;
            let s = view::<i64>(&ss, sl, "slot_mapping")?;
            let o = view::<$t>(&bs, bl, "page bounds")?;
            b.arg(&k).arg(&s).arg(&o).arg(&kv_heads_i).arg(&head_dim_i).arg(&block_size_i).arg(&blocks_i);
            unsafe { b.launch(launch1d((slots as u32, kv_heads as u32, 1), head_dim.min(128) as u32, 0)) }.w()?;
        }};
    }
    match key_cache.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
    Ok(())
}
