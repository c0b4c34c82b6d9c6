//! The CPU features the CPU kernels dispatch on, detected at run time (one binary for every x86-64).

/// Whether the CPU has AVX2, FMA and F16C: the SIMD paths of `quant_linear` and `dense_linear`.
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") && std::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}
