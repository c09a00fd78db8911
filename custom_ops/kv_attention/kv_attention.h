// QuantKVAttention (domain com.toolkit, since_version 1): attention of one decoder
// layer over a quantized KV cache (KIVI-style int8 / int4 / 2-bit), which it also
// appends to. Dequantization is fused into the QK and PV dot products: no
// full-precision copy of the cache is ever built.
//
// The cache layout (tensor shapes, packing, scale/zero rules, padding rule) is
// defined in ONE place: toolkit/ops/kv_quant.py, which is also the NumPy reference.
//
//   input  0 query         float32 [B, Hq, S, D]   RoPE applied, not scaled
//   input  1 key           float32 [B, Hkv, S, D]  the S new tokens (RoPE applied)
//   input  2 value         float32 [B, Hkv, S, D]
//   input  3 past_key_q    uint8   [B, Hkv, N, D*bits/8]
//   input  4 past_key_scale float16 [B, Hkv, N/Gk, D] (per channel) | [B, Hkv, N, D/Gk]
//   input  5 past_key_zero float16 as key_scale; absent when symmetric
//   input  6 past_key_res  float32 [B, Hkv, r, D]   r < R (r = 0 when R = 0)
//   input  7 past_value_q  uint8   [B, Hkv, N, D*bits/8]
//   input  8 past_value_scale float16 [B, Hkv, N, D/Gv]
//   input  9 past_value_zero float16; absent when symmetric
//   input 10 past_value_res float32 [B, Hkv, r, D]
//   input 11 attn_bias     float32 [B|1, 1, S, T], T = N + r + S (optional; absent:
//                          causal, query s sees positions <= N + r + s)
//   input 12 cache_lengths int64 [2] = (N, r), host memory (optional; see below)
//   output 0 output        float32 [B, Hq, S, D]
//   outputs 1..8           present_* with the layout of inputs 3..10
//   output 9 present_cache_lengths int64 [2] = (N', r') (optional)
//   attrs  bits (8|4|2), key_per_channel (0|1), key_group, value_group, residual,
//          symmetric (0|1), scale (float, 0 = 1/sqrt(D)), quantize_query (0|1)
//
// quantize_query=1 rounds each scaled query row to int8 before attention (one scale
// per row: q' = c a / 127, c = round(q 127 / a) in [-127, 127], a = max |q|; the rule
// is toolkit/ops/kv_quant.py: quantize_query). The CPU kernel then scores int8
// per-token keys with integer dot products (8-bit multiply-adds instead of float
// FMAs); other schemes use the rounded query in their float dot products.
//
// Query head h reads KV head h / (Hq / Hkv) (GQA as in Hugging Face repeat_kv).
// After the attention, r + S residual tokens are in hand; floor((r + S) / R) * R of
// them (all when R = 0) are quantized and appended to the quantized part.
//
// Two cache modes:
// - growing (no cache_lengths): N and r are the token dimensions of the past
//   tensors and every present tensor is a new, longer tensor (a copy of the past
//   plus the appended tokens), as an exported model's Concat would give.
// - fixed capacity (cache_lengths given): the token dimensions are capacities
//   (C quantized slots, Rc residual slots; C a multiple of key_group for per-channel
//   keys), N <= C and r <= Rc are read from cache_lengths, and each present tensor
//   has the shape of its past tensor. When the host binds a present output to the
//   same buffer as its past input (ONNX Runtime IOBinding, as for
//   GroupQueryAttention's past_present_share_buffer), only the appended tokens are
//   written: a decode step reads the cache once and writes one token. Otherwise
//   the past tensor is copied first. Slots past the valid lengths are never read.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/common.h"

