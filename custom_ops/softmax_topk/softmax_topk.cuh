// Host-side interface of the FusedSoftmaxTopK CUDA kernels (softmax_topk.cu).
// Plain C++: included from .cc files that are compiled without nvcc.
#pragma once

#include <cstdint>

namespace toolkit::softmax_topk {

// Launches the kernels on `stream` (a cudaStream_t). Returns a cudaError_t value
// (0 = success); argument errors return cudaErrorInvalidValue (1).
int LaunchCuda(const void* logits, bool is_fp16, int64_t rows, int64_t V, int64_t k, float temperature,
               int normalize, int log_probs, void* values, int64_t* indices, float* log_norm, void* stream);

// Name of a cudaError_t, for status messages.
const char* CudaErrorString(int code);

}  // namespace toolkit::softmax_topk

// C entry point for ctypes / torch harnesses (all pointers are device pointers,
// log_norm may be null). Returns a cudaError_t code.
extern "C" int toolkit_softmax_topk_cuda(const void* logits, int is_fp16, int64_t rows, int64_t V, int64_t k,
                                         float temperature, int normalize, int log_probs, void* values,
                                         int64_t* indices, float* log_norm, void* stream);
