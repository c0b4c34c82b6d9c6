//! The linear-layer checks: replay rows, the wide-load GEMV and the batch-row fold against
//! upstream's products.

use crate::*;

/// candle's CUDA quantized matmul (`QMatMul`, what upstream's GGUF layers call) at `b` rows against
/// the same weights one row at a time and against the CPU op. A replay window of w sends w rows per
/// sequence through every projection, which selects candle's multi-row vector kernels (b ≤ 8);
/// upstream's own decode only sends one row per sequence. Returns failures as text.
pub(crate) fn check_replay_rows(rng: &mut Rng, gpu_dev: &Device) -> Result<Vec<String>> {
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
pub(crate) fn check_gemv_rows(rng: &mut Rng, gpu_dev: &Device) -> Result<Vec<String>> {
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
pub(crate) fn check_fold_batch_rows(rng: &mut Rng, gpu_dev: &Device) -> Result<Vec<String>> {
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
