//! `quant_linear` against candle's CPU `QMatMul` (upstream's path) on Qwen2.5-Coder-1.5B's shapes,
//! and `dense_linear` against candle's matmul on f16 weights (SmolLM2-135M's MLP), side by side in
//! one run: decode (1, 2, 4, 8 rows) and a prompt (512 rows; dense: decode only), ms per product
//! and the weight bytes read per second. Each product reads weights no cache holds (128 MiB of
//! copies, cycled), as a model's decode does.
//!
//! `cargo bench -p retro-kernels --bench quant_linear` (QUANT_LINEAR_ROWS=1,512 picks row counts).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use retro_kernels::quant_linear;

/// Bytes of weight copies a product cycles through (beyond the last-level cache).
const COLD_BYTES: usize = 128 << 20;

fn best_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let dev = Device::Cpu;
    let rows: Vec<usize> = std::env::var("QUANT_LINEAR_ROWS")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 4, 8, 512]);
    println!("threads {}, AVX2 {}", rayon::current_num_threads(), quant_linear::avx2());
    println!("| type | n x k | rows | ours ms | upstream ms | upstream/ours | ours GB/s (weights) |");
    println!("|---|---|---|---|---|---|---|");
    // Qwen2.5-Coder-1.5B: MLP up/gate (8960 x 1536), down (1536 x 8960); SmolLM2-135M's MLP in Q4_1.
    for (dtype, n, k) in [
        (GgmlDType::Q4K, 8960, 1536),
        (GgmlDType::Q6K, 1536, 8960),
        (GgmlDType::Q4_1, 1536, 576),
        (GgmlDType::Q8_0, 1536, 1536),
    ] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let q = std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap());
        let bytes = q.storage_size_in_bytes() as f64;
        // Copies of the weights cycled through, more than any cache holds, so that decode reads
        // them from memory as a model's layers do.
        let copies: Vec<_> = (0..(COLD_BYTES / bytes as usize).max(1))
            .map(|_| std::sync::Arc::new(QTensor::quantize(&w, dtype).unwrap()))
            .collect();
        let upstream: Vec<_> = copies.iter().map(|q| QMatMul::from_arc(q.clone()).unwrap()).collect();
        for &m in &rows {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap();
            let reps = if m > 64 { 3 } else { 20 };
            let mut next = 0;
            let ours = best_ms(reps, || {
                next = (next + 1) % copies.len();
                std::hint::black_box(quant_linear::qmatmul(&copies[next], &x).unwrap().unwrap());
            });
            let theirs = best_ms(reps.min(5), || {
                next = (next + 1) % copies.len();
                std::hint::black_box(upstream[next].forward(&x).unwrap());
            });
            println!(
                "| {dtype:?} | {n} x {k} | {m} | {ours:.3} | {theirs:.3} | {:.2} | {:.1} |",
                theirs / ours,
                bytes / (ours * 1e-3) / 1e9
            );
        }
    }
    for (n, k) in [(1536, 576), (576, 1536)] {
        let copies: Vec<_> = (0..COLD_BYTES / (2 * n * k))
            .map(|_| Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap().to_dtype(candle_core::DType::F16).unwrap())
            .collect();
        let bytes = (2 * n * k) as f64;
        for &m in rows.iter().filter(|&&m| m <= retro_kernels::dense_linear::MAX_ROWS) {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap().to_dtype(candle_core::DType::F16).unwrap();
            let mut next = 0;
            let ours = best_ms(20, || {
                next = (next + 1) % copies.len();
                std::hint::black_box(retro_kernels::dense_linear::matmul(&copies[next], &x).unwrap().unwrap());
            });
            let theirs = best_ms(20, || {
                next = (next + 1) % copies.len();
                std::hint::black_box(x.broadcast_matmul(&copies[next].t().unwrap()).unwrap());
            });
            println!("| F16 | {n} x {k} | {m} | {ours:.3} | {theirs:.3} | {:.2} | {:.1} |", theirs / ours, bytes / (ours * 1e-3) / 1e9);
        }
    }
}
