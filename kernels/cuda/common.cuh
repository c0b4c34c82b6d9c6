// Shared helpers for the retro kernels: dtype conversion and the upstream paged-cache layout.
//
// Layout (vLLM / mistral.rs paged attention, identical on CPU and CUDA):
//   key_cache   [num_blocks, kv_heads, head_dim / x, block_size, x],  x = 16 / sizeof(T)
//   value_cache [num_blocks, kv_heads, head_dim, block_size]
// so one (block, kv_head) page of K and of V is each one contiguous run of head_dim * block_size
// elements, which is what lets every kernel here read a page with 16-byte coalesced loads.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16(v); }

// Elements per 16-byte chunk of the key layout.
template <typename T> __host__ __device__ constexpr int key_chunk() { return 16 / (int)sizeof(T); }

// Instantiate `NAME_f32`, `NAME_f16`, `NAME_bf16` extern "C" entry points of a templated kernel body.
#define RETRO_FOR_EACH_DTYPE(MACRO) \
  MACRO(float, f32)                 \
  MACRO(__half, f16)                \
  MACRO(__nv_bfloat16, bf16)
