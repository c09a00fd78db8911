// Host-side interface of the LowRankMatMul CUDA kernels (lowrank_matmul.cu).
#pragma once

#include <cstdint>

namespace toolkit::lowrank_matmul {

// y [M, N] = (x [M, K] · U [K, r]) · V [r, N] (+ bias [N]) on `stream`: two tiled
// GEMMs through a stream-ordered [M, r] float32 scratch. U and V are float32 or
// float16 (`weights_fp16`); bias may be null. Returns a cudaError_t value (0 = success).
int LaunchCuda(const float* x, const void* U, const void* V, const float* bias, bool weights_fp16, int64_t M,
               int64_t K, int64_t r, int64_t N, float* y, void* stream);

const char* CudaErrorString(int code);

}  // namespace toolkit::lowrank_matmul

// C entry point for ctypes / torch harnesses (device pointers; bias may be null).
extern "C" int toolkit_lowrank_matmul_cuda(const float* x, const void* U, const void* V, const float* bias,
                                           int weights_fp16, int64_t M, int64_t K, int64_t r, int64_t N, float* y,
                                           void* stream);
