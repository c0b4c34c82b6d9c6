//! The CPU decode kernels alone (no model, no server), in SmolLM2-135M's layout: 30 layers of
//! 3 KV heads x 3 query heads of 64, f32 cache, block 16, one sequence. Per context it times one
//! decode step's attention over all 30 layers (each layer its own cache, so the K/V come from
//! memory, not from a cache warmed by the previous layer) for `full` (every page, 1 row), `quest`
//! (12.5% of the pages, 1 row) and a retro-like window (2 rows: the newest over the selection, the
//! older over the selection plus as many other pages), and prints ms/step, the bytes the step's
//! attention reads and the bandwidth that implies against a copy loop measured in the same run.
//!
//! `cargo bench -p retro-kernels --bench decode_kernel` (CONTEXTS=512,2048,8192 to choose;
//! HUGEPAGES=1 backs the caches with transparent huge pages first, an experiment: docs/cpu.md).

#[path = "support/bandwidth.rs"]
mod bandwidth;
use bandwidth::copy_bandwidth;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use retro_kernels::cpu::{paged_decode, paged_decode_selected};
use retro_kernels::rng::Rng;
use retro_kernels::PageSelection;

const LAYERS: usize = 30;
const KV_HEADS: usize = 3;
const GROUP: usize = 3;
const HEAD_DIM: usize = 64;
const BLOCK: usize = 16;


fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let contexts: Vec<usize> = std::env::var("CONTEXTS")
        .ok()
        .map(|s| s.split(',').map(|c| c.trim().parse().expect("CONTEXTS: numbers")).collect())
        .unwrap_or_else(|| vec![512, 2048, 8192]);
    let copy = copy_bandwidth();
    println!("copy bandwidth {:.1} GB/s (read + write); {LAYERS} layers, {KV_HEADS} KV heads x {GROUP}, head dim {HEAD_DIM}, block {BLOCK}, f32", copy / 1e9);
    println!("| context | kernel | ms/step | MB read/step | GB/s | of copy bandwidth |");
    println!("|---:|---|---:|---:|---:|---:|");
    let mut rng = Rng::new(0x5eed);
    let scale = 1.0 / (HEAD_DIM as f32).sqrt();
    for &ctx in &contexts {
        let pages = ctx.div_ceil(BLOCK);
        let blocks = pages + 1;
        let caches: Vec<(Tensor, Tensor)> = (0..LAYERS)
            .map(|_| (rng.tensor(&[blocks, KV_HEADS, HEAD_DIM / 4, BLOCK, 4], 1.0, DType::F32), rng.tensor(&[blocks, KV_HEADS, HEAD_DIM, BLOCK], 1.0, DType::F32)))
            .collect();
        if std::env::var("HUGEPAGES").is_ok_and(|v| v == "1") {
            for (k, v) in &caches {
                for t in [k, v] {
                    huge_pages(t);
                }
            }
            let anon = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
            eprintln!("{}", anon.lines().filter(|l| l.starts_with("AnonHugePages")).collect::<Vec<_>>().join(" "));
        }
        // Blocks in a shuffled order, as a long-running cache hands them out.
        let mut table: Vec<u32> = (0..blocks as u32).collect();
        rng.shuffle(&mut table);
        let tables = Tensor::from_vec(table[..pages].to_vec(), (1, pages), &Device::Cpu).unwrap();
        let lens = Tensor::new(&[ctx as u32], &Device::Cpu).unwrap();
        let q1 = rng.tensor(&[1, KV_HEADS * GROUP, HEAD_DIM], 1.0, DType::F32);
        let q2 = rng.tensor(&[2, KV_HEADS * GROUP, HEAD_DIM], 1.0, DType::F32);
        let budget = pages.div_ceil(8).max(1);
        // Every 8th page plus the last: a spread-out selection; the older row adds the pages after them.
        let chosen: Vec<u32> = (0..pages as u32).filter(|p| p % 8 == 0 || *p as usize == pages - 1).take(budget + 1).collect();
        let mut quest = PageSelection::new(KV_HEADS);
        let mut retro = PageSelection::new(KV_HEADS);
        for _ in 0..KV_HEADS {
            for &p in &chosen {
                quest.push(p, 1);
            }
            quest.finish_list();
            for p in 0..pages as u32 {
                if chosen.contains(&p) {
                    retro.push(p, 0b11);
                } else if chosen.contains(&p.saturating_sub(1)) && p as usize + 1 < pages {
                    retro.push(p, 0b01);
                }
            }
            retro.finish_list();
        }
        let page_bytes = (2 * HEAD_DIM * BLOCK * 4) as f64;
        let count = |s: &PageSelection| s.entries.len() as f64;
        let runs: [(&str, f64, Box<dyn Fn(&Tensor, &Tensor)>); 3] = [
            ("full", (pages * KV_HEADS) as f64 * page_bytes, Box::new(|k, v| drop(paged_decode(&q1, k, v, &tables, &lens, scale, None).unwrap()))),
            ("quest 12.5%", count(&quest) * page_bytes, Box::new(|k, v| drop(paged_decode_selected(&q1, k, v, &tables, &lens, &quest, scale, None).unwrap()))),
            ("window 2 rows", count(&retro) * page_bytes, Box::new(|k, v| drop(paged_decode_selected(&q2, k, v, &tables, &lens, &retro, scale, None).unwrap()))),
        ];
        for (name, bytes_per_layer, run) in &runs {
            let mut best = f64::MAX;
            for _ in 0..7 {
                let t = Instant::now();
                for (k, v) in &caches {
                    run(k, v);
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            let bytes = bytes_per_layer * LAYERS as f64;
            println!("| {ctx} | {name} | {:.2} | {:.1} | {:.1} | {:.0}% |", best * 1e3, bytes / 1e6, bytes / best / 1e9, 100.0 * bytes / best / copy);
        }
    }
}

/// Experiment: back a CPU tensor's buffer with transparent huge pages (MADV_HUGEPAGE, then
/// MADV_COLLAPSE for the pages already touched).
fn huge_pages(t: &Tensor) {
    extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    let (storage, _) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { return };
    let data = cpu.as_slice::<f32>().unwrap();
    const HUGE: usize = 2 << 20;
    let start = (data.as_ptr() as usize).next_multiple_of(HUGE);
    let end = (data.as_ptr() as usize + data.len() * 4) / HUGE * HUGE;
    if end > start {
        unsafe {
            madvise(start as *mut _, end - start, 14); // MADV_HUGEPAGE
            let rc = madvise(start as *mut _, end - start, 25); // MADV_COLLAPSE
            if rc != 0 {
                eprintln!("MADV_COLLAPSE failed: {}", std::io::Error::last_os_error());
            }
        }
    }
}
