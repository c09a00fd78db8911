#include "common/common.h"

namespace toolkit {

std::string ShapeToString(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(shape[i]);
  }
  return s + "]";
}

OrtStatus* MakeStatus(OrtErrorCode code, const std::string& message) {
  return Ort::GetApi().CreateStatus(code, message.c_str());
}

OrtStatus* InvalidInputStatus(const char* op, const char* input_name, const std::vector<int64_t>& shape,
                              const std::string& expectation) {
  return MakeStatus(ORT_INVALID_ARGUMENT, std::string(op) + ": input '" + input_name + "' has shape " +
                                              ShapeToString(shape) + "; expected " + expectation);
}

float* OptionalFloatOutput(OrtKernelContext* context, size_t index, const std::vector<int64_t>& shape) {
  Ort::KernelContext ctx(context);
  if (ctx.GetOutputCount() <= index) return nullptr;
  OrtValue* out = nullptr;
  Ort::ThrowOnError(Ort::GetApi().KernelContext_GetOutput(context, index, shape.data(), shape.size(), &out));
  float* data = nullptr;
  if (out) Ort::ThrowOnError(Ort::GetApi().GetTensorMutableData(out, reinterpret_cast<void**>(&data)));
  return data;
}

}  // namespace toolkit
