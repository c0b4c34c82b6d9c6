//! Every type against dequantize-then-matmul (candle's dequantization of the same bytes), on
//! weights quantized by candle and on random bytes (every bit pattern of the weight fields).
//! The reference takes the inputs as the kernel quantizes them (each within half a step of the
//! original, checked), so the only difference left is float summation order.

use super::*;
use candle_core::quantized::QStorage;
use std::borrow::Cow;

fn ggml(ty: WeightType) -> GgmlDType {
    match ty {
        WeightType::Q4_0 => GgmlDType::Q4_0,
        WeightType::Q4_1 => GgmlDType::Q4_1,
        WeightType::Q5_0 => GgmlDType::Q5_0,
        WeightType::Q5_1 => GgmlDType::Q5_1,
        WeightType::Q8_0 => GgmlDType::Q8_0,
        WeightType::Q4K => GgmlDType::Q4K,
        WeightType::Q5K => GgmlDType::Q5K,
        WeightType::Q6K => GgmlDType::Q6K,
    }
}

fn randn(shape: (usize, usize), seed: u64) -> Vec<f32> {
    // A small xorshift + Box-Muller, so the data does not depend on candle's RNG.
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        (s >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..shape.0 * shape.1)
        .map(|_| {
            let (u, v) = (next().max(1e-12), next());
            ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
        })
        .collect()
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    randn((len, 1), seed).iter().map(|v| (v.to_bits() >> 7) as u8).collect()
}

