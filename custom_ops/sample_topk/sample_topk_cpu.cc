// CPU kernel of SampleTopKTopP and the provider-independent attribute checks.
// The candidates come from the FusedSoftmaxTopK CPU kernel (one pass over each row);
// the draw over the k candidates is sample_math.h.
#include <cmath>
#include <string>
#include <vector>

#include "sample_topk/sample_math.h"
#include "sample_topk/sample_topk.h"

namespace toolkit::sample_topk {

OrtStatus* ReadAttributes(const OrtKernelInfo* info, Attributes* attrs) {
  const OrtApi& api = Ort::GetApi();
  if (OrtStatus* st = softmax_topk::ReadAttributes(info, &attrs->topk)) {
    // The message names FusedSoftmaxTopK's attribute 'k'; say which op it is.
    const std::string msg = std::string(kOpName) + " (" + api.GetErrorMessage(st) + ")";
    api.ReleaseStatus(st);
    return MakeStatus(ORT_INVALID_ARGUMENT, msg);
  }
  attrs->topk.normalize = 0;
  attrs->topk.log_probs = 0;
  if (OrtStatus* st = ReadFloatAttribute(info, kOpName, "top_p", &attrs->top_p)) return st;
  if (OrtStatus* st = ReadFloatAttribute(info, kOpName, "min_p", &attrs->min_p)) return st;
  if (OrtStatus* st = ReadIntAttribute(info, kOpName, "seed", &attrs->seed)) return st;
  if (!(attrs->top_p > 0.0f && attrs->top_p <= 1.0f)) {
    return MakeStatus(ORT_INVALID_ARGUMENT, std::string(kOpName) + ": attribute 'top_p' must be in (0, 1], got " +
                                                std::to_string(attrs->top_p));
  }
  if (!(attrs->min_p >= 0.0f && attrs->min_p < 1.0f)) {
    return MakeStatus(ORT_INVALID_ARGUMENT, std::string(kOpName) + ": attribute 'min_p' must be in [0, 1), got " +
                                                std::to_string(attrs->min_p));
  }
  return nullptr;
}

OrtStatus* ReadSeeds(OrtKernelContext* context, const Attributes& attrs, int64_t rows, int64_t* seed,
                     const int64_t** row_seeds) {
  Ort::KernelContext ctx(context);
  *seed = attrs.seed;
  *row_seeds = nullptr;
  if (ctx.GetInputCount() < 2) return nullptr;
  Ort::ConstValue value = ctx.GetInput(1);
  if (!value) return nullptr;  // optional input left empty
  const auto info = value.GetTensorTypeAndShapeInfo();
  const int64_t n = int64_t(info.GetElementCount());
  if (n == 1) {
    *seed = *value.GetTensorData<int64_t>();
  } else if (n == rows) {
    *row_seeds = value.GetTensorData<int64_t>();
  } else {
    return InvalidInputStatus(kOpName, "seed", info.GetShape(),
                              "one int64 element (the call's stream) or one per row of logits (" +
                                  std::to_string(rows) + ")");
  }
  return nullptr;
}

OrtStatus* ComputeCpu(const Attributes& attrs, OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Ort::KernelContext ctx(context);
    Ort::ConstValue input = ctx.GetInput(0);
    const auto info = input.GetTensorTypeAndShapeInfo();
    softmax_topk::Io io;
    io.shape = info.GetShape();
    if (OrtStatus* st = softmax_topk::CheckInput(io.shape, attrs.topk, &io.rows, &io.V, kOpName)) {
      return st;
    }
    int64_t seed = 0;
    const int64_t* row_seeds = nullptr;
    if (OrtStatus* st = ReadSeeds(context, attrs, io.rows, &seed, &row_seeds)) return st;
    const std::vector<int64_t> out_shape(io.shape.begin(), io.shape.end() - 1);
    int64_t* token_ids = ctx.GetOutput(0, out_shape).GetTensorMutableData<int64_t>();
    float* token_probs = OptionalFloatOutput(context, 1, out_shape);
    if (io.rows == 0) return nullptr;

    const int64_t k = attrs.topk.k;
    io.fp16 = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    io.logits = input.GetTensorRawData();
    std::vector<float> probs(size_t(io.rows * k));
    std::vector<uint16_t> probs16(io.fp16 ? size_t(io.rows * k) : 0);
    std::vector<int64_t> ids(size_t(io.rows * k));
    io.values = io.fp16 ? static_cast<void*>(probs16.data()) : static_cast<void*>(probs.data());
    io.indices = ids.data();
    if (OrtStatus* st = softmax_topk::RunCpu(context, io, attrs.topk)) return st;
    if (io.fp16) {
      for (size_t i = 0; i < probs16.size(); ++i) probs[i] = Ort::Float16_t::FromBits(probs16[i]).ToFloat();
    }
    for (int64_t r = 0; r < io.rows; ++r) {
      const float* p = probs.data() + r * k;
      const int64_t j = SamplePosition([p](int64_t i) { return double(p[i]); }, k, attrs.top_p, attrs.min_p,
                                       RowUniform(seed, row_seeds, r));
      token_ids[r] = ids[size_t(r * k + j)];
      if (token_probs) token_probs[r] = p[j];
    }
    return nullptr;
  });
}

}  // namespace toolkit::sample_topk
