// CUDA execution-provider glue of QuantKVAttention: the checks and output
// allocation of Prepare (shared with the CPU kernel), then the kernels of
// kv_attention.cu on ORT's compute stream. Compiled by the host compiler.
#include <string>

#include "kv_attention/kv_attention.cuh"
#include "kv_attention/kv_attention.h"

namespace toolkit::kv_attention {

OrtStatus* ComputeCuda(const Attributes& attrs, OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Io io;
    if (OrtStatus* st = Prepare(context, attrs, &io)) return st;
    Ort::KernelContext ctx(context);
    const int err = LaunchCuda(io, attrs, ctx.GetGPUComputeStream());
    if (err != 0) {
      return MakeStatus(ORT_RUNTIME_EXCEPTION,
                        std::string(kOpName) + ": CUDA kernel failed for input 'query' of shape " +
                            ShapeToString({io.B, io.Hq, io.S, io.D}) + " with " + std::to_string(io.Hkv) +
                            " KV heads, " + std::to_string(io.N) + " quantized + " + std::to_string(io.r) +
                            " residual past tokens (bits=" + std::to_string(attrs.bits) + "): " +
                            CudaErrorString(err));
    }
    return nullptr;
  });
}

}  // namespace toolkit::kv_attention
