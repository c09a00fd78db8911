// CUDA execution-provider glue of LowRankMatMul: shape checks and output
// allocation through ORT, kernels launched on ORT's compute stream. Compiled by the
// host compiler; the kernels are in lowrank_matmul.cu.
#include <string>

#include "lowrank_matmul/lowrank_matmul.cuh"
#include "lowrank_matmul/lowrank_matmul.h"

namespace toolkit::lowrank_matmul {

OrtStatus* ComputeCuda(const Attributes& /*attrs*/, OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Io io;
    if (OrtStatus* st = PrepareIo(context, &io)) return st;
    if (io.M == 0) return nullptr;
    Ort::KernelContext ctx(context);
    const WeightType type = io.int8 ? WeightType::kInt8 : io.fp16 ? WeightType::kFloat16 : WeightType::kFloat32;
    const int err = LaunchCuda(io.x, io.U, io.V, io.bias, type, io.u_scale, io.v_scale, io.M, io.K, io.r, io.N,
                               io.y, ctx.GetGPUComputeStream());
    if (err != 0) {
      return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(kOpName) + ": CUDA kernel failed for input 'x' of shape " +
                                                   ShapeToString(io.x_shape) + " (r = " + std::to_string(io.r) +
                                                   ", N = " + std::to_string(io.N) + "): " + CudaErrorString(err));
    }
    return nullptr;
  });
}

}  // namespace toolkit::lowrank_matmul
