// The plan step of a sparse decode step on the GPU, for a batch of sequences:
//  1. score_pages: Quest's upper bound of q·k over every page, Σ_g Σ_d max(q_d·min_d, q_d·max_d)
//     summed over the query heads g of the KV head's GQA group, from the newest query row; the
//     first page (attention sink) and the last (partial, newest) page score +inf so they are
//     always kept (same rule as policy::plan::select_pages on CPU).
//  2. select_top_pages: per (sequence, KV head) the top-k pages by score, k = the budget in pages,
//     written in ascending page order (what the decode kernel and the CPU PageSelection expect).
//     A radix select finds the k-th largest score in 4 passes over the scores, then an ordered
//     block-wide compaction writes the winners; ties at the threshold go to the lowest pages.
//  3. retro_row_masks: which query rows of the replay window use each selected page: the newest
//     row always; an older row only when it is a cached row that has not seen the page yet (its
//     "supplement"), after which the page is marked seen; then the newest row's bitset starts over
//     with this selection. The bitsets live on the device across steps, so retro's plan needs no
//     read-back.
#include "common.cuh"

// grid: (ceil(max_pages / (WARPS * PAGES_PER_WARP)), kv_heads, batch); block: 32 * WARPS.
// The block's GQA queries (newest row) are staged once in shared memory as f32; each warp then scores
// PAGES_PER_WARP pages, lane l reading channels 4l.. of the bounds (in the cache's dtype) at once.
constexpr int SCORE_PAGES_PER_WARP = 8;
constexpr int SCORE_MAX_QUERY_FLOATS = 8 * 256;  // GQA group <= 8, head_dim <= 256

// Four consecutive channels of a page bound, as f32 (one 16-byte load for f32, 8 bytes for 16-bit).
__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
template <typename T2, typename T>
__device__ __forceinline__ float4 load4_16(const T* p) {
  const uint2 raw = *reinterpret_cast<const uint2*>(p);
  const T2* v = reinterpret_cast<const T2*>(&raw);
  return make_float4(to_f32(v[0].x), to_f32(v[0].y), to_f32(v[1].x), to_f32(v[1].y));
}
__device__ __forceinline__ float4 load4(const __half* p) { return load4_16<__half2>(p); }
__device__ __forceinline__ float4 load4(const __nv_bfloat16* p) { return load4_16<__nv_bfloat162>(p); }

template <typename T, int WARPS>
__device__ void score_pages(const T* __restrict__ queries, const T* __restrict__ bounds,
                            const uint32_t* __restrict__ block_tables, int max_blocks_per_seq,
                            const uint32_t* __restrict__ context_lens, int rows, int heads,
                            int kv_heads, int head_dim, int block_size,
                            float* __restrict__ scores, int max_pages) {
  __shared__ __align__(16) float q_s[SCORE_MAX_QUERY_FLOATS];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int h = blockIdx.y, seq = blockIdx.z;
  const int pages = (context_lens[seq] + block_size - 1) / block_size;
  const int first = blockIdx.x * WARPS * SCORE_PAGES_PER_WARP;
  if (first >= pages) return;
  const int group = heads / kv_heads;
  const T* q = queries + (((int64_t)seq * rows + rows - 1) * heads + (int64_t)h * group) * head_dim;
  for (int i = threadIdx.x; i < group * head_dim; i += blockDim.x) q_s[i] = to_f32(q[i]);
  __syncthreads();
  float* out = scores + ((int64_t)seq * kv_heads + h) * max_pages;
  const uint32_t* table = block_tables + (int64_t)seq * max_blocks_per_seq;
  for (int k = 0; k < SCORE_PAGES_PER_WARP; ++k) {
    const int page = first + warp * SCORE_PAGES_PER_WARP + k;
    if (page >= pages) break;
    if (page == 0 || page == pages - 1) {
      if (lane == 0) out[page] = INFINITY;
      continue;
    }
    const T* lo = bounds + ((int64_t)table[page] * kv_heads + h) * 2 * head_dim;
    const T* hi = lo + head_dim;
    float acc = 0.f;
    for (int d = 4 * lane; d < head_dim; d += 128) {
      const float4 l4 = load4(lo + d);
      const float4 h4 = load4(hi + d);
      for (int g = 0; g < group; ++g) {
        const float4 q4 = *reinterpret_cast<const float4*>(q_s + g * head_dim + d);
        acc += fmaxf(q4.x * l4.x, q4.x * h4.x) + fmaxf(q4.y * l4.y, q4.y * h4.y) +
               fmaxf(q4.z * l4.z, q4.z * h4.z) + fmaxf(q4.w * l4.w, q4.w * h4.w);
      }
    }
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) out[page] = acc;
  }
}

