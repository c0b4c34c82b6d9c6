//! `retro-gpu-bench`: one decode attention layer on the GPU, upstream's paged attention (`full`)
//! against our `quest` and `retro` kernels, in the Llama-3.1-8B head layout (32 query / 8 KV heads,
//! head dim 128, bf16, block 32), at contexts 8K/32K/128K, batch 1/8/32, budgets 1024/2048/4096
//! tokens, windows 2 and 4, with the device copy bandwidth measured in the same run.
//!
//! A sparse step is timed as the GPU runs it per layer: page scoring + top-k, (retro: row masks,)
//! the fused decode and its split combine. Retro is timed at its worst case (every past row uses
//! every selected page: most compute, same bytes). Bytes per step count what each kernel must
//! read: K and V of the attended tokens, plus for the sparse policies every page's bounds (min and
//! max, in the cache's dtype: bf16 here).
//!
//! Usage: `retro-gpu-bench [--quick] [--prompt-only] [--json FILE] [--split BLOCKS,PAGES]` (one JSON record per line;
//! `--prompt-only`: just the prompt-attention table).

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use retro_kernels::cuda::{self as gpu, DevicePlan};
use retro_kernels::DecodePlan;

const HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const BLOCK: usize = 32;

fn sync(dev: &Device) -> Result<()> {
    dev.synchronize()?;
    Ok(())
}

/// Median seconds per call of `f` over `iters` calls (after 3 warm-up calls), each call timed
/// between device synchronizations.
fn time<F: FnMut() -> Result<()>>(dev: &Device, iters: usize, mut f: F) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    sync(dev)?;
    let mut samples = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        sync(dev)?;
        samples.push(t.elapsed().as_secs_f64());
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    Ok(samples[samples.len() / 2])
}

/// Device-to-device copy bandwidth (bytes read + written per second) of a 4 GiB buffer, with the
/// driver's memcpy (the HBM roofline the kernels are compared against).
fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let Device::Cuda(cuda) = dev else { anyhow::bail!("not a CUDA device") };
    let n = 1usize << 30; // f32 elements
    let src = cuda.alloc_zeros::<f32>(n)?;
    let mut dst = cuda.alloc_zeros::<f32>(n)?;
    let stream = cuda.cuda_stream();
    let secs = time(dev, 10, || {
        stream.memcpy_dtod(&src, &mut dst)?;
        Ok(())
    })?;
    Ok(2.0 * (n * 4) as f64 / secs)
}

/// Target CUDA blocks and least pages per split of the sparse decode (see `DecodePlan::new`).
const DEFAULT_SPLIT: (usize, usize) = (132 * 4, 4);

