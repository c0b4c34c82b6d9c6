//! retro-kernels: every kernel of the KV policies (`full`, `quest`, `retro`) and of the CPU linear
//! layers, CPU and CUDA side by side, on candle only (no mistral.rs).
//!
//! A sparse decode step is FlashInfer's plan / run split:
//! - device-neutral types: [`PageSelection`] (per (sequence, KV head) page lists with per-row
//!   masks), the budget rule [`selected_len`] (written once, used by both backends), the host-side
//!   [`DecodePlan`] (once per step: page counts, list stride, work partition) and the exact
//!   log-sum-exp merge of partial attention results ([`merge_partial`]);
//! - [`cpu`]: page bounds, page selection, the fused sparse decode, the causal prompt attention,
//!   cache writes and gathers; these define the semantics;
//! - [`cuda`] (feature `cuda`): the same kernels on the GPU, each tested against its CPU
//!   counterpart by `retro-gpu-check` on random data, plus retro's device-side row masks and
//!   output-cache merge.
//!
//! The CPU linear layers ([`quant_linear`] for GGUF blocks, [`dense_linear`] for f16/bf16) sit
//! beside them, dispatched at run time on the CPU's features ([`cpu_features`]).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub mod cpu_features;
pub mod dense_linear;
mod plan;
mod prompt;
pub mod quant_linear;
pub mod rng;
mod selection;

pub use plan::{device_budgets, selected_len, DecodePlan};
pub use prompt::PromptShape;
pub use selection::{all_rows_mask, longest_lists, merge_partial, PaddedLists, PageSelection, PageUse};
