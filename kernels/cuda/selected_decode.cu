// The fused sparse decode kernel of quest and retro (quest is rows = 1).
//
// One CUDA block per (split of a page list, KV head, sequence). Each listed page is read from HBM
// once, by cp.async straight into shared memory, STAGES - 1 pages ahead of the one in use, and
// serves every query head of the KV head's GQA group and every query row of the replay window
// whose mask bit is set, each row limited to its causal prefix (row r of a window of `rows` sees
// the first context_len - (rows - 1 - r) tokens). A partial (O, lse) per split; combine_splits
// merges the splits exactly by log-sum-exp, and merge_step folds partial results into retro's
// output cache. Semantics are those of cpu::paged_decode_selected (the reference for the GPU
// tests).
//
// Two bodies share the page pipeline and the online softmax:
// - 16-bit caches (f16, bf16): QK^T and PV on tensor cores (mma.sync m16n8k16, f32 accumulators),
//   queries padded to tiles of 16 rows. Retro's window multiplies the queries a page serves
//   (GQA group x rows); on CUDA cores that made the scoring compute-bound from w = 2 on, while a
//   16-row tile costs the same for 4 queries or 16. The probabilities enter PV in the cache's
//   dtype, as in FlashAttention.
// - f32 caches (the parity tests): CUDA cores, a warp scores BS tokens for 32 / BS queries (a lane
//   per token) and each thread accumulates one output channel for every query.
#include "common.cuh"

// Pages in shared memory at once: the one in use and STAGES - 1 in flight (an f32 page is twice
// the bytes, so one fewer keeps its blocks per SM).
template <typename T> __host__ __device__ constexpr int decode_stages() { return sizeof(T) == 4 ? 2 : 3; }

// Where 16-byte chunk j (C chunks per channel) of channel d of a V page sits in shared memory. The
// PV product has thread d read chunk j of its own channel, so without the XOR the 8 lanes of a
// 128-bit load phase would hit the same banks (a channel is C * 16 bytes, at most 128).
template <int C> __device__ __forceinline__ int v_chunk(int d, int j) { return d * C + (j ^ ((d / (8 / C)) % C)); }

// The list of pages one block reads, and the cp.async pipeline that streams them through STAGES
// shared-memory slots. K keeps the cache's [D/X][BS][X] layout (lane t reads token t's chunks:
// consecutive 16-byte words); V's [D][BS] is swizzled by v_chunk.
template <typename T, int D, int BS, int THREADS>
struct PagePipeline {
  static constexpr int X = key_chunk<T>();
  static constexpr int C = BS / X;           // 16-byte chunks per channel of a V page
  static constexpr int CHUNKS = D * BS / X;  // 16-byte chunks per page, of K and of V each
  static constexpr int VECS = CHUNKS / THREADS;
  static constexpr int STAGES = decode_stages<T>();
  static_assert(VECS >= 1 && CHUNKS % THREADS == 0, "page must split evenly over threads");

  uint4* slots;  // [STAGES][K, V][CHUNKS]
  const T* key_cache;
  const T* value_cache;
  const uint32_t* block_row;  // this sequence's block table
  const uint32_t* pages;      // this (sequence, KV head)'s selected pages
  int begin, end, kv_heads, h, tid;

  __device__ __forceinline__ uint4* k(int i) const { return slots + ((i - begin) % STAGES) * 2 * CHUNKS; }
  __device__ __forceinline__ uint4* v(int i) const { return k(i) + CHUNKS; }

