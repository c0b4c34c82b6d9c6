//! The tensor-core prompt kernel against the CPU one.

use crate::*;

/// The tensor-core prompt kernel (`gpu::causal_prompt_attention`) against the CPU's
/// (`cpu::causal_prompt_attention`) on random prompts: ragged lengths around the 64-row tiles, GQA
/// groups 1/4/2, head dims 64/128, K and V handed over strided as a model's reshapes leave them.
pub(crate) fn check_prompt_attention(rng: &mut Rng, gpu_dev: &Device, quick: bool) -> Result<Vec<String>> {
    let mut failures = Vec::new();
    println!("| prompt attention (heads / kv heads x n x d) | dtype | max rel. error vs CPU |");
    println!("|---|---|---|");
    let lengths: &[usize] = if quick { &[1, 63, 65, 200] } else { &[1, 5, 63, 64, 65, 200, 1000, 4096] };
    for dtype in [DType::F16, DType::BF16] {
        for d in [64, 128] {
            for (heads, kv_heads) in [(4, 4), (8, 2), (6, 3)] {
                for &n in lengths {
                    let scale = 1.0 / (d as f32).sqrt();
                    let q = rng.tensor(&[1, heads, n, d], 2.0, dtype);
                    // K/V as [1, n, kv, d] transposed: strided, like a model's view after its reshape.
                    let k = rng.tensor(&[1, n, kv_heads, d], 2.0, dtype).transpose(1, 2)?;
                    let v = rng.tensor(&[1, n, kv_heads, d], 1.0, dtype).transpose(1, 2)?;
                    let reference = cpu::causal_prompt_attention(&q, &k, &v, scale)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                    let (gq, gk, gv) = (q.to_device(gpu_dev)?, k.to_device(gpu_dev)?, v.to_device(gpu_dev)?);
                    let out = gpu::causal_prompt_attention(&gq, &gk, &gv, scale)?;
                    let (rel, nan) = rel_error(&to_f32(&out)?, &reference);
                    println!("| {heads} / {kv_heads} x {n} x {d} | {dtype:?} | {} |", if nan { "NaN".to_string() } else { format!("{rel:.2e}") });
                    if nan || rel > out_tolerance(dtype) {
                        failures.push(format!("prompt attention {dtype:?} {heads}/{kv_heads} x {n} x {d}: {rel:.2e} vs CPU{}", if nan { " (NaN)" } else { "" }));
                    }
                }
            }
        }
    }
    Ok(failures)
}
