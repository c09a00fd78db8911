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

// A provider's compute function: the node's attributes and the call's context.
template <typename Attrs>
using ComputeFn = OrtStatus* (*)(const Attrs& attrs, OrtKernelContext* context);

// Kernel state of one node: its checked attributes and the provider's compute
// function. ORT deletes it through ~Kernel (CustomOpBase's KernelDestroy).
template <typename Attrs>
struct Kernel {
  Kernel(const Attrs& a, ComputeFn<Attrs> fn) : attrs(a), compute(fn) {}
  OrtStatus* ComputeV2(OrtKernelContext* context) { return compute(attrs, context); }
  Attrs attrs;
  ComputeFn<Attrs> compute;
};

// The CUDA compute function of an op, or null in a build without CUDA.
#ifdef TOOLKIT_WITH_CUDA
#define TOOLKIT_CUDA_COMPUTE(fn) (fn)
#else
#define TOOLKIT_CUDA_COMPUTE(fn) nullptr
#endif

// What every operator shares: name, provider, the ORT API version it declares, and
// kernel creation (read + check the attributes, pick the provider's compute
// function). An op derives from it (CRTP) and adds its input/output types:
//   struct Op : OpBase<Op, Attributes> { ... GetInputTypeCount() ... };
// `st` with the node's name in its message ("<op> node 'n0': ..."): errors at session
// creation carry no node name otherwise (ORT adds it to run-time errors only).
OrtStatus* WithNodeName(const OrtKernelInfo* info, OrtStatus* st);

template <typename Derived, typename Attrs>
struct OpBase : Ort::CustomOpBase<Derived, Kernel<Attrs>, /*WithStatus=*/true> {
  using ReadFn = OrtStatus* (*)(const OrtKernelInfo* info, Attrs* attrs);

  OpBase(const char* name, Provider provider, ReadFn read, ComputeFn<Attrs> cpu, ComputeFn<Attrs> cuda)
      : name_(name), provider_(provider), read_(read), cpu_(cpu), cuda_(cuda) {
    // CustomOpBase stamps the header's ORT_API_VERSION; runtimes older than that
    // would reject the op. Declare the version the library actually needs.
    OrtCustomOp::version = TOOLKIT_ORT_API_VERSION;
  }

  OrtStatus* CreateKernelV2(const OrtApi&, const OrtKernelInfo* info, void** kernel) const {
    return GuardStatus(name_, [&]() -> OrtStatus* {
      Attrs attrs;
      if (read_ != nullptr) {
        if (OrtStatus* st = read_(info, &attrs)) return WithNodeName(info, st);
      }
      ComputeFn<Attrs> fn = provider_ == Provider::kCuda ? cuda_ : cpu_;
      if (fn == nullptr) {
        return MakeStatus(ORT_NOT_IMPLEMENTED, std::string(name_) + ": library built without CUDA");
      }
      *kernel = new Kernel<Attrs>(attrs, fn);
      return nullptr;
    });
  }

  const char* GetName() const { return name_; }
  const char* GetExecutionProviderType() const {
    return provider_ == Provider::kCuda ? kCudaExecutionProvider : nullptr;
  }

 private:
  const char* name_;
  Provider provider_;
  ReadFn read_;
  ComputeFn<Attrs> cpu_, cuda_;
};

// Attributes. ORT's C API reads an attribute by type, and a node whose attribute has
// another type than the one read looks as if it had none: `temperature=2` (an int)
// would silently run at the default. These read the node's value whatever its type
// and refuse the types that do not fit, naming the attribute:
// * a float attribute written as an integer takes that integer's value (2 -> 2.0);
// * an integer attribute written as a float is an error (bits=8.0, k=2.5).
// A missing attribute leaves *v as is, and sets *found to false when given.
OrtStatus* ReadFloatAttribute(const OrtKernelInfo* info, const char* op, const char* name, float* v,
                              bool* found = nullptr);
OrtStatus* ReadIntAttribute(const OrtKernelInfo* info, const char* op, const char* name, int64_t* v,
                            bool* found = nullptr);

// Output `index` as float32 of `shape` when the node requests it, else null.
float* OptionalFloatOutput(OrtKernelContext* context, size_t index, const std::vector<int64_t>& shape);

}  // namespace toolkit
