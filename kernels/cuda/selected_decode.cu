// The fused sparse decode kernel of quest and retro (quest is rows = 1).
//
// One CUDA block per (split of a page list, KV head, sequence). Each listed page is read from HBM
// once (16-byte coalesced loads of its contiguous K and V runs, the next page prefetched into
// registers while the current one is used) and serves every query head of the KV head's GQA group
// and every query row of the replay window whose mask bit is set, each row limited to its causal
// prefix (row r of a window of `rows` sees the first context_len - (rows - 1 - r) tokens). An
// online softmax per (row, head) gives a partial (O, lse) per split; combine_splits merges the
// splits exactly by log-sum-exp, and merge_step folds partial results into retro's output cache.
// Semantics are those of cpu::paged_decode_selected (the reference for the GPU tests).
#include "common.cuh"

template <typename T> __host__ __device__ constexpr int k_stride(int d) { return d + (sizeof(T) == 4 ? 1 : 2); }

// MAXQ: query vectors (GQA group size x window rows) one block can serve; the launcher picks the
// smallest instantiation that fits, since each thread keeps MAXQ accumulators in registers.
template <typename T, int D, int BS, int MAXQ>
__device__ void selected_decode(const T* __restrict__ query, const T* __restrict__ key_cache,
                                const T* __restrict__ value_cache,
                                const uint32_t* __restrict__ block_tables, int max_blocks_per_seq,
                                const uint32_t* __restrict__ context_lens,
                                const uint32_t* __restrict__ sel_pages,
                                const uint32_t* __restrict__ sel_counts,
                                const uint32_t* __restrict__ sel_masks, int sel_stride, int rows,
                                int heads, int kv_heads, float scale, float softcap,
                                int pages_per_split, float* __restrict__ part_o,
                                float* __restrict__ part_lse) {
  constexpr int THREADS = D;  // one output channel per thread
  constexpr int X = key_chunk<T>();
  constexpr int KS = k_stride<T>(D);
  constexpr int VECS = D * BS / X / THREADS;  // 16-byte vectors per thread per page, K and V each
  static_assert(VECS >= 1 && (D * BS / X) % THREADS == 0, "page must split evenly over threads");

  const int split = blockIdx.x, h = blockIdx.y, seq = blockIdx.z;
  const int batch = gridDim.z, tid = threadIdx.x;
  const int group = heads / kv_heads;
  const int nq = group * rows;
  const int list = seq * kv_heads + h;
  const int count = sel_counts[list];
  const int begin = split * pages_per_split;
  const int end = min(count, begin + pages_per_split);
  const int ctx = context_lens[seq];

  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* q_s = reinterpret_cast<float*>(smem_raw);  // [nq][D], pre-scaled
  float* p_s = q_s + MAXQ * D;               // [nq][BS] scores, then probabilities
  float* m_s = p_s + MAXQ * BS;              // [nq] running max
  float* l_s = m_s + MAXQ;                   // [nq] running sum
  float* a_s = l_s + MAXQ;                   // [nq] rescale of this page
  T* k_s = reinterpret_cast<T*>(a_s + MAXQ);  // [BS][KS]
  T* v_s = k_s + BS * KS;                            // [BS][D]

  // qi = r * group + g: row r, head h * group + g.
  for (int i = tid; i < nq * D; i += THREADS) {
    const int qi = i / D, d = i % D;
    const int r = qi / group, g = qi % group;
    q_s[i] = scale * to_f32(query[(((int64_t)seq * rows + r) * heads + h * group + g) * D + d]);
  }
  if (tid < MAXQ) {
    m_s[tid] = -INFINITY;
    l_s[tid] = 0.f;
  }
  float acc[MAXQ];
#pragma unroll
  for (int qi = 0; qi < MAXQ; ++qi) acc[qi] = 0.f;

  const uint32_t* pages = sel_pages + (int64_t)list * sel_stride;
  const uint32_t* masks = sel_masks ? sel_masks + (int64_t)list * sel_stride : nullptr;
  const uint32_t all_rows = rows >= 32 ? 0xffffffffu : ((1u << rows) - 1u);
  const int64_t page_elems = (int64_t)D * BS;

  uint4 k_reg[VECS], v_reg[VECS];
  auto load_page = [&](int i) {
    const uint32_t block = block_tables[(int64_t)seq * max_blocks_per_seq + pages[i]];
    const uint4* k = reinterpret_cast<const uint4*>(key_cache + ((int64_t)block * kv_heads + h) * page_elems);
    const uint4* v = reinterpret_cast<const uint4*>(value_cache + ((int64_t)block * kv_heads + h) * page_elems);
#pragma unroll
    for (int j = 0; j < VECS; ++j) {
      k_reg[j] = __ldg(k + j * THREADS + tid);
      v_reg[j] = __ldg(v + j * THREADS + tid);
    }
  };
  if (begin < end) load_page(begin);

  for (int i = begin; i < end; ++i) {
    const int page = pages[i];
    const uint32_t mask = masks ? masks[i] : all_rows;
    // Registers -> shared: K from [D/X][BS][X] to [BS][KS], V from [D][BS] to [BS][D].
#pragma unroll
    for (int j = 0; j < VECS; ++j) {
      const int vi = j * THREADS + tid;
      const T* kv = reinterpret_cast<const T*>(&k_reg[j]);
      const int chunk = vi / BS, t = vi % BS;
#pragma unroll
      for (int e = 0; e < X; ++e) k_s[t * KS + chunk * X + e] = kv[e];
      const T* vv = reinterpret_cast<const T*>(&v_reg[j]);
      const int d = vi * X / BS, t0 = vi * X % BS;
      // Slots past the context were never written (upstream allocates the cache uninitialized, so
      // they can hold NaN bit patterns): their probability is 0, but 0 * NaN is NaN, so the values
      // themselves are zeroed. Keys need nothing: scores past a row's prefix are never computed.
      const int written = ctx - page * BS - t0;
#pragma unroll
      for (int e = 0; e < X; ++e) v_s[(t0 + e) * D + d] = e < written ? vv[e] : from_f32<T>(0.f);
    }
    __syncthreads();
    if (i + 1 < end) load_page(i + 1);  // in flight while this page is used

    // Scores of every (query, token) pair this page serves.
    for (int pi = tid; pi < nq * BS; pi += THREADS) {
      const int qi = pi / BS, t = pi % BS;
      const int r = qi / group;
      const int visible = ctx - (rows - 1 - r);
      const int token = page * BS + t;
      float s = -INFINITY;
      if (((mask >> r) & 1u) && token < visible) {
        const float* q = q_s + qi * D;
        const T* k = k_s + t * KS;
        float dot = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) dot += q[d] * to_f32(k[d]);
        s = softcap > 0.f ? softcap * tanhf(dot / softcap) : dot;
      }
      p_s[pi] = s;
    }
    __syncthreads();
    // Online softmax bookkeeping, one thread per query.
    if (tid < nq) {
      float* p = p_s + tid * BS;
      float mx = -INFINITY;
      for (int t = 0; t < BS; ++t) mx = fmaxf(mx, p[t]);
      const float m_old = m_s[tid];
      const float m_new = fmaxf(m_old, mx);
      float alpha = 1.f, sum = 0.f;
      if (m_new == -INFINITY) {
        for (int t = 0; t < BS; ++t) p[t] = 0.f;
      } else {
        alpha = __expf(m_old - m_new);
        for (int t = 0; t < BS; ++t) {
          const float e = __expf(p[t] - m_new);
          p[t] = e;
          sum += e;
        }
      }
      m_s[tid] = m_new;
      l_s[tid] = l_s[tid] * alpha + sum;
      a_s[tid] = alpha;
    }
    __syncthreads();
#pragma unroll
    for (int qi = 0; qi < MAXQ; ++qi) {
      if (qi < nq) {
        const float* p = p_s + qi * BS;
        float a = acc[qi] * a_s[qi];
#pragma unroll
        for (int t = 0; t < BS; ++t) a += p[t] * to_f32(v_s[t * D + tid]);
        acc[qi] = a;
      }
    }
    __syncthreads();
  }

  // Partial results of this split: normalized O and lse (-inf, O = 0 when nothing was attended).
