//! The fused sparse decode (`selected_decode.cu`): each selected page read once for every query
//! row that uses it, split over CUDA blocks, and the split combine.

use super::*;

/// Dynamic shared memory of the decode kernel (see the layouts in selected_decode.cu).
fn decode_smem(dtype: DType, head_dim: usize, block_size: usize, maxq: usize) -> usize {
    // decode_stages() in selected_decode.cu: pages of K and V in shared memory at once.
    let stages = if dtype == DType::F32 { 2 } else { 3 };
    let pages = stages * 2 * head_dim * block_size * dtype.size_in_bytes();
    if dtype == DType::F32 {
        // selected_decode_fma: f32 queries [maxq][d], probabilities [maxq][bs], three [maxq] rows.
        pages + (maxq * head_dim + maxq * block_size + 3 * maxq) * 4
    } else {
        // selected_decode_mma: queries padded to 16-row tiles, rows padded by 8 (bank conflicts).
        let rows = maxq.div_ceil(16) * 16;
        pages + rows * (head_dim + 8) * 2 + (rows * (block_size + 8) + 3 * rows) * 4
    }
}

/// Sparse decode attention of `query [batch * rows, heads, head_dim]` over the selection: row r of
/// sequence b attends to the listed pages whose mask has bit r, within its causal prefix (the
/// first `context_len - (rows - 1 - r)` tokens). Returns the output in the query's dtype and the
/// natural-log lse per (row, head) in f32 (`-inf` for a row that attended to nothing, output 0).
/// Same semantics as `cpu::paged_decode_selected`. `softcap`: `c * tanh(s / c)` when `Some(c)`.
#[allow(clippy::too_many_arguments)]
pub fn selected_decode(
    plan: &DevicePlan,
    query: &Tensor,
    key_cache: &Tensor,
    value_cache: &Tensor,
    block_tables: &Tensor,
    selection: &Selection,
    softmax_scale: f32,
    softcap: Option<f32>,
) -> Result<(Tensor, Tensor)> {
    let p = &plan.plan;
    let dev = cuda_device(query, "query")?;
    let (_, kv_heads, head_dim, block_size) = cache_geometry(key_cache, value_cache)?;
    let (qrows, heads, qdim) = query.dims3()?;
    check_dtype(key_cache, query.dtype(), "key_cache")?;
    if qdim != head_dim || kv_heads != p.kv_heads || block_size != p.block_size || qrows != p.batch * p.rows {
        bail!(
            "retro-kernels: query {:?} / caches (kv heads {kv_heads}, head dim {head_dim}, block {block_size}) do not fit the plan (batch {}, rows {}, kv heads {}, block {})",
            query.dims(), p.batch, p.rows, p.kv_heads, p.block_size
        );
    }
    if heads % kv_heads != 0 || (heads / kv_heads) * p.rows > MAX_QUERIES {
        bail!("retro-kernels: GQA group {} x window {} exceeds {MAX_QUERIES} queries per block", heads / kv_heads.max(1), p.rows);
    }
    if !matches!(head_dim, 64 | 128) || !matches!(block_size, 16 | 32) {
        bail!("retro-kernels: decode kernels are built for head dim 64/128 and block size 16/32, not {head_dim}/{block_size}");
    }
    check_dtype(block_tables, DType::U32, "block_tables")?;
    let (bt_rows, max_blocks) = block_tables.dims2()?;
    if bt_rows != p.batch || max_blocks < p.max_pages {
        bail!("retro-kernels: block_tables {:?} too small for {} sequences of {} pages", block_tables.dims(), p.batch, p.max_pages);
    }
    check_dims(&selection.pages, &[p.lists(), p.stride.max(1)], "selection pages")?;
    if let Some(c) = softcap {
        if !(c.is_finite() && c > 0.0) {
            bail!("retro-kernels: softcap must be a positive number, got {c}");
        }
    }
    let out = new_tensor_dtype(&dev, query.dtype(), &[qrows, heads, head_dim])?;
    let lse = new_tensor::<f32>(&dev, &[qrows, heads])?;
    if qrows == 0 {
        return Ok((out, lse));
    }
    let splits = p.splits;
    let part_o = new_tensor::<f32>(&dev, &[splits, qrows, heads, head_dim])?;
    let part_lse = new_tensor::<f32>(&dev, &[splits, qrows, heads])?;
    let sfx = suffix(query.dtype(), "query")?;
    let stream = dev.cuda_stream();
    {
        let maxq = queries_per_block((heads / kv_heads) * p.rows);
        let smem = decode_smem(query.dtype(), head_dim, block_size, maxq);
        let name = format!("selected_decode_{sfx}_d{head_dim}_bs{block_size}_q{maxq}");
        let func = function_with(&dev, "selected_decode", &name, |f| {
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()
        })?;
        let (qs, ql) = query.storage_and_layout();
        let (ks, kl) = key_cache.storage_and_layout();
        let (vs, vl) = value_cache.storage_and_layout();
        let (ts, tl) = block_tables.storage_and_layout();
        let (cs, cl) = plan.context_lens.storage_and_layout();
        let (ps, pl) = selection.pages.storage_and_layout();
        let (ns, nl) = selection.counts.storage_and_layout();
        let masks = selection.masks.as_ref().map(|m| m.storage_and_layout());
        let (os, ol) = part_o.storage_and_layout();
        let (ls, ll) = part_lse.storage_and_layout();
        let t_ = view::<u32>(&ts, tl, "block_tables")?;
        let c_ = view::<u32>(&cs, cl, "context_lens")?;
        let p_ = view::<u32>(&ps, pl, "selection pages")?;
        let n_ = view::<u32>(&ns, nl, "selection counts")?;
        let m_ = match &masks {
            Some((ms, ml)) => Some(view::<u32>(ms, ml, "selection masks")?),
            None => None,
        };
        let null: u64 = 0;
        let o_ = view::<f32>(&os, ol, "partial outputs")?;
        let l_ = view::<f32>(&ls, ll, "partial lse")?;
        let ints = [max_blocks as i32, p.stride.max(1) as i32, p.rows as i32, heads as i32, kv_heads as i32, p.pages_per_split as i32];
        let floats = [softmax_scale, softcap.unwrap_or(0.0)];
        let cfg = LaunchConfig {
            grid_dim: (splits as u32, kv_heads as u32, p.batch as u32),
            block_dim: (head_dim as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut b = stream.launch_builder(&func);
        macro_rules! go {
            ($t:ty) => {{
                let q_ = view::<$t>(&qs, ql, "query")?;
                let k_ = view::<$t>(&ks, kl, "key_cache")?;
                let v_ = view::<$t>(&vs, vl, "value_cache")?;
                b.arg(&q_).arg(&k_).arg(&v_).arg(&t_).arg(&ints[0]).arg(&c_).arg(&p_).arg(&n_);
                match &m_ {
                    Some(m) => b.arg(m),
                    None => b.arg(&null),
                };
                b.arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&floats[0]).arg(&floats[1]).arg(&ints[5]).arg(&o_).arg(&l_);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match query.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        }
    }
    {
        let func = function(&dev, "selected_decode", &format!("combine_splits_{sfx}"))?;
        let (os, ol) = part_o.storage_and_layout();
        let (ls, ll) = part_lse.storage_and_layout();
        let (us, ul) = out.storage_and_layout();
        let (es, el) = lse.storage_and_layout();
        let o_ = view::<f32>(&os, ol, "partial outputs")?;
        let l_ = view::<f32>(&ls, ll, "partial lse")?;
        let e_ = view::<f32>(&es, el, "lse")?;
        let ints = [splits as i32, qrows as i32, heads as i32, head_dim as i32];
        let cfg = launch1d((qrows as u32, heads as u32, 1), head_dim as u32, 0);
        let mut b = stream.launch_builder(&func);
        macro_rules! go {
            ($t:ty) => {{
                let u_ = view::<$t>(&us, ul, "output")?;
                b.arg(&o_).arg(&l_).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&u_).arg(&e_);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match query.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        }
    }
    Ok((out, lse))
}