namespace toolkit::kv_attention {

inline constexpr const char* kOpName = "QuantKVAttention";
// A key position whose bias (last query row) is at or below this is padding and
// left out of per-channel key ranges (toolkit/ops/kv_quant.py: MASKED_BIAS).
inline constexpr float kMaskedBias = -1.0e8f;

struct Attributes {
  int64_t bits = 4;
  int64_t key_per_channel = 1;
  int64_t key_group = 32;
  int64_t value_group = 32;
  int64_t residual = 128;
  int64_t symmetric = 0;
  int64_t quantize_query = 0;
  float scale = 0.0f;
};

OrtStatus* ReadAttributes(const OrtKernelInfo* info, Attributes* attrs);

// The attribute rules, shared by ReadAttributes and the CUDA C entries: the error
// (after "QuantKVAttention: "), or empty when the attributes are valid.
inline std::string AttributeError(const Attributes& a) {
  if (a.bits != 8 && a.bits != 4 && a.bits != 2) {
    return "attribute bits=" + std::to_string(a.bits) + "; expected 8, 4 or 2";
  }
  if (a.key_group <= 0 || a.value_group <= 0) return "attributes key_group and value_group must be positive";
  if (a.residual < 0) return "attribute residual must be >= 0";
  if (a.key_per_channel && (a.residual < a.key_group || a.residual % a.key_group != 0)) {
    return "attribute residual=" + std::to_string(a.residual) + " must be a positive multiple of key_group=" +
           std::to_string(a.key_group) + " when keys are quantized per channel (key_per_channel=1)";
  }
  if (a.symmetric && (a.bits != 8 || a.key_per_channel)) {
    return "symmetric=1 is only supported for bits=8 with per-token keys (key_per_channel=0)";
  }
  if (a.quantize_query != 0 && a.quantize_query != 1) {
    return "attribute quantize_query=" + std::to_string(a.quantize_query) + "; expected 0 or 1";
  }
  if (!(a.scale >= 0.0f) || !std::isfinite(a.scale)) return "attribute scale must be finite and >= 0 (0 = 1/sqrt(D))";
  return {};
}

// Shapes, the flush decision and the data pointers of one call (host or device
// pointers, depending on the provider). Filled by Prepare, shared by all providers.
struct Io {
  int64_t B = 0, Hq = 0, Hkv = 0, S = 0, D = 0;
  int64_t N = 0;    // quantized tokens in the past
  int64_t r = 0;    // residual tokens in the past
  // Token strides of the cache tensors: growing cache Nc = N, Rc = r, N2c = N + F,
  // R2c = r + S - F; fixed capacity Nc = N2c = C, Rc = R2c = residual slots.
  bool capacity = false;
  int64_t Nc = 0, Rc = 0, N2c = 0, R2c = 0;
  int64_t T = 0;    // N + r + S
  int64_t F = 0;    // tokens quantized by this call
  int64_t row_bytes = 0;  // D * bits / 8
  int64_t key_params_per_token = 0;  // per-token keys: D / Gk
  int64_t value_params = 0;          // D / Gv
  int64_t bias_batch = 0;            // 0: no bias, 1: broadcast, B
  float scale = 0.0f;

  const float* query = nullptr;
  const float* key = nullptr;
  const float* value = nullptr;
  const uint8_t* key_q = nullptr;
  const uint16_t* key_scale = nullptr;
  const uint16_t* key_zero = nullptr;
  const float* key_res = nullptr;
  const uint8_t* value_q = nullptr;
  const uint16_t* value_scale = nullptr;
  const uint16_t* value_zero = nullptr;
  const float* value_res = nullptr;
  const float* bias = nullptr;

  float* out = nullptr;
  uint8_t* p_key_q = nullptr;
  uint16_t* p_key_scale = nullptr;
  uint16_t* p_key_zero = nullptr;
  float* p_key_res = nullptr;
  uint8_t* p_value_q = nullptr;
  uint16_t* p_value_scale = nullptr;
  uint16_t* p_value_zero = nullptr;
  float* p_value_res = nullptr;
  int64_t* p_lengths = nullptr;  // present_cache_lengths when requested: an output, so in the provider's memory
};

// Elements of the key scales (and zeros) of `tokens` token slots of one (batch, KV
// head): per channel, D per group of key_group tokens; per token, D / key_group each.
inline int64_t KeyParams(const Io& io, const Attributes& a, int64_t tokens) {
  return a.key_per_channel ? tokens / a.key_group * io.D : tokens * io.key_params_per_token;
}

// Checks every input against the attributes and the other inputs (errors name the
// input, its shape and what was expected), allocates the outputs, fills `io`.
OrtStatus* Prepare(OrtKernelContext* context, const Attributes& attrs, Io* io);

// The provider kernels: compute functions (CPU in the _cpu.cc, CUDA in the _cuda.cc).
OrtStatus* ComputeCpu(const Attributes& attrs, OrtKernelContext* context);
#ifdef TOOLKIT_WITH_CUDA
OrtStatus* ComputeCuda(const Attributes& attrs, OrtKernelContext* context);
#endif

struct Op : OpBase<Op, Attributes> {
  explicit Op(Provider provider)
      : OpBase(kOpName, provider, &ReadAttributes, &ComputeCpu, TOOLKIT_CUDA_COMPUTE(&ComputeCuda)) {}

  size_t GetInputTypeCount() const { return 13; }
  ONNXTensorElementDataType GetInputType(size_t index) const { return IoType(index == 11 ? 0 : index); }
  OrtCustomOpInputOutputCharacteristic GetInputCharacteristic(size_t index) const {
    return (index == 5 || index == 9 || index >= 11) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }
  // The lengths are read on the host by every provider.
  OrtMemType GetInputMemoryType(size_t index) const { return index == 12 ? OrtMemTypeCPUInput : OrtMemTypeDefault; }
  size_t GetOutputTypeCount() const { return 10; }
  // Outputs 1..8 mirror inputs 3..10; output 9 (the lengths) mirrors input 12.
  ONNXTensorElementDataType GetOutputType(size_t index) const {
    return IoType(index == 0 ? 0 : index == 9 ? 12 : index + 2);
  }
  OrtCustomOpInputOutputCharacteristic GetOutputCharacteristic(size_t index) const {
    return (index == 3 || index == 7 || index == 9) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
  }

 private:
  static ONNXTensorElementDataType IoType(size_t input_index) {
    switch (input_index) {
      case 3:
      case 7:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
      case 4:
      case 5:
      case 8:
      case 9:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
      case 12:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
      default:
        return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    }
  }
};

}  // namespace toolkit::kv_attention
