// The fused sparse decode kernel of quest and retro (quest is rows = 1).
//
// One CUDA block per (split of a page list, KV head, sequence). Each listed page is read from HBM
// once, by cp.async straight into shared memory, STAGES - 1 pages ahead of the one in use, and
// serves every query head of the KV head's GQA group and every query row of the replay window
// whose mask bit is set, each row limited to its causal prefix (row r of a window of `rows` sees
// the first context_len - (rows - 1 - r) tokens). A warp scores BS tokens for 32 / BS queries
// (a lane per token, so the online softmax's max and sum are warp shuffles and its state stays in
// registers); then each thread accumulates one output channel for every query. A partial (O, lse)
// per split; combine_splits merges the splits exactly by log-sum-exp, and merge_step folds partial
// results into retro's output cache. Semantics are those of cpu::paged_decode_selected (the
// reference for the GPU tests).
#include "common.cuh"

// Pages in shared memory at once: the one in use and STAGES - 1 in flight (an f32 page is twice
// the bytes, so one fewer keeps its blocks per SM).
template <typename T> __host__ __device__ constexpr int decode_stages() { return sizeof(T) == 4 ? 2 : 3; }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Where 16-byte chunk j (C chunks per channel) of channel d of a V page sits in shared memory. The
// PV product has thread d read chunk j of its own channel, so without the XOR the 8 lanes of a
// 128-bit load phase would hit the same banks (a channel is C * 16 bytes, at most 128).
template <int C> __device__ __forceinline__ int v_chunk(int d, int j) { return d * C + (j ^ ((d / (8 / C)) % C)); }

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
  constexpr int WARPS = THREADS / 32;
  constexpr int X = key_chunk<T>();
  constexpr int C = BS / X;             // 16-byte chunks per channel of a V page
  constexpr int CHUNKS = D * BS / X;    // 16-byte chunks per page, of K and of V each
  constexpr int VECS = CHUNKS / THREADS;
  constexpr int STAGES = decode_stages<T>();
  constexpr int QPW = 32 / BS;          // queries a warp scores at once
  constexpr int PASSES = (MAXQ + WARPS * QPW - 1) / (WARPS * QPW);
  static_assert(VECS >= 1 && CHUNKS % THREADS == 0, "page must split evenly over threads");
  static_assert(32 % BS == 0 && C <= 8, "a warp scores whole pages");

  const int split = blockIdx.x, h = blockIdx.y, seq = blockIdx.z;
  const int batch = gridDim.z, tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32, t = lane % BS;
  const int group = heads / kv_heads;
  const int nq = group * rows;
  const int list = seq * kv_heads + h;
  const int count = sel_counts[list];
  const int begin = split * pages_per_split;
  const int end = min(count, begin + pages_per_split);
  const int ctx = context_lens[seq];

  extern __shared__ __align__(16) unsigned char smem_raw[];
  uint4* stage_s = reinterpret_cast<uint4*>(smem_raw);  // [STAGES][K, V][CHUNKS]
  float* q_s = reinterpret_cast<float*>(stage_s + STAGES * 2 * CHUNKS);  // [MAXQ][D], pre-scaled
  float* p_s = q_s + MAXQ * D;   // [MAXQ][BS] probabilities of the page in use
  float* a_s = p_s + MAXQ * BS;  // [MAXQ] rescale of the accumulators for this page
  float* m_s = a_s + MAXQ;       // [MAXQ] final max
  float* l_s = m_s + MAXQ;       // [MAXQ] final sum

  // qi = r * group + g: row r, head h * group + g.
  for (int i = tid; i < nq * D; i += THREADS) {
    const int qi = i / D, d = i % D;
    const int r = qi / group, g = qi % group;
    q_s[i] = scale * to_f32(query[(((int64_t)seq * rows + r) * heads + h * group + g) * D + d]);
  }

  const uint32_t* pages = sel_pages + (int64_t)list * sel_stride;
  const uint32_t* masks = sel_masks ? sel_masks + (int64_t)list * sel_stride : nullptr;
  const uint32_t all_rows = rows >= 32 ? 0xffffffffu : ((1u << rows) - 1u);
  const int64_t page_elems = (int64_t)D * BS;

  // K keeps the cache's [D/X][BS][X] layout (lane t reads token t's chunks: consecutive 16-byte
  // words); V's [D][BS] is swizzled by v_chunk. Past the list an empty group keeps the count.
  auto issue = [&](int i) {
    if (i < end) {
      const uint32_t block = block_tables[(int64_t)seq * max_blocks_per_seq + pages[i]];
      const uint4* k = reinterpret_cast<const uint4*>(key_cache + ((int64_t)block * kv_heads + h) * page_elems);
      const uint4* v = reinterpret_cast<const uint4*>(value_cache + ((int64_t)block * kv_heads + h) * page_elems);
      uint4* ks = stage_s + ((i - begin) % STAGES) * 2 * CHUNKS;
      uint4* vs = ks + CHUNKS;
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
        const int vi = j * THREADS + tid;
        cp_async16(ks + vi, k + vi);
        cp_async16(vs + v_chunk<C>(vi / C, vi % C), v + vi);
      }
    }
    cp_async_commit();
  };
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(begin + s);

  float acc[MAXQ];
