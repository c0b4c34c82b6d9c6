//! Retro's output-cache step on the device (`selected_decode.cu`, `merge_step`).

use super::*;

/// Retro's output-cache step for one layer. `entries` (i32 values in a u32 tensor) `[k, 3]`: a cached
/// row of `cache_o` f32 `[n, heads, head_dim]` / `cache_lse` f32 `[n, heads]` (plus `row_offset`),
/// the partial row of `part_o [m, heads, head_dim]` / `part_lse [m, heads]` it absorbs (-1: none),
/// exactly by log-sum-exp over disjoint tokens, and the partial row that then replaces it (-1: none;
/// a row entering the window). A merged row is also written back over its partial row, so `part_o`
/// becomes the layer's corrected output. Rows are checked against `n` and `m` on the host side
/// (the caller's tables), not here: reading them back would stall the stream.
pub fn merge_step(cache_o: &Tensor, cache_lse: &Tensor, part_o: &Tensor, part_lse: &Tensor, entries: &Tensor, row_offset: usize) -> Result<()> {
    let dev = cuda_device(cache_o, "cache_o")?;
    let (n, heads, head_dim) = cache_o.dims3()?;
    check_dtype(cache_o, DType::F32, "cache_o")?;
    check_dims(cache_lse, &[n, heads], "cache_lse")?;
    let (m, ph, pd) = part_o.dims3()?;
    if (ph, pd) != (heads, head_dim) {
        bail!("retro-kernels: partial output {:?} does not match the cache's heads x head dim", part_o.dims());
    }
    check_dims(part_lse, &[m, heads], "part_lse")?;
    check_dtype(entries, DType::U32, "entries")?;
    let (k, three) = entries.dims2()?;
    if three != 3 || row_offset > n {
        bail!("retro-kernels: entries {:?} must be [k, 3] and row offset {row_offset} within {n} rows", entries.dims());
    }
    if k == 0 {
        return Ok(());
    }
    let func = function(&dev, "selected_decode", &format!("merge_step_{}", suffix(part_o.dtype(), "part_o")?))?;
    let (cs, cl) = cache_o.storage_and_layout();
    let (es, el) = cache_lse.storage_and_layout();
    let (ps, pl) = part_o.storage_and_layout();
    let (ls, ll) = part_lse.storage_and_layout();
    let (rs, rl) = entries.storage_and_layout();
    let c_ = view::<f32>(&cs, cl, "cache_o")?;
    let e_ = view::<f32>(&es, el, "cache_lse")?;
    let l_ = view::<f32>(&ls, ll, "part_lse")?;
    let r_ = view::<u32>(&rs, rl, "entries")?;
    let ints = [row_offset as i32, heads as i32, head_dim as i32];
    let stream = dev.cuda_stream();
    let cfg = launch1d((k as u32, heads as u32, 1), head_dim as u32, 0);
    let mut b = stream.launch_builder(&func);
    macro_rules! go {
        ($t:ty) => {{
            let p_ = view::<$t>(&ps, pl, "part_o")?;
            b.arg(&c_).arg(&e_).arg(&p_).arg(&l_).arg(&r_).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]);
            unsafe { b.launch(cfg) }.w()?;
        }};
    }
    match part_o.dtype() {
        DType::F32 => go!(f32),
        DType::F16 => go!(half::f16),
        _ => go!(half::bf16),
    }
    Ok(())
}
