// Microbenchmark: upstream mistralrs-quant 0.8.1 batched GEMV vs the wide variant (bit-identity
// checked), Llama-3.1-8B shapes, bf16, weights rotated over > 512 MB so they come from HBM.
// mistralrs-quant 0.8.1's kernel file, copied beside this one before a run (see run.sh); it is never
// part of the repository. gemv_wide.cuh uses its helpers (WARP_SIZE, warp_reduce_sum, to_float).
#include "upstream_gemv.cu"
#include "gemv_wide.cuh"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("CUDA %s at %d\n", cudaGetErrorString(e), __LINE__); exit(1); } } while (0)
typedef __nv_bfloat16 bf;

template <int PER>
void launch_wide(const bf *A, const bf *X, bf *Y, int M, int K, int B, cudaStream_t s) {
  dim3 grid(M);
  constexpr int T = 256 / PER;
  switch (B) {
  case 1: gemv_kernel_batched_wide<bf, __nv_bfloat162, PER, 1><<<grid, T, 0, s>>>(A, X, nullptr, Y, M, K, false); break;
  case 2: gemv_kernel_batched_wide<bf, __nv_bfloat162, PER, 2><<<grid, T, 0, s>>>(A, X, nullptr, Y, M, K, false); break;
  case 3: gemv_kernel_batched_wide<bf, __nv_bfloat162, PER, 3><<<grid, T, 0, s>>>(A, X, nullptr, Y, M, K, false); break;
  case 4: gemv_kernel_batched_wide<bf, __nv_bfloat162, PER, 4><<<grid, T, 0, s>>>(A, X, nullptr, Y, M, K, false); break;
  case 8: gemv_kernel_batched_wide<bf, __nv_bfloat162, PER, 8><<<grid, T, 0, s>>>(A, X, nullptr, Y, M, K, false); break;
  }
}

__global__ void fill(bf *p, size_t n, unsigned seed) {
  size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
  if (i < n) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
    p[i] = __float2bfloat16(((h & 0xffff) / 65536.0f - 0.5f) * 0.1f);
  }
}

int main(int argc, char **argv) {
  int iters = 50;
  struct Shape { const char *name; int M, K; } shapes[] = {
      {"qkv 6144x4096", 6144, 4096}, {"o 4096x4096", 4096, 4096}, {"gate_up 28672x4096", 28672, 4096},
      {"down 4096x14336", 4096, 14336}, {"lm_head 128256x4096", 128256, 4096}};
  int batches[] = {1, 2, 3, 4, 8};
  cudaStream_t s; CK(cudaStreamCreate(&s));
  cudaEvent_t e0, e1; CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
  printf("shape,B,kernel,us,GBps,identical\n");
  for (auto sh : shapes) {
    size_t n = (size_t)sh.M * sh.K;
    int copies = (int)((1024ull << 20) / (n * 2)) + 1;
    if (copies > 16) copies = 16;
    std::vector<bf *> As(copies);
    for (int c = 0; c < copies; c++) { CK(cudaMalloc(&As[c], n * 2)); fill<<<(n + 255) / 256, 256>>>(As[c], n, c * 77 + 1); }
    bf *X, *Y0, *Y1; CK(cudaMalloc(&X, 8 * sh.K * 2)); CK(cudaMalloc(&Y0, 8 * (size_t)sh.M * 2)); CK(cudaMalloc(&Y1, 8 * (size_t)sh.M * 2));
    fill<<<(8 * sh.K + 255) / 256, 256>>>(X, 8 * sh.K, 999);
    std::vector<uint16_t> h0(8 * (size_t)sh.M), h1(8 * (size_t)sh.M);
    for (int B : batches) {
      for (int kern = 0; kern < 3; kern++) {
        auto go = [&](int c, bf *Y) {
          if (kern == 0) launch_gemv_bf16(As[c], X, nullptr, Y, sh.M, sh.K, B, false, s);
          else if (kern == 1) launch_wide<4>(As[c], X, Y, sh.M, sh.K, B, s);
          else launch_wide<8>(As[c], X, Y, sh.M, sh.K, B, s);
        };
        go(0, kern == 0 ? Y0 : Y1);
        CK(cudaStreamSynchronize(s));
        bool same = true;
        if (kern > 0) {
          CK(cudaMemcpy(h0.data(), Y0, B * (size_t)sh.M * 2, cudaMemcpyDeviceToHost));
          CK(cudaMemcpy(h1.data(), Y1, B * (size_t)sh.M * 2, cudaMemcpyDeviceToHost));
          same = memcmp(h0.data(), h1.data(), B * (size_t)sh.M * 2) == 0;
        }
        for (int w = 0; w < 5; w++) go(w % copies, Y1);
        CK(cudaEventRecord(e0, s));
        for (int i = 0; i < iters; i++) go(i % copies, Y1);
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float ms; CK(cudaEventElapsedTime(&ms, e0, e1));
        double us = ms * 1000.0 / iters;
        const char *kn[] = {"upstream", "wide4", "wide8"};
        printf("%s,%d,%s,%.2f,%.0f,%s\n", sh.name, B, kn[kern], us, n * 2 / us / 1e3, kern == 0 ? "-" : (same ? "yes" : "NO"));
      }
    }
    // B=1 rows of a B=2 call equal B=1 (the property retro = full rests on)
    launch_gemv_bf16(As[0], X, nullptr, Y0, sh.M, sh.K, 1, false, s);
    launch_wide<4>(As[0], X, Y1, sh.M, sh.K, 2, s);
    CK(cudaStreamSynchronize(s));
    CK(cudaMemcpy(h0.data(), Y0, (size_t)sh.M * 2, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(h1.data(), Y1, (size_t)sh.M * 2, cudaMemcpyDeviceToHost));
    printf("%s,row0 of B=2 wide4 == B=1 upstream: %s\n", sh.name, memcmp(h0.data(), h1.data(), sh.M * 2) == 0 ? "yes" : "NO");
    for (auto a : As) cudaFree(a);
    cudaFree(X); cudaFree(Y0); cudaFree(Y1);
  }
  return 0;
}
