// A batched GEMV with the same sums as upstream's gemv_kernel_batched<T, Vec2, 256, B>: each thread
// owns PER of upstream's 256 threads (PER consecutive pairs = whole 16-byte loads), and the
// reductions replay upstream's butterfly over those virtual threads, so results are bit-identical.
#pragma once
template <typename T, typename Vec2>
__device__ __forceinline__ float fma_pair(Vec2 a, Vec2 x, float acc) {
  if constexpr (std::is_same_v<T, float>) {
    acc = fmaf(a.x, x.x, acc);
    acc = fmaf(a.y, x.y, acc);
  } else if constexpr (std::is_same_v<T, __half>) {
    float2 af = __half22float2(a);
    float2 xf = __half22float2(x);
    acc = fmaf(af.x, xf.x, acc);
    acc = fmaf(af.y, xf.y, acc);
  } else {
    acc = fmaf(__bfloat162float(a.x), __bfloat162float(x.x), acc);
    acc = fmaf(__bfloat162float(a.y), __bfloat162float(x.y), acc);
  }
  return acc;
}

template <typename T, typename Vec2, int PER, int BATCH_SIZE>
__global__ void gemv_kernel_batched_wide(const T *__restrict__ A, const T *__restrict__ X,
                                         const T *__restrict__ bias, T *__restrict__ Y, int M,
                                         int K, bool has_bias) {
  constexpr int VIRTUAL = 256;
  constexpr int THREADS = VIRTUAL / PER;
  constexpr int NUM_WARPS = VIRTUAL / WARP_SIZE;
  constexpr int LANES = WARP_SIZE / PER; // threads per virtual warp
  constexpr int CHUNK = PER * sizeof(Vec2) / 16; // 16-byte loads per thread and iteration
  static_assert(PER * sizeof(Vec2) % 16 == 0, "whole 16-byte loads");
  __shared__ float warp_sums[NUM_WARPS][BATCH_SIZE];
  const int row = blockIdx.x;
  if (row >= M) return;
  const int tid = threadIdx.x;
  const int groups = K / 2 / PER; // K % (2 * PER) == 0
  const uint4 *a_row = reinterpret_cast<const uint4 *>(A + (size_t)row * K);

  float acc[PER][BATCH_SIZE];
#pragma unroll
  for (int k = 0; k < PER; k++)
#pragma unroll
    for (int b = 0; b < BATCH_SIZE; b++) acc[k][b] = 0.0f;

#pragma unroll 4
  for (int g = tid; g < groups; g += THREADS) {
    uint4 a[CHUNK];
#pragma unroll
    for (int c = 0; c < CHUNK; c++) a[c] = __ldg(a_row + (size_t)g * CHUNK + c);
    const Vec2 *av = reinterpret_cast<const Vec2 *>(a);
#pragma unroll
    for (int b = 0; b < BATCH_SIZE; b++) {
      const uint4 *x_row = reinterpret_cast<const uint4 *>(X + (size_t)b * K);
      uint4 x[CHUNK];
#pragma unroll
      for (int c = 0; c < CHUNK; c++) x[c] = __ldg(x_row + (size_t)g * CHUNK + c);
      const Vec2 *xv = reinterpret_cast<const Vec2 *>(x);
#pragma unroll
      for (int k = 0; k < PER; k++) acc[k][b] = fma_pair<T, Vec2>(av[k], xv[k], acc[k][b]);
    }
  }

#pragma unroll
  for (int b = 0; b < BATCH_SIZE; b++) {
#pragma unroll
    for (int off = WARP_SIZE / 2; off >= PER; off /= 2)
#pragma unroll
      for (int k = 0; k < PER; k++) acc[k][b] += __shfl_xor_sync(0xffffffff, acc[k][b], off / PER);
#pragma unroll
    for (int off = PER / 2; off > 0; off /= 2) {
      float t[PER];
#pragma unroll
      for (int k = 0; k < PER; k++) t[k] = acc[k][b] + acc[k ^ off][b];
#pragma unroll
      for (int k = 0; k < PER; k++) acc[k][b] = t[k];
    }
  }
  if (tid % LANES == 0) {
#pragma unroll
    for (int b = 0; b < BATCH_SIZE; b++) warp_sums[tid / LANES][b] = acc[0][b];
  }
  __syncthreads();
  if (tid < WARP_SIZE) {
    float bias_val = has_bias ? to_float(__ldg(bias + row)) : 0.0f;
#pragma unroll
    for (int b = 0; b < BATCH_SIZE; b++) {
      float v = (tid < NUM_WARPS) ? warp_sums[tid][b] : 0.0f;
      v = warp_reduce_sum(v);
      if (tid == 0) {
        float result = v + bias_val;
        if constexpr (std::is_same_v<T, float>) Y[b * M + row] = result;
        else if constexpr (std::is_same_v<T, __half>) Y[b * M + row] = __float2half(result);
        else Y[b * M + row] = __float2bfloat16(result);
      }
    }
  }
}