  // Starts the copy of page i; past the list an empty group keeps the wait counts right.
  __device__ __forceinline__ void issue(int i) const {
    if (i < end) {
      const int64_t at = ((int64_t)block_row[pages[i]] * kv_heads + h) * D * BS;
      const uint4* kg = reinterpret_cast<const uint4*>(key_cache + at);
      const uint4* vg = reinterpret_cast<const uint4*>(value_cache + at);
      uint4* ks = k(i);
      uint4* vs = v(i);
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
        const int vi = j * THREADS + tid;
        cp_async16(ks + vi, kg + vi);
        cp_async16(vs + v_chunk<C>(vi / C, vi % C), vg + vi);
      }
    }
    cp_async_commit();
  }

  // Waits for this thread's copies of page i. Slots past the context were never written (upstream
  // allocates the cache uninitialized, so they can hold NaN bit patterns): their probability is 0,
  // but 0 * NaN is NaN, so each thread zeroes them in the V chunks it copied. Keys need nothing:
  // their scores are masked. The caller's barrier then makes the page whole.
  __device__ __forceinline__ void land(int i, int written) const {
    cp_async_wait<STAGES - 2>();
    if (written < BS) {
      uint4* vs = v(i);
#pragma unroll
      for (int j = 0; j < VECS; ++j) {
        const int vi = j * THREADS + tid;
        T* vv = reinterpret_cast<T*>(vs + v_chunk<C>(vi / C, vi % C));
#pragma unroll
        for (int e = 0; e < X; ++e)
          if ((vi % C) * X + e >= written) vv[e] = from_f32<T>(0.f);
      }
    }
  }
};

// One page's step of the online softmax of the query whose scores a group of BS lanes holds (s:
// this lane's token, -inf where not attended): the page max and sum are shuffles within the
// group. Returns this token's probability; `alpha` rescales the query's earlier accumulators.
template <int BS>
__device__ __forceinline__ float softmax_step(float s, float& m, float& l, float& alpha) {
  float mx = s;
#pragma unroll
  for (int o = BS / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const float m_new = fmaxf(m, mx);
  float p = 0.f;
  alpha = 1.f;
  if (m_new != -INFINITY) {
    alpha = __expf(m - m_new);
    p = __expf(s - m_new);
  }
  float sum = p;
#pragma unroll
  for (int o = BS / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  m = m_new;
  l = l * alpha + sum;
  return p;
}

// Where query qi = r * group + g (row r of the window, head h * group + g) of a split's partial
// results sits.
__device__ __forceinline__ int64_t partial_row(int split, int batch, int seq, int rows, int heads, int h,
                                               int group, int qi) {
  const int r = qi / group, g = qi % group;
  return ((int64_t)split * batch * rows + (int64_t)seq * rows + r) * heads + h * group + g;
}

#define DECODE_PARAMS(T)                                                                          \
  const T *__restrict__ query, const T *__restrict__ key_cache, const T *__restrict__ value_cache, \
      const uint32_t *__restrict__ block_tables, int max_blocks_per_seq,                          \
      const uint32_t *__restrict__ context_lens, const uint32_t *__restrict__ sel_pages,          \
      const uint32_t *__restrict__ sel_counts, const uint32_t *__restrict__ sel_masks,            \
      int sel_stride, int rows, int heads, int kv_heads, float scale, float softcap,              \
      int pages_per_split, float *__restrict__ part_o, float *__restrict__ part_lse
#define DECODE_ARGS                                                                             \
  query, key_cache, value_cache, block_tables, max_blocks_per_seq, context_lens, sel_pages,      \
      sel_counts, sel_masks, sel_stride, rows, heads, kv_heads, scale, softcap, pages_per_split, \
      part_o, part_lse

// What both bodies derive from the launch: this block's list, its slice of it, its masks.
#define DECODE_PROLOGUE(T, D, BS)                                                                 \
  const int split = blockIdx.x, h = blockIdx.y, seq = blockIdx.z;                                \
  const int batch = gridDim.z, tid = threadIdx.x;                                                \
  const int warp = tid / 32, lane = tid % 32;                                                    \
  const int group = heads / kv_heads;                                                            \
  const int nq = group * rows;                                                                   \
  const int list = seq * kv_heads + h;                                                           \
  const int count = sel_counts[list];                                                            \
  const int begin = split * pages_per_split;                                                     \
  const int end = min(count, begin + pages_per_split);                                           \
  const int ctx = context_lens[seq];                                                             \
  const uint32_t* pages = sel_pages + (int64_t)list * sel_stride;                                \
  const uint32_t* masks = sel_masks ? sel_masks + (int64_t)list * sel_stride : nullptr;          \
  const uint32_t all_rows = rows >= 32 ? 0xffffffffu : ((1u << rows) - 1u);                      \
  extern __shared__ __align__(16) unsigned char smem_raw[];                                      \
  using Pipe = PagePipeline<T, D, BS, D>;                                                        \
  const Pipe pipe{reinterpret_cast<uint4*>(smem_raw), key_cache, value_cache,                    \
                  block_tables + (int64_t)seq * max_blocks_per_seq, pages, begin, end, kv_heads, \
                  h, tid};                                                                       \
  unsigned char* after_slots = smem_raw + Pipe::STAGES * 2 * Pipe::CHUNKS * 16

// MAXQ: query vectors (GQA group size x window rows) one block can serve; the launcher picks the
// smallest instantiation that fits, since each thread keeps MAXQ accumulators in registers.
template <typename T, int D, int BS, int MAXQ>
__device__ void selected_decode_fma(DECODE_PARAMS(T)) {
  constexpr int WARPS = D / 32;  // one output channel per thread
  constexpr int X = key_chunk<T>();
  constexpr int C = BS / X;
  constexpr int QPW = 32 / BS;  // queries a warp scores at once
  constexpr int PASSES = (MAXQ + WARPS * QPW - 1) / (WARPS * QPW);
  static_assert(32 % BS == 0 && C <= 8, "a warp scores whole pages");
  DECODE_PROLOGUE(T, D, BS);
  const int t = lane % BS;
  float* q_s = reinterpret_cast<float*>(after_slots);  // [MAXQ][D], pre-scaled
  float* p_s = q_s + MAXQ * D;   // [MAXQ][BS] probabilities of the page in use
  float* a_s = p_s + MAXQ * BS;  // [MAXQ] rescale of the accumulators for this page
  float* m_s = a_s + MAXQ;       // [MAXQ] final max
  float* l_s = m_s + MAXQ;       // [MAXQ] final sum

  for (int i = tid; i < nq * D; i += D) {
    const int qi = i / D, d = i % D;
    const int r = qi / group, g = qi % group;
    q_s[i] = scale * to_f32(query[(((int64_t)seq * rows + r) * heads + h * group + g) * D + d]);
  }
#pragma unroll
  for (int s = 0; s < Pipe::STAGES - 1; ++s) pipe.issue(begin + s);

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
    const int page = pages[i];
    const uint32_t mask = masks ? masks[i] : all_rows;
    pipe.land(i, ctx - page * BS);
    // Every thread is past page i - 1 (its slot is free again) and page i is complete.
    __syncthreads();
    pipe.issue(i + Pipe::STAGES - 1);
    const uint4* ks = pipe.k(i);
    const uint4* vs = pipe.v(i);

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
      float alpha;
      const float p = softmax_step<BS>(s, m_r[ps], l_r[ps], alpha);
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
      const int64_t at = partial_row(split, batch, seq, rows, heads, h, group, qi);
      const float l = l_s[qi];
      part_o[at * D + tid] = l > 0.f ? acc[qi] / l : 0.f;
      if (tid == 0) part_lse[at] = l > 0.f ? m_s[qi] + __logf(l) : -INFINITY;
    }
  }
}

