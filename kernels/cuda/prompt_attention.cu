// Causal prompt attention (prefill of one sequence with no cached tokens) on tensor cores, for the
// sparse policies' CUDA prompts: upstream 0.8.1 without candle-flash-attn materializes the full
// score matrix (a 32K prompt takes ~44 s on the H200, a 128K one does not fit), so long-context
// runs could not even be set up. Same semantics as cpu::causal_prompt_attention (the reference
// in retro-gpu-check): softmax(q k^T * scale + causal) v, row i attends to keys 0..=i.
//
// FlashAttention-2's shape: one 128-thread block per (64-row query tile, head); each warp owns 16
// query rows, keeps their Q fragments and O accumulators in registers, and walks the key tiles at
// or below its diagonal: S = Q K^T by mma.sync m16n8k16 (K rows padded by 8 elements in shared
// memory, so a fragment's 8 tokens start on 8 different bank quads), the online softmax in
// registers (a row's 4 lanes reduce by shuffles), then P V with P converted in registers from the
// S accumulators (an m16n8 C fragment pair is an m16k16 A fragment) and V's B fragments by
// ldmatrix.trans. K/V tiles are double-buffered by cp.async. Query tiles are scheduled heaviest
// (latest) first.
#include "common.cuh"

constexpr int PROMPT_BM = 64;  // query rows per block (16 per warp)
constexpr int PROMPT_BN = 64;  // keys per tile

// Two transposed 8x8 tiles of 16-bit values: rows addressed by lanes 0-7 (tile 0) and 8-15 (tile 1),
// each lane receiving column lane / 4, rows 2 (lane % 4) and 2 (lane % 4) + 1 of each tile; x4 adds
// tiles 2 and 3 addressed by lanes 16-31.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// q [heads, n, D], k/v [kv_heads, n, D], out [heads, n, D], all contiguous (the batch of one dropped).
// grid: (ceil(n / 64), heads); block: 128; dynamic shared memory: 2 * 2 * 64 * (D + 8) * sizeof(T).
template <typename T, int D>
__device__ void causal_prompt_attention(const T* __restrict__ q, const T* __restrict__ k,
                                        const T* __restrict__ v, T* __restrict__ out, int n,
                                        int heads, int kv_heads, float scale) {
  constexpr int BN = PROMPT_BN;
  constexpr int STRIDE = D + 8;  // shared-memory row stride in elements (16 bytes of padding)
  constexpr int KT = D / 16;     // k-steps of Q K^T
  constexpr int NT = BN / 8;     // 8-key tiles of S
  constexpr int DT = D / 8;      // 8-channel tiles of O
  constexpr int CHUNKS = BN * D / 8;  // 16-byte chunks of a K (or V) tile
  static_assert(sizeof(T) == 2 && DT % 2 == 0, "16-bit types, head dim a multiple of 16");

  const int qt = gridDim.x - 1 - blockIdx.x;  // heaviest query tiles first
  const int h = blockIdx.y;
  const int kvh = h / (heads / kv_heads);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, quad = lane % 4;
  const int row0 = qt * PROMPT_BM + warp * 16;  // this warp's first query row

  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_s = reinterpret_cast<T*>(smem_raw);  // [2][BN][STRIDE]
  T* v_s = k_s + 2 * BN * STRIDE;           // [2][BN][STRIDE]

  const T* qh = q + (int64_t)h * n * D;
  const T* kh = k + (int64_t)kvh * n * D;
  const T* vh = v + (int64_t)kvh * n * D;

  // A fragments of this warp's 16 query rows (rows past the prompt are zero).
  uint32_t qa[KT][4];
  auto q_pair = [&](int row, int col) -> uint32_t {
    return row < n ? *reinterpret_cast<const uint32_t*>(qh + (int64_t)row * D + col) : 0u;
  };
#pragma unroll
  for (int kk = 0; kk < KT; ++kk) {
    const int c = kk * 16 + 2 * quad;
    qa[kk][0] = q_pair(row0 + g, c);
    qa[kk][1] = q_pair(row0 + g + 8, c);
    qa[kk][2] = q_pair(row0 + g, c + 8);
    qa[kk][3] = q_pair(row0 + g + 8, c + 8);
  }

  // Key tiles 0..tiles-1 reach this block's last row; keys past the prompt are zero-filled (a
  // valid row never attends to them, and zeros keep 0 * garbage out of P V).
  const int last_row = min(n, (qt + 1) * PROMPT_BM) - 1;
  const int tiles = last_row / BN + 1;
  auto load = [&](int t) {
    const int buf = t & 1;
#pragma unroll
    for (int i = threadIdx.x; i < CHUNKS; i += 128) {
      const int r = i / (D / 8), c = (i % (D / 8)) * 8;
      const int tok = t * BN + r;
      T* kd = k_s + (buf * BN + r) * STRIDE + c;
      T* vd = v_s + (buf * BN + r) * STRIDE + c;
      if (tok < n) {
        cp_async16(kd, kh + (int64_t)tok * D + c);
        cp_async16(vd, vh + (int64_t)tok * D + c);
      } else {
        *reinterpret_cast<uint4*>(kd) = make_uint4(0, 0, 0, 0);
        *reinterpret_cast<uint4*>(vd) = make_uint4(0, 0, 0, 0);
      }
    }
    cp_async_commit();
  };

  float o[DT][4];
#pragma unroll
  for (int j = 0; j < DT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8

  load(0);
  for (int t = 0; t < tiles; ++t) {
    if (t + 1 < tiles) load(t + 1);
    else cp_async_commit();  // an empty group keeps the wait count below right
    cp_async_wait<1>();      // tile t has landed (this thread's copies)
    __syncthreads();         // ... and everyone's
    const T* kb = k_s + (t & 1) * BN * STRIDE;
    const T* vb = v_s + (t & 1) * BN * STRIDE;
    // A warp whose rows all precede the tile's first key has nothing to do here.
    if (row0 + 15 >= t * BN && row0 < n) {
      float s[NT][4];
#pragma unroll
      for (int j = 0; j < NT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < KT; ++kk) {
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          const uint32_t* kw = reinterpret_cast<const uint32_t*>(kb + (j * 8 + g) * STRIDE + kk * 16 + 2 * quad);
          mma_16816<T>(s[j], qa[kk], kw[0], kw[4]);
        }
      }
      // Scale, causal mask, and the online softmax of rows g (e = 0, 1) and g + 8 (e = 2, 3).
      const bool diagonal = (t + 1) * BN - 1 > row0;
      float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = row0 + g + (e / 2) * 8;
          const int key = t * BN + j * 8 + 2 * quad + (e % 2);
          s[j][e] = (!diagonal || key <= row) ? s[j][e] * scale : -INFINITY;
          mx[e / 2] = fmaxf(mx[e / 2], s[j][e]);
        }
      }
      float alpha[2], m_new[2], sum[2] = {0.f, 0.f};
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
        m_new[r] = fmaxf(m[r], mx[r]);
        alpha[r] = m_new[r] == -INFINITY ? 1.f : __expf(m[r] - m_new[r]);
      }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int r = e / 2;
          s[j][e] = m_new[r] == -INFINITY ? 0.f : __expf(s[j][e] - m_new[r]);
          sum[r] += s[j][e];
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 1);
        sum[r] += __shfl_xor_sync(0xffffffffu, sum[r], 2);
        l[r] = l[r] * alpha[r] + sum[r];
        m[r] = m_new[r];
      }
