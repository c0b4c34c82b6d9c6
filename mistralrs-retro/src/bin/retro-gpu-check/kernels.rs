//! The kernel cases: random caches, selections and queries through every CUDA kernel of a decode
//! step against the CPU kernels and references.

use crate::*;

#[derive(Clone, Debug)]
pub(crate) struct Case {
    pub(crate) dtype: DType,
    pub(crate) block_size: usize,
    pub(crate) head_dim: usize,
    pub(crate) kv_heads: usize,
    pub(crate) group: usize,
    pub(crate) rows: usize,
    pub(crate) contexts: Vec<usize>,
    pub(crate) budget_tokens: usize,
    pub(crate) softcap: Option<f32>,
}

impl Case {
    pub(crate) fn label(&self) -> String {
        format!(
            "{:?} bs{} d{} kv{}x{} w{} ctx{:?} budget{}{}",
            self.dtype,
            self.block_size,
            self.head_dim,
            self.kv_heads,
            self.group,
            self.rows,
            self.contexts,
            self.budget_tokens,
            self.softcap.map(|c| format!(" softcap{c}")).unwrap_or_default()
        )
    }
}

pub(crate) fn run_case(case: &Case, rng: &mut Rng, gpu_dev: &Device, tally: &mut Tally) -> Result<()> {
    let (bs, d, kvh) = (case.block_size, case.head_dim, case.kv_heads);
    let heads = kvh * case.group;
    let batch = case.contexts.len();
    let rows = case.rows;
    let x = 16 / case.dtype.size_in_bytes();
    let pages: Vec<usize> = case.contexts.iter().map(|c| c.div_ceil(bs)).collect();
    let max_pages = pages.iter().copied().max().unwrap_or(0);
    let num_blocks = pages.iter().sum::<usize>() + 3;
    // Blocks are handed out in a random order, as a long-running cache would have them.
    let mut free: Vec<u32> = (0..num_blocks as u32).collect();
    rng.shuffle(&mut free);
    let mut tables = vec![vec![0u32; max_pages.max(1)]; batch];
    for (seq, &p) in pages.iter().enumerate() {
        for page in 0..p {
            tables[seq][page] = free.pop().expect("enough blocks");
        }
    }
    // Slots past each context hold NaN: upstream allocates the cache uninitialized, and no kernel
    // may let a never-written slot reach a result (not even through a probability of 0).
    let unwritten: Vec<(usize, usize)> = tables
        .iter()
        .zip(&case.contexts)
        .filter(|(_, &c)| c % bs != 0)
        .map(|(t, &c)| (t[c / bs] as usize, c % bs))
        .collect();
    let key_cache = with_unwritten_slots(rng.tensor(&[num_blocks, kvh, d / x, bs, x], 1.0, DType::F32), &unwritten)?.to_dtype(case.dtype)?;
    let value_cache = with_unwritten_slots(rng.tensor(&[num_blocks, kvh, d, bs], 1.0, DType::F32), &unwritten)?.to_dtype(case.dtype)?;
    let query = rng.tensor(&[batch * rows, heads, d], 2.0, case.dtype);
    let flat_tables: Vec<u32> = tables.iter().flatten().copied().collect();
    let block_tables = Tensor::from_vec(flat_tables, (batch, max_pages.max(1)), &Device::Cpu)?;
    let ctx_u32: Vec<u32> = case.contexts.iter().map(|&c| c as u32).collect();
    let context_lens = Tensor::new(ctx_u32.as_slice(), &Device::Cpu)?;
    let scale = 1.0 / (d as f32).sqrt();

    let g_key = key_cache.to_device(gpu_dev)?;
    let g_value = value_cache.to_device(gpu_dev)?;
    let g_query = query.to_device(gpu_dev)?;
    let g_tables = block_tables.to_device(gpu_dev)?;

    // 1. Page bounds after a prefill of every sequence.
    let summaries = PageSummaries::for_cache(&key_cache, 1)?;
    let used: Vec<usize> = tables.iter().zip(&pages).flat_map(|(t, &p)| t[..p].iter().map(|&b| b as usize)).collect();
    summaries.refresh(0, &key_cache, &used)?;
    let slots: Vec<i64> = tables
        .iter()
        .zip(&case.contexts)
        .flat_map(|(t, &c)| (0..c).map(move |tok| (t[tok / bs] as usize * bs + tok % bs) as i64))
        .collect();
    // In the cache's dtype, as the policies keep them; compared exactly with the CPU's f32 bounds.
    let g_bounds = Tensor::full(f32::NAN, (num_blocks, kvh, 2, d), gpu_dev)?.to_dtype(case.dtype)?;
    gpu::refresh_page_bounds(&g_key, &Tensor::new(slots.as_slice(), gpu_dev)?, &g_bounds)?;
    let gb = to_f32(&g_bounds)?;
    let cpu_bounds = summaries.layer(0).clone();
    let mut bound_mismatch = 0;
    for &block in &used {
        for h in 0..kvh {
            let at = summaries.offset(block, h);
            if gb[at..at + 2 * d] != cpu_bounds[at..at + 2 * d] {
                bound_mismatch += 1;
            }
        }
    }
    if bound_mismatch > 0 {
        tally.fail(case, format!("page bounds differ in {bound_mismatch} (block, kv head) pages"));
    }
    tally.record("refresh_page_bounds", case.dtype, if bound_mismatch > 0 { f32::INFINITY } else { 0.0 }, 0.0, 0);

    // 2. Selection: quest's top pages for the newest row.
    let budget_pages: Vec<u32> = vec![case.budget_tokens.div_ceil(bs) as u32; batch];
    let target_blocks = 132 * 4;
    let plan = DecodePlan::new(&ctx_u32, &budget_pages, rows, kvh, bs, target_blocks, 1 + rng.below(4));
    let dplan = DevicePlan::upload(plan.clone(), gpu_dev)?;
    poison(gpu_dev)?;
    let mut g_sel = gpu::select_pages(&dplan, &g_query, &g_bounds, &g_tables)?;
    let g_counts: Vec<u32> = g_sel.counts.to_vec1()?;
    let g_pages: Vec<Vec<u32>> = g_sel.pages.to_vec2()?;
    let q32 = to_f32(&query)?;
    let budgets: Vec<usize> = budget_pages.iter().map(|&b| b as usize).collect();
    let inputs = PlanInputs {
        queries: &q32,
        rows,
        heads,
        context_lens: &case.contexts,
        block_tables: &tables,
        budget_pages: &budgets,
    };
    let cpu_sel = select_pages(&inputs, &summaries, &cpu_bounds);
    let mut swaps = 0;
    for seq in 0..batch {
        for h in 0..kvh {
            let list = seq * kvh + h;
            let gpu_list = &g_pages[list][..g_counts[list] as usize];
            let cpu_list: Vec<u32> = cpu_sel.list(seq, h).iter().map(|u| u.page).collect();
            if !gpu_list.windows(2).all(|w| w[0] < w[1]) || gpu_list.iter().any(|&p| p as usize >= pages[seq]) {
                tally.fail(case, format!("list (seq {seq}, kv {h}) not ascending in range: {gpu_list:?}"));
                continue;
            }
            if gpu_list.len() != cpu_list.len() {
                tally.fail(case, format!("list (seq {seq}, kv {h}) has {} pages, CPU {}", gpu_list.len(), cpu_list.len()));
                continue;
            }
            if gpu_list == cpu_list.as_slice() {
                continue;
            }
            // Different sets are fine only where the scores tie to float rounding.
            let score = |page: u32| -> f32 {
                if page == 0 || page as usize == pages[seq] - 1 {
                    return f32::INFINITY;
                }
                let at = summaries.offset(tables[seq][page as usize] as usize, h);
                (0..case.group)
                    .map(|g| {
                        let q = ((seq * rows + rows - 1) * heads + h * case.group + g) * d;
                        page_bound(&q32[q..q + d], &cpu_bounds[at..at + 2 * d])
                    })
                    .sum()
            };
            let only_gpu: Vec<f32> = gpu_list.iter().filter(|p| !cpu_list.contains(p)).map(|&p| score(p)).collect();
            let only_cpu: Vec<f32> = cpu_list.iter().filter(|p| !gpu_list.contains(p)).map(|&p| score(p)).collect();
            let lo = only_gpu.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = only_cpu.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if lo < hi - 1e-4 * (1.0 + hi.abs()) {
                tally.fail(case, format!("list (seq {seq}, kv {h}): GPU kept a page scoring {lo} over one scoring {hi}"));
            }
            swaps += only_gpu.len();
        }
    }
    tally.record("select_pages", case.dtype, 0.0, 0.0, swaps);

    // 3. Retro's row masks for the selection, from random row states and pooled seen bitsets.
    let mut masks_host: Option<Vec<Vec<u32>>> = None;
    if rows > 1 {
        let words = max_pages.div_ceil(32).max(1) + rng.below(2);
        // Each sequence owns `rows` pool rows (shuffled); the newest takes past row 0's, as in the
        // server (slot pos % (w - 1)), or a row of its own.
        // The table's pool rows are relative to a layer's offset into the pool.
        let row_offset = rng.below(3);
        let pool_rows = batch * rows + 1 + row_offset;
        let mut order: Vec<usize> = (0..pool_rows - row_offset).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut meta = vec![0i32; batch * (2 * rows + 1)];
        for seq in 0..batch {
            let m = &mut meta[seq * (2 * rows + 1)..(seq + 1) * (2 * rows + 1)];
            for r in 0..rows - 1 {
                m[r] = (rng.below(4) != 0) as i32;
                m[rows - 1 + r] = if rng.below(8) == 0 { -1 } else { order[seq * rows + r] as i32 };
            }
            m[2 * rows - 2] = match rng.below(4) {
                0 => -1,
                1 => order[seq * rows + rows - 1] as i32,
                _ => order[seq * rows] as i32,
            };
            m[2 * rows - 1] = if rng.below(5) == 0 { -1 } else { seq as i32 };
            m[2 * rows] = rng.below(2) as i32;
        }
        let seen: Vec<u32> = (0..pool_rows * kvh * words).map(|_| rng.next_u64() as u32 & rng.next_u64() as u32).collect();
        let g_meta = Tensor::from_vec(meta.iter().map(|&v| v as u32).collect::<Vec<u32>>(), (batch, 2 * rows + 1), gpu_dev)?;
        let g_seen = Tensor::from_vec(seen.clone(), (pool_rows, kvh, words), gpu_dev)?;
        let g_counters = Tensor::zeros((batch, 2), DType::I64, gpu_dev)?;
        poison(gpu_dev)?;
        gpu::retro_row_masks(&dplan, &mut g_sel, &g_seen, &g_meta, &g_counters, row_offset)?;
        let g_masks: Vec<Vec<u32>> = g_sel.masks.as_ref().expect("masks").to_vec2()?;
        let g_seen_after: Vec<u32> = g_seen.flatten_all()?.to_vec1()?;
        let g_counters: Vec<Vec<i64>> = g_counters.to_vec2()?;
        // The reference: masks and supplements first, then the newest row's bitset starts over.
        let mut want_seen = seen.clone();
        let mut want_counters = vec![vec![0i64; 2]; batch];
        let mut bad = 0;
        for seq in 0..batch {
            let m = &meta[seq * (2 * rows + 1)..(seq + 1) * (2 * rows + 1)];
            let first_pos = case.contexts[seq] as i64 - rows as i64;
            let counter = (m[2 * rows - 1] >= 0).then_some(seq);
            for h in 0..kvh {
                let list = seq * kvh + h;
                let listed = &g_pages[list][..g_counts[list] as usize];
                for (i, &page) in listed.iter().enumerate() {
                    let mut mask = 1u32 << (rows - 1);
                    for r in 0..rows - 1 {
                        if m[r] != 1 || m[rows - 1 + r] < 0 || page as i64 * bs as i64 > first_pos + r as i64 {
                            continue;
                        }
                        let word = ((m[rows - 1 + r] as usize + row_offset) * kvh + h) * words + page as usize / 32;
                        if want_seen[word] & (1 << (page % 32)) == 0 {
                            mask |= 1 << r;
                            want_seen[word] |= 1 << (page % 32);
                            if let Some(c) = counter {
                                want_counters[c][0] += 1;
                            }
                        }
                    }
                    bad += (g_masks[list][i] != mask) as usize;
                }
                let newest = m[2 * rows - 2];
                if newest >= 0 {
                    let bits = &mut want_seen[((newest as usize + row_offset) * kvh + h) * words..][..words];
                    if let (Some(c), 1) = (counter, m[2 * rows]) {
                        want_counters[c][1] += bits.iter().map(|w| i64::from(w.count_ones())).sum::<i64>();
                    }
                    bits.fill(0);
                    for &page in listed {
                        bits[page as usize / 32] |= 1 << (page % 32);
                    }
                }
            }
        }
        if bad > 0 || g_seen_after != want_seen || g_counters != want_counters {
            tally.fail(
                case,
                format!(
                    "retro_row_masks: {bad} masks differ, seen bitsets {}, counters {:?} (want {:?})",
                    if g_seen_after == want_seen { "match" } else { "differ" },
                    g_counters,
                    want_counters
                ),
            );
        }
        tally.record("retro_row_masks", case.dtype, (bad > 0) as u32 as f32, 0.0, 0);
        masks_host = Some(g_masks);
    }

    // 4. The fused decode over the same selection (with retro's masks when rows > 1).
    let mut selection = PageSelection::new(kvh);
    let all_rows = if rows >= 32 { u32::MAX } else { (1u32 << rows) - 1 };
    for list in 0..batch * kvh {
        for (i, &page) in g_pages[list][..g_counts[list] as usize].iter().enumerate() {
            selection.push(page, masks_host.as_ref().map_or(all_rows, |m| m[list][i]));
        }
        selection.finish_list();
    }
    let reference = cpu::paged_decode_selected(&query, &key_cache, &value_cache, &block_tables, &context_lens, &selection, scale, case.softcap)?;
    poison(gpu_dev)?;
    let (g_out, g_lse) = gpu::selected_decode(&dplan, &g_query, &g_key, &g_value, &g_tables, &g_sel, scale, case.softcap)?;
    let (rel, nan) = rel_error(&to_f32(&g_out)?, &to_f32(&reference.out)?);
    let g_lse_host = to_f32(&g_lse)?;
    let lse = lse_error(&g_lse_host, &reference.lse);
    let kernel = if rows > 1 { "selected_decode (retro masks)" } else { "selected_decode (quest)" };
    if nan || rel > out_tolerance(case.dtype) || lse.map_or(true, |e| e > LSE_TOLERANCE) {
        tally.fail(case, format!("{kernel}: rel error {rel:e}, NaN {nan}, lse error {lse:?}"));
    }
    tally.record(kernel, case.dtype, rel, lse.unwrap_or(f32::INFINITY), 0);

    // 5. Output-cache step: that result merged into random cached rows (written back as the
    // corrected output rows), then other partial rows replacing cached rows, at a row offset.
    let n_cached = batch * rows + 2;
    let row_offset = rng.below(3);
    let cache_o: Vec<f32> = (0..(n_cached + row_offset) * heads * d).map(|_| rng.uniform()).collect();
    let cache_lse: Vec<f32> = (0..(n_cached + row_offset) * heads).map(|_| if rng.below(8) == 0 { f32::NEG_INFINITY } else { 3.0 * rng.uniform() }).collect();
    // Each partial row is merged into one cached row at most, or replaces one, never both.
    let mut partial: Vec<usize> = (0..batch * rows).collect();
    rng.shuffle(&mut partial);
    let mut entries: Vec<[i32; 3]> = Vec::new();
    for row in 0..n_cached {
        let merge = if rng.below(4) != 0 { partial.pop().map_or(-1, |p| p as i32) } else { -1 };
        let replace = if rng.below(3) == 0 { partial.pop().map_or(-1, |p| p as i32) } else { -1 };
        if merge >= 0 || replace >= 0 || rng.below(4) == 0 {
            entries.push([row as i32, merge, replace]);
        }
    }
    let part_o = to_f32(&g_out)?;
    let g_cache_o = Tensor::from_vec(cache_o.clone(), (n_cached + row_offset, heads, d), gpu_dev)?;
    let g_cache_lse = Tensor::from_vec(cache_lse.clone(), (n_cached + row_offset, heads), gpu_dev)?;
    let g_lse2 = g_lse.reshape((batch * rows, heads))?;
    let flat: Vec<u32> = entries.iter().flatten().map(|&v| v as u32).collect();
    gpu::merge_step(&g_cache_o, &g_cache_lse, &g_out, &g_lse2, &Tensor::from_vec(flat, (entries.len(), 3), gpu_dev)?, row_offset)?;
    let (mut want_o, mut want_lse, mut want_part) = (cache_o, cache_lse, part_o.clone());
    for &[row, merge, replace] in &entries {
        for h in 0..heads {
            let a = (row as usize + row_offset) * heads + h;
            if merge >= 0 {
                let b = merge as usize * heads + h;
                retro_kernels::merge_partial(&mut want_o[a * d..(a + 1) * d], &mut want_lse[a], &part_o[b * d..(b + 1) * d], g_lse_host[b]);
                want_part[b * d..(b + 1) * d].copy_from_slice(&want_o[a * d..(a + 1) * d]);
            }
            if replace >= 0 {
                let b = replace as usize * heads + h;
                want_o[a * d..(a + 1) * d].copy_from_slice(&part_o[b * d..(b + 1) * d]);
                want_lse[a] = g_lse_host[b];
            }
        }
    }
    let (rel, nan) = rel_error(&to_f32(&g_cache_o)?, &want_o);
    let lse = lse_error(&to_f32(&g_cache_lse)?, &want_lse);
    // The corrected output rows are the merged f32 values rounded to the query's dtype.
    let (rel_out, nan_out) = rel_error(&to_f32(&g_out)?, &want_part);
    if nan || nan_out || rel > 1e-5 || rel_out > out_tolerance(case.dtype) || lse.map_or(true, |e| e > 1e-5) {
        tally.fail(case, format!("merge_step: cache rel error {rel:e}, output rel error {rel_out:e}, NaN {nan}/{nan_out}, lse error {lse:?}"));
    }
    tally.record("merge_step", case.dtype, rel.max(rel_out), lse.unwrap_or(f32::INFINITY), 0);
    Ok(())
}

