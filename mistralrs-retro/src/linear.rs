//! Which code computes the linear layers (the weight products): on CPU, `--cpu-linear`; for the
//! few rows per sequence of a sparse decode step, on CPU and CUDA, `linear_rows`.
//!
//! On CPU: Upstream's candle path runs
//! GGUF products one input row at a time (a prompt re-reads every weight block per token) and, in
//! the builds we ship, with scalar dot products; for f16/bf16 weights and a few rows, gemm repacks
//! the weights on every call. `retro-kernels`' `quant_linear` and `dense_linear` read each weight
//! row once per product on every core, with AVX2 detected at run time (docs/cpu.md has the numbers).

use tracing::info;

use crate::config::{KernelChoice, PolicyKind};

/// `--cpu-linear`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum CpuLinear {
    /// `retro-kernels`' products for GGUF weights (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K)
    /// and for f16/bf16 weights at 1..=8 rows (decode); everything else upstream's.
    #[default]
    Ours,
    /// Upstream's (candle's) products throughout.
    Upstream,
}

/// Route mistralrs-quant's CPU products (patch mistralrs-quant/0005) as `choice` says.
pub fn install(choice: CpuLinear) {
    match choice {
        CpuLinear::Ours => {
            mistralrs_quant::set_cpu_quantized_matmul(Some(retro_kernels::quant_linear::qmatmul));
            mistralrs_quant::set_cpu_unquantized_matmul(Some(retro_kernels::dense_linear::matmul));
            let isa = retro_kernels::quant_linear::isa();
            info!("CPU linear layers (--cpu-linear ours): retro-kernels' for GGUF weights ({isa}) and for f16/bf16 decode; f32 weights and f16/bf16 prompts upstream's");
        }
        CpuLinear::Upstream => {
            mistralrs_quant::set_cpu_quantized_matmul(None);
            mistralrs_quant::set_cpu_unquantized_matmul(None);
            info!("CPU linear layers: upstream's (--cpu-linear upstream)");
        }
    }
}

/// Largest row count of a CPU linear layer computed row by row when our row paths are on: above
/// it gemm's packed path is as fast (measured on SmolLM2-135M's shapes, see patches/README.md).
const CPU_ROW_SPLIT_LIMIT: usize = 8;

/// Set how linear layers treat the few rows per sequence of a policy about to run (`linear_rows`,
/// a flag and a policy-file key). Sparse decode steps feed 1..=window rows per sequence through
/// every linear layer:
/// - on CPU gemm's packed path makes 2..8-row products several times slower than the one-row path,
///   so ours runs them row by row (patch mistralrs-quant/0001);
/// - on CUDA upstream multiplies `[batch, rows, k]` as `batch` products against a broadcast weight,
///   reading the weights once per sequence, so ours folds the batch's rows into one matrix (patch
///   mistralrs-quant/0004).
/// `auto` keeps upstream's arithmetic for `full`.
pub fn set_row_paths(kind: PolicyKind, choice: KernelChoice) {
    let ours = choice.ours(kind != PolicyKind::Full);
    mistralrs_quant::set_cpu_row_split_limit(if ours { CPU_ROW_SPLIT_LIMIT } else { 0 });
    mistralrs_quant::set_cuda_fold_batch_rows(ours);
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use mistralrs_quant::{QuantMethod, QuantMethodConfig, UnquantLinear};

    /// Patch mistralrs-quant/0001: with the limit on, 2..=8-row CPU products (each weight row read
    /// once for all rows) equal one matmul up to float reassociation, bias included; 1 row and
    /// 9 rows take upstream's path.
    #[test]
    fn small_row_linear_products_match_one_matmul() {
        let dev = Device::Cpu;
        let (n, k) = (70, 45);
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, n, &dev).unwrap();
        mistralrs_quant::set_cpu_row_split_limit(8);
        // f32 only: candle has no CPU matmul for half types, so no CPU model runs them through here.
        let layer = UnquantLinear::new(QuantMethodConfig::Unquantized(candle_nn::Linear::new(w.clone(), Some(b.clone())))).unwrap();
        for m in 1..=9 {
            let x = Tensor::randn(0f32, 1.0, (1, m, k), &dev).unwrap();
            let got = layer.forward(&x).unwrap();
            assert_eq!(got.dims(), &[1, m, n]);
            let want = x.matmul(&w.t().unwrap().unsqueeze(0).unwrap()).unwrap().broadcast_add(&b).unwrap();
            let err = (got - want).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(err < 1e-4, "{m} rows: max error {err}");
        }
        mistralrs_quant::set_cpu_row_split_limit(0);
    }
}
