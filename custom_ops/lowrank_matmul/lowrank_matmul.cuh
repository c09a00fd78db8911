// Host-side interface of the LowRankMatMul CUDA kernels (lowrank_matmul.cu).
#pragma once

#include <cstdint>

namespace toolkit::lowrank_matmul {

enum class WeightType { kFloat32, kFloat16, kInt8 };

// y [M, N] = (x [M, K] · U [K, r]) · V [r, N] (+ bias [N]) on `stream`: two tiled
// GEMMs through a stream-ordered [M, r] float32 scratch. U and V are float32,
// float16 or int8 (`type`); int8 needs the column scales u_scale [r] and v_scale [N]
// (null otherwise), applied to each chain's sum as on the CPU. bias may be null.
// Returns a cudaError_t value (0 = success).
int LaunchCuda(const float* x, const void* U, const void* V, const float* bias, WeightType type,
               const float* u_scale, const float* v_scale, int64_t M, int64_t K, int64_t r, int64_t N, float* y,
               void* stream);

const char* CudaErrorString(int code);

}  // namespace toolkit::lowrank_matmul

// C entry point for ctypes / torch harnesses (device pointers; bias may be null).
extern "C" int toolkit_lowrank_matmul_cuda(const float* x, const void* U, const void* V, const float* bias,
                                           int weights_fp16, int64_t M, int64_t K, int64_t r, int64_t N, float* y,
                                           void* stream);
// The same with int8 weights and their column scales.
extern "C" int toolkit_lowrank_matmul_cuda_int8(const float* x, const int8_t* U, const int8_t* V,
                                                const float* u_scale, const float* v_scale, const float* bias,
                                                int64_t M, int64_t K, int64_t r, int64_t N, float* y, void* stream);
