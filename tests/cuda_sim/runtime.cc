// Host pieces of the CUDA simulation library (tests/cuda_sim): the device's SM count
// for the tests, and a stub of ONNX Runtime's API entry (the kernels' headers include
// the ORT C++ API, whose globals ask for it; the simulated kernels never call ORT).
#include <onnxruntime_c_api.h>

#include "cuda_runtime.h"

extern "C" __attribute__((visibility("default"))) void cuda_sim_set_sm_count(int n) { cuda_sim::SmCount() = n; }

namespace {
OrtApi g_api{};
const OrtApi* ORT_API_CALL GetApiStub(uint32_t) noexcept { return &g_api; }
const char* ORT_API_CALL VersionStub() noexcept { return "cuda_sim"; }
OrtApiBase g_base{GetApiStub, VersionStub};
}  // namespace

extern "C" const OrtApiBase* OrtGetApiBase(void) noexcept { return &g_base; }
