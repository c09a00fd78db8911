// Host-side interface of the SampleTopKTopP CUDA kernels (sample_topk.cu).
#pragma once

#include <cstdint>

namespace toolkit::sample_topk {

// Top-k candidates via the FusedSoftmaxTopK kernels into stream-ordered scratch,
// then one thread per row draws its token (RowUniform: row_seeds, in host memory, is
// one seed per row or null). Returns a cudaError_t value (0 = success).
int LaunchSampleCuda(const void* logits, bool is_fp16, int64_t rows, int64_t V, int64_t k, float temperature,
                     float top_p, float min_p, int64_t seed, const int64_t* row_seeds, int64_t* token_ids,
                     float* token_probs, void* stream);

}  // namespace toolkit::sample_topk

// C entry point for ctypes / torch harnesses (device pointers, but row_seeds: host
// memory, or null; token_probs may be null).
extern "C" int toolkit_sample_topk_cuda(const void* logits, int is_fp16, int64_t rows, int64_t V, int64_t k,
                                        float temperature, float top_p, float min_p, int64_t seed,
                                        const int64_t* row_seeds, int64_t* token_ids, float* token_probs,
                                        void* stream);
