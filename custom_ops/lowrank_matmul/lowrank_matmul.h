// LowRankMatMul (domain com.toolkit, since_version 1): a factored linear layer
// y = (x · U) · V (+ bias) in one kernel (the rank-r intermediate x·U never leaves it).
//
//   input  0 x        float32, shape [..., K], rank >= 1
//   input  1 U        float32 | float16 | int8, shape [K, r], r >= 1 (a constant weight)
//   input  2 V        same type as U, shape [r, N], N >= 1
//   input  3 bias     float32, optional, shape [N]
//   input  4 U_scale  float32 [r]: int8 U only (required there, absent otherwise)
//   input  5 V_scale  float32 [N]: int8 V only
//   output 0 y        float32, shape [..., N]
//
// int8 weights are symmetric per output column: U[k, j] ~ U_scale[j] * U_q[k, j],
// codes in [-127, 127] (toolkit/ops/reference.py: quantize_columns).
//
// Numerics: float16 and int8 weights are widened to float32 exactly; every output
// element (and every element of the intermediate t = x·U, which is rounded to
// float32) is a fused multiply-add chain over the reduction axis in ascending
// order, starting at 0, then (int8) multiplied by its column's scale; the bias is
// added last. The CPU result therefore does not depend on the thread count, the
// row blocking or the SIMD path (AVX2 or scalar std::fma). The CUDA kernels keep
// the same order (one fmaf chain per element, then the scale, then the bias) for
// float32, float16 and int8 weights.
//
// This is the operator the `low-rank` pass (passes/low_rank.py) writes for a
// MatMul(+Add) whose weight W [K, N] it factored as W ~ U · V by truncated SVD.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "common/common.h"

namespace toolkit::lowrank_matmul {

inline constexpr const char* kOpName = "LowRankMatMul";

// A weight [rows, cols] repacked for the CPU kernel: panels of kPanel columns,
// [ceil(cols / kPanel)][rows][kPanel], the last panel zero-padded. Reading one panel
// is one contiguous stream, and a slice of kKC rows of it (16 KiB) stays in L1 while
// the register tiles of several rows use it.
inline constexpr int kPanel = 16;
struct PackedWeight {
  int64_t rows = 0, cols = 0;
  std::vector<float> f32;      // float32 weights
  std::vector<uint16_t> f16;   // float16 weights (kept as float16: widened on load)
  std::vector<int8_t> i8;      // int8 codes
};

// No ONNX attributes. On the CPU, a U or V that is a constant initializer is packed
// once when the kernel is created (ORT's KernelInfoGetConstantInput_tensor) and kept
// here (the packed copy costs the weight's size again); other weights are packed on
// every call.
struct Attributes {
  std::shared_ptr<const PackedWeight> U, V;
};

// Kernel creation on the CPU: packs constant U / V.
OrtStatus* ReadCpu(const OrtKernelInfo* info, Attributes* attrs);

// Shapes of one call, checked.
struct Io {
  std::vector<int64_t> x_shape;
  int64_t M = 0, K = 0, r = 0, N = 0;  // M = product of x's leading axes
  bool fp16 = false;                    // dtype of U and V
  bool int8 = false;
  const float* x = nullptr;
  const void* U = nullptr;
  const void* V = nullptr;
  const float* bias = nullptr;  // null when absent
  const float* u_scale = nullptr;  // int8 only
  const float* v_scale = nullptr;
  float* y = nullptr;
};

// Checks x [..., K], U [K, r], V [r, N], bias [N]; each failure names the input,
// its shape and the expectation.
OrtStatus* CheckShapes(const std::vector<int64_t>& x, const std::vector<int64_t>& U, const std::vector<int64_t>& V,
                       const std::vector<int64_t>* bias, int64_t* M, int64_t* K, int64_t* r, int64_t* N);

// Reads and checks the inputs and allocates the output (provider independent).
OrtStatus* PrepareIo(OrtKernelContext* context, Io* io);

// The provider kernels: compute functions (CPU in the _cpu.cc, CUDA in the _cuda.cc).
OrtStatus* ComputeCpu(const Attributes& attrs, OrtKernelContext* context);
#ifdef TOOLKIT_WITH_CUDA
OrtStatus* ComputeCuda(const Attributes& attrs, OrtKernelContext* context);
#endif

struct Op : OpBase<Op, Attributes> {
  // `weight_dtype`: the element type of U and V (x, bias and y are float32).
  Op(Provider provider, ONNXTensorElementDataType weight_dtype)
      : OpBase(kOpName, provider, provider == Provider::kCpu ? &ReadCpu : nullptr, &ComputeCpu,
               TOOLKIT_CUDA_COMPUTE(&ComputeCuda)),
        dtype_(weight_dtype) {}

  size_t GetInputTypeCount() const { return 6; }
  ONNXTensorElementDataType GetInputType(size_t index) const {
    return index == 1 || index == 2 ? dtype_ : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
  }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return index >= 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  size_t GetOutputTypeCount() const { return 1; }
  ONNXTensorElementDataType GetOutputType(size_t) const { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; }

 private:
  ONNXTensorElementDataType dtype_;
};

}  // namespace toolkit::lowrank_matmul
