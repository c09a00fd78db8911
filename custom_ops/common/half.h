// IEEE binary16 <-> binary32, bit-exact, for host code and CUDA device code. The one
// definition every kernel uses (the KV cache's float16 scales, float16 logits and
// weights). FloatToHalf rounds to nearest even, as NumPy's astype(float16);
// HalfToFloat is exact and branch-free, so loops over it vectorise. Checked against
// the earlier per-op copies over all 2^32 floats and all 2^16 halves (identical bits,
// NaN payloads included).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#ifdef __CUDACC__
#define TOOLKIT_HD __host__ __device__ __forceinline__
#else
#define TOOLKIT_HD inline
#endif

namespace toolkit {

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
  const uint32_t em = h & 0x7fffu;
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = em << 13;
  const float normal = BitsFloat(e + (112u << 23));          // rebias exponent 15 -> 127
  const float sub = BitsFloat(e + (113u << 23)) - 0x1p-14f;  // subnormal: m * 2^-24, exact
  const float special = BitsFloat(e | 0x7f800000u);          // inf / NaN keep the payload
  const float f = em < 0x400u ? sub : (em >= 0x7c00u ? special : normal);
  return BitsFloat(FloatBits(f) | sign);
}

}  // namespace toolkit