#define RETRO_SCORE(T, NAME)                                                                     \
  extern "C" __global__ void score_pages_##NAME(                                                 \
      const T* queries, const T* bounds, const uint32_t* block_tables,                          \
      int max_blocks_per_seq, const uint32_t* context_lens, int rows, int heads, int kv_heads,   \
      int head_dim, int block_size, float* scores, int max_pages) {                              \
    score_pages<T, 4>(queries, bounds, block_tables, max_blocks_per_seq, context_lens, rows,    \
                      heads, kv_heads, head_dim, block_size, scores, max_pages);                 \
  }
RETRO_FOR_EACH_DTYPE(RETRO_SCORE)

// Monotone map of a float to an unsigned key: a > b  <=>  key(a) > key(b) (NaN aside).
__device__ __forceinline__ uint32_t order_key(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix sum of one int per thread over the block; returns the block total too.
template <int THREADS>
__device__ __forceinline__ int block_exclusive_sum(int v, int* total, int* warp_sums) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int incl = v;
#pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int n = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += n;
  }
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    int w = lane < THREADS / 32 ? warp_sums[lane] : 0;
#pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int n = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += n;
    }
    if (lane < THREADS / 32) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const int before = warp == 0 ? 0 : warp_sums[warp - 1];
  *total = warp_sums[THREADS / 32 - 1];
  __syncthreads();  // warp_sums is reused by the next call
  return before + incl - v;
}

// grid: (kv_heads, batch); block: THREADS. Writes sel_pages[list * stride + i], i < sel_counts[list].
template <int THREADS>
__device__ void select_top_pages(const float* __restrict__ scores, int max_pages,
                                 const uint32_t* __restrict__ context_lens,
                                 const uint32_t* __restrict__ budget_pages, int block_size,
                                 int kv_heads, uint32_t* __restrict__ sel_pages,
                                 uint32_t* __restrict__ sel_counts, int stride) {
  const int h = blockIdx.x, seq = blockIdx.y;
  const int list = seq * kv_heads + h;
  const int pages = (context_lens[seq] + block_size - 1) / block_size;
  const int keep = budget_pages[seq];
  uint32_t* out = sel_pages + (int64_t)list * stride;
  if (keep >= pages) {
    for (int p = threadIdx.x; p < pages; p += THREADS) out[p] = p;
    if (threadIdx.x == 0) sel_counts[list] = pages;
    return;
  }
  const float* s = scores + (int64_t)list * max_pages;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_prefix, s_mask;
  __shared__ int s_want, s_base, s_tie_base;
  __shared__ int warp_sums[32];
  if (threadIdx.x == 0) {
    s_prefix = 0;
    s_mask = 0;
    s_want = min(max(keep, 2), pages);  // first and last are always in, as on CPU
  }
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += THREADS) hist[i] = 0;
    __syncthreads();
    const uint32_t prefix = s_prefix, mask = s_mask;
    for (int p = threadIdx.x; p < pages; p += THREADS) {
      const uint32_t u = order_key(s[p]);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
    }
    __syncthreads();
    // The digit holding the want-th largest key: warp 0, lane l owns digits 255 - 8l down to
    // 248 - 8l; a prefix sum over lanes finds the one chunk where the count from the top crosses.
    if (threadIdx.x < 32) {
      const int lane = threadIdx.x;
      const int want = s_want;
      int chunk = 0;
#pragma unroll
      for (int j = 0; j < 8; ++j) chunk += hist[255 - 8 * lane - j];
      int incl = chunk;
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const int n = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += n;
      }
      int above = incl - chunk;
      if (above < want && incl >= want) {
        for (int j = 0; j < 8; ++j) {
          const int d = 255 - 8 * lane - j;
          if (above + (int)hist[d] >= want) {
            s_prefix = prefix | ((uint32_t)d << shift);
            s_mask = mask | (255u << shift);
            s_want = want - above;
            break;
          }
          above += hist[d];
        }
      }
    }
    __syncthreads();
  }
  const uint32_t threshold = s_prefix;
  const int ties_wanted = s_want;
  if (threadIdx.x == 0) {
    s_base = 0;
    s_tie_base = 0;
  }
  __syncthreads();
  for (int start = 0; start < pages; start += THREADS) {
    const int p = start + threadIdx.x;
    const uint32_t u = p < pages ? order_key(s[p]) : 0u;
    const int above = p < pages && u > threshold;
    const int tie = p < pages && u == threshold;
    int ties_total;
    const int tie_rank = block_exclusive_sum<THREADS>(tie, &ties_total, warp_sums);
    const int take = above || (tie && s_tie_base + tie_rank < ties_wanted);
    int taken;
    const int at = block_exclusive_sum<THREADS>(take, &taken, warp_sums);
    if (take) out[s_base + at] = p;
    __syncthreads();
    if (threadIdx.x == 0) {
      s_base += taken;
      s_tie_base += ties_total;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) sel_counts[list] = s_base;
}