pub(crate) fn cases(rng: &mut Rng, quick: bool) -> Vec<Case> {
    let mut out = Vec::new();
    let dtypes = [DType::F32, DType::F16, DType::BF16];
    for &dtype in &dtypes {
        for block_size in [16, 32] {
            for head_dim in [64, 128] {
                for (kv_heads, group) in [(2, 1), (2, 4), (1, 8), (3, 3)] {
                    for rows in [1, 2, 4, 8] {
                        let batch = 1 + rng.below(4);
                        let contexts: Vec<usize> = (0..batch)
                            .map(|_| match rng.below(6) {
                                0 => 1 + rng.below(block_size),
                                1 => block_size * (1 + rng.below(3)),
                                2 => block_size * (1 + rng.below(8)) + 1,
                                _ => 64 + rng.below(if quick { 600 } else { 4000 }),
                            })
                            .collect();
                        let budget_tokens = rng.pick(&[2 * block_size, 128, 256, 1 << 30]);
                        let softcap = (rng.below(6) == 0).then_some(30.0);
                        out.push(Case { dtype, block_size, head_dim, kv_heads, group, rows, contexts, budget_tokens, softcap });
                    }
                }
            }
        }
    }
    if !quick {
        // Long contexts in the Llama-3.1-8B layout, ragged, sparse and dense.
        for (contexts, budget, rows) in [
            (vec![32768], 2048, 2),
            (vec![131072], 2048, 4),
            (vec![131072, 7, 40000], 4096, 2),
            (vec![32768, 1000], 1 << 30, 1),
        ] {
            out.push(Case { dtype: DType::BF16, block_size: 32, head_dim: 128, kv_heads: 8, group: 4, rows, contexts, budget_tokens: budget, softcap: None });
        }
    }
    out
}
