// Scalar pieces of the quantized KV cache shared by the CPU and CUDA kernels: the
// quantization of one group (float16 conversion in common/half.h). The rules are
// those of toolkit/ops/kv_quant.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/half.h"

namespace toolkit::kv_attention {

// A group's range as the reference takes it (NumPy's max / min): a NaN element makes
// it NaN, so the group's scale (and zero) is NaN and its codes are the fixed ones, and
// the NaN reaches every later output that reads the group. Otherwise these are
// std::max(m, x) / std::min(m, x) (which skip a NaN x): ties keep m.
TOOLKIT_HD float NanMax(float m, float x) { return (x > m || x != x) ? x : m; }
TOOLKIT_HD float NanMin(float m, float x) { return (x < m || x != x) ? x : m; }

// Scale and zero of an asymmetric group with range [mn, mx], as stored (float16).
TOOLKIT_HD void AsymmetricParams(float mn, float mx, int bits, uint16_t* scale, uint16_t* zero) {
  const float levels = float((1 << bits) - 1);
  *scale = FloatToHalf((mx - mn) / levels);
  *zero = FloatToHalf(mn);
}

TOOLKIT_HD uint8_t AsymmetricCode(float x, float s, float z, int bits) {
  if (!(s > 0.0f)) return 0;
  const float q = rintf((x - z) / s);
  const float levels = float((1 << bits) - 1);
  return uint8_t(q >= levels ? levels : (q >= 0.0f ? q : 0.0f));
}

// quantize_query=1: the int8 code of one scaled query element, inv = 127 / max |q|
// of its row (kv_quant.quantize_query: round half to even, clamped to +-127).
TOOLKIT_HD float QueryCode(float x, float inv) { return fminf(127.0f, fmaxf(-127.0f, rintf(x * inv))); }

TOOLKIT_HD uint8_t SymmetricCode(float x, float s) {
  if (!(s > 0.0f)) return 128;
  const float q = rintf(x / s);
  return uint8_t((q >= 127.0f ? 127.0f : (q >= -127.0f ? q : -127.0f)) + 128.0f);
}

}  // namespace toolkit::kv_attention