/// Time quest and retro w=2 at 32K context, batch 8, budget 2048 under several work partitions.
fn split_sweep(dev: &Device, scale: f32) -> Result<()> {
    let (ctx, batch, budget) = (32768usize, 8usize, 2048usize);
    let x = 16 / DType::BF16.size_in_bytes();
    let pages = ctx / BLOCK;
    let blocks = batch * pages;
    let key_cache = Tensor::randn(0f32, 1.0, (blocks, KV_HEADS, HEAD_DIM / x, BLOCK, x), dev)?.to_dtype(DType::BF16)?;
    let value_cache = Tensor::randn(0f32, 1.0, (blocks, KV_HEADS, HEAD_DIM, BLOCK), dev)?.to_dtype(DType::BF16)?;
    let bounds = Tensor::zeros((blocks, KV_HEADS, 2, HEAD_DIM), DType::BF16, dev)?;
    let slots: Vec<i64> = (0..blocks as i64).map(|b| b * BLOCK as i64).collect();
    gpu::refresh_page_bounds(&key_cache, &Tensor::new(slots.as_slice(), dev)?, &bounds)?;
    let tables: Vec<u32> = (0..blocks as u32).collect();
    let block_tables = Tensor::from_vec(tables, (batch, pages), dev)?;
    let ctx_host = vec![ctx as u32; batch];
    let budget_pages = vec![(budget / BLOCK) as u32; batch];
    println!("\nwork partition sweep, 32K context, batch 8, budget 2048 (ms per layer step)");
    println!("| target blocks | min pages/split | splits | quest | retro w=2 |");
    println!("|---|---|---|---|---|");
    for target in [132, 528, 1056, 2112, 4224] {
        for min_pages in [1, 2, 4] {
            let mut cells = Vec::new();
            let mut splits = 0;
            for w in [1usize, 2] {
                let query = Tensor::randn(0f32, 1.0, (batch * w, HEADS, HEAD_DIM), dev)?.to_dtype(DType::BF16)?;
                let plan = DevicePlan::upload(DecodePlan::new(&ctx_host, &budget_pages, w, KV_HEADS, BLOCK, target, min_pages), dev)?;
                splits = plan.plan.splits;
                let ms = 1e3
                    * time(dev, 20, || {
                        let sel = gpu::select_pages(&plan, &query, &bounds, &block_tables)?;
                        gpu::selected_decode(&plan, &query, &key_cache, &value_cache, &block_tables, &sel, scale, None)?;
                        Ok(())
                    })?;
                cells.push(format!("{ms:.3}"));
            }
            println!("| {target} | {min_pages} | {splits} | {} |", cells.join(" | "));
        }
    }
    // Where a step's time goes (default partition): the plan kernels alone, the decode alone over
    // a ready selection, and an empty step (allocations and launches on zero-length contexts).
    println!("\nbreakdown at 32K context, batch 8, budget 2048 (ms per layer step)");
    println!("| policy | select (score + top-k) | decode + combine | select + decode |");
    println!("|---|---|---|---|");
    for w in [1usize, 2, 4] {
        let query = Tensor::randn(0f32, 1.0, (batch * w, HEADS, HEAD_DIM), dev)?.to_dtype(DType::BF16)?;
        let plan = DevicePlan::upload(DecodePlan::new(&ctx_host, &budget_pages, w, KV_HEADS, BLOCK, DEFAULT_SPLIT.0, DEFAULT_SPLIT.1), dev)?;
        let select_ms = 1e3 * time(dev, 20, || Ok(gpu::select_pages(&plan, &query, &bounds, &block_tables).map(|_| ())?))?;
        let sel = gpu::select_pages(&plan, &query, &bounds, &block_tables)?;
        let decode_ms = 1e3
            * time(dev, 20, || {
                gpu::selected_decode(&plan, &query, &key_cache, &value_cache, &block_tables, &sel, scale, None)?;
                Ok(())
            })?;
        let both_ms = 1e3
            * time(dev, 20, || {
                let sel = gpu::select_pages(&plan, &query, &bounds, &block_tables)?;
                gpu::selected_decode(&plan, &query, &key_cache, &value_cache, &block_tables, &sel, scale, None)?;
                Ok(())
            })?;
        let name = if w == 1 { "quest".to_string() } else { format!("retro w={w}") };
        println!("| {name} | {select_ms:.3} | {decode_ms:.3} | {both_ms:.3} |");
    }
    Ok(())
}

struct Record {
    kind: &'static str,
    policy: String,
    context: usize,
    batch: usize,
    budget: Option<usize>,
    window: usize,
    ms: f64,
    gbps: f64,
}

