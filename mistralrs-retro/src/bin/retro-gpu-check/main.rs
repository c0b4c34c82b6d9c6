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

mod kernels;
mod linear;
mod prompt;

use std::process::ExitCode;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use retro_kernels::{cpu, PageSelection};
use retro_kernels::cpu::{page_bound, select_pages, PageSummaries, PlanInputs};
use retro_kernels::rng::Rng;
use retro_kernels::cuda::{self as gpu, DevicePlan};
use retro_kernels::DecodePlan;

use kernels::{cases, run_case, Case};
use linear::{check_fold_batch_rows, check_gemv_rows, check_replay_rows};
use prompt::check_prompt_attention;

/// Max error per (kernel, dtype), over all cases.
#[derive(Default)]
pub(crate) struct Tally {
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

pub(crate) fn out_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-4,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}
pub(crate) const LSE_TOLERANCE: f32 = 1e-3;

pub(crate) fn to_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Fill and free a large device buffer with NaN so the next allocations (stream-ordered pool)
/// start out poisoned.
pub(crate) fn poison(dev: &Device) -> Result<()> {
    let t = Tensor::full(f32::NAN, 32 << 20, dev)?;
    drop(t);
    Ok(())
}

/// NaN in every slot from `first` on of each listed `(block, first)` partial page of a paged K or V
/// cache (`[blocks, kv_heads, ..., block_size(, x)]`: the token index is the second-last or last dim).
pub(crate) fn with_unwritten_slots(cache: Tensor, unwritten: &[(usize, usize)]) -> Result<Tensor> {
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
pub(crate) fn rel_error(a: &[f32], b: &[f32]) -> (f32, bool) {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let nan = a.iter().any(|v| v.is_nan());
    let err = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    (err / scale, nan)
}

pub(crate) fn lse_error(a: &[f32], b: &[f32]) -> Option<f32> {
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
