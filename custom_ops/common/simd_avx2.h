// AVX2 building blocks shared by the CPU kernels (x86-64 only): the target
// attribute of the AVX2 paths, an 8-lane exp for non-positive arguments and
// horizontal reductions. Callers dispatch at run time (AvxAvailable()).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include <cstdint>

namespace toolkit {

#define TOOLKIT_AVX2 __attribute__((target("avx2,fma,f16c")))

// exp(t) for t <= 0, 8 lanes; same reduction and polynomial as ExpNonPositive.
TOOLKIT_AVX2 inline __m256 Exp8(__m256 t) {
  // maxps returns its second operand when either is NaN: t, so a NaN stays NaN
  t = _mm256_max_ps(_mm256_set1_ps(-87.0f), t);
  const __m256 shifter = _mm256_set1_ps(12582912.0f);
  const __m256 z = _mm256_fmadd_ps(t, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 n = _mm256_sub_ps(z, shifter);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), t);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i scale = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_sub_epi32(_mm256_castps_si256(z), _mm256_castps_si256(shifter)),
                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// 1.5 * 2^23: adding it to a float |u| < 2^22 rounds u to the nearest integer n,
// which the low mantissa bits of the sum then hold.
constexpr float kRoundShifter = 12582912.0f;

// 2^r for |r| <= 1/2, 8 lanes: a degree-5 minimax polynomial (relative-error fit,
// 7.5e-8 before float rounding).
TOOLKIT_AVX2 inline __m256 Exp2Frac5(__m256 r) {
  __m256 p = _mm256_set1_ps(0x1.5c08e4p-10f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0x1.3d0c54p-7f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0x1.c6b6e4p-5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0x1.ebf918p-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0x1.62e428p-1f));
  return _mm256_fmadd_ps(p, r, _mm256_set1_ps(0x1.000002p+0f));
}

// 2^(x a - c) for an integer-valued c with |c| <= 2^22, 8 lanes, about 2.5e-7
// relative error; vk = kRoundShifter - c (exact for such c). One FMA gives
// z = fl(x a + vk) = shifter + n, n the nearest integer to x a - c, rounded once
// from the exact product; vk - z = -c - n exactly, so a second FMA gives
// r = fl(x a - c - n), |r| <= 1/2, again from the exact product. Then 2^r by
// Exp2Frac5 and 2^n added straight into the exponent field ((bits(z) << 23) ==
// n << 23: the shifter's own bits shift out of the word). Seven FMAs, a subtraction,
// a shift and an integer add: against forming u = x a - c first and rounding it with
// a shifter add and subtract, one operation fewer per 8 terms.
// The caller keeps x a - c in [-125, 2^22) (below -125 the exponent add would wrap).
// *z_bits gets the bits of z: unsigned, they are >= bits(+inf) exactly when x is NaN
// or +inf (z is then NaN or +inf), and near bits(shifter) otherwise, so an unsigned
// max over them flags non-finite input without a compare per vector.
TOOLKIT_AVX2 inline __m256 Exp2Affine8(__m256 x, __m256 va, __m256 vk, __m256i* z_bits) {
  const __m256 z = _mm256_fmadd_ps(x, va, vk);
  const __m256 r = _mm256_fmadd_ps(x, va, _mm256_sub_ps(vk, z));
  *z_bits = _mm256_castps_si256(z);
  const __m256i e = _mm256_slli_epi32(*z_bits, 23);
  return _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(Exp2Frac5(r)), e));
}

// True when some lane of an unsigned max of Exp2Affine8's z_bits came from a NaN or
// +inf input.
TOOLKIT_AVX2 inline bool AnyNonFiniteZ(__m256i z_max) {
  const __m256i inf = _mm256_set1_epi32(0x7f800000);
  return _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_max_epu32(z_max, inf), z_max))) != 0;
}

TOOLKIT_AVX2 inline float HorizontalMax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

TOOLKIT_AVX2 inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

TOOLKIT_AVX2 inline int32_t HorizontalSumI32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1)));
}

TOOLKIT_AVX2 inline uint32_t HorizontalMaxU32(__m256i v) {
  __m128i m = _mm_max_epu32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4e));
  return uint32_t(_mm_cvtsi128_si32(_mm_max_epu32(m, _mm_shuffle_epi32(m, 0xb1))));
}

inline bool AvxAvailable() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
}

}  // namespace toolkit

#endif