extern "C" __global__ void select_top_pages_u32(const float* scores, int max_pages,
                                                const uint32_t* context_lens,
                                                const uint32_t* budget_pages, int block_size,
                                                int kv_heads, uint32_t* sel_pages,
                                                uint32_t* sel_counts, int stride) {
  select_top_pages<512>(scores, max_pages, context_lens, budget_pages, block_size, kv_heads,
                        sel_pages, sel_counts, stride);
}

// grid: (kv_heads, batch); block: 256. The window's rows keep their seen-page bitsets in a pool
// that outlives the step (u32 seen [pool_rows, kv_heads, words], one row per (output-cache block,
// layer, slot)); meta i32 [batch, 2 * rows + 1] per sequence: rows - 1 states of the past rows
// (1 = a cached row that gets supplements, 0 = skip), the pool row of each row (past rows, then the
// newest; -1 = none), the sequence's counter slot (-1 = none), and whether the row leaving the window
// counts toward exposure; pool rows are relative to row_offset (the layer's place in the pool), so
// one table serves every layer of a step. counters u64 [slots, 2]: supplement pages, pages seen by
// closed rows.
// After the masks, the newest row takes its pool row (the slot of the row leaving the window):
// cleared, then marked with this selection.
extern "C" __global__ void retro_row_masks(const uint32_t* __restrict__ sel_pages,
                                           const uint32_t* __restrict__ sel_counts, int stride,
                                           uint32_t* __restrict__ masks,
                                           uint32_t* __restrict__ seen, int words,
                                           const int32_t* __restrict__ meta,
                                           const uint32_t* __restrict__ context_lens,
                                           int block_size, int rows, int kv_heads,
                                           unsigned long long* __restrict__ counters,
                                           int row_offset) {
  const int h = blockIdx.x, seq = blockIdx.y;
  const int list = seq * kv_heads + h;
  const int count = sel_counts[list];
  const int32_t* m = meta + (int64_t)seq * (2 * rows + 1);
  const int32_t* pool_row = m + (rows - 1);
  const int counter = m[2 * rows - 1], count_leaving = m[2 * rows];
  const int first_pos = (int)context_lens[seq] - rows;
  __shared__ unsigned long long block_sum;
  if (threadIdx.x == 0) block_sum = 0;
  __syncthreads();
  unsigned long long supplements = 0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const uint32_t page = sel_pages[(int64_t)list * stride + i];
    uint32_t mask = 1u << (rows - 1);
    for (int r = 0; r < rows - 1; ++r) {
      // A page that starts after the row holds nothing it may attend to.
      if (m[r] != 1 || pool_row[r] < 0 || (int64_t)page * block_size > first_pos + r) continue;
      uint32_t* bits = seen + ((int64_t)(pool_row[r] + row_offset) * kv_heads + h) * words;
      const uint32_t bit = 1u << (page % 32);
      // Pages within a list are distinct, so no other thread touches this bit.
      if (!(bits[page / 32] & bit)) {
        mask |= 1u << r;
        atomicOr(&bits[page / 32], bit);
        ++supplements;
      }
    }
    masks[(int64_t)list * stride + i] = mask;
  }
  const int newest = pool_row[rows - 1];
  if (counter >= 0 && supplements) atomicAdd(&block_sum, supplements);
  __syncthreads();
  if (newest < 0) {
    if (threadIdx.x == 0 && counter >= 0 && block_sum) atomicAdd(&counters[2 * counter], block_sum);
    return;
  }
  uint32_t* bits = seen + ((int64_t)(newest + row_offset) * kv_heads + h) * words;
  unsigned long long leaving = 0;
  if (count_leaving)
    for (int w = threadIdx.x; w < words; w += blockDim.x) leaving += __popc(bits[w]);
  __shared__ unsigned long long leaving_sum;
  if (threadIdx.x == 0) leaving_sum = 0;
  __syncthreads();
  if (leaving) atomicAdd(&leaving_sum, leaving);
  __syncthreads();  // every read of the leaving row's bits is done
  if (threadIdx.x == 0 && counter >= 0) {
    if (block_sum) atomicAdd(&counters[2 * counter], block_sum);
    if (leaving_sum) atomicAdd(&counters[2 * counter + 1], leaving_sum);
  }
  for (int w = threadIdx.x; w < words; w += blockDim.x) bits[w] = 0;
  __syncthreads();
  for (int i = threadIdx.x; i < count; i += blockDim.x) {
    const uint32_t page = sel_pages[(int64_t)list * stride + i];
    atomicOr(&bits[page / 32], 1u << (page % 32));
  }
}