/// The prompt (prefill) kernel, Llama-3.1-8B's attention layout, one layer: ms per prompt and the
/// tensor-core rate it reaches (causal FLOPs: 2 products x n(n+1)/2 pairs x head dim x 2 per
/// multiply-add, per query head).
fn prompt_bench(dev: &Device, scale: f32, quick: bool) -> Result<()> {
    println!("\nprompt attention (causal, 32 query / 8 KV heads, head dim 128, bf16), ms per layer");
    println!("| prompt tokens | ms | TFLOP/s |");
    println!("|---|---|---|");
    let lengths: &[usize] = if quick { &[8192] } else { &[2048, 8192, 32768, 131072] };
    for &n in lengths {
        let q = Tensor::randn(0f32, 1.0, (1, HEADS, n, HEAD_DIM), dev)?.to_dtype(DType::BF16)?;
        let k = Tensor::randn(0f32, 1.0, (1, KV_HEADS, n, HEAD_DIM), dev)?.to_dtype(DType::BF16)?;
        let v = Tensor::randn(0f32, 1.0, (1, KV_HEADS, n, HEAD_DIM), dev)?.to_dtype(DType::BF16)?;
        let iters = if n > 32768 { 3 } else { 10 };
        let ms = 1e3 * time(dev, iters, || Ok(gpu::causal_prompt_attention(&q, &k, &v, scale).map(|_| ())?))?;
        let flops = 4.0 * (n as f64) * (n as f64 + 1.0) / 2.0 * HEAD_DIM as f64 * HEADS as f64;
        println!("| {n} | {ms:.3} | {:.0} |", flops / (ms * 1e-3) / 1e12);
    }
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args.iter().position(|a| a == "--json").and_then(|i| args.get(i + 1)).cloned();
    let dev = Device::new_cuda(0).context("no CUDA device")?;
    let iters = if quick { 5 } else { 20 };
    if args.iter().any(|a| a == "--prompt-only") {
        return prompt_bench(&dev, 1.0 / (HEAD_DIM as f32).sqrt(), quick);
    }

    let copy_bw = copy_bandwidth(&dev)?;
    println!("copy bandwidth: {:.0} GB/s (read + write)", copy_bw / 1e9);
    let mut records = Vec::new();

    let contexts: &[usize] = if quick { &[8192] } else { &[8192, 32768, 131072] };
    let batches: &[usize] = if quick { &[1, 8] } else { &[1, 8, 32] };
    let budgets: &[usize] = if quick { &[2048] } else { &[1024, 2048, 4096] };
    let windows: &[usize] = &[2, 4];
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    let x = 16 / DType::BF16.size_in_bytes();
    let kv_token_bytes = (KV_HEADS * HEAD_DIM * 2 * 2) as f64; // K and V, bf16
    let bound_page_bytes = (KV_HEADS * 2 * HEAD_DIM * 2) as f64; // bf16 min and max

    // Work partition (target CUDA blocks, min pages per split): `--split BLOCKS,PAGES` overrides.
    let split: (usize, usize) = match args.iter().position(|a| a == "--split") {
        None => DEFAULT_SPLIT,
        Some(i) => {
            let value = args.get(i + 1).map(String::as_str).unwrap_or("");
            let parsed = value.split_once(',').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
            parsed.with_context(|| format!("--split {value:?}: expected BLOCKS,PAGES (two whole numbers)"))?
        }
    };
    if !quick {
        split_sweep(&dev, scale)?;
    }
    println!("\nsplit: target {} blocks, at least {} pages per split", split.0, split.1);
    println!("| context | batch | policy | budget | window | ms | bytes/step (MB) | GB/s | % of copy | x full |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &ctx in contexts {
        // candle's element-wise CUDA kernels (used here to fill the caches) index with 32 bits:
        // a cache of 2^31 elements or more cannot be made, so such batches are skipped (reported).
        let fits = |batch: usize| batch * ctx * KV_HEADS * HEAD_DIM < (1usize << 31);
        let max_batch = batches.iter().copied().filter(|&b| fits(b)).max().unwrap_or(1);
        for &batch in batches.iter().filter(|&&b| !fits(b)) {
            println!("| {ctx} | {batch} | (skipped: a {:.0} GB cache is beyond candle's 32-bit element indexing) | | | | | | | |", (batch * ctx) as f64 * kv_token_bytes / 1e9);
        }
        let pages = ctx / BLOCK;
        let num_blocks = max_batch * pages;
        // Random caches for the largest batch; smaller batches use the first sequences.
        let key_cache = Tensor::randn(0f32, 1.0, (num_blocks, KV_HEADS, HEAD_DIM / x, BLOCK, x), &dev)?.to_dtype(DType::BF16)?;
        let value_cache = Tensor::randn(0f32, 1.0, (num_blocks, KV_HEADS, HEAD_DIM, BLOCK), &dev)?.to_dtype(DType::BF16)?;
        let bounds = Tensor::zeros((num_blocks, KV_HEADS, 2, HEAD_DIM), DType::BF16, &dev)?;
        // Page summaries for every block, as a prefill would leave them (one slot per block suffices).
        let slots: Vec<i64> = (0..num_blocks as i64).map(|b| b * BLOCK as i64).collect();
        gpu::refresh_page_bounds(&key_cache, &Tensor::new(slots.as_slice(), &dev)?, &bounds)?;
        sync(&dev)?;
        for &batch in batches.iter().filter(|&&b| fits(b)) {
            let tables: Vec<u32> = (0..(batch * pages) as u32).collect();
            let block_tables = Tensor::from_vec(tables, (batch, pages), &dev)?;
            let ctx_host = vec![ctx as u32; batch];
            let context_lens = Tensor::new(ctx_host.as_slice(), &dev)?;
            let query = Tensor::randn(0f32, 1.0, (batch, HEADS, HEAD_DIM), &dev)?.to_dtype(DType::BF16)?;

            let full_ms = 1e3
                * time(&dev, iters, || {
                    mistralrs_paged_attn::paged_attention(&query, None, None, &key_cache, &value_cache, &block_tables, &context_lens, None, ctx, scale, 1.0, None)?;
                    Ok(())
                })?;
            let full_bytes = batch as f64 * ctx as f64 * kv_token_bytes;
            let mut report = |policy: String, budget: Option<usize>, window: usize, ms: f64, bytes: f64| {
                let gbps = bytes / (ms * 1e-3) / 1e9;
                println!(
                    "| {ctx} | {batch} | {policy} | {} | {window} | {ms:.3} | {:.1} | {gbps:.0} | {:.0}% | {:.2} |",
                    budget.map_or("-".to_string(), |b| b.to_string()),
                    bytes / 1e6,
                    100.0 * gbps * 1e9 / copy_bw,
                    full_ms / ms
                );
                records.push(Record { kind: "kernel", policy, context: ctx, batch, budget, window, ms, gbps });
            };
            report("full".into(), None, 1, full_ms, full_bytes);

            // Our kernel reading every page (same bytes as full): the sparse kernel's dense speed.
            let all = DevicePlan::upload(DecodePlan::new(&ctx_host, &vec![pages as u32; batch], 1, KV_HEADS, BLOCK, split.0, split.1), &dev)?;
            let ms = 1e3
                * time(&dev, iters, || {
                    let sel = gpu::select_pages(&all, &query, &bounds, &block_tables)?;
                    gpu::selected_decode(&all, &query, &key_cache, &value_cache, &block_tables, &sel, scale, None)?;
                    Ok(())
                })?;
            report("ours, every page".into(), Some(ctx), 1, ms, full_bytes);

            for &budget in budgets {
                let budget_pages = vec![(budget / BLOCK) as u32; batch];
                let sparse_bytes = batch as f64 * (budget.min(ctx) as f64 * kv_token_bytes + pages as f64 * bound_page_bytes);
                let plan = DevicePlan::upload(DecodePlan::new(&ctx_host, &budget_pages, 1, KV_HEADS, BLOCK, split.0, split.1), &dev)?;
                let ms = 1e3
                    * time(&dev, iters, || {
                        let sel = gpu::select_pages(&plan, &query, &bounds, &block_tables)?;
                        gpu::selected_decode(&plan, &query, &key_cache, &value_cache, &block_tables, &sel, scale, None)?;
                        Ok(())
                    })?;
                report("quest".into(), Some(budget), 1, ms, sparse_bytes);
                for &w in windows {
                    let rows_query = Tensor::randn(0f32, 1.0, (batch * w, HEADS, HEAD_DIM), &dev)?.to_dtype(DType::BF16)?;
                    let plan = DevicePlan::upload(DecodePlan::new(&ctx_host, &budget_pages, w, KV_HEADS, BLOCK, split.0, split.1), &dev)?;
                    let ms = 1e3
                        * time(&dev, iters, || {
                            // Masks omitted = every row uses every page: retro's worst case.
                            let sel = gpu::select_pages(&plan, &rows_query, &bounds, &block_tables)?;
                            gpu::selected_decode(&plan, &rows_query, &key_cache, &value_cache, &block_tables, &sel, scale, None)?;
                            Ok(())
                        })?;
                    report(format!("retro w={w}"), Some(budget), w, ms, sparse_bytes);
                }
            }
            // Retro's mask kernel on its own (budget 2048, w = 4), for the record.
            if !quick {
                let w = 4;
                let budget_pages = vec![(2048 / BLOCK) as u32; batch];
                let plan = DevicePlan::upload(DecodePlan::new(&ctx_host, &budget_pages, w, KV_HEADS, BLOCK, split.0, split.1), &dev)?;
                let rows_query = Tensor::randn(0f32, 1.0, (batch * w, HEADS, HEAD_DIM), &dev)?.to_dtype(DType::BF16)?;
                let words = pages.div_ceil(32);
                let seen = Tensor::zeros((batch * w, KV_HEADS, words), DType::U32, &dev)?;
                // Every past row cached, pool rows as the server lays them out (the newest takes row 0's).
                let meta: Vec<u32> = (0..batch)
                    .flat_map(|b| {
                        let rows = (0..w - 1).map(move |r| (b * w + r) as u32);
                        std::iter::repeat(1).take(w - 1).chain(rows).chain([(b * w) as u32, b as u32, 1])
                    })
                    .collect();
                let meta = Tensor::from_vec(meta, (batch, 2 * w + 1), &dev)?;
                let counters = Tensor::zeros((batch, 2), DType::I64, &dev)?;
                let mut sel = gpu::select_pages(&plan, &rows_query, &bounds, &block_tables)?;
                let ms = 1e3 * time(&dev, iters, || Ok(gpu::retro_row_masks(&plan, &mut sel, &seen, &meta, &counters, 0)?))?;
                println!("| {ctx} | {batch} | retro row masks only | 2048 | {w} | {ms:.4} | - | - | - | - |");
            }
        }
        drop((key_cache, value_cache, bounds));
    }
    prompt_bench(&dev, scale, quick)?;
    if let Some(path) = json_path {
        let mut f = std::fs::File::create(&path).with_context(|| format!("cannot write {path}"))?;
        writeln!(f, "{{\"kind\":\"copy\",\"gbps\":{:.1}}}", copy_bw / 1e9)?;
        for r in &records {
            writeln!(
                f,
                "{{\"kind\":\"{}\",\"policy\":\"{}\",\"context\":{},\"batch\":{},\"budget\":{},\"window\":{},\"ms\":{:.4},\"gbps\":{:.1},\"tok_s\":null}}",
                r.kind,
                r.policy,
                r.context,
                r.batch,
                r.budget.map_or("null".to_string(), |b| b.to_string()),
                r.window,
                r.ms,
                r.gbps
            )?;
        }
    }
    Ok(())
}
