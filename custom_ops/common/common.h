// Shared definitions of the toolkit custom-op library: the operator domain, the
// targeted ONNX Runtime C API version, export macros and status helpers.
#pragma once

#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "onnxruntime_cxx_api.h"

#ifndef TOOLKIT_ORT_API_VERSION
// KernelContext_ParallelFor and OrtCustomOp::GetStartVersion are "since 1.17".
#define TOOLKIT_ORT_API_VERSION 17
#endif
static_assert(TOOLKIT_ORT_API_VERSION <= ORT_API_VERSION,
              "the ORT headers are older than the API version the library targets");

#define TOOLKIT_EXPORT extern "C" __attribute__((visibility("default")))

namespace toolkit {

// Every operator of the library lives in this single domain.
inline constexpr const char* kDomain = "com.toolkit";
inline constexpr const char* kCudaExecutionProvider = "CUDAExecutionProvider";

// "[3,5,32000]"
std::string ShapeToString(const std::vector<int64_t>& shape);

// A status built with the API the library was initialised with.
OrtStatus* MakeStatus(OrtErrorCode code, const std::string& message);

// "<op>: input '<name>' has shape [..]; expected <expectation>"
OrtStatus* InvalidInputStatus(const char* op, const char* input_name, const std::vector<int64_t>& shape,
                              const std::string& expectation);

// Runs `body`, converting a C++ exception (Ort::Exception from the C++ wrappers,
// std::bad_alloc, ...) into an ORT status: no exception may cross the C ABI.
template <typename Body>
OrtStatus* GuardStatus(const char* op, Body&& body) noexcept {
  try {
    return body();
  } catch (const Ort::Exception& e) {
    return MakeStatus(e.GetOrtErrorCode(), std::string(op) + ": " + e.what());
  } catch (const std::exception& e) {
    return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(op) + ": " + e.what());
  } catch (...) {
    return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(op) + ": unknown C++ exception");
  }
}

enum class Provider { kCpu, kCuda };

// Kernel state of one node; ORT deletes it through this base. Each op declares a
// CPU and (with CUDA) a CUDA subclass implementing ComputeV2.
template <typename Attrs>
struct KernelBase {
  explicit KernelBase(const Attrs& a) : attrs(a) {}
  virtual ~KernelBase() = default;
  virtual OrtStatus* ComputeV2(OrtKernelContext* context) = 0;
  Attrs attrs;
};

// Creates the provider's kernel for checked attributes (CreateKernelV2 of every op).
template <typename CpuKernel, typename CudaKernel, typename Attrs>
OrtStatus* NewKernel(const char* op, Provider provider, const Attrs& attrs, void** kernel) {
  if (provider == Provider::kCpu) {
    *kernel = new CpuKernel(attrs);
    return nullptr;
  }
  if constexpr (!std::is_void_v<CudaKernel>) {
    *kernel = new CudaKernel(attrs);
    return nullptr;
  }
  return MakeStatus(ORT_NOT_IMPLEMENTED, std::string(op) + ": library built without CUDA");
}

// Output `index` as float32 of `shape` when the node requests it, else null.
float* OptionalFloatOutput(OrtKernelContext* context, size_t index, const std::vector<int64_t>& shape);

}  // namespace toolkit
