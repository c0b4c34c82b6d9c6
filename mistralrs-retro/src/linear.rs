//! Which code computes the linear layers (the weight products) on CPU. Upstream's candle path runs
//! GGUF products one input row at a time (a prompt re-reads every weight block per token) and, in
//! the builds we ship, with scalar dot products; for f16/bf16 weights and a few rows, gemm repacks
//! the weights on every call. `retro-kernels`' `quant_linear` and `dense_linear` read each weight
//! row once per product on every core, with AVX2 detected at run time (docs/cpu.md has the numbers).

use tracing::info;

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
