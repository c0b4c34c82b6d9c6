//! The causal prompt attention on tensor cores (`prompt_attention.cu`).

use super::*;

/// Query rows and keys per tile of the prompt kernel (`PROMPT_BM`, `PROMPT_BN` in prompt_attention.cu).
const PROMPT_TILE: usize = 64;

/// Causal attention of one prompt over itself on tensor cores (a prefill with no cached tokens):
/// `q` `[1, heads, n, d]`, `k`/`v` `[1, kv_heads, n, d]` (query head `h` reads KV head
/// `h / (heads / kv_heads)`), f16 or bf16, head dim 64 or 128; `softmax(q kᵀ · scale + causal) v` as
/// `[1, heads, n, d]` in `q`'s dtype. Same semantics as `cpu::causal_prompt_attention` (the reference
/// of `retro-gpu-check`). Strided inputs are made contiguous first.
pub fn causal_prompt_attention(q: &Tensor, k: &Tensor, v: &Tensor, softmax_scale: f32) -> Result<Tensor> {
    let dev = cuda_device(q, "q")?;
    let crate::PromptShape { heads, kv_heads, n, d } = crate::PromptShape::of(q, k, v)?;
    if !matches!(d, 64 | 128) || !matches!(q.dtype(), DType::F16 | DType::BF16) {
        bail!("retro-kernels: prompt attention is built for f16/bf16 and head dim 64/128, not {:?}/{d}", q.dtype());
    }
    check_dtype(k, q.dtype(), "k")?;
    check_dtype(v, q.dtype(), "v")?;
    let out = new_tensor_dtype(&dev, q.dtype(), &[1, heads, n, d])?;
    if n == 0 || heads == 0 {
        return Ok(out);
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let sfx = suffix(q.dtype(), "q")?;
    // Two buffers of a K and a V tile, rows padded by 8 elements.
    let smem = 2 * 2 * PROMPT_TILE * (d + 8) * q.dtype().size_in_bytes();
    let func = function_with(&dev, "prompt_attention", &format!("causal_prompt_attention_{sfx}_d{d}"), |f| {
        f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()
    })?;
    {
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = out.storage_and_layout();
        let ints = [n as i32, heads as i32, kv_heads as i32];
        let stream = dev.cuda_stream();
        let cfg = launch1d((n.div_ceil(PROMPT_TILE) as u32, heads as u32, 1), 128, smem as u32);
        let mut b = stream.launch_builder(&func);
        macro_rules! go {
            ($t:ty) => {{
                let q_ = view::<$t>(&qs, ql, "q")?;
                let k_ = view::<$t>(&ks, kl, "k")?;
                let v_ = view::<$t>(&vs, vl, "v")?;
                let o_ = view::<$t>(&os, ol, "out")?;
                b.arg(&q_).arg(&k_).arg(&v_).arg(&o_).arg(&ints[0]).arg(&ints[1]).arg(&ints[2]).arg(&softmax_scale);
                unsafe { b.launch(cfg) }.w()?;
            }};
        }
        match q.dtype() {
            DType::F16 => go!(half::f16),
            _ => go!(half::bf16),
        }
    }
    Ok(out)
}
