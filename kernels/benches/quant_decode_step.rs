//! One decode token's linear layers of Qwen2.5-Coder-1.5B-Instruct Q4_K_M, through `quant_linear`:
//! the file's exact types and shapes (28 layers of q, k, v, o, gate, up, down, then the output
//! layer; 0.98 GB of weights), random values. Reports ms per token and the weight bytes read per
//! second, with the products called from a thread outside rayon's pool (each product hands its
//! tasks to the pool and waits) and from a thread that is one of its pool's threads (no hand-off),
//! alternating, best of several tokens each. Next to them: a plain read of the same bytes.
//!
//! `cargo bench -p retro-kernels --bench quant_decode_step` (`QUANT_STEP_TOKENS=N`, default 8;
//! `QUANT_STEP_BY_SHAPE=1` adds ms per token by product shape).

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use retro_kernels::quant_linear;

/// One product: weight type, `[n, k]`.
type Shape = (GgmlDType, usize, usize);

/// The products of one token, in order (llama.cpp's Q4_K_M puts Q6_K on half the layers' `attn_v`
/// and `ffn_down`).
fn qwen_1_5b() -> Vec<Shape> {
    use GgmlDType::{Q4K, Q6K};
    let mut v = vec![];
    for layer in 0..28 {
        let wide = if layer % 2 == 0 { Q6K } else { Q4K };
        v.extend([(Q4K, 1536, 1536), (Q4K, 256, 1536), (wide, 256, 1536), (Q4K, 1536, 1536)]);
        v.extend([(Q4K, 8960, 1536), (Q4K, 8960, 1536), (wide, 1536, 8960)]);
    }
    v.push((Q6K, 151936, 1536));
    v
}

/// A quantized `[n, k]` of `dtype` with random values.
fn weights(dtype: GgmlDType, n: usize, k: usize) -> QTensor {
    QTensor::quantize(&Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).unwrap(), dtype).unwrap()
}

fn product_ms(w: &QTensor, x: &Tensor) -> f64 {
    let t = Instant::now();
    std::hint::black_box(quant_linear::qmatmul(w, x).unwrap().unwrap());
    t.elapsed().as_secs_f64() * 1e3
}

fn token_ms(layers: &[(QTensor, Tensor)]) -> f64 {
    layers.iter().map(|(w, x)| product_ms(w, x)).sum()
}

/// ms per token by product shape, each product run once from a thread outside the pool.
fn by_shape(layers: &[(QTensor, Tensor)]) {
    let mut shapes: Vec<(Shape, f64, usize)> = vec![];
    for (w, x) in layers {
        let (n, k) = w.shape().dims2().unwrap();
        let key = (w.dtype(), n, k);
        let ms = product_ms(w, x);
        match shapes.iter_mut().find(|s| s.0 == key) {
            Some(s) => (s.1, s.2) = (s.1 + ms, s.2 + 1),
            None => shapes.push((key, ms, 1)),
        }
    }
    println!("| type | n x k | products | ms per token | GB/s |");
    println!("|---|---|---|---|---|");
    for ((dtype, n, k), ms, count) in shapes {
        let bytes = (n * k / dtype.block_size() * dtype.type_size() * count) as f64;
        println!("| {dtype:?} | {n} x {k} | {count} | {ms:.2} | {:.1} |", bytes / (ms * 1e-3) / 1e9);
    }
}

fn main() {
    let tokens: usize = std::env::var("QUANT_STEP_TOKENS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let dev = Device::Cpu;
    let layers: Vec<(QTensor, Tensor)> = qwen_1_5b()
        .into_iter()
        .map(|(dtype, n, k)| (weights(dtype, n, k), Tensor::randn(0f32, 1.0, (1, 1, k), &dev).unwrap()))
        .collect();
    let bytes: usize = layers.iter().map(|(w, _)| w.storage_size_in_bytes()).sum();
    println!("threads {}, {} ({} products, {:.1} MB of weights per token)", rayon::current_num_threads(), quant_linear::isa(), layers.len(), bytes as f64 / 1e6);

    // A pool of the global pool's size whose first thread is this one's helper thread: the
    // products then start on a thread of their own pool, as the engine thread does.
    let threads = rayon::current_num_threads();
    let (to_pool, in_pool) = std::sync::mpsc::channel::<()>();
    let (done_tx, done) = std::sync::mpsc::channel::<f64>();
    let layers = std::sync::Arc::new(layers);
    let pooled = {
        let layers = layers.clone();
        std::thread::spawn(move || {
            let _pool = rayon::ThreadPoolBuilder::new().num_threads(threads).use_current_thread().build().unwrap();
            while in_pool.recv().is_ok() {
                done_tx.send(token_ms(&layers)).unwrap();
            }
        })
    };
    // A plain read of the same bytes on every thread, for the memory floor.
    let read_ms = || {
        let t = Instant::now();
        let sum: u64 = layers
            .iter()
            .map(|(w, _)| w.data().unwrap().par_chunks(64 << 10).map(|d| d.chunks(64).map(|c| c[0] as u64).sum::<u64>()).sum::<u64>())
            .sum();
        std::hint::black_box(sum);
        t.elapsed().as_secs_f64() * 1e3
    };
    let (mut outside, mut inside, mut read) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for i in 0..=tokens {
        let a = token_ms(&layers);
        to_pool.send(()).unwrap();
        let b = done.recv().unwrap();
        let r = read_ms();
        if i > 0 {
            (outside, inside, read) = (outside.min(a), inside.min(b), read.min(r));
        }
    }
    drop(to_pool);
    pooled.join().unwrap();
    let gbs = |ms: f64| bytes as f64 / (ms * 1e-3) / 1e9;
    println!("| caller | ms per token | GB/s | tok/s |");
    println!("|---|---|---|---|");
    println!("| outside the pool | {outside:.2} | {:.1} | {:.1} |", gbs(outside), 1e3 / outside);
    println!("| a pool thread | {inside:.2} | {:.1} | {:.1} |", gbs(inside), 1e3 / inside);
    println!("| plain read (every 64th byte, all threads) | {read:.2} | {:.1} | {:.1} |", gbs(read), 1e3 / read);
    if std::env::var("QUANT_STEP_BY_SHAPE").is_ok() {
        by_shape(&layers);
    }
}