// Shared memory of the tensor-core body after the page slots (mirrored by decode_smem in
// kernels/src/cuda/decode.rs): queries [MQ][D + 8] in T, scores/probabilities [MQ][BS + 8] in f32, then
// alpha, max and sum [MQ] each. The +8 pads make the fragment loads and stores bank-conflict free
// (row g of a fragment starts 4g words further along the banks).
template <typename T, int D, int BS, int MAXQ>
__device__ void selected_decode_mma(DECODE_PARAMS(T)) {
  constexpr int WARPS = D / 32;
  constexpr int MT = (MAXQ + 15) / 16;  // 16-row tiles of queries
  constexpr int MQ = MT * 16;
  constexpr int QS = D + 8;             // row stride of the queries, in T
  constexpr int SS = BS + 8;            // row stride of the scores, in f32
  constexpr int NT = BS / 8;            // 8-token tiles of a page (QK^T), spread over the warps
  constexpr int DT = D / 8 / WARPS;     // 8-channel tiles of the output each warp owns (PV)
  constexpr int QPW = 32 / BS;          // queries a warp takes through the softmax at once
  constexpr int PASSES = (MAXQ + WARPS * QPW - 1) / (WARPS * QPW);
  static_assert(sizeof(T) == 2 && key_chunk<T>() == 8, "tensor-core body is for 16-bit caches");
  static_assert(BS % 16 == 0 && 32 % BS == 0 && DT >= 1, "page and head must tile by 16 and 8");
  DECODE_PROLOGUE(T, D, BS);
  constexpr int C = Pipe::C;
  const int g = lane / 4, quad = lane % 4;  // a fragment's row (column for B) and pair
  const int t = lane % BS;
  T* q_s = reinterpret_cast<T*>(after_slots);
  float* s_s = reinterpret_cast<float*>(q_s + MQ * QS);
  float* a_s = s_s + MQ * SS;
  float* m_s = a_s + MQ;
  float* l_s = m_s + MQ;

  // Rows past nq are zero (they pad the tile; their scores are written as 0, so their P rows are
  // 0 too and they never touch real rows), and alpha starts at 1 for them.
  for (int i = tid; i < MQ * QS; i += D) {
    const int qi = i / QS, d = i % QS;
    T v = from_f32<T>(0.f);
    if (qi < nq && d < D) {
      const int r = qi / group, gg = qi % group;
      v = query[(((int64_t)seq * rows + r) * heads + h * group + gg) * D + d];
    }
    q_s[i] = v;
  }
  for (int i = tid; i < MQ; i += D) a_s[i] = 1.f;
#pragma unroll
  for (int s = 0; s < Pipe::STAGES - 1; ++s) pipe.issue(begin + s);

  float o[MT][DT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int j = 0; j < DT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[mt][j][e] = 0.f;
  float m_r[PASSES], l_r[PASSES];
#pragma unroll
  for (int ps = 0; ps < PASSES; ++ps) {
    m_r[ps] = -INFINITY;
    l_r[ps] = 0.f;
  }
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(q_s);

  for (int i = begin; i < end; ++i) {
    const int page = pages[i];
    const uint32_t mask = masks ? masks[i] : all_rows;
    pipe.land(i, ctx - page * BS);
    __syncthreads();
    pipe.issue(i + Pipe::STAGES - 1);
    const uint32_t* kw = reinterpret_cast<const uint32_t*>(pipe.k(i));
    const uint32_t* vw = reinterpret_cast<const uint32_t*>(pipe.v(i));

    // S = Q K^T, one 8-token tile per warp. B's column g is token tile*8 + g, its pair `quad`
    // the channels 16kk + 2quad (+1) and + 8: word quad of chunks 2kk and 2kk + 1 of that token.
#pragma unroll
    for (int tw = 0; tw < (NT + WARPS - 1) / WARPS; ++tw) {
      const int tile = tw * WARPS + warp;
      if (tile >= NT) break;
      const int tok = tile * 8 + g;
      float sc[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[mt][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t b0 = kw[((2 * kk) * BS + tok) * 4 + quad];
        const uint32_t b1 = kw[((2 * kk + 1) * BS + tok) * 4 + quad];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          const uint32_t* q0 = qw + (mt * 16 + g) * (QS / 2) + kk * 8 + quad;
          const uint32_t* q8 = q0 + 8 * (QS / 2);
          const uint32_t a[4] = {q0[0], MAXQ <= 8 ? 0u : q8[0], q0[4], MAXQ <= 8 ? 0u : q8[4]};
          mma_16816<T>(sc[mt], a, b0, b1);
        }
      }
      // Scaled, soft-capped, masked: -inf where a live query does not attend, 0 for pad rows.
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int qi = mt * 16 + g + half * 8;
          const int r = qi / group;
          const bool row_live = qi < nq && ((mask >> r) & 1u);
          const int visible = ctx - (rows - 1 - r) - page * BS;
          float2 out;
          float* o2 = reinterpret_cast<float*>(&out);
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int tt = tile * 8 + 2 * quad + e;
            const float dot = sc[mt][half * 2 + e] * scale;
            const float s = softcap > 0.f ? softcap * tanhf(dot / softcap) : dot;
            o2[e] = row_live && tt < visible ? s : (qi < nq ? -INFINITY : 0.f);
          }
          *reinterpret_cast<float2*>(s_s + qi * SS + tile * 8 + 2 * quad) = out;
        }
      }
    }
    __syncthreads();

    // The online softmax over the page's scores, turned into probabilities in place.
