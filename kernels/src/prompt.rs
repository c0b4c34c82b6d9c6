//! The shapes of one causal prompt attention call, checked the same way for the CPU kernel
//! ([`crate::cpu::causal_prompt_attention`], `cpu/prefill.rs`) and the CUDA one ([`crate::cuda::causal_prompt_attention`]).

use candle_core::{bail, Result, Tensor};

/// `q` `[1, heads, n, d]`, `k` and `v` `[1, kv_heads, n, d]`, with `heads` a multiple of
/// `kv_heads` (query head `h` reads KV head `h / group`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PromptShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub n: usize,
    pub d: usize,
}

impl PromptShape {
    pub fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (b, heads, n, d) = q.dims4()?;
        let (kb, kv_heads, kn, kd) = k.dims4()?;
        if b != 1 || kb != 1 || kn != n || kd != d || v.dims() != k.dims() {
            bail!(
                "prompt attention takes q [1, h, n, d] and k/v [1, kv_h, n, d]; got q {:?}, k {:?}, v {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if kv_heads == 0 || heads % kv_heads != 0 {
            bail!("prompt attention: {heads} query heads do not group over {kv_heads} KV heads");
        }
        Ok(Self { heads, kv_heads, n, d })
    }

    /// Query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn t(dims: &[usize]) -> Tensor {
        Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn accepts_grouped_heads() {
        let shape = PromptShape::of(&t(&[1, 8, 5, 16]), &t(&[1, 2, 5, 16]), &t(&[1, 2, 5, 16])).unwrap();
        assert_eq!(shape, PromptShape { heads: 8, kv_heads: 2, n: 5, d: 16 });
        assert_eq!(shape.group(), 4);
    }

    #[test]
    fn names_the_shapes_it_refuses() {
        let cases = [
            ([2, 8, 5, 16], [2, 2, 5, 16], [2, 2, 5, 16], "got q [2, 8, 5, 16]"),
            ([1, 8, 5, 16], [1, 2, 4, 16], [1, 2, 4, 16], "k [1, 2, 4, 16]"),
            ([1, 8, 5, 16], [1, 2, 5, 8], [1, 2, 5, 8], "k [1, 2, 5, 8]"),
            ([1, 8, 5, 16], [1, 2, 5, 16], [1, 2, 5, 8], "v [1, 2, 5, 8]"),
            ([1, 8, 5, 16], [1, 3, 5, 16], [1, 3, 5, 16], "8 query heads do not group over 3 KV heads"),
            ([1, 8, 5, 16], [1, 0, 5, 16], [1, 0, 5, 16], "over 0 KV heads"),
        ];
        for (q, k, v, want) in cases {
            let err = PromptShape::of(&t(&q), &t(&k), &t(&v)).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} does not say {want:?}");
        }
    }
}
