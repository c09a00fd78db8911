// CUDA execution-provider glue of FusedSoftmaxTopK: shape checks and output
// allocation through ORT, kernels launched on ORT's compute stream. Compiled by the
// host compiler; the kernels are in softmax_topk.cu.
#include <string>
#include <vector>

#include "softmax_topk/softmax_topk.cuh"
#include "softmax_topk/softmax_topk.h"

namespace toolkit::softmax_topk {

OrtStatus* ComputeCuda(const Attributes& attrs, OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Io io;
    if (OrtStatus* st = PrepareIo(context, attrs, &io)) return st;
    if (io.rows == 0) return nullptr;
    Ort::KernelContext ctx(context);
    const int err = LaunchCuda(io.logits, io.fp16, io.rows, io.V, attrs.k, attrs.temperature, int(attrs.normalize),
                               int(attrs.log_probs), io.values, io.indices, io.log_norm, ctx.GetGPUComputeStream());
    if (err != 0) {
      return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(kOpName) + ": CUDA kernel failed for input '" +
                                                   kInputName + "' of shape " + ShapeToString(io.shape) + ": " +
                                                   CudaErrorString(err));
    }
    return nullptr;
  });
}

}  // namespace toolkit::softmax_topk
