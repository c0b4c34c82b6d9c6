//! Page selection on the device (`plan.cu`): scores, the per-(sequence, KV head) top-k, and
//! retro's row masks from the seen-page bitsets.

use super::*;

/// Quest's selection for every (sequence, KV head): the first and last page plus the top pages
/// by page bound for the newest query row, `budget_pages` in all (every page when the budget covers
/// them). `queries [batch * rows, heads, head_dim]`, `bounds` in the queries' (the cache's) dtype,
/// `block_tables` u32 `[batch, max_blocks]`.
pub fn select_pages(plan: &DevicePlan, queries: &Tensor, bounds: &Tensor, block_tables: &Tensor) -> Result<Selection> {
    let p = &plan.plan;
    let dev = cuda_device(queries, "queries")?;
    let (qrows, heads, head_dim) = queries.dims3()?;
    if qrows != p.batch * p.rows {
        bail!("retro-kernels: queries have {qrows} rows, the plan {} x {}", p.batch, p.rows);
    }
    if heads % p.kv_heads != 0 {
        bail!("retro-kernels: {heads} query heads do not group over {} kv heads", p.kv_heads);
    }
    // The kernel reads budgets as int: a larger one would wrap negative and select two pages.
    if let Some(b) = p.budget_pages.iter().find(|&&b| b > i32::MAX as u32) {
        bail!("retro-kernels: budget of {b} pages exceeds i32::MAX (clamp it to the sequence's pages)");
    }
    let (num_blocks, kv_heads, two, bounds_dim) = bounds.dims4()?;
    if kv_heads != p.kv_heads || two != 2 || bounds_dim != head_dim {
        bail!("retro-kernels: page bounds {:?} do not fit {} kv heads x head dim {head_dim}", bounds.dims(), p.kv_heads);
    }
    let _ = num_blocks;
    check_dtype(bounds, queries.dtype(), "page bounds")?;
    check_dtype(block_tables, DType::U32, "block_tables")?;
    let (bt_rows, max_blocks) = block_tables.dims2()?;
    if bt_rows != p.batch || max_blocks < p.max_pages {
        bail!("retro-kernels: block_tables {:?} too small for {} sequences of {} pages", block_tables.dims(), p.batch, p.max_pages);
    }
    if head_dim % 4 != 0 || (heads / p.kv_heads) * head_dim > 8 * 256 {
        bail!("retro-kernels: page scoring needs head dim % 4 == 0 and GQA group x head dim <= 2048, got {} x {head_dim}", heads / p.kv_heads);
    }
    let lists = p.lists();
    let pages = new_tensor::<u32>(&dev, &[lists, p.stride.max(1)])?;
    let counts = new_tensor::<u32>(&dev, &[lists])?;
    if lists == 0 {
        return Ok(Selection { pages, counts, masks: None });
    }
    let scores = new_tensor::<f32>(&dev, &[lists, p.max_pages.max(1)])?;
    let stream = dev.cuda_stream();
    // When every budget covers its sequence, the selection is every page: no scores needed.
    let sparse = p.context_lens.iter().zip(&p.budget_pages).any(|(&c, &b)| (b as usize) < (c as usize).div_ceil(p.block_size));
    if sparse {
        let score = function(&dev, "plan", &format!("score_pages_{}", suffix(queries.dtype(), "queries")?))?;
        let (qs, ql) = queries.storage_and_layout();
        let (bs, bl) = bounds.storage_and_layout();
        let (ts, tl) = block_tables.storage_and_layout();
        let (cs, cl) = plan.context_lens.storage_and_layout();
        let (ss, sl) = scores.storage_and_layout();
        let t_ = view::<u32>(&ts, tl, "block_tables")?;
        let c_ = view::<u32>(&cs, cl, "context_lens")?;
        let s_ = view::<f32>(&ss, sl, "scores")?;
        let ints = [max_blocks as i32, p.rows as i32, heads as i32, p.kv_heads as i32, head_dim as i32, p.block_size as i32, p.max_pages as i32];
        // 4 warps of 8 pages per block (SCORE_PAGES_PER_WARP in plan.cu).
        let cfg = launch1d((p.max_pages.div_ceil(32).max(1) as u32, p.kv_heads as u32, p.batch as u32), 128, 0);
        let mut b = stream.launch_builder(&score);
        macro_rules! go {
            ($t:ty) => {{
                let q_ = view::<$t>(&qs, ql, "queries")?;
                let b_ = view::<$t>(&bs, bl, "page bounds")?;
                b.arg(&q_).arg(&b_).arg(&t_).arg(&ints[0]).arg(&c_).arg(&ints[1]).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&ints[5]).arg(&s_).arg(&ints[6]);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match queries.dtype() {
            DType::F32 => go!(f32),
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        }
    }
    {
        let select = function(&dev, "plan", "select_top_pages_u32")?;
        let (ss, sl) = scores.storage_and_layout();
        let (cs, cl) = plan.context_lens.storage_and_layout();
        let (gs, gl) = plan.budget_pages.storage_and_layout();
        let (ps, pl) = pages.storage_and_layout();
        let (ns, nl) = counts.storage_and_layout();
        let s_ = view::<f32>(&ss, sl, "scores")?;
        let c_ = view::<u32>(&cs, cl, "context_lens")?;
        let g_ = view::<u32>(&gs, gl, "budget_pages")?;
        let p_ = view::<u32>(&ps, pl, "selected pages")?;
        let n_ = view::<u32>(&ns, nl, "selected counts")?;
        let ints = [p.max_pages as i32, p.block_size as i32, p.kv_heads as i32, p.stride.max(1) as i32];
        let mut b = stream.launch_builder(&select);
        b.arg(&s_).arg(&ints[0]).arg(&c_).arg(&g_).arg(&ints[1]).arg(&ints[2]).arg(&p_).arg(&n_).arg(&ints[3]);
        unsafe { b.launch(launch1d((p.kv_heads as u32, p.batch as u32, 1), 512, 0)) }.w()?;
    }
    Ok(Selection { pages, counts, masks: None })
}

/// Retro's row masks for a selection, from seen-page bitsets kept on the device across steps.
///
/// `seen` u32 `[pool_rows, kv_heads, words]` (`words * 32` ≥ the plan's pages); `meta` (i32 values
/// in a u32 tensor) `[batch, 2 * rows + 1]`, per sequence: the states of its `rows - 1` past rows (1 = a cached row,
/// which uses the listed pages its bitset lacks and then marks them; 0 = skip), the pool row of
/// each row (past rows, then the newest; -1 = none), its counter slot (-1 = none) and whether the
/// row leaving the window counts toward exposure (1/0); `counters` i64 `[slots, 2]` accumulate
/// supplement pages and the pages the leaving rows had seen. The newest row always uses every listed
/// page; afterwards its pool row (the leaving row's slot) holds exactly this selection. Pool rows in
/// `meta` are relative to `row_offset`, so one uploaded table serves every layer of a step.
pub fn retro_row_masks(plan: &DevicePlan, selection: &mut Selection, seen: &Tensor, meta: &Tensor, counters: &Tensor, row_offset: usize) -> Result<()> {
    let p = &plan.plan;
    let dev = cuda_device(&selection.pages, "selection")?;
    if p.rows < 2 {
        bail!("retro-kernels: row masks need a window of at least 2 rows, the plan has {}", p.rows);
    }
    check_dtype(seen, DType::U32, "seen")?;
    // i32 values carried in a u32 tensor (-1 = 0xffff_ffff): candle has no i32 dtype.
    check_dtype(meta, DType::U32, "meta")?;
    check_dims(meta, &[p.batch, 2 * p.rows + 1], "meta")?;
    check_dtype(counters, DType::I64, "counters")?;
    let (_, two) = counters.dims2()?;
    let (_, sh, words) = seen.dims3()?;
    if sh != p.kv_heads || words * 32 < p.max_pages || two != 2 {
        bail!("retro-kernels: seen {:?} / counters {:?} do not fit {} kv heads x {} pages", seen.dims(), counters.dims(), p.kv_heads, p.max_pages);
    }
    if !seen.is_contiguous() || !meta.is_contiguous() || !counters.is_contiguous() {
        bail!("retro-kernels: seen, meta and counters must be contiguous");
    }
    let masks = new_tensor::<u32>(&dev, &[p.lists(), p.stride.max(1)])?;
    if p.lists() > 0 {
        let func = function(&dev, "plan", "retro_row_masks")?;
        let (ps, pl) = selection.pages.storage_and_layout();
        let (ns, nl) = selection.counts.storage_and_layout();
        let (ms, ml) = masks.storage_and_layout();
        let (es, el) = seen.storage_and_layout();
        let (rs, rl) = meta.storage_and_layout();
        let (cs, cl) = plan.context_lens.storage_and_layout();
        let (ks, kl) = counters.storage_and_layout();
        let p_ = view::<u32>(&ps, pl, "selected pages")?;
        let n_ = view::<u32>(&ns, nl, "selected counts")?;
        let m_ = view::<u32>(&ms, ml, "masks")?;
        let e_ = view::<u32>(&es, el, "seen")?;
        let r_ = view::<u32>(&rs, rl, "meta")?;
        let c_ = view::<u32>(&cs, cl, "context_lens")?;
        let k_ = view::<i64>(&ks, kl, "counters")?;
        let ints = [p.stride.max(1) as i32, words as i32, p.block_size as i32, p.rows as i32, p.kv_heads as i32, row_offset as i32];
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&p_).arg(&n_).arg(&ints[0]).arg(&m_).arg(&e_).arg(&ints[1]).arg(&r_).arg(&c_).arg(&ints[2]).arg(&ints[3]).arg(&ints[4]).arg(&k_).arg(&ints[5]);
        unsafe { b.launch(launch1d((p.kv_heads as u32, p.batch as u32, 1), 256, 0)) }.w()?;
    }
    selection.masks = Some(masks);
    Ok(())
}
