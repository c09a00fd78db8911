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

namespace {
// The node's attribute `name` read as one type: false (and no status left behind)
// when it is absent or has another type.
bool GetAttribute(const OrtKernelInfo* info, const char* name, float* v) {
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_float(info, name, v);
  if (st) Ort::GetApi().ReleaseStatus(st);
  return st == nullptr;
}
bool GetAttribute(const OrtKernelInfo* info, const char* name, int64_t* v) {
  OrtStatus* st = Ort::GetApi().KernelInfoGetAttribute_int64(info, name, v);
  if (st) Ort::GetApi().ReleaseStatus(st);
  return st == nullptr;
}
}  // namespace

// (`op` is unused: every integer converts to a float, so this read cannot fail; the
// parameter keeps both readers' call sites alike.)
OrtStatus* ReadFloatAttribute(const OrtKernelInfo* info, const char* /*op*/, const char* name, float* v,
                              bool* found) {
  int64_t i = 0;
  bool present = GetAttribute(info, name, v);
  if (!present && GetAttribute(info, name, &i)) {
    *v = static_cast<float>(i);  // temperature=2 written as an integer attribute
    present = true;
  }
  if (found) *found = present;  // absent (or a string / tensor attribute, which no op declares)
  return nullptr;
}

OrtStatus* ReadIntAttribute(const OrtKernelInfo* info, const char* op, const char* name, int64_t* v, bool* found) {
  float f = 0.0f;
  const bool as_int = GetAttribute(info, name, v), as_float = !as_int && GetAttribute(info, name, &f);
  if (found) *found = as_int || as_float;
  if (!as_float) return nullptr;
  return MakeStatus(ORT_INVALID_ARGUMENT, std::string(op) + ": attribute '" + name + "' must be an integer, got the float " +
                                              std::to_string(f) + "; write it as an int (e.g. onnx.helper.make_node(..., " +
                                              name + "=" + std::to_string(static_cast<long long>(f)) + "))");
}

OrtStatus* WithNodeName(const OrtKernelInfo* info, OrtStatus* st) {
  if (st == nullptr) return nullptr;
  const OrtApi& api = Ort::GetApi();
  size_t size = 0;
  std::string node;
  if (OrtStatus* s1 = api.KernelInfo_GetNodeName(info, nullptr, &size)) {
    api.ReleaseStatus(s1);
    return st;
  }
  node.resize(size);
  if (OrtStatus* s2 = api.KernelInfo_GetNodeName(info, node.data(), &size)) {
    api.ReleaseStatus(s2);
    return st;
  }
  if (!node.empty() && node.back() == '\0') node.pop_back();
  const OrtErrorCode code = api.GetErrorCode(st);
  const std::string message = std::string("node '") + node + "': " + api.GetErrorMessage(st);
  api.ReleaseStatus(st);
  return MakeStatus(code, message);
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
