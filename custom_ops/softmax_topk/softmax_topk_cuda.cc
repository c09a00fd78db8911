// CUDA execution-provider glue of FusedSoftmaxTopK: shape checks and output
// allocation through ORT, kernels launched on ORT's compute stream. Compiled by the
// host compiler; the kernels are in softmax_topk.cu.
#include <string>
#include <vector>

#include "softmax_topk/softmax_topk.cuh"
#include "softmax_topk/softmax_topk.h"

namespace toolkit::softmax_topk {

OrtStatus* CudaKernel::ComputeV2(OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Ort::KernelContext ctx(context);
    Ort::ConstValue input = ctx.GetInput(0);
    const auto info = input.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = info.GetShape();
    int64_t rows = 0, V = 0;
    if (OrtStatus* st = CheckInput(shape, attrs, &rows, &V)) return st;

    std::vector<int64_t> out_shape = shape;
    out_shape.back() = attrs.k;
    auto values = ctx.GetOutput(0, out_shape);
    auto indices = ctx.GetOutput(1, out_shape);
    float* log_norm = nullptr;
    if (ctx.GetOutputCount() > 2) {
      const std::vector<int64_t> norm_shape(shape.begin(), shape.end() - 1);
      OrtValue* out = nullptr;
      Ort::ThrowOnError(
          Ort::GetApi().KernelContext_GetOutput(context, 2, norm_shape.data(), norm_shape.size(), &out));
      if (out) Ort::ThrowOnError(Ort::GetApi().GetTensorMutableData(out, reinterpret_cast<void**>(&log_norm)));
    }
    if (rows == 0) return nullptr;

    const bool fp16 = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const int err = LaunchCuda(input.GetTensorRawData(), fp16, rows, V, attrs.k, attrs.temperature,
                               int(attrs.normalize), int(attrs.log_probs), values.GetTensorMutableRawData(),
                               indices.GetTensorMutableData<int64_t>(), log_norm, ctx.GetGPUComputeStream());
    if (err != 0) {
      return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(kOpName) + ": CUDA kernel failed for input '" +
                                                   kInputName + "' of shape " + ShapeToString(shape) + ": " +
                                                   CudaErrorString(err));
    }
    return nullptr;
  });
}

}  // namespace toolkit::softmax_topk
