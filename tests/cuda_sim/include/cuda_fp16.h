// CPU stand-in for cuda_fp16.h (tests/cuda_sim): __half as its IEEE bits, converted
// with the project's own float16 rules (common/half.h), which the device code uses too.
#pragma once

#include <cstdint>

#include "common/half.h"

struct __half {
  uint16_t x;
};
inline float __half2float(__half h) { return toolkit::HalfToFloat(h.x); }
inline __half __float2half_rn(float f) { return __half{toolkit::FloatToHalf(f)}; }
