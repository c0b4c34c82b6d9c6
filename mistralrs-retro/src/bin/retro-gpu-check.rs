//! `retro-gpu-check`: every CUDA kernel of `retro-kernels` against the CPU kernels (the reference)
//! on fresh random data over many shapes: dtypes f32/f16/bf16, block 16/32, head dim 64/128,
//! GQA 1/4/8, windows 1/2/4/8, ragged batches from one token to 128K tokens, sparse and full
//! budgets, with and without soft-capping. Output buffers come from poisoned (NaN-filled) device
//! memory, so an element a kernel forgets to write fails the check. Prints a table of max errors
//! and exits non-zero on any failure.
//!
//! It also checks the one upstream op a replay window leans on that the CPU path never runs: candle's
//! CUDA quantized matmul (GGUF models) with 2..8 rows, the rows a window of w feeds per sequence, against
//! the same op one row at a time, and mistralrs-quant's GEMV for unquantized layers with 2..8 rows
//! against one row at a time, bit for bit (`--replay-rows` runs only these two, `--gemv` the last),
//! and an unquantized layer fed `[batch, rows, k]` with the batch folded into its rows (patch
//! mistralrs-quant/0004) against the same layer unfolded (`--gemv` runs it too). The tensor-core
//! prompt (prefill) kernel is checked against `cpu::causal_prompt_attention` on ragged prompts
//! (`--prompt` runs only that check). `--seed N` seeds the random cases (default 0x5eed).
//!
//! Built on the CPU machine with `--features cuda`, run on the GPU machine: `scripts/gpu/check.sh`.

use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use retro_kernels::{cpu, PageSelection};
use retro_kernels::cpu::{page_bound, select_pages, PageSummaries, PlanInputs};
use retro_kernels::rng::Rng;
use retro_kernels::cuda::{self as gpu, DevicePlan};
use retro_kernels::DecodePlan;

#[derive(Clone, Debug)]
struct Case {
    dtype: DType,
    block_size: usize,
    head_dim: usize,
    kv_heads: usize,
    group: usize,
    rows: usize,
    contexts: Vec<usize>,
    budget_tokens: usize,
    softcap: Option<f32>,
}