#pragma unroll
  for (int qi = 0; qi < MAXQ; ++qi) acc[qi] = 0.f;
  // Online softmax state of the queries this lane scores, pass by pass.
  float m_r[PASSES], l_r[PASSES];
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    m_r[ps] = -INFINITY;
    l_r[ps] = 0.f;
  }

  for (int i = begin; i < end; ++i) {
    cp_async_wait<STAGES - 2>();  // this thread's copies of page i have landed
    const int page = pages[i];
    const uint32_t mask = masks ? masks[i] : all_rows;
    const uint4* ks = stage_s + ((i - begin) % STAGES) * 2 * CHUNKS;
    uint4* vs = stage_s + ((i - begin) % STAGES) * 2 * CHUNKS + CHUNKS;
    // Slots past the context were never written (upstream allocates the cache uninitialized, so
    // they can hold NaN bit patterns): their probability is 0, but 0 * NaN is NaN, so each thread
    // zeroes them in the V chunks it copied. Keys need nothing: those scores are never computed.
    const int written = ctx - page * BS;
    if (written < BS) {
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
        const int vi = j * THREADS + tid;
        T* v = reinterpret_cast<T*>(vs + v_chunk<C>(vi / C, vi % C));
#pragma unroll
        for (int e = 0; e < X; ++e)
          if ((vi % C) * X + e >= written) v[e] = from_f32<T>(0.f);
      }
    }
    // Every thread is past page i - 1 (its stage is free again) and page i is complete.
    __syncthreads();
    issue(i + STAGES - 1);

    // Scores and the online softmax: warp w, pass ps scores queries (ps * WARPS + w) * QPW + ...
#pragma unroll
    for (int ps = 0; ps < PASSES; ++ps) {
      const int first = (ps * WARPS + warp) * QPW;
      if (first >= nq) break;
      const int qi = first + lane / BS;
      const int r = qi / group;
      const bool live = qi < nq && ((mask >> r) & 1u) && page * BS + t < ctx - (rows - 1 - r);
      float s = -INFINITY;
      if (live) {
        const float* q = q_s + qi * D;
        float dot = 0.f;
#pragma unroll
        for (int c = 0; c < D / X; ++c) {
          const uint4 raw = ks[c * BS + t];
          const T* k = reinterpret_cast<const T*>(&raw);
#pragma unroll
          for (int e = 0; e < X; e += 4) {
            const float4 q4 = *reinterpret_cast<const float4*>(q + c * X + e);
            dot = fmaf(q4.x, to_f32(k[e]), dot);
            dot = fmaf(q4.y, to_f32(k[e + 1]), dot);
            dot = fmaf(q4.z, to_f32(k[e + 2]), dot);
            dot = fmaf(q4.w, to_f32(k[e + 3]), dot);
          }
        }
        s = softcap > 0.f ? softcap * tanhf(dot / softcap) : dot;
      }
      float mx = s;
#pragma unroll
      for (int o = BS / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_new = fmaxf(m_r[ps], mx);
      float p = 0.f, alpha = 1.f;
      if (m_new != -INFINITY) {
        alpha = __expf(m_r[ps] - m_new);
        p = __expf(s - m_new);
      }
      float sum = p;
#pragma unroll
      for (int o = BS / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      m_r[ps] = m_new;
      l_r[ps] = l_r[ps] * alpha + sum;
      if (qi < nq) {
        p_s[qi * BS + t] = p;
        if (t == 0) a_s[qi] = alpha;
      }
    }
    __syncthreads();

    // O += P V: thread d reads its channel's BS values once and serves every query.
    float v[BS];
#pragma unroll
    for (int j = 0; j < C; ++j) {
      const uint4 raw = vs[v_chunk<C>(tid, j)];
      const T* vv = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int e = 0; e < X; ++e) v[j * X + e] = to_f32(vv[e]);
    }
#pragma unroll
    for (int qi = 0; qi < MAXQ; ++qi) {
      if (qi < nq) {
        const float* p = p_s + qi * BS;
        float a = acc[qi] * a_s[qi];
#pragma unroll
        for (int tt = 0; tt < BS; tt += 4) {
          const float4 p4 = *reinterpret_cast<const float4*>(p + tt);
          a = fmaf(p4.x, v[tt], a);
          a = fmaf(p4.y, v[tt + 1], a);
          a = fmaf(p4.z, v[tt + 2], a);
          a = fmaf(p4.w, v[tt + 3], a);
        }
        acc[qi] = a;
      }
    }
  }

#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    const int first = (ps * WARPS + warp) * QPW;
    if (first >= nq) break;
    const int qi = first + lane / BS;
    if (qi < nq && t == 0) {
      m_s[qi] = m_r[ps];
      l_s[qi] = l_r[ps];
    }
  }
  __syncthreads();

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
