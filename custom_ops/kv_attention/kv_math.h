// Scalar pieces of the quantized KV cache shared by the CPU and CUDA kernels: float16
// conversion (round to nearest even, bit-exact with NumPy's astype(float16)) and
// the quantization of one group. The rules are those of toolkit/ops/kv_quant.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define TOOLKIT_HD __host__ __device__ __forceinline__
#else
#define TOOLKIT_HD inline
#endif

namespace toolkit::kv_attention {

TOOLKIT_HD uint32_t FloatBits(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t x;
  std::memcpy(&x, &f, 4);
  return x;
#endif
}

TOOLKIT_HD float BitsFloat(uint32_t x) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(x);
#else
  float f;
  std::memcpy(&f, &x, 4);
  return f;
#endif
}

TOOLKIT_HD uint16_t FloatToHalf(float f) {
  const uint32_t x = FloatBits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax >= 0x7f800000u) return uint16_t(sign | (ax > 0x7f800000u ? 0x7e00u : 0x7c00u));
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to infinity
  if (ax < 0x38800000u) {  // half subnormal or zero: multiples of 2^-24
    const float scaled = BitsFloat(ax) * 16777216.0f;  // exact (power of two)
    return uint16_t(sign | uint32_t(rintf(scaled)));
  }
  uint32_t h = ((((ax >> 23) - 112u)) << 10) | ((ax & 0x7fffffu) >> 13);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry rolls into the exponent
  return uint16_t(sign | h);
}

TOOLKIT_HD float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1fu;
  const uint32_t m = h & 0x3ffu;
  if (e == 0) {
    const float f = float(m) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -f : f;
  }
  if (e == 31) return BitsFloat(sign | 0x7f800000u | (m << 13));
  return BitsFloat(sign | ((e + 112u) << 23) | (m << 13));
}

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

TOOLKIT_HD uint8_t SymmetricCode(float x, float s) {
  if (!(s > 0.0f)) return 128;
  const float q = rintf(x / s);
  return uint8_t((q >= 127.0f ? 127.0f : (q >= -127.0f ? q : -127.0f)) + 128.0f);
}

}  // namespace toolkit::kv_attention
