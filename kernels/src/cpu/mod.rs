//! The CPU kernels of the KV policies, over the upstream mistral.rs / vLLM paged cache layout:
//!
//! - key_cache `[num_blocks, kv_heads, head_dim / x, block_size, x]`, `x = 16 / sizeof(dtype)`;
//! - value_cache `[num_blocks, kv_heads, head_dim, block_size]`;
//!
//! with f32, f16 or bf16 elements (arithmetic in f32) and any block size. Token slot `s` lives in
//! block `s / block_size` at offset `s % block_size`.
//!
//! In the order a step uses them: the cache write ([`write_kv`]) and the page bounds it refreshes
//! ([`PageSummaries`]); the plan ([`select_pages`]: per KV head, the pages to read); the run
//! ([`paged_decode_selected`], or [`paged_decode`] over every page); beside them the prompt
//! attention ([`causal_prompt_attention`]) and the prefix-cache gather ([`gather_kv`]). The
//! references define the semantics the CPU and CUDA kernels are tested against.

mod access;
mod cache_write;
mod decode;
mod gather;
mod prefill;
mod reference;
mod select;
#[cfg(test)]
mod selected_tests;
mod summaries;
#[doc(hidden)]
pub mod test_support;

pub use cache_write::write_kv;
pub use decode::{paged_decode, paged_decode_selected, AttentionWithLse};
pub use gather::gather_kv;
pub use prefill::causal_prompt_attention;
pub use reference::{paged_decode_reference, paged_decode_selected_reference};
pub use select::{page_bound, pages_read, select_pages, PlanInputs};
pub use summaries::PageSummaries;
