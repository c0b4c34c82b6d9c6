//! GPU kernels of the sparse KV policies (`quest`, `retro`), in FlashInfer's plan / run split:
//!
//! - [`DecodePlan`] (host, once per decode step, shared by every layer): page counts, the padded
//!   page-list stride, and how each (sequence, KV head) list is split over CUDA blocks;
//! - under the `cuda` feature, the launchers in [`cuda`]: page-summary refresh after cache writes,
//!   page scoring + per-KV-head top-k (the selection), retro's per-row masks, the fused sparse decode
//!   (each selected page read once for every query row that uses it) with its split combine, and the
//!   output-cache merge.
//!
//! The CPU kernels in `mistralrs-retro/src/cpu` define the semantics; `retro-gpu-check` tests every
//! kernel here against them on random data.

#[cfg(feature = "cuda")]
pub mod cuda;

pub mod cpu_features;
pub mod dense_linear;
pub mod quant_linear;
mod plan;
mod prompt;
pub use plan::{selected_len, DecodePlan};
pub use prompt::PromptShape;
