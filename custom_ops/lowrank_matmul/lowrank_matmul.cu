// CUDA kernels of LowRankMatMul: a shared-memory tiled GEMM (16x16 output tile per
// block, one fused multiply-add chain per element in ascending k, like the CPU
// kernel, then the int8 column scale, then the bias) run twice, x·U into a
// stream-ordered scratch t, then t·V (+ bias). The
// intermediate goes through global memory (it stays in L2 for decode-sized M);
// correctness first, not tuned.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lowrank_matmul/lowrank_matmul.cuh"

namespace toolkit::lowrank_matmul {
namespace {

constexpr int kTile = 16;

__device__ __forceinline__ float Widen(float w) { return w; }
__device__ __forceinline__ float Widen(__half w) { return __half2float(w); }
__device__ __forceinline__ float Widen(int8_t w) { return float(w); }

// C [M, N] = (A [M, K] · B [K, N]) * scale [N] (+ bias); scale (int8 B) and bias may
// be null. Grid-stride over row tiles so any M fits.
template <typename W>
__global__ void GemmKernel(const float* __restrict__ A, const W* __restrict__ B, const float* __restrict__ scale,
                           const float* __restrict__ bias, float* __restrict__ C, int64_t M, int64_t K, int64_t N) {
  __shared__ float As[kTile][kTile];
  __shared__ float Bs[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t col = int64_t(blockIdx.x) * kTile + tx;
  for (int64_t row0 = int64_t(blockIdx.y) * kTile; row0 < M; row0 += int64_t(gridDim.y) * kTile) {
    const int64_t row = row0 + ty;
    float acc = 0.0f;
    for (int64_t k0 = 0; k0 < K; k0 += kTile) {
      As[ty][tx] = (row < M && k0 + tx < K) ? A[row * K + k0 + tx] : 0.0f;
      Bs[ty][tx] = (k0 + ty < K && col < N) ? Widen(B[(k0 + ty) * N + col]) : 0.0f;
      __syncthreads();
      const int kk_end = int(K - k0 < kTile ? K - k0 : kTile);
      for (int kk = 0; kk < kk_end; ++kk) acc = fmaf(As[ty][kk], Bs[kk][tx], acc);
      __syncthreads();
    }
    if (row < M && col < N) {
      // Rounded multiply, then rounded add, as the CPU kernel: the _rn intrinsics keep
      // nvcc from contracting them into one FMA.
      if (scale) acc = __fmul_rn(acc, scale[col]);
      C[row * N + col] = bias ? __fadd_rn(acc, bias[col]) : acc;
    }
  }
}

template <typename W>
cudaError_t Gemm(const float* A, const W* B, const float* scale, const float* bias, float* C, int64_t M, int64_t K,
                 int64_t N, cudaStream_t s) {
  const int64_t col_tiles = (N + kTile - 1) / kTile;
  const int64_t row_tiles = (M + kTile - 1) / kTile;
  if (col_tiles > INT32_MAX) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(col_tiles), unsigned(row_tiles < 65535 ? row_tiles : 65535));
  GemmKernel<W><<<grid, dim3(kTile, kTile), 0, s>>>(A, B, scale, bias, C, M, K, N);
  return cudaGetLastError();
}

template <typename W>
int Run(const float* x, const W* U, const W* V, const float* u_scale, const float* v_scale, const float* bias,
        int64_t M, int64_t K, int64_t r, int64_t N, float* y, cudaStream_t s) {
  float* t = nullptr;
  cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&t), size_t(M * r) * sizeof(float), s);
  if (err != cudaSuccess) return int(err);
  err = Gemm<W>(x, U, u_scale, nullptr, t, M, K, r, s);
  if (err == cudaSuccess) err = Gemm<W>(t, V, v_scale, bias, y, M, r, N, s);
  const cudaError_t free_err = cudaFreeAsync(t, s);
  return int(err != cudaSuccess ? err : free_err);
}

}  // namespace

const char* CudaErrorString(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int LaunchCuda(const float* x, const void* U, const void* V, const float* bias, WeightType type,
               const float* u_scale, const float* v_scale, int64_t M, int64_t K, int64_t r, int64_t N, float* y,
               void* stream) {
  if (M < 0 || K < 1 || r < 1 || N < 1) return int(cudaErrorInvalidValue);
  if (type == WeightType::kInt8 && (u_scale == nullptr || v_scale == nullptr)) return int(cudaErrorInvalidValue);
  if (M == 0) return int(cudaSuccess);
  auto s = static_cast<cudaStream_t>(stream);
  switch (type) {
    case WeightType::kFloat16:
      return Run<__half>(x, static_cast<const __half*>(U), static_cast<const __half*>(V), nullptr, nullptr, bias, M,
                         K, r, N, y, s);
    case WeightType::kInt8:
      return Run<int8_t>(x, static_cast<const int8_t*>(U), static_cast<const int8_t*>(V), u_scale, v_scale, bias, M,
                         K, r, N, y, s);
    default:
      return Run<float>(x, static_cast<const float*>(U), static_cast<const float*>(V), nullptr, nullptr, bias, M, K,
                        r, N, y, s);
  }
}

}  // namespace toolkit::lowrank_matmul

extern "C" __attribute__((visibility("default"))) int toolkit_lowrank_matmul_cuda(
    const float* x, const void* U, const void* V, const float* bias, int weights_fp16, int64_t M, int64_t K, int64_t r,
    int64_t N, float* y, void* stream) {
  using toolkit::lowrank_matmul::WeightType;
  return toolkit::lowrank_matmul::LaunchCuda(x, U, V, bias, weights_fp16 != 0 ? WeightType::kFloat16 : WeightType::kFloat32,
                                             nullptr, nullptr, M, K, r, N, y, stream);
}

extern "C" __attribute__((visibility("default"))) int toolkit_lowrank_matmul_cuda_int8(
    const float* x, const int8_t* U, const int8_t* V, const float* u_scale, const float* v_scale, const float* bias,
    int64_t M, int64_t K, int64_t r, int64_t N, float* y, void* stream) {
  return toolkit::lowrank_matmul::LaunchCuda(x, U, V, bias, toolkit::lowrank_matmul::WeightType::kInt8, u_scale,
                                             v_scale, M, K, r, N, y, stream);
}