#pragma unroll
    for (int ps = 0; ps < PASSES; ++ps) {
      const int first = (ps * WARPS + warp) * QPW;
      if (first >= nq) break;
      const int qi = first + lane / BS;
      const float s = qi < nq ? s_s[qi * SS + t] : -INFINITY;
      float alpha;
      const float p = softmax_step<BS>(s, m_r[ps], l_r[ps], alpha);
      if (qi < nq) {
        s_s[qi * SS + t] = p;
        if (t == 0) a_s[qi] = alpha;
      }
    }
    __syncthreads();

    // O = alpha O + P V over this warp's channel tiles. A's pair `quad` is tokens 16kt + 2quad
    // (+1) and + 8; B's column g is channel tile*8 + g, its pair word quad of V chunks 2kt, 2kt+1.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const float a0 = a_s[mt * 16 + g], a8 = a_s[mt * 16 + g + 8];
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        o[mt][j][0] *= a0;
        o[mt][j][1] *= a0;
        o[mt][j][2] *= a8;
        o[mt][j][3] *= a8;
      }
    }
#pragma unroll
    for (int kt = 0; kt < BS / 16; ++kt) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const float* p0 = s_s + (mt * 16 + g) * SS + kt * 16 + 2 * quad;
        const float* p8 = p0 + 8 * SS;
        const float2 x0 = *reinterpret_cast<const float2*>(p0);
        const float2 x1 = *reinterpret_cast<const float2*>(p0 + 8);
        a[mt][0] = pack2<T>(x0.x, x0.y);
        a[mt][2] = pack2<T>(x1.x, x1.y);
        if (MAXQ <= 8) {
          a[mt][1] = a[mt][3] = 0u;
        } else {
          const float2 y0 = *reinterpret_cast<const float2*>(p8);
          const float2 y1 = *reinterpret_cast<const float2*>(p8 + 8);
          a[mt][1] = pack2<T>(y0.x, y0.y);
          a[mt][3] = pack2<T>(y1.x, y1.y);
        }
      }
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        const int d = (warp * DT + j) * 8 + g;
        const uint32_t b0 = vw[v_chunk<C>(d, 2 * kt) * 4 + quad];
        const uint32_t b1 = vw[v_chunk<C>(d, 2 * kt + 1) * 4 + quad];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) mma_16816<T>(o[mt][j], a[mt], b0, b1);
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
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int qi = mt * 16 + g + half * 8;
      if (qi >= nq) continue;
      const int64_t at = partial_row(split, batch, seq, rows, heads, h, group, qi);
      const float l = l_s[qi];
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        const int d = (warp * DT + j) * 8 + 2 * quad;
        const float2 v = l > 0.f ? make_float2(o[mt][j][half * 2] / l, o[mt][j][half * 2 + 1] / l)
                                 : make_float2(0.f, 0.f);
        *reinterpret_cast<float2*>(part_o + at * D + d) = v;
      }
    }
  }
  for (int qi = tid; qi < nq; qi += D) {
    const float l = l_s[qi];
    part_lse[partial_row(split, batch, seq, rows, heads, h, group, qi)] =
        l > 0.f ? m_s[qi] + __logf(l) : -INFINITY;
  }
}

template <typename T, int D, int BS, int MAXQ>
__device__ __forceinline__ void selected_decode(DECODE_PARAMS(T)) {
  if constexpr (sizeof(T) == 2)
    selected_decode_mma<T, D, BS, MAXQ>(DECODE_ARGS);
  else
    selected_decode_fma<T, D, BS, MAXQ>(DECODE_ARGS);
}

#define RETRO_DECODE(T, NAME, D, BS, Q)                                                          \
  extern "C" __global__ void __launch_bounds__(D) selected_decode_##NAME##_d##D##_bs##BS##_q##Q( \
      DECODE_PARAMS(T)) {                                                                        \
    selected_decode<T, D, BS, Q>(DECODE_ARGS);                                                   \
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
