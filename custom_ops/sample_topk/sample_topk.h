// SampleTopKTopP (domain com.toolkit, since_version 1): the whole sampling head of a
// decode step in one op — the one-pass softmax–top-k of FusedSoftmaxTopK, then
// temperature / top-k / top-p / min-p filtering and a seeded draw.
//
//   input  0 logits       float32 | float16, shape [..., V], rank >= 1
//   input  1 seed         int64, optional: one element, the random stream of this call
//                         (a decode loop passes CallSeed(base_seed, step), sample_math.h),
//                         or one per row of logits (a server batching requests: each row
//                         its request's stream, RowUniform); default: attribute seed
//   attr   k              int, required, 1 <= k <= V: candidates (top-k)
//   attr   temperature    float, default 1.0, > 0
//   attr   top_p          float, default 1.0, in (0, 1]
//   attr   min_p          float, default 0.0, in [0, 1)
//   attr   seed           int, default 0
//   output 0 token_ids    [...] int64: the drawn token of each row
//   output 1 token_probs  [...] float32 (optional): its probability under softmax(x / T)
//
// Filtering order, transformers' (its TopK, TopP, MinP logits warpers; also vLLM's and
// llama.cpp's): top-k, then top-p (the shortest prefix, in descending order, whose
// mass reaches top_p of the top-k mass), then min-p (keep p >= min_p * p_max). (Until
// stop 22 min-p came before top-p, which keeps fewer tokens when both are set.)
// k = 1 or top_p -> 0 is greedy. Row r draws u = Uniform(seed, r) (sample_math.h), or
// Uniform(seeds[r], 0) with a seed per row,
// the same number on every provider and thread count, so for a given seed a provider
// gives the same tokens at any thread count. Across providers the candidate
// probabilities agree only to rounding (the CPU forms them in double, the CUDA kernel
// in float), so a draw or a min-p / top-p cut that lands within that rounding of a
// boundary can pick a different token.
#pragma once

#include <cstdint>
#include <vector>

#include "common/common.h"
#include "softmax_topk/softmax_topk.h"

namespace toolkit::sample_topk {

inline constexpr const char* kOpName = "SampleTopKTopP";

struct Attributes {
  softmax_topk::Attributes topk;  // k, temperature (normalize = log_probs = 0)
  float top_p = 1.0f;
  float min_p = 0.0f;
  int64_t seed = 0;
};

OrtStatus* ReadAttributes(const OrtKernelInfo* info, Attributes* attrs);

// The seeds of this call: input 1 when given (one int64 element: *seed; or one per row
// of the `rows` rows: *row_seeds points at them, in host memory), else the attribute.
OrtStatus* ReadSeeds(OrtKernelContext* context, const Attributes& attrs, int64_t rows, int64_t* seed,
                     const int64_t** row_seeds);

// The provider kernels: compute functions (CPU in the _cpu.cc, CUDA in the _cuda.cc).
OrtStatus* ComputeCpu(const Attributes& attrs, OrtKernelContext* context);
#ifdef TOOLKIT_WITH_CUDA
OrtStatus* ComputeCuda(const Attributes& attrs, OrtKernelContext* context);
#endif

struct Op : OpBase<Op, Attributes> {
  Op(Provider provider, ONNXTensorElementDataType dtype)
      : OpBase(kOpName, provider, &ReadAttributes, &ComputeCpu, TOOLKIT_CUDA_COMPUTE(&ComputeCuda)), dtype_(dtype) {}

  size_t GetInputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 0 ? dtype_ : ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  // The seed is read on the host by every provider.
  OrtMemType GetInputMemoryType(size_t index) const {
    return index == 1 ? OrtMemTypeCPUInput : OrtMemTypeDefault;
  }
  size_t GetOutputTypeCount() const { return 2; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return index == 0 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 1 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

 private:
  ONNXTensorElementDataType dtype_;
};

}  // namespace toolkit::sample_topk
