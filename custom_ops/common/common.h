// Shared definitions of the toolkit custom-op library: the operator domain, the
// targeted ONNX Runtime C API version, export macros and status helpers.
#pragma once

#include <cstdint>
#include <string>
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

}  // namespace toolkit
