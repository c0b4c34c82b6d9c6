//! CPU paged-attention kernels over the upstream mistral.rs / vLLM paged cache layout:
//!
//! - key_cache `[num_blocks, kv_heads, head_dim / x, block_size, x]`, `x = 16 / sizeof(dtype)`;
//! - value_cache `[num_blocks, kv_heads, head_dim, block_size]`;
//!
//! with f32, f16 or bf16 elements (arithmetic in f32) and any block size. Token slot `s` lives in
//! block `s / block_size` at offset `s % block_size`.

mod access;
mod cache_write;
mod decode;
mod gather;
mod prefill;
mod reference;
#[cfg(test)]
mod selected_tests;
mod selection;
#[cfg(test)]
pub(crate) mod test_support;

pub use cache_write::write_kv;
pub use decode::{paged_decode, paged_decode_selected, AttentionWithLse};
pub use gather::gather_kv;
pub use prefill::causal_prompt_attention;
pub use reference::{paged_decode_reference, paged_decode_selected_reference};
pub use selection::{all_rows_mask, merge_partial, PageSelection, PageUse};
