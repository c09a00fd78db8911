// CUDA kernels of SampleTopKTopP: candidates from the FusedSoftmaxTopK kernels, then
// the draw of sample_math.h, one thread per row (k is small next to V).
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "sample_topk/sample_math.h"
#include "sample_topk/sample_topk.cuh"
#include "softmax_topk/softmax_topk.cuh"

namespace toolkit::sample_topk {
namespace {

template <typename T>
__device__ __forceinline__ double ToDouble(T v);
template <>
__device__ __forceinline__ double ToDouble<float>(float v) { return double(v); }
template <>
__device__ __forceinline__ double ToDouble<__half>(__half v) { return double(__half2float(v)); }

template <typename T>
__global__ void DrawKernel(const T* __restrict__ probs, const int64_t* __restrict__ ids, int64_t rows, int64_t k,
                           double top_p, double min_p, int64_t seed, const int64_t* __restrict__ row_seeds,
                           int64_t* __restrict__ token_ids, float* __restrict__ token_probs) {
  const int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= rows) return;
  const T* p = probs + r * k;
  const int64_t j = SamplePosition([p](int64_t i) { return ToDouble<T>(p[i]); }, k, top_p, min_p,
                                   RowUniform(seed, row_seeds, r));
  token_ids[r] = ids[r * k + j];
  if (token_probs) token_probs[r] = float(ToDouble<T>(p[j]));
}

}  // namespace

int LaunchSampleCuda(const void* logits, bool is_fp16, int64_t rows, int64_t V, int64_t k, float temperature,
                     float top_p, float min_p, int64_t seed, const int64_t* row_seeds, int64_t* token_ids,
                     float* token_probs, void* stream) {
  if (rows == 0) return 0;
  if (rows < 0 || k < 1 || k > V) return int(cudaErrorInvalidValue);
  auto s = static_cast<cudaStream_t>(stream);
  const size_t value_bytes = size_t(rows * k) * (is_fp16 ? sizeof(__half) : sizeof(float));
  const size_t seed_bytes = row_seeds ? size_t(rows) * sizeof(int64_t) : 0;
  void* scratch = nullptr;
  cudaError_t err = cudaMallocAsync(&scratch, seed_bytes + size_t(rows * k) * sizeof(int64_t) + value_bytes, s);
  if (err != cudaSuccess) return int(err);
  // int64 seeds and indices first (8-byte aligned), values after them.
  auto* seeds = row_seeds ? static_cast<int64_t*>(scratch) : nullptr;
  auto* ids = static_cast<int64_t*>(scratch) + (row_seeds ? rows : 0);
  void* probs = static_cast<char*>(scratch) + seed_bytes + size_t(rows * k) * sizeof(int64_t);
  int rc = 0;
  if (seeds) {  // (from pageable memory: staged before the call returns)
    rc = int(cudaMemcpyAsync(seeds, row_seeds, seed_bytes, cudaMemcpyHostToDevice, s));
  }
  if (rc == 0) {
    rc = softmax_topk::LaunchCuda(logits, is_fp16, rows, V, k, temperature, 0, 0, probs, ids, nullptr, stream);
  }
  if (rc == 0) {
    const int threads = 128;
    const unsigned blocks = unsigned((rows + threads - 1) / threads);
    if (is_fp16) {
      DrawKernel<__half><<<blocks, threads, 0, s>>>(static_cast<const __half*>(probs), ids, rows, k, top_p, min_p,
                                                    seed, seeds, token_ids, token_probs);
    } else {
      DrawKernel<float><<<blocks, threads, 0, s>>>(static_cast<const float*>(probs), ids, rows, k, top_p, min_p,
                                                   seed, seeds, token_ids, token_probs);
    }
    rc = int(cudaGetLastError());
  }
  const cudaError_t free_err = cudaFreeAsync(scratch, s);
  return rc != 0 ? rc : int(free_err);
}

}  // namespace toolkit::sample_topk

extern "C" __attribute__((visibility("default"))) int toolkit_sample_topk_cuda(
    const void* logits, int is_fp16, int64_t rows, int64_t V, int64_t k, float temperature, float top_p, float min_p,
    int64_t seed, const int64_t* row_seeds, int64_t* token_ids, float* token_probs, void* stream) {
  return toolkit::sample_topk::LaunchSampleCuda(logits, is_fp16 != 0, rows, V, k, temperature, top_p, min_p, seed,
                                                row_seeds, token_ids, token_probs, stream);
}
