// Page summaries (Quest's key bounds): per (block, kv head, channel) the min and max key over the
// block's slots, refreshed for every block a cache write touched (prefill, decode, retro's
// overwrites of past rows). Same definition as PageSummaries::refresh on CPU: all block_size slots
// count, written or not (the partial last page is always selected, never scored).
//
// The bounds are kept in the cache's dtype: a min or max of T values is a T value, so nothing is
// rounded, and scoring reads half the bytes of f32 bounds for 16-bit caches (at 32K context the
// bounds are as many bytes as the selected pages themselves).
#include "common.cuh"

// grid: (num_slots, kv_heads); block: any multiple of 32 (channels are strided over threads).
// bounds: T [num_blocks, kv_heads, 2, head_dim], min then max.
template <typename T>
__device__ void refresh_page_bounds(const T* __restrict__ key_cache,
                                    const int64_t* __restrict__ slot_mapping,
                                    T* __restrict__ bounds, int kv_heads, int head_dim,
                                    int block_size, int num_blocks) {
  const int i = blockIdx.x, h = blockIdx.y;
  const int64_t slot = slot_mapping[i];
  if (slot < 0) return;
  const int64_t block = slot / block_size;
  if (block >= num_blocks) return;
  // A prefill writes a block's slots in a run: only the run's first slot does the work. Blocks
  // written from two places (never in practice) are just computed twice, with equal results.
  if (i > 0) {
    const int64_t prev = slot_mapping[i - 1];
    if (prev >= 0 && prev / block_size == block) return;
  }
  constexpr int x = key_chunk<T>();
  const T* page = key_cache + (block * kv_heads + h) * (int64_t)head_dim * block_size;
  T* out = bounds + (block * kv_heads + h) * 2 * (int64_t)head_dim;
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
    const T* chan = page + (c / x) * block_size * x + (c % x);
    float lo = INFINITY, hi = -INFINITY;
    for (int t = 0; t < block_size; ++t) {
      const float v = to_f32(chan[t * x]);
      lo = fminf(lo, v);
      hi = fmaxf(hi, v);
    }
    out[c] = from_f32<T>(lo);
    out[head_dim + c] = from_f32<T>(hi);
  }
}

#define RETRO_REFRESH(T, NAME)                                                                  \
  extern "C" __global__ void refresh_page_bounds_##NAME(                                        \
      const T* key_cache, const int64_t* slot_mapping, T* bounds, int kv_heads,                \
      int head_dim, int block_size, int num_blocks) {                                           \
    refresh_page_bounds<T>(key_cache, slot_mapping, bounds, kv_heads, head_dim, block_size,    \
                           num_blocks);                                                         \
  }
RETRO_FOR_EACH_DTYPE(RETRO_REFRESH)