#pragma unroll
  for (int qi = 0; qi < MAXQ; ++qi) {
    if (qi < nq) {
      const int r = qi / group, g = qi % group;
      const int64_t at = ((int64_t)split * batch * rows + (int64_t)seq * rows + r) * heads + h * group + g;
      const float l = l_s[qi];
      part_o[at * D + tid] = l > 0.f ? acc[qi] / l : 0.f;
      if (tid == 0) part_lse[at] = l > 0.f ? m_s[qi] + __logf(l) : -INFINITY;
    }
  }
}

#define RETRO_DECODE(T, NAME, D, BS, Q)                                                          \
  extern "C" __global__ void __launch_bounds__(D) selected_decode_##NAME##_d##D##_bs##BS##_q##Q( \
      const T* query, const T* key_cache, const T* value_cache, const uint32_t* block_tables,    \
      int max_blocks_per_seq, const uint32_t* context_lens, const uint32_t* sel_pages,           \
      const uint32_t* sel_counts, const uint32_t* sel_masks, int sel_stride, int rows,           \
      int heads, int kv_heads, float scale, float softcap, int pages_per_split, float* part_o,   \
      float* part_lse) {                                                                         \
    selected_decode<T, D, BS, Q>(query, key_cache, value_cache, block_tables,                    \
                                 max_blocks_per_seq, context_lens, sel_pages, sel_counts,        \
                                 sel_masks, sel_stride, rows, heads, kv_heads, scale, softcap,   \
                                 pages_per_split, part_o, part_lse);                             \
  }
#define RETRO_DECODE_Q(T, NAME, D, BS) \
  RETRO_DECODE(T, NAME, D, BS, 8)      \
  RETRO_DECODE(T, NAME, D, BS, 32)     \
  RETRO_DECODE(T, NAME, D, BS, 64)