/// Sane scales for random blocks: each f16 field a value of moderate size (random bits could be
/// NaN or huge).
fn fix_scales(ty: WeightType, bytes: &mut [u8], seed: u64) {
    let fields: &[usize] = match ty {
        WeightType::Q4_0 | WeightType::Q5_0 | WeightType::Q8_0 => &[0],
        WeightType::Q4_1 | WeightType::Q5_1 | WeightType::Q4K | WeightType::Q5K => &[0, 2],
        WeightType::Q6K => &[208],
    };
    let vals = randn((bytes.len(), 1), seed);
    for (b, block) in bytes.chunks_exact_mut(ty.block_bytes()).enumerate() {
        for (f, &at) in fields.iter().enumerate() {
            let v = half::f16::from_f32(vals[2 * b + f] * 0.02);
            block[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Checks `matmul` against candle's dequantization of `bytes`.
fn check(ty: WeightType, bytes: &[u8], n: usize, k: usize, m: usize, seed: u64) {
    let dev = Device::Cpu;
    let qt = QTensor::new(QStorage::from_data(Cow::Borrowed(bytes), &dev, ggml(ty)).unwrap(), (n, k)).unwrap();
    let wd = qt.dequantize(&dev).unwrap().to_vec2::<f32>().unwrap();
    let x = randn((m, k), seed);
    let got = matmul(ty, bytes, n, k, &x);
    let xq = QuantizedRows::new(&x, k, ty.block_len());
    for i in 0..m {
        // The inputs as the kernel sees them: 8-bit values times their block's scale.
        let row = xq.row(i);
        let xr: Vec<f64> = (0..k).map(|t| row.d[t / ty.block_len()] as f64 * row.q[t] as f64).collect();
        for (t, (a, b)) in xr.iter().zip(&x[i * k..(i + 1) * k]).enumerate() {
            assert!((a - *b as f64).abs() <= row.d[t / ty.block_len()] as f64 * 0.5001, "input {t} quantized to {a}, was {b}");
        }
        for (j, wj) in wd.iter().enumerate() {
            let want: f64 = wj.iter().zip(&xr).map(|(a, b)| *a as f64 * b).sum();
            let abs: f64 = wj.iter().zip(&xr).map(|(a, b)| (*a as f64 * b).abs()).sum();
            let diff = (got[i * n + j] as f64 - want).abs();
            assert!(diff <= 2e-5 * abs + 1e-6, "{ty:?} n {n} k {k} m {m}: y[{i}][{j}] = {} want {want} (diff {diff})", got[i * n + j]);
        }
    }
}

/// Row counts of decode (1..=8, retro's window included), tails of the 4-row kernel, and a prompt
/// longer than one task's rows.
const ROWS: [usize; 8] = [1, 2, 3, 4, 5, 8, 9, 70];

#[test]
fn every_type_matches_dequantize_then_matmul_on_quantized_weights() {
    for ty in WeightType::ALL {
        let (n, k) = (37, 2 * ty.block_len().max(64));
        let w = Tensor::from_vec(randn((n, k), 7), (n, k), &Device::Cpu).unwrap();
        let qt = QTensor::quantize(&w, ggml(ty)).unwrap();
        let bytes = qt.data().unwrap().into_owned();
        for (s, m) in ROWS.into_iter().enumerate() {
            check(ty, &bytes, n, k, m, 100 + s as u64);
        }
    }
}

/// Products large enough to run on the thread pool (the ones above run on the calling thread).
#[test]
fn large_products_on_the_thread_pool_match_too() {
    for ty in [WeightType::Q4_0, WeightType::Q4K, WeightType::Q6K] {
        let (n, k) = (600, 1024);
        assert!(n * k / ty.block_len() * ty.block_bytes() > SERIAL_BYTES);
        let w = Tensor::from_vec(randn((n, k), 9), (n, k), &Device::Cpu).unwrap();
        let bytes = QTensor::quantize(&w, ggml(ty)).unwrap().data().unwrap().into_owned();
        for m in [1, 5, 70] {
            check(ty, &bytes, n, k, m, 200 + m as u64);
        }
    }
}

#[test]
fn every_type_matches_dequantize_then_matmul_on_random_bytes() {
    for (t, ty) in WeightType::ALL.into_iter().enumerate() {
        for (n, blocks) in [(1, 1), (5, 3), (66, 2)] {
            let k = blocks * ty.block_len();
            let mut bytes = random_bytes(n * blocks * ty.block_bytes(), 11 + t as u64);
            fix_scales(ty, &mut bytes, 13 + t as u64);
            for m in [1, 3, 8] {
                check(ty, &bytes, n, k, m, 17 + m as u64);
            }
        }
    }
}

#[test]
fn simd_and_portable_dots_agree() {
    if !avx2() {
        return;
    }
    for (t, ty) in WeightType::ALL.into_iter().enumerate() {
        let k = 4 * ty.block_len();
        let mut bytes = random_bytes(k / ty.block_len() * ty.block_bytes(), 31 + t as u64);
        fix_scales(ty, &mut bytes, 37);
        let mut w = UnpackedRow::default();
        w.resize(k, ty.block_len());
        unpack_row(ty, &bytes, &mut w);
        let x = randn((4, k), 41);
        let xq = QuantizedRows::new(&x, k, ty.block_len());
        for rows in 1..=4 {
            let xr: Vec<_> = (0..rows).map(|r| xq.row(r)).collect();
            let headers: Vec<_> = bytes.chunks_exact(ty.block_bytes()).map(|b| block_header(ty, b)).collect();
            let mut want = [[0f32; 4]];
            dot_rows(ty, false, &[&bytes], &[&headers], &w, &xr, &mut want);
            // Both SIMD variants where the CPU has them (`matmul` takes the best one).
            let mut got = vec![];
            let mut a = [[0f32; 4]];
            unsafe { simd::dot_rows_avx2(ty, &[&bytes], &[&headers], &xr, &mut a) };
            got.push(("avx2", a[0]));
            if simd::vnni() {
                unsafe { simd::dot_rows_vnni(ty, &[&bytes], &[&headers], &xr, &mut a) };
                got.push(("vnni", a[0]));
            }
            for (name, a) in got {
                for r in 0..rows {
                    let b = want[0][r];
                    assert!((a[r] - b).abs() <= 1e-5 * b.abs().max(1.0), "{ty:?} {name} rows {rows}: {} vs {b}", a[r]);
                }
            }
        }
    }
}

/// The portable path against the reference too (`matmul` takes the SIMD one where it can).
#[test]
fn portable_path_matches_dequantize_then_matmul() {
    for (t, ty) in WeightType::ALL.into_iter().enumerate() {
        let (n, k) = (3, 2 * ty.block_len());
        let mut bytes = random_bytes(n * k / ty.block_len() * ty.block_bytes(), 51 + t as u64);
        fix_scales(ty, &mut bytes, 53);
        let wd = QTensor::new(QStorage::from_data(Cow::Borrowed(&bytes), &Device::Cpu, ggml(ty)).unwrap(), (n, k))
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let x = randn((2, k), 57);
        let xq = QuantizedRows::new(&x, k, ty.block_len());
        let mut w = UnpackedRow::default();
        w.resize(k, ty.block_len());
        let row_bytes = bytes.len() / n;
        for j in 0..n {
            unpack_row(ty, &bytes[j * row_bytes..(j + 1) * row_bytes], &mut w);
            let mut got = [0f32; 2];
            dot::dot_rows_portable(&w, ty.has_min(), ty.block_len(), &[xq.row(0), xq.row(1)], &mut got);
            for i in 0..2 {
                let row = xq.row(i);
                let want: f64 = (0..k).map(|t| wd[j][t] as f64 * row.d[t / ty.block_len()] as f64 * row.q[t] as f64).sum();
                let abs: f64 = (0..k).map(|t| (wd[j][t] as f64 * row.d[t / ty.block_len()] as f64 * row.q[t] as f64).abs()).sum();
                assert!((got[i] as f64 - want).abs() <= 2e-5 * abs + 1e-6, "{ty:?} row {j} input {i}: {} vs {want}", got[i]);
            }
        }
    }
}

#[test]
fn qmatmul_keeps_leading_dims_and_declines_what_it_cannot_take() {
    let dev = Device::Cpu;
    let (n, k) = (8, 256);
    let w = Tensor::from_vec(randn((n, k), 3), (n, k), &dev).unwrap();
    let x = Tensor::from_vec(randn((6, k), 5), (2, 3, k), &dev).unwrap();
    let q = QTensor::quantize(&w, GgmlDType::Q4K).unwrap();
    let y = qmatmul(&q, &x).unwrap().expect("Q4_K is taken");
    assert_eq!(y.dims(), &[2, 3, n]);
    let want = x.broadcast_matmul(&q.dequantize(&dev).unwrap().t().unwrap()).unwrap();
    let diff = (y - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 0.5, "{diff}");
    let xh = x.to_dtype(DType::F16).unwrap();
    assert_eq!(qmatmul(&q, &xh).unwrap().expect("f16 input is taken").dtype(), DType::F16);
    // Types outside the table, and inputs of the wrong width.
    assert!(qmatmul(&QTensor::quantize(&w, GgmlDType::F32).unwrap(), &x).unwrap().is_none());
    assert!(qmatmul(&q, &Tensor::zeros((1, 128), DType::F32, &dev).unwrap()).unwrap().is_none());
}