#pragma unroll
      for (int j = 0; j < DT; ++j) {
        o[j][0] *= alpha[0];
        o[j][1] *= alpha[0];
        o[j][2] *= alpha[1];
        o[j][3] *= alpha[1];
      }
      // O += P V, 16 keys per step: P's A fragment from the S accumulators of key tiles 2kt, 2kt + 1.
#pragma unroll
      for (int kt = 0; kt < BN / 16; ++kt) {
        const uint32_t pa[4] = {pack2<T>(s[2 * kt][0], s[2 * kt][1]), pack2<T>(s[2 * kt][2], s[2 * kt][3]),
                                pack2<T>(s[2 * kt + 1][0], s[2 * kt + 1][1]),
                                pack2<T>(s[2 * kt + 1][2], s[2 * kt + 1][3])};
        // Lanes 0-7 / 8-15 address keys 16kt + 0..7 / + 8..15 at channel tile j, lanes 16-31 the
        // same keys at channel tile j + 1.
        const int key = kt * 16 + (lane % 16);
#pragma unroll
        for (int j = 0; j < DT; j += 2) {
          uint32_t b[4];
          ldmatrix_x4_trans(b, vb + key * STRIDE + (j + lane / 16) * 8);
          mma_16816<T>(o[j], pa, b[0], b[1]);
          mma_16816<T>(o[j + 1], pa, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // tile t's buffer is free for tile t + 2
  }

  // Every valid row attended to at least key 0, so l > 0.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + g + r * 8;
    if (row >= n) continue;
    const float inv = 1.f / l[r];
    T* dst = out + ((int64_t)h * n + row) * D + 2 * quad;
#pragma unroll
    for (int j = 0; j < DT; ++j)
      *reinterpret_cast<uint32_t*>(dst + j * 8) = pack2<T>(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
  }
}

#define RETRO_PROMPT(T, NAME, D)                                                                     \
  extern "C" __global__ void __launch_bounds__(128) causal_prompt_attention_##NAME##_d##D(          \
      const T* q, const T* k, const T* v, T* out, int n, int heads, int kv_heads, float scale) {    \
    causal_prompt_attention<T, D>(q, k, v, out, n, heads, kv_heads, scale);                        \
  }
RETRO_PROMPT(__half, f16, 64)
RETRO_PROMPT(__half, f16, 128)
RETRO_PROMPT(__nv_bfloat16, bf16, 64)
RETRO_PROMPT(__nv_bfloat16, bf16, 128)
