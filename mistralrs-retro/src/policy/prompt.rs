//! Every policy's prompt attention (patch 0009's hook) for a batch of prompts with nothing cached,
//! as the `prompt_attention` setting (flag and policy-file key) chooses:
//! - on CPU, for a batch of one prompt, our tiled causal kernel (`cpu::causal_prompt_attention`)
//!   instead of upstream's row-at-a-time loop; `auto` and `ours` use it for every policy (it differs
//!   from upstream's by float reassociation only);
//! - on CUDA, our tensor-core kernel (`retro_kernels::cuda::causal_prompt_attention`, checked
//!   against the CPU's by retro-gpu-check) instead of upstream's SDPA without flash-attn, which
//!   materializes the score matrix (a 32K prompt 44 s on the H200 against 3 s, 128K out of reach).
//!   `auto` uses it for `quest` and `retro` and keeps upstream's for `full`, so `full` stays what
//!   upstream produces bit for bit; `ours` makes long-context runs of all three compare like with
//!   like. A batch of prompts (padded at the end, masked causally only) runs prompt by prompt, and
//!   the model builds no causal mask for it ([`PromptAttention::replaces_mask`]).

use candle_core::{Device, Result, Tensor};

use crate::config::{KernelChoice, PolicyKind};

/// One policy's prompt-attention choice.
#[derive(Clone, Copy, Debug)]
pub struct PromptAttention {
    kind: PolicyKind,
    choice: KernelChoice,
}

impl PromptAttention {
    pub fn new(kind: PolicyKind, choice: KernelChoice) -> Self {
        Self { kind, choice }
    }

    fn ours_on_cpu(&self) -> bool {
        self.choice.ours(true)
    }

    fn ours_on_cuda(&self) -> bool {
        self.choice.ours(self.kind != PolicyKind::Full)
    }

    /// Our prompt attention where the choice says so and a kernel takes the shapes; `None` leaves
    /// the prompt to upstream.
    pub fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, softmax_scale: f32) -> Result<Option<Tensor>> {
        if q.device().is_cpu() {
            if q.dim(0)? != 1 || !self.ours_on_cpu() {
                return Ok(None);
            }
            return retro_kernels::cpu::causal_prompt_attention(q, k, v, softmax_scale).map(Some);
        }
        #[cfg(feature = "cuda")]
        if q.device().is_cuda() && self.ours_on_cuda() {
            let d = q.dim(candle_core::D::Minus1)?;
            if matches!(q.dtype(), candle_core::DType::F16 | candle_core::DType::BF16) && matches!(d, 64 | 128) {
                let batch = q.dim(0)?;
                if batch == 1 {
                    return retro_kernels::cuda::causal_prompt_attention(q, k, v, softmax_scale).map(Some);
                }
                let one = |t: &Tensor, b| t.narrow(0, b, 1);
                let outs = (0..batch)
                    .map(|b| retro_kernels::cuda::causal_prompt_attention(&one(q, b)?, &one(k, b)?, &one(v, b)?, softmax_scale))
                    .collect::<Result<Vec<_>>>()?;
                return Tensor::cat(&outs, 0).map(Some);
            }
        }
        Ok(None)
    }

    /// Patch 0009's question: does [`Self::attend`] mask every causal prompt on `device` by itself,
    /// so the model can skip building the `[n, n]` mask? Only on CUDA where our kernel is on: a
    /// 128K prompt's mask is 32 GB and past candle's 32-bit element indexing. (Where our kernel then
    /// declines a prompt, f32 or another head size, the hook builds upstream's mask after all.)
    pub fn replaces_mask(&self, device: &Device) -> bool {
        device.is_cuda() && self.ours_on_cuda()
    }

    /// Which prompt attention this policy's prompts get, for the startup log.
    pub fn describe(&self, device: &Device) -> String {
        let (ours, kernel) = if device.is_cuda() {
            (self.ours_on_cuda(), "tensor-core causal kernel")
        } else {
            (self.ours_on_cpu(), "tiled causal kernel, batches of one prompt")
        };
        let name = self.kind;
        match (ours, self.choice) {
            (true, _) => format!("kv-policy={name}: prompt attention: ours ({kernel}; --prompt-attention upstream for upstream's)"),
            (false, KernelChoice::Auto) => format!(
                "kv-policy={name}: prompt attention: upstream's, bit for bit (--prompt-attention ours for ours; without flash-attn a 32K prompt takes ~44 s on an H200 and 64K or more fail)"
            ),
            (false, _) => format!("kv-policy={name}: prompt attention: upstream's (--prompt-attention upstream)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `auto` keeps `full` on upstream's CUDA prompt attention and sends `quest`/`retro` to ours, and
    /// uses ours on CPU for all three; `ours` all to ours; `upstream` none.
    #[test]
    fn prompt_kernel_defaults_and_overrides() {
        let cases = [(KernelChoice::Auto, false, true, true), (KernelChoice::Ours, true, true, true), (KernelChoice::Upstream, false, false, false)];
        for (choice, full_cuda, sparse_cuda, cpu) in cases {
            let full = PromptAttention::new(PolicyKind::Full, choice);
            assert_eq!(full.ours_on_cuda(), full_cuda, "full with {choice:?}");
            assert_eq!(full.ours_on_cpu(), cpu, "full on CPU with {choice:?}");
            for kind in [PolicyKind::Quest, PolicyKind::Retro] {
                let p = PromptAttention::new(kind, choice);
                assert_eq!(p.ours_on_cuda(), sparse_cuda, "{kind:?} with {choice:?}");
                assert_eq!(p.ours_on_cpu(), cpu, "{kind:?} on CPU with {choice:?}");
                assert!(!p.replaces_mask(&Device::Cpu), "the CPU always gets a mask");
            }
        }
    }
}