#define RETRO_DECODE_SHAPES(T, NAME) \
  RETRO_DECODE_Q(T, NAME, 64, 16)    \
  RETRO_DECODE_Q(T, NAME, 64, 32)    \
  RETRO_DECODE_Q(T, NAME, 128, 16)   \
  RETRO_DECODE_Q(T, NAME, 128, 32)
RETRO_FOR_EACH_DTYPE(RETRO_DECODE_SHAPES)

// grid: (batch * rows, heads); block: head_dim. out [batch * rows, heads, head_dim] in T,
// lse [batch * rows * heads] f32.
template <typename T>
__device__ void combine_splits(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                               int splits, int qrows, int heads, int head_dim, T* __restrict__ out,
                               float* __restrict__ lse) {
  const int row = blockIdx.x, head = blockIdx.y, d = threadIdx.x;
  const int64_t at = (int64_t)row * heads + head;
  const int64_t split_stride = (int64_t)qrows * heads;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_lse[s * split_stride + at]);
  float acc = 0.f, w = 0.f;
  if (m > -INFINITY) {
    for (int s = 0; s < splits; ++s) {
      const float ls = part_lse[s * split_stride + at];
      if (ls == -INFINITY) continue;
      const float e = __expf(ls - m);
      w += e;
      acc += e * part_o[(s * split_stride + at) * head_dim + d];
    }
  }
  out[at * head_dim + d] = from_f32<T>(w > 0.f ? acc / w : 0.f);
  if (d == 0) lse[at] = w > 0.f ? m + __logf(w) : -INFINITY;
}

#define RETRO_COMBINE(T, NAME)                                                                   \
  extern "C" __global__ void combine_splits_##NAME(const float* part_o, const float* part_lse,   \
                                                   int splits, int qrows, int heads,              \
                                                   int head_dim, T* out, float* lse) {            \
    combine_splits<T>(part_o, part_lse, splits, qrows, heads, head_dim, out, lse);               \
  }
RETRO_FOR_EACH_DTYPE(RETRO_COMBINE)

// Retro's output-cache step for one layer: grid (entries, heads); block: head_dim. entries i32
// [k, 3]: a cached row (plus row_offset, the layer's place in the pool), the partial-result row
// merged into it (-1 none) and the partial row that then takes its place (-1 none: a row entering
// the window takes the slot of the row leaving it). A merge is exact by log-sum-exp
// (cpu::merge_partial) over disjoint tokens, and its result is also written back over the partial
// row: that row of the layer's output is the corrected one. A partial row is named by one entry at
// most as a merge and is never both merged and a replacement, so blocks never race.
template <typename T>
__device__ void merge_step(float* __restrict__ cache_o, float* __restrict__ cache_lse,
                           T* __restrict__ part_o, const float* __restrict__ part_lse,
                           const int32_t* __restrict__ entries, int row_offset, int heads,
                           int head_dim) {
  const int head = blockIdx.y, d = threadIdx.x;
  const int32_t* e = entries + 3 * (int64_t)blockIdx.x;
  const int64_t a = ((int64_t)e[0] + row_offset) * heads + head;
  const int merge = e[1], replace = e[2];
  if (merge >= 0) {
    const int64_t b = (int64_t)merge * heads + head;
    const float la = cache_lse[a], lb = part_lse[b];
    const float m = fmaxf(la, lb);
    const float wa = la == -INFINITY ? 0.f : __expf(la - m);
    const float wb = lb == -INFINITY ? 0.f : __expf(lb - m);
    const float oa = cache_o[a * head_dim + d], ob = to_f32(part_o[b * head_dim + d]);
    // Nothing attended on either side: the row stays as it is (output 0, lse -inf).
    const float o = m == -INFINITY ? oa : (wa * oa + wb * ob) / (wa + wb);
    cache_o[a * head_dim + d] = o;
    part_o[b * head_dim + d] = from_f32<T>(o);
    __syncthreads();  // every thread has read cache_lse[a] before it changes
    if (d == 0 && m != -INFINITY) cache_lse[a] = m + __logf(wa + wb);
  }
  if (replace >= 0) {
    __syncthreads();
    const int64_t b = (int64_t)replace * heads + head;
    cache_o[a * head_dim + d] = to_f32(part_o[b * head_dim + d]);
    if (d == 0) cache_lse[a] = part_lse[b];
  }
}

#define RETRO_MERGE(T, NAME)                                                                     \
  extern "C" __global__ void merge_step_##NAME(float* cache_o, float* cache_lse, T* part_o,       \
                                               const float* part_lse, const int32_t* entries,     \
                                               int row_offset, int heads, int head_dim) {         \
    merge_step<T>(cache_o, cache_lse, part_o, part_lse, entries, row_offset, heads, head_dim);   \
  }
RETRO_FOR_EACH_DTYPE(RETRO_MERGE)