impl Case {
    fn label(&self) -> String {
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

/// Max error per (kernel, dtype), over all cases.
#[derive(Default)]
struct Tally {
    rows: Vec<(String, DType, usize, f32, f32, usize)>,
    failures: Vec<String>,
}

impl Tally {
    fn record(&mut self, kernel: &str, dtype: DType, rel: f32, lse: f32, swaps: usize) {
        match self.rows.iter_mut().find(|r| r.0 == kernel && r.1 == dtype) {
            Some(r) => {
                r.2 += 1;
                r.3 = r.3.max(rel);
                r.4 = r.4.max(lse);
                r.5 += swaps;
            }
            None => self.rows.push((kernel.to_string(), dtype, 1, rel, lse, swaps)),
        }
    }
    fn fail(&mut self, case: &Case, what: String) {
        eprintln!("FAIL {}: {what}", case.label());
        self.failures.push(format!("{}: {what}", case.label()));
    }
}

fn out_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}
const LSE_TOLERANCE: f32 = 1e-3;

fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Fill and free a large device buffer with NaN so the next allocations (stream-ordered pool)
/// start out poisoned.
fn poison(dev: &Device) -> Result<()> {
    let t = Tensor::full(f32::NAN, 32 << 20, dev)?;
    drop(t);
    Ok(())
}

/// NaN in every slot from `first` on of each listed `(block, first)` partial page of a paged K or V
/// cache (`[blocks, kv_heads, ..., block_size(, x)]`: the token index is the second-last or last dim).
fn with_unwritten_slots(cache: Tensor, unwritten: &[(usize, usize)]) -> Result<Tensor> {
    let dims = cache.dims().to_vec();
    let key_layout = dims.len() == 5;
    let (bs, x) = if key_layout { (dims[3], dims[4]) } else { (dims[3], 1) };
    let page: usize = dims[2..].iter().product();
    let kvh = dims[1];
    let mut data = cache.flatten_all()?.to_vec1::<f32>()?;
    for &(block, first) in unwritten {
        for h in 0..kvh {
            let base = (block * kvh + h) * page;
            for (i, v) in data[base..base + page].iter_mut().enumerate() {
                if (i / x) % bs >= first {
                    *v = f32::NAN;
                }
            }
        }
    }
    Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
}

/// Max |a - b| over max |b|, and whether any value of `a` is NaN.
fn rel_error(a: &[f32], b: &[f32]) -> (f32, bool) {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let nan = a.iter().any(|v| v.is_nan());
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (err / scale, nan)
}

fn lse_error(a: &[f32], b: &[f32]) -> Option<f32> {
    let mut worst = 0f32;
    for (x, y) in a.iter().zip(b) {
        if y.is_infinite() || x.is_infinite() {
            if x != y {
                return None;
            }
        } else {
            worst = worst.max((x - y).abs());
        }
    }
    Some(worst)
}

fn run_case(case: &Case, rng: &mut Rng, gpu_dev: &Device, tally: &mut Tally) -> Result<()> {
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

fn cases(rng: &mut Rng, quick: bool) -> Vec<Case> {
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

/// candle's CUDA quantized matmul (`QMatMul`, what upstream's GGUF layers call) at `b` rows against
/// the same weights one row at a time and against the CPU op. A replay window of w sends w rows per
/// sequence through every projection, which selects candle's multi-row vector kernels (b ≤ 8);
/// upstream's own decode only sends one row per sequence. Returns failures as text.
fn check_replay_rows(rng: &mut Rng, gpu_dev: &Device) -> Result<Vec<String>> {
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::Module;
    let mut failures = Vec::new();
    println!("| quantized matmul (rows x k -> n) | dtype | max rel. error vs one row at a time | max rel. error vs CPU |");
    println!("|---|---|---|---|");
    // SmolLM2-135M's projections (q/o, k/v, gate/up, down) and its Q8_0 output head, then Llama-8B's q.
    let shapes: &[(usize, usize)] = &[(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096)];
    for dtype in [GgmlDType::Q4_1, GgmlDType::Q4_0, GgmlDType::Q8_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        // K-quants pack 256 values per block: only the shapes whose inner dim splits into them.
        for &(n, k) in shapes.iter().filter(|(_, k)| k % dtype.block_size() == 0) {
            let w = rng.tensor(&[n, k], 0.5, DType::F32);
            let on_cpu = QMatMul::from_qtensor(QTensor::quantize(&w, dtype)?)?;
            let on_gpu = QMatMul::from_qtensor(QTensor::quantize(&w.to_device(gpu_dev)?, dtype)?)?;
            for b in 1..=8usize {
                let x = rng.tensor(&[1, b, k], 1.0, DType::F32);
                let xg = x.to_device(gpu_dev)?;
                let batched = to_f32(&on_gpu.forward(&xg)?)?;
                let mut one_by_one = Vec::with_capacity(b * n);
                for r in 0..b {
                    one_by_one.extend(to_f32(&on_gpu.forward(&xg.narrow(1, r, 1)?.contiguous()?)?)?);
                }
                let cpu_out = to_f32(&on_cpu.forward(&x)?)?;
                let (vs_rows, nan) = rel_error(&batched, &one_by_one);
                let (vs_cpu, _) = rel_error(&batched, &cpu_out);
                println!("| {b} x {k} -> {n} | {dtype:?} | {vs_rows:.2e} | {vs_cpu:.2e} |");
                // Both sides quantize the rows to q8_1 the same way: only the summation order differs.
                if nan || vs_rows > 1e-3 || vs_cpu > 2e-2 {
                    failures.push(format!("quantized matmul {dtype:?} {b} x {k} -> {n}: {vs_rows:.2e} vs one row at a time, {vs_cpu:.2e} vs CPU{}", if nan { ", NaN" } else { "" }));
                }
            }
        }
    }
    Ok(failures)
}

/// mistralrs-quant's CUDA GEMV (unquantized linear layers, 1-8 rows; patch mistralrs-quant/0003 gives
/// 2-8 rows of bf16/f16 a 16-byte-load kernel) at `b` rows against the same call one row at a time,
/// which must be **bit-identical** (retro = full at a budget above the context rests on it), and
/// against the CPU in f32. Shapes cover the patched path (K a multiple of 8, K/2 > 128), its
/// fallbacks (K % 8 ≠ 0, small K, an input 2 elements off 16-byte alignment) and a bias. Returns failures.
fn check_gemv_rows(rng: &mut Rng, gpu_dev: &Device) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    println!("| GEMV (rows x k -> n) | dtype | bias | offset | bit-identical to one row at a time | max rel. error vs CPU |");
    println!("|---|---|---|---|---|---|");
    let shapes: &[(usize, usize)] = &[(576, 576), (192, 576), (1536, 576), (576, 1536), (4096, 4096), (300, 200), (264, 262)];
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        for &(n, k) in shapes {
            for (bias_on, offset) in [(false, 0usize), (true, 0), (false, 2)] {
                let w = rng.tensor(&[n, k], 0.5, dtype).to_device(gpu_dev)?;
                let bias = if bias_on { Some(rng.tensor(&[n], 0.5, dtype).to_device(gpu_dev)?) } else { None };
                let mut identical = true;
                let mut worst = 0f32;
                for b in 1..=8usize {
                    // `offset` elements of padding in front move the rows off 16-byte alignment (2: the
                    // 4 or 8 bytes upstream's pair loads still need).
                    let flat = rng.tensor(&[offset + b * k], 1.0, dtype).to_device(gpu_dev)?;
                    let x = flat.narrow(0, offset, b * k)?.reshape((b, k))?;
                    let case = || format!("GEMV {dtype:?} {b} x {k} -> {n} (bias {bias_on}, offset {offset})");
                    let batched = mistralrs_quant::gemv::gemv(&x, &w, bias.as_ref()).with_context(case)?;
                    let bb = to_f32(&batched).with_context(case)?;
                    let mut one_by_one = Vec::with_capacity(b);
                    for r in 0..b {
                        one_by_one.push(mistralrs_quant::gemv::gemv(&x.narrow(0, r, 1)?, &w, bias.as_ref())?);
                    }
                    let one_by_one = Tensor::cat(&one_by_one, 0)?;
                    let ob = to_f32(&one_by_one).with_context(|| format!("{} one row at a time", case()))?;
                    let nan = bb.iter().any(|v| v.is_nan());
                    identical &= !nan && bb.iter().zip(&ob).all(|(a, o)| a.to_bits() == o.to_bits());
                    let (xc, wc) = (x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
                    let mut cpu_out = xc.matmul(&wc.t()?)?;
                    if let Some(bias) = &bias {
                        cpu_out = cpu_out.broadcast_add(&bias.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?;
                    }
                    let (vs_cpu, _) = rel_error(&bb, &cpu_out.flatten_all()?.to_vec1::<f32>()?);
                    worst = worst.max(if nan { f32::INFINITY } else { vs_cpu });
                }
                println!("| 1..8 x {k} -> {n} | {dtype:?} | {bias_on} | {offset} | {} | {worst:.2e} |", if identical { "yes" } else { "NO" });
                // The output's own rounding (bf16 8 bits, f16 11 bits) dominates the summation order.
                if !identical || worst > out_tolerance(dtype) {
                    failures.push(format!("GEMV {dtype:?} x {k} -> {n} (bias {bias_on}, offset {offset}): bit-identical {identical}, {worst:.2e} vs CPU"));
                }
            }
        }
    }
    Ok(failures)
}

/// Patch mistralrs-quant/0004: with the fold on, an unquantized CUDA linear layer given
/// `[batch, rows, k]` (retro's window at batch > 1) multiplies one `[batch * rows, k]` matrix. Up to
/// 8 rows in all that is the GEMV either way, and one row per sequence is not folded, so both are
/// bit-identical to the fold off; above, one cuBLAS
/// product instead of `batch` of them, which must be as close to the CPU as the unfolded products
/// (cuBLAS may take f32 through TF32, ~3e-4 here, so the dtype's tolerance alone is too tight).
/// Returns failures.
fn check_fold_batch_rows(rng: &mut Rng, gpu_dev: &Device) -> Result<Vec<String>> {
    use mistralrs_quant::{QuantMethod, QuantMethodConfig, UnquantLinear};
    let mut failures = Vec::new();
    println!("| folded linear (batch x rows x k -> n) | dtype | bit-identical to unfolded | max rel. error vs unfolded | max rel. error vs CPU (unfolded) |");
    println!("|---|---|---|---|---|");
    for dtype in [DType::BF16, DType::F32] {
        for &(n, k) in &[(1536, 576), (4096, 4096)] {
            let w = rng.tensor(&[n, k], 0.5, dtype).to_device(gpu_dev)?;
            let bias = rng.tensor(&[n], 0.5, dtype).to_device(gpu_dev)?;
            let layer = UnquantLinear::new(QuantMethodConfig::Unquantized(candle_nn::Linear::new(w.clone(), Some(bias.clone()))))?;
            for (b, s) in [(2usize, 2usize), (4, 2), (8, 2), (4, 4), (3, 5), (16, 1)] {
                let x = rng.tensor(&[b, s, k], 1.0, dtype).to_device(gpu_dev)?;
                mistralrs_quant::set_cuda_fold_batch_rows(true);
                let folded = layer.forward(&x);
                mistralrs_quant::set_cuda_fold_batch_rows(false);
                let (folded, unfolded) = (to_f32(&folded?)?, to_f32(&layer.forward(&x)?)?);
                let identical = folded.iter().zip(&unfolded).all(|(a, o)| a.to_bits() == o.to_bits());
                let (xc, wc) = (x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?, w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?);
                let cpu_out = xc.broadcast_matmul(&wc.t()?)?.broadcast_add(&bias.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)?;
                let cpu_out = cpu_out.flatten_all()?.to_vec1::<f32>()?;
                let (vs_unfolded, nan) = rel_error(&folded, &unfolded);
                let (vs_cpu, _) = rel_error(&folded, &cpu_out);
                let (unfolded_vs_cpu, _) = rel_error(&unfolded, &cpu_out);
                println!("| {b} x {s} x {k} -> {n} | {dtype:?} | {} | {vs_unfolded:.2e} | {vs_cpu:.2e} ({unfolded_vs_cpu:.2e}) |", if identical { "yes" } else { "no" });
                if nan || ((b * s <= 8 || s == 1) && !identical) || vs_cpu > out_tolerance(dtype).max(2.0 * unfolded_vs_cpu) {
                    failures.push(format!("folded linear {dtype:?} {b} x {s} x {k} -> {n}: bit-identical {identical}, {vs_cpu:.2e} vs CPU{}", if nan { ", NaN" } else { "" }));
                }
            }
        }
    }
    Ok(failures)
}

/// The tensor-core prompt kernel (`gpu::causal_prompt_attention`) against the CPU's
/// (`cpu::causal_prompt_attention`) on random prompts: ragged lengths around the 64-row tiles, GQA
/// groups 1/4/2, head dims 64/128, K and V handed over strided as a model's reshapes leave them.
fn check_prompt_attention(rng: &mut Rng, gpu_dev: &Device, quick: bool) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    println!("| prompt attention (heads / kv heads x n x d) | dtype | max rel. error vs CPU |");
    println!("|---|---|---|");
    let lengths: &[usize] = if quick { &[1, 63, 65, 200] } else { &[1, 5, 63, 64, 65, 200, 1000, 4096] };
    for dtype in [DType::F16, DType::BF16] {
        for d in [64, 128] {
            for (heads, kv_heads) in [(4, 4), (8, 2), (6, 3)] {
                for &n in lengths {
                    let scale = 1.0 / (d as f32).sqrt();
                    let q = rng.tensor(&[1, heads, n, d], 2.0, dtype);
                    // K/V as [1, n, kv, d] transposed: strided, like a model's view after its reshape.
                    let k = rng.tensor(&[1, n, kv_heads, d], 2.0, dtype).transpose(1, 2)?;
                    let v = rng.tensor(&[1, n, kv_heads, d], 1.0, dtype).transpose(1, 2)?;
                    let reference = cpu::causal_prompt_attention(&q, &k, &v, scale)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let (gq, gk, gv) = (q.to_device(gpu_dev)?, k.to_device(gpu_dev)?, v.to_device(gpu_dev)?);
                    let out = gpu::causal_prompt_attention(&gq, &gk, &gv, scale)?;
                    let (rel, nan) = rel_error(&to_f32(&out)?, &reference);
                    println!("| {heads} / {kv_heads} x {n} x {d} | {dtype:?} | {} |", if nan { "NaN".to_string() } else { format!("{rel:.2e}") });
                    if nan || rel > out_tolerance(dtype) {
                        failures.push(format!("prompt attention {dtype:?} {heads}/{kv_heads} x {n} x {d}: {rel:.2e} vs CPU{}", if nan { " (NaN)" } else { "" }));
                    }
                }
            }
        }
    }
    Ok(failures)
}

fn main() -> ExitCode {
    let quick = std::env::args().any(|a| a == "--quick");
    let replay_rows_only = std::env::args().any(|a| a == "--replay-rows");
    let gemv_only = std::env::args().any(|a| a == "--gemv");
    let prompt_only = std::env::args().any(|a| a == "--prompt");
    let args: Vec<String> = std::env::args().collect();
    let seed = match args.iter().position(|a| a == "--seed") {
        None => 0x5eed_u64,
        Some(i) => match args.get(i + 1).and_then(|s| s.parse().ok()) {
            Some(seed) => seed,
            None => {
                eprintln!("retro-gpu-check: --seed {:?}: expected a whole number", args.get(i + 1).map_or("", String::as_str));
                return ExitCode::from(2);
            }
        },
    };
    let gpu_dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("retro-gpu-check: no CUDA device: {e}");
            return ExitCode::from(2);
        }
    };
    let mut rng = Rng::new(seed);
    let all = if replay_rows_only || gemv_only || prompt_only { Vec::new() } else { cases(&mut rng, quick) };
    let mut tally = Tally::default();
    let started = std::time::Instant::now();
    for (i, case) in all.iter().enumerate() {
        eprint!("\rretro-gpu-check: case {}/{} ", i + 1, all.len());
        if let Err(e) = run_case(case, &mut rng, &gpu_dev, &mut tally) {
            tally.fail(case, format!("error: {e:#}"));
        }
    }
    eprintln!();
    println!("seed {seed:#x}, {} cases in {:.1} s", all.len(), started.elapsed().as_secs_f64());
    if !all.is_empty() {
        println!("| kernel | dtype | checks | max rel. error (out) | max lse abs. error | tie swaps |");
        println!("|---|---|---|---|---|---|");
        for (kernel, dtype, n, rel, lse, swaps) in &tally.rows {
            println!("| {kernel} | {dtype:?} | {n} | {rel:.2e} | {lse:.2e} | {swaps} |");
        }
    }
    match if gemv_only || prompt_only { Ok(Vec::new()) } else { check_replay_rows(&mut rng, &gpu_dev) } {
        Ok(f) => tally.failures.extend(f),
        Err(e) => tally.failures.push(format!("quantized matmul check: error: {e:#}")),
    }
    match if gemv_only { Ok(Vec::new()) } else { check_prompt_attention(&mut rng, &gpu_dev, quick) } {
        Ok(f) => tally.failures.extend(f),
        Err(e) => tally.failures.push(format!("prompt attention check: error: {e:#}")),
    }
    match if prompt_only { Ok(Vec::new()) } else { check_gemv_rows(&mut rng, &gpu_dev) } {
        Ok(f) => tally.failures.extend(f),
        Err(e) => tally.failures.push(format!("GEMV check: error: {e:#}")),
    }
    match if prompt_only { Ok(Vec::new()) } else { check_fold_batch_rows(&mut rng, &gpu_dev) } {
        Ok(f) => tally.failures.extend(f),
        Err(e) => tally.failures.push(format!("batch-fold check: error: {e:#}")),
    }
    println!("tolerances: out f32 {:.0e}, f16 {:.0e}, bf16 {:.1e} (max abs error / max abs reference); lse {LSE_TOLERANCE:.0e}; bounds and masks exact", out_tolerance(DType::F32), out_tolerance(DType::F16), out_tolerance(DType::BF16));
    if tally.failures.is_empty() {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        println!("{} FAILURES:", tally.failures.len());
        for f in tally.failures.iter().take(50) {
            println!("  {f}");
        }
        ExitCode::FAILURE
    }
}
