// Host-side interface of the QuantKVAttention CUDA kernels (kv_attention.cu).
// Plain C++: included from kv_attention_cuda.cc, which is compiled without nvcc.
#pragma once

#include <cstdint>

#include "kv_attention/kv_attention.h"

namespace toolkit::kv_attention {

// Runs the whole op on `stream` (a cudaStream_t): attention into io.out and the
// present cache into io.p_*. Every pointer of `io` is a device pointer; `io` is
// as filled by Prepare (shapes, F, scale). Scratch for the flash-decoding partials
// is stream-ordered (cudaMallocAsync). Returns a cudaError_t value (0 = success);
// shapes the kernels cannot run (head_dim too large for shared memory) return
// cudaErrorInvalidValue (1).
int LaunchCuda(const Io& io, const Attributes& attrs, void* stream);

// Name of a cudaError_t, for status messages.
const char* CudaErrorString(int code);

}  // namespace toolkit::kv_attention

// C entry point for ctypes / torch harnesses (all pointers are device pointers).
//   dims:    B, Hq, Hkv, S, D, N, r, bias_batch (0: no bias, 1: broadcast, B)
//   attrs:   bits, key_per_channel, key_group, value_group, residual, symmetric,
//            quantize_query
//   scale:   0 = 1/sqrt(D)
//   inputs:  the 12 inputs in op order (absent optional ones null)
//   outputs: the 9 outputs in op order (present zeros null when symmetric), sized
//            for N + F quantized and r + S - F residual tokens.
// Returns a cudaError_t code.
extern "C" int toolkit_quant_kv_attention_cuda(const int64_t* dims, const int64_t* attrs, float scale,
                                               const void* const* inputs, void* const* outputs, void* stream);

// The same with the fixed-capacity cache: dims has two more entries, Nc and Rc (the
// token dimensions of the past and present quantized / residual tensors, which have
// the same shapes), N and r are the cache lengths, and outputs has a tenth entry, the
// int64 [2] present lengths. A present may share its past's buffer (in place).
extern "C" int toolkit_quant_kv_attention_cuda_capacity(const int64_t* dims, const int64_t* attrs, float scale,
                                                        const void* const* inputs, void* const* outputs,
                                                        void* stream);
