// CUDA execution-provider glue of SampleTopKTopP: checks, outputs allocated by ORT,
// kernels on ORT's compute stream. Compiled by the host compiler.
#include <string>
#include <vector>

#include "sample_topk/sample_topk.cuh"
#include "sample_topk/sample_topk.h"
#include "softmax_topk/softmax_topk.cuh"

namespace toolkit::sample_topk {

OrtStatus* ComputeCuda(const Attributes& attrs, OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Ort::KernelContext ctx(context);
    Ort::ConstValue input = ctx.GetInput(0);
    const auto info = input.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = info.GetShape();
    int64_t rows = 0, V = 0;
    if (OrtStatus* st = softmax_topk::CheckInput(shape, attrs.topk, &rows, &V, kOpName)) return st;
    int64_t seed = 0;
    const int64_t* row_seeds = nullptr;  // host memory: the launch copies them to the device
    if (OrtStatus* st = ReadSeeds(context, attrs, rows, &seed, &row_seeds)) return st;
    const std::vector<int64_t> out_shape(shape.begin(), shape.end() - 1);
    int64_t* token_ids = ctx.GetOutput(0, out_shape).GetTensorMutableData<int64_t>();
    float* token_probs = OptionalFloatOutput(context, 1, out_shape);
    const bool fp16 = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
    const int err = LaunchSampleCuda(input.GetTensorRawData(), fp16, rows, V, attrs.topk.k, attrs.topk.temperature,
                                     attrs.top_p, attrs.min_p, seed, row_seeds, token_ids, token_probs,
                                     ctx.GetGPUComputeStream());
    if (err != 0) {
      return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(kOpName) + ": CUDA kernel failed for input 'logits' of "
                                                   "shape " + ShapeToString(shape) + ": " +
                                                   softmax_topk::CudaErrorString(err));
    }
    return nullptr;
  });
}

}  // namespace toolkit::sample_topk
