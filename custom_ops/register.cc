// Entry point of libtoolkit_ops.so: RegisterCustomOps (called by ONNX Runtime's
// RegisterCustomOpsLibrary) and the toolkit_* C functions read by toolkit.ops via ctypes.
//
// One line per operator x provider x dtype below; every op is in the one domain
// toolkit::kDomain.
#include <mutex>
#include <string>
#include <vector>

#include "common/common.h"
#include "kv_attention/kv_attention.h"
#include "lowrank_matmul/lowrank_matmul.h"
#include "sample_topk/sample_topk.h"
#include "softmax_topk/softmax_topk.h"

namespace {

using toolkit::softmax_topk::Op;
using toolkit::Provider;
using SampleOp = toolkit::sample_topk::Op;
using KvOp = toolkit::kv_attention::Op;
using LowRankOp = toolkit::lowrank_matmul::Op;
constexpr auto kF32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
constexpr auto kF16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
constexpr auto kI8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;

const OrtCustomOp* const kOps[] = {
    new Op(Provider::kCpu, kF32),  // FusedSoftmaxTopK, CPU, float32
    new Op(Provider::kCpu, kF16),  // FusedSoftmaxTopK, CPU, float16
    new SampleOp(Provider::kCpu, kF32),  // SampleTopKTopP, CPU, float32
    new SampleOp(Provider::kCpu, kF16),  // SampleTopKTopP, CPU, float16
    new KvOp(Provider::kCpu),  // QuantKVAttention, CPU, float32 (uint8/float16 cache)
    new LowRankOp(Provider::kCpu, kF32),  // LowRankMatMul, CPU, float32 weights
    new LowRankOp(Provider::kCpu, kF16),  // LowRankMatMul, CPU, float16 weights
    new LowRankOp(Provider::kCpu, kI8),   // LowRankMatMul, CPU, int8 weights + column scales
#ifdef TOOLKIT_WITH_CUDA
    new Op(Provider::kCuda, kF32),  // FusedSoftmaxTopK, CUDA, float32
    new Op(Provider::kCuda, kF16),  // FusedSoftmaxTopK, CUDA, float16
    new SampleOp(Provider::kCuda, kF32),  // SampleTopKTopP, CUDA, float32
    new SampleOp(Provider::kCuda, kF16),  // SampleTopKTopP, CUDA, float16
    new LowRankOp(Provider::kCuda, kF32),  // LowRankMatMul, CUDA, float32 weights
    new LowRankOp(Provider::kCuda, kF16),  // LowRankMatMul, CUDA, float16 weights
    new LowRankOp(Provider::kCuda, kI8),   // LowRankMatMul, CUDA, int8 weights + column scales
    new KvOp(Provider::kCuda),  // QuantKVAttention, CUDA, float32
#endif
};

// Domains must outlive every session that uses them; they are deliberately never
// released (releasing them at process exit can run after ORT itself is gone).
std::mutex g_domains_mutex;
std::vector<OrtCustomOpDomain*> g_domains;

}  // namespace

TOOLKIT_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(TOOLKIT_ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* api1 = api_base->GetApi(1);
    const std::string msg = "toolkit custom-op library needs ONNX Runtime with API version >= " +
                            std::to_string(TOOLKIT_ORT_API_VERSION) + " (ORT 1." +
                            std::to_string(TOOLKIT_ORT_API_VERSION) + "); this runtime (" +
                            api_base->GetVersionString() + ") is older: upgrade onnxruntime";
    return api1 ? api1->CreateStatus(ORT_FAIL, msg.c_str()) : nullptr;
  }
  Ort::InitApi(api);

  OrtCustomOpDomain* domain = nullptr;
  if (OrtStatus* st = api->CreateCustomOpDomain(toolkit::kDomain, &domain)) return st;
  for (const OrtCustomOp* op : kOps) {
    if (OrtStatus* st = api->CustomOpDomain_Add(domain, op)) {
      api->ReleaseCustomOpDomain(domain);
      return st;
    }
  }
  if (OrtStatus* st = api->AddCustomOpDomain(options, domain)) {
    api->ReleaseCustomOpDomain(domain);
    return st;
  }
  std::lock_guard<std::mutex> lock(g_domains_mutex);
  g_domains.push_back(domain);
  return nullptr;
}

TOOLKIT_EXPORT int toolkit_ops_min_ort_api_version() { return TOOLKIT_ORT_API_VERSION; }

TOOLKIT_EXPORT int toolkit_ops_has_cuda() {
#ifdef TOOLKIT_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

TOOLKIT_EXPORT const char* toolkit_ops_version() { return TOOLKIT_OPS_VERSION; }
