// FusedSoftmaxTopK (domain com.toolkit, since_version 1): softmax (or log-softmax)
// over the last axis fused with TopK, in one read of the logits.
//
//   input  0 logits          float32 | float16, shape [..., V], rank >= 1, V >= 1
//   attr   k                 int, required, 1 <= k <= V
//   attr   temperature       float, default 1.0, > 0: probabilities are softmax(x / T)
//   attr   normalize         int, default 0
//            0: probabilities over the full row, i.e. exactly
//               Softmax(axis=-1) -> TopK(k, axis=-1, largest=1, sorted=1)
//            1: renormalised over the kept k (MoE router form), i.e.
//               TopK(logits) -> Softmax of the k values
//   attr   log_probs         int, default 0: 1 = log-probabilities
//               (LogSoftmax -> TopK, resp. TopK -> LogSoftmax)
//   output 0 values          [..., k], input dtype, descending
//   output 1 indices         [..., k], int64
//   output 2 log_normalizer  [...] float32 (optional) = m + log(sum exp(x/T - m)) over
//                            the whole row, m = max(x/T)
//
// Order: descending by probability, equal logits go to the LOWER index first.
// Ranking is done on the exact logits (exp is monotone): where ONNX Runtime's
// rounded float probabilities tie although the logits differ (underflow to 0,
// fp16 rounding), ORT orders by index and we order by logit; both are a valid
// TopK of the probability tensor.
//
// Non-finite rows, measured on ONNX Runtime 1.32 CPU (fp32 and fp16) and replicated:
//   normalize = 0 (Softmax -> TopK, LogSoftmax -> TopK): a row that contains a NaN or
//     a +inf, or whose entries are all -inf, has an all-NaN probability row, and TopK
//     of an all-NaN row returns indices 0, 1, ..., k-1 with NaN values. Entries equal
//     to -inf in an otherwise finite row get probability 0 (log-probability -inf) and
//     rank last, lower index first.
//   normalize = 1 (TopK -> Softmax): ORT's TopK orders NaN above +inf above every
//     finite value above -inf (NaNs among themselves by index). The indices follow
//     that order; the values are all NaN when the row holds a NaN or a +inf, or is all
//     -inf (softmax of the kept values is then NaN everywhere).
//   log_normalizer: NaN if the row holds a NaN, else +inf if it holds a +inf, else
//     -inf if it is all -inf.
#pragma once

#include <cstdint>
#include <vector>

#include "common/common.h"

namespace toolkit::softmax_topk {

inline constexpr const char* kOpName = "FusedSoftmaxTopK";
inline constexpr const char* kInputName = "logits";

struct Attributes {
  int64_t k = 0;
  float temperature = 1.0f;
  int64_t normalize = 0;
  int64_t log_probs = 0;
};

// Reads and checks the attributes that do not depend on the input shape.
OrtStatus* ReadAttributes(const OrtKernelInfo* info, Attributes* attrs);

// Checks the input shape against the attributes; on success sets rows (product of
// the leading dims) and V (the last dim).
// `op` names the operator in the error (SampleTopKTopP shares these checks).
OrtStatus* CheckInput(const std::vector<int64_t>& shape, const Attributes& attrs, int64_t* rows, int64_t* V,
                      const char* op = kOpName);

// The tensors of one call, checked and with outputs allocated by ORT; the same for
// every provider (pointers are host or device memory as the provider's allocator gives).
struct Io {
  std::vector<int64_t> shape;  // of the input
  int64_t rows = 0, V = 0;
  bool fp16 = false;
  const void* logits = nullptr;
  void* values = nullptr;
  int64_t* indices = nullptr;
  float* log_norm = nullptr;   // null when the optional output is not requested
};

// Checks the input against the attributes and allocates the outputs.
OrtStatus* PrepareIo(OrtKernelContext* context, const Attributes& attrs, Io* io);

// The CPU kernel on host buffers described by `io` (values in the input dtype:
// float, or IEEE half bits); threads come from the context's intra-op pool.
// SampleTopKTopP builds on it.
OrtStatus* RunCpu(OrtKernelContext* context, const Io& io, const Attributes& attrs);

// The provider kernels: compute functions (CPU in the _cpu.cc, CUDA in the _cuda.cc).
OrtStatus* ComputeCpu(const Attributes& attrs, OrtKernelContext* context);
#ifdef TOOLKIT_WITH_CUDA
OrtStatus* ComputeCuda(const Attributes& attrs, OrtKernelContext* context);
#endif

// One OrtCustomOp per (provider, dtype); all share the name and the domain.
struct Op : OpBase<Op, Attributes> {
  Op(Provider provider, ONNXTensorElementDataType dtype)
      : OpBase(kOpName, provider, &ReadAttributes, &ComputeCpu, TOOLKIT_CUDA_COMPUTE(&ComputeCuda)), dtype_(dtype) {}

  size_t GetInputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetInputType(size_t) const { return dtype_; }
  size_t GetOutputTypeCount() const { return 3; }
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    if (index == 0) return dtype_;
    if (index == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
    return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return index == 2 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

 private:
  ONNXTensorElementDataType dtype_;
};

}  // namespace toolkit::softmax_topk
