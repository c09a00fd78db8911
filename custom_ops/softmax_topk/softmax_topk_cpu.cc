// CPU kernel of FusedSoftmaxTopK, plus the provider-independent attribute and shape
// checks (this file never needs nvcc).
//
// One read of each row: blocks of kBlock logits are loaded once (fp16 converted on
// the fly) and, while they sit in L1, feed
//   * the online softmax normaliser (running max m and sum of exp(x/T - m), rescaled
//     when m grows; Milakov & Gimelshein 2018, "Online normalizer calculation for
//     softmax", arXiv:1805.02867), with a vectorisable polynomial exp;
//   * a top-k selection on the raw logits (exp is monotone, so the top-k of the
//     logits is the top-k of the probabilities): candidates above the current k-th
//     key are appended to a buffer that is cut back to k with nth_element once k
//     more have piled up (the AVX2 path seeds that key from the first block's group
//     maxima); a whole block is rejected at once when its max is not above that key.
// Rows are spread over ORT's intra-op thread pool; when there are fewer rows than
// kTargetTasks, each long row is split into chunks whose partial (max, sum, top-k)
// are merged afterwards. The chunking depends only on the shape, never on the
// thread count, so results are identical for any number of threads.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/half.h"
#include "common/simd_avx2.h"
#include "softmax_topk/softmax_topk.h"

namespace toolkit::softmax_topk {

// ------------------------------------------------------------------ checks

OrtStatus* ReadAttributes(const OrtKernelInfo* info, Attributes* attrs) {
  bool has_k = false;
  if (OrtStatus* st = ReadIntAttribute(info, kOpName, "k", &attrs->k, &has_k)) return st;
  if (!has_k) {
    return MakeStatus(ORT_INVALID_ARGUMENT,
                      std::string(kOpName) + ": the required integer attribute 'k' is missing");
  }
  if (OrtStatus* st = ReadIntAttribute(info, kOpName, "normalize", &attrs->normalize)) return st;
  if (OrtStatus* st = ReadIntAttribute(info, kOpName, "log_probs", &attrs->log_probs)) return st;
  if (OrtStatus* st = ReadFloatAttribute(info, kOpName, "temperature", &attrs->temperature)) return st;
  for (auto [name, v] : {std::pair{"normalize", attrs->normalize}, std::pair{"log_probs", attrs->log_probs}}) {
    if (v != 0 && v != 1) {
      return MakeStatus(ORT_INVALID_ARGUMENT, std::string(kOpName) + ": attribute '" + name +
                                                  "' must be 0 or 1, got " + std::to_string(v));
    }
  }
  // 1 / T must be finite too: a subnormal T (1e-45) passes "> 0" and turns every
  // scaled logit into inf or NaN.
  const float t = attrs->temperature;
  if (!(t > 0.0f) || !std::isfinite(t) || !std::isfinite(1.0f / t)) {
    return MakeStatus(ORT_INVALID_ARGUMENT,
                      std::string(kOpName) + ": attribute 'temperature' must be finite and > 0 with 1/temperature "
                                             "finite (at least about 3e-39), got " + std::to_string(t) +
                          "; use 1.0 for the model's own distribution, a smaller value to sharpen it");
  }
  return nullptr;
}

OrtStatus* CheckInput(const std::vector<int64_t>& shape, const Attributes& attrs, int64_t* rows, int64_t* V,
                      const char* op) {
  if (shape.empty()) {
    return InvalidInputStatus(op, kInputName, shape, "rank >= 1 (softmax and top-k run over the last axis)");
  }
  const int64_t v = shape.back();
  if (v <= 0) {
    return InvalidInputStatus(op, kInputName, shape, "a non-empty last axis (V >= 1)");
  }
  if (v > std::numeric_limits<int32_t>::max()) {
    return InvalidInputStatus(op, kInputName, shape, "a last axis of at most 2^31-1 elements");
  }
  if (attrs.k < 1 || attrs.k > v) {
    return InvalidInputStatus(op, kInputName, shape,
                              "1 <= k <= " + std::to_string(v) + " (the size of the last axis), got k=" +
                                  std::to_string(attrs.k));
  }
  if (!(attrs.temperature > 0.0f) || !std::isfinite(attrs.temperature) || !std::isfinite(1.0f / attrs.temperature)) {
    return InvalidInputStatus(op, kInputName, shape,
                              "a finite temperature > 0, got temperature=" + std::to_string(attrs.temperature));
  }
  int64_t r = 1;
  for (size_t i = 0; i + 1 < shape.size(); ++i) r *= shape[i];
  *rows = r;
  *V = v;
  return nullptr;
}

// ------------------------------------------------------------------ numerics

namespace {

constexpr int kBlock = 512;     // logits per block: 2 KiB of fp32, stays in L1
constexpr int kLanes = 16;      // independent accumulators, so -O3 vectorises
// Few, long chunks: every chunk pays a warm-up of its top-k buffer (its first
// candidates are admitted before a threshold exists, and it starts with the two-sweep
// path) and adds k candidates to the merge. Measured at V=128256, k=50, batch 1, 1
// thread: 15 chunks of 8K took 313 us, 4 chunks of 32K 140 us. Whether a split pays
// at batch 1 depends on how the pool wakes its threads, which the op cannot see: two
// chunks at V = 128256 / 151936 on 2 threads took 49 / 47 us instead of 66 / 69 us
// with ORT's default spin-wait, but 152 / 123 us instead of 69 / 62 us with spinning
// off (toolkit bench topk's sessions), where waking a pool thread costs more than a
// row's second half. So a row is split only from V = 2 kMinChunk = 262144 on (batch
// 1, spinning off: 115 us on 2 threads vs 215 us on 1). The chunking depends on the
// shape only, so every thread count gives the same result.
constexpr int64_t kTargetTasks = 4;
constexpr int64_t kMinChunk = 131072;
constexpr float kInf = std::numeric_limits<float>::infinity();

inline uint32_t Bits(float f) { return FloatBits(f); }
inline float FromBits(uint32_t u) { return BitsFloat(u); }

template <typename T>
inline float ToFloat(T v);
template <>
inline float ToFloat<float>(float v) { return v; }
template <>
inline float ToFloat<uint16_t>(uint16_t v) { return HalfToFloat(v); }

template <typename T>
inline T FromFloat(float v);
template <>
inline float FromFloat<float>(float v) { return v; }
template <>
inline uint16_t FromFloat<uint16_t>(float v) { return FloatToHalf(v); }

// exp(t) for t <= 0 with about 1 ulp error, in plain float arithmetic so that loops
// over it vectorise. Cody-Waite reduction t = n ln2 + r, |r| <= ln2/2, then a
// degree-7 minimax polynomial; 2^n is built in the exponent field. t is clamped at
// -87 (exp(-87) ~ 1.6e-38 is negligible next to the sum, which is >= 1).
inline float ExpNonPositive(float t) {
  t = t < -87.0f ? -87.0f : t;
  const float shifter = 12582912.0f;                 // 1.5 * 2^23: round-to-int trick
  const float z = t * 1.44269504088896341f + shifter;
  const float n = z - shifter;
  float r = t - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const uint32_t scale = (Bits(z) - Bits(shifter) + 127u) << 23;  // 2^n, n in [-126, 0]
  return p * FromBits(scale);
}

// Total order of the logits as int32: NaN (any sign) above +inf above finite above
// -inf, and -0 == +0; this is the order ORT's TopK uses.
inline int32_t OrderKey(float f) {
  const uint32_t b = Bits(f);
  const uint32_t mag = b & 0x7fffffffu;
  int32_t key = int32_t(b ^ (uint32_t(int32_t(b) >> 31) & 0x7fffffffu));
  key = mag == 0 ? 0 : key;
  return mag > 0x7f800000u ? std::numeric_limits<int32_t>::max() : key;  // branch-free: vectorises
}

// Inverse of OrderKey for non-NaN keys.
inline float KeyToFloat(int32_t key) {
  return FromBits(uint32_t(key) ^ (uint32_t(key >> 31) & 0x7fffffffu));
}

// Candidates are single uint64: ascending order = key descending, index ascending.
inline uint64_t Compose(int32_t key, int64_t index) {
  return (uint64_t(int64_t(std::numeric_limits<int32_t>::max()) - key) << 32) | uint64_t(uint32_t(index));
}
inline int32_t KeyOf(uint64_t c) { return int32_t(int64_t(std::numeric_limits<int32_t>::max()) - int64_t(c >> 32)); }
inline int64_t IndexOf(uint64_t c) { return int64_t(c & 0xffffffffu); }

struct Partial {
  float max = -kInf;        // max of the non-NaN logits
  double sum = 0.0;         // sum exp((x - max) / T) over the finite part
  bool nan = false;
  std::vector<uint64_t> cand;  // best min(k, len) candidates, unsorted
};

// Rescales a partial sum computed against `from` to the max `to` (to >= from).
inline double Rescale(double sum, float from, float to, double inv_t) {
  if (sum == 0.0 || from == to) return sum;
  return sum * std::exp((double(from) - double(to)) * inv_t);
}

// Ends a chunk scan: cuts the first n_cand entries of out->cand to the best `keep`
// (unsorted) and records the chunk's normaliser. Shared by the scalar and AVX2 scans.
inline void FinishPartial(size_t keep, size_t n_cand, float m, double sum, bool nan, Partial* out) {
  std::vector<uint64_t>& cand = out->cand;
  if (n_cand > keep) {
    std::nth_element(cand.begin(), cand.begin() + (keep - 1), cand.begin() + n_cand);
    n_cand = keep;
  }
  cand.resize(n_cand);
  out->max = m;
  out->sum = sum;
  out->nan = nan;
}

template <typename T>
__attribute__((always_inline)) inline void ScanChunkImpl(const T* row, int64_t begin, int64_t end, int64_t k,
                                                        float inv_t, Partial* out) {
  const int64_t len = end - begin;
  const size_t keep = size_t(std::min<int64_t>(k, len));
  // Small buffer: the threshold rises after a few hundred logits already.
  const size_t cap = size_t(std::min<int64_t>(len, k + std::max<int64_t>(k, 128)));
  std::vector<uint64_t>& cand = out->cand;
  cand.resize(cap);
  size_t n_cand = 0;
  int32_t threshold = std::numeric_limits<int32_t>::min();  // below every real key

  float m = -kInf;
  double sum = 0.0;
  bool any_nan = false;
  alignas(64) float converted[kBlock + kLanes];

  for (int64_t b = begin; b < end; b += kBlock) {
    const int n = int(std::min<int64_t>(kBlock, end - b));
    const float* x;
    if constexpr (std::is_same_v<T, float>) {
      x = row + b;
    } else {
      for (int i = 0; i < n; ++i) converted[i] = ToFloat<T>(row[b + i]);
      x = converted;
    }

    // Order keys of the block and their max (integer max vectorises; NaN -> INT32_MAX).
    // Per group of kLanes keys a max too, so the candidate scan skips whole groups
    // with one (well-predicted) compare instead of branching on every logit.
    constexpr int32_t kMinKey = std::numeric_limits<int32_t>::min();
    alignas(64) int32_t keys[kBlock + kLanes];
    alignas(64) int32_t group_max[kBlock / kLanes];
    const int groups = (n + kLanes - 1) / kLanes;
    for (int t = 0; t < n; ++t) keys[t] = OrderKey(x[t]);
    for (int t = n; t < groups * kLanes; ++t) keys[t] = kMinKey;
    for (int g = 0; g < groups; ++g) {
      int32_t v = kMinKey;
      for (int j = 0; j < kLanes; ++j) v = std::max(v, keys[g * kLanes + j]);
      group_max[g] = v;
    }
    int32_t block_key = kMinKey;
    for (int g = 0; g < groups; ++g) block_key = std::max(block_key, group_max[g]);
    const bool block_nan = block_key == std::numeric_limits<int32_t>::max();
    // With a NaN the row is poisoned and the max no longer matters.
    const float block_max = block_nan ? -kInf : KeyToFloat(block_key);
    any_nan |= block_nan;

    // Online normaliser.
    if (block_max > m) {
      sum = Rescale(sum, m, block_max, inv_t);
      m = block_max;
    }
    if (m != kInf && m != -kInf && !block_nan) {
      // Exps into a buffer (a plain map loop, which -O3 vectorises), then a
      // lane-wise sum; a block sum feeds a double running total.
      alignas(64) float e[kBlock + kLanes];
      const float mm = m;
      for (int t = 0; t < n; ++t) e[t] = ExpNonPositive((x[t] - mm) * inv_t);
      for (int t = n; t < (n + kLanes - 1) / kLanes * kLanes; ++t) e[t] = 0.0f;
      float lane_sum[kLanes] = {};
      for (int t = 0; t < n; t += kLanes) {
        for (int j = 0; j < kLanes; ++j) lane_sum[j] += e[t + j];
      }
      float block_sum = 0.0f;
      for (int j = 0; j < kLanes; ++j) block_sum += lane_sum[j];
      sum += double(block_sum);
    }

    // Top-k candidates; whole block rejected when its best key cannot enter.
    if (block_key <= threshold) continue;
    for (int g = 0; g < groups; ++g) {
      if (group_max[g] <= threshold) continue;
      const int t_end = std::min(n, (g + 1) * kLanes);
      for (int t = g * kLanes; t < t_end; ++t) {
        const int32_t key = keys[t];
        if (key <= threshold) continue;
        cand[n_cand++] = Compose(key, b + t);
        if (n_cand == cap && cap > keep) {
          std::nth_element(cand.begin(), cand.begin() + (keep - 1), cand.begin() + n_cand);
          n_cand = keep;
          threshold = KeyOf(cand[keep - 1]);
        }
      }
    }
  }
  FinishPartial(keep, n_cand, m, sum, any_nan, out);
}

// AVX2+FMA+F16C path, chosen at run time by cpuid; the default build stays baseline
// x86-64 (no -march flags). It handles rows of finite values and -inf (the normal
// case) with explicit 8-wide intrinsics, three sweeps per L1-resident block:
//   1. max and min of the block, and a flag for NaN / +inf;
//   2. sum of exp((x - m) / T) against the running max m (online normaliser;
//      Exp2Affine8, with the next block prefetched meanwhile);
//   3. top-k candidates: a vector compare against the current k-th value and a
//      bit-scan of the mask, skipped entirely when the block max cannot enter.
// A chunk holding a NaN or +inf is rescanned by the exact scalar path above, which
// reproduces ONNX Runtime's ordering of non-finite values.
#if defined(__x86_64__) && defined(__GNUC__)
#define TOOLKIT_HAVE_AVX2_PATH 1

// The terms: 2^(x a - c) by Exp2Affine8 (a = log2(e) / T; c = the integer nearest
// to m a for the running max m, so that the shifter folds into the exponent's FMA and
// the reduced argument is rounded once from the exact product x a), with x clamped
// below at lo (ClampFloor: lo a - c >= -125). c differs from m a, the same way for
// every term: a common factor 2^(m a - c) of the sum that FastScanAvx2 takes out
// exactly in double (CToMax). The clamp sits on x (maxps(lo, NaN) keeps the NaN,
// which Exp2Affine8 flags).
template <bool kClamp>
TOOLKIT_AVX2 inline __m256 ExpTerm8(const float* p, __m256 va, __m256 vk, __m256 vlo) {
  __m256 x = _mm256_loadu_ps(p);
  if constexpr (kClamp) x = _mm256_max_ps(vlo, x);
  __m256i z_bits;
  return Exp2Affine8(x, va, vk, &z_bits);
}

// The integer c for a running max m: nearest to fl(m a). NaN (so ClampFloor refuses
// it) when it is beyond 2^22, where kRoundShifter - c would not be exact.
inline float IntegerOffset(float m, float a) {
  const float c = std::nearbyint(m * a);
  return std::fabs(c) <= 4194304.0f ? c : std::numeric_limits<float>::quiet_NaN();
}

// The clamp for ExpTerm8 / BlockMaxExpSum: the float lo < m with lo a - c >= -125
// that is closest to m - 124 / a (terms clamped there add at most 2^-124 each to a
// sum >= 1). False, and the chunk takes the exact scalar path, when c is NaN
// (IntegerOffset: |m a| beyond about 2^22, i.e. |m| beyond about 2.9e6 T) or too far
// from m a (2^(x a - c) near the max would then be far from 1). Real logits are many
// orders of magnitude below that.
inline bool ClampFloor(float m, float a, float c, float* lo) {
  if (!(std::fabs(double(m) * double(a) - double(c)) <= 1.0)) return false;
  float v = float(double(m) - 124.0 / double(a));
  if (!(v < m)) return false;
  while (double(v) * double(a) - double(c) < -125.0) {
    v = std::nextafter(v, kInf);
    if (!(v < m)) return false;
  }
  *lo = v;
  return true;
}
// 2^(c - m a) exactly in double (m and a are floats, so m a is exact): turns a sum of
// 2^(x a - c) into one of 2^((x - m) a).
inline double CToMax(float m, float a, float c) { return std::exp2(double(c) - double(m) * double(a)); }
// Sum over x[0..n8) of ExpTerm8, in float (n8 <= 1024 terms of at most 1 each; the
// caller accumulates blocks in double). `next` is prefetched one cache line per 16
// terms: the next block's first read
// then finds it in L1 instead of waiting on L2/L3 (on its own, that read sweep is
// memory bound while this one is compute bound, so they overlap this way).
template <bool kClamp>
TOOLKIT_AVX2 inline float BlockExpSum(const float* x, int n8, float c, float lo, float log2e_t, const char* next) {
  const __m256 va = _mm256_set1_ps(log2e_t), vk = _mm256_set1_ps(kRoundShifter - c), vlo = _mm256_set1_ps(lo);
  // Two independent accumulators hide the add latency.
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int i = 0;
  for (; i + 16 <= n8; i += 16) {
    _mm_prefetch(next + 4 * i, _MM_HINT_T0);
    s0 = _mm256_add_ps(s0, ExpTerm8<kClamp>(x + i, va, vk, vlo));
    s1 = _mm256_add_ps(s1, ExpTerm8<kClamp>(x + i + 8, va, vk, vlo));
  }
  for (; i < n8; i += 8) s0 = _mm256_add_ps(s0, ExpTerm8<kClamp>(x + i, va, vk, vlo));
  return HorizontalSum(_mm256_add_ps(s0, s1));
}

// One sweep for blocks after the first: the sum of 2^(x a - c) against the c of the
// running max m of the blocks before, and the largest z = fl(x a + kRoundShifter - c)
// of the block (*z_top, bits; Exp2Affine8), not its max. z is monotone in x, so a
// z_top below that of a reference value r proves every logit of the block below r
// and the caller needs no block max; only otherwise (a block that may raise the max
// or, at k = 1, hold a candidate: a few blocks per row) does it take the exact max
// (BlockMax, a short L1 sweep). Against a float max in this sweep, 2-3% faster at
// k = 1 (A/B in one process; no change at k = 50). x is
// clamped below at lo (ClampFloor); clamping only raises z, so the proof holds. The
// caller keeps the result only when the max rose by at most kMaxMergedJump in u
// (terms up to 2^4, so the float block sum stays far from overflow) and otherwise
// redoes the block against its own max. A NaN or +inf logit makes the returned sum
// NaN (AnyNonFiniteZ), which sends the caller to the checking path.
constexpr float kMaxMergedJump = 4.0f;
//
// kFlags: also marks each 16-logit group holding a logit above `thr` (bit i of
// *flags for x[16 i .. 16 i + 16), n8 <= 1024), so the candidate scan visits only
// those groups instead of the whole block (at k = 50 most blocks late in a row hold
// one candidate or none).
template <bool kFlags>
TOOLKIT_AVX2 inline float BlockZExpSum(const float* x, int n8, float c_m, float lo, float log2e_t, const char* next,
                                       float thr, uint32_t* z_top, uint64_t* flags) {
  const __m256 va = _mm256_set1_ps(log2e_t), vk = _mm256_set1_ps(kRoundShifter - c_m), vlo = _mm256_set1_ps(lo);
  // One accumulator for the sum and one for the z bits. The exp's constants take 9
  // of the 16 ymm registers; with a second sum accumulator GCC kept it on the stack
  // (a store and reload in every iteration, 10% slower). The unsigned max of the z
  // bits (two integer ops per 16 logits) also replaces an unordered compare and OR.
  const __m256 vthr = _mm256_set1_ps(thr);
  __m256 sum = _mm256_setzero_ps();
  __m256i z_max = _mm256_setzero_si256();
  // kFlags: a bit per group from a float compare of the group's max. Two variants
  // measured 6-9% slower at k = 50: the group's lane mask stored as a byte (bits
  // formed after the loop; the shift/OR it saves runs on idle integer ports), and a
  // compare of the z bits instead of the floats (z is monotone in x, but groups
  // within one rounding step below thr get flagged and scanned too).
  uint64_t f = 0;
  int i = 0;
  for (; i + 16 <= n8; i += 16) {
    _mm_prefetch(next + 4 * i, _MM_HINT_T0);
    const __m256 a = _mm256_max_ps(vlo, _mm256_loadu_ps(x + i)), c = _mm256_max_ps(vlo, _mm256_loadu_ps(x + i + 8));
    if constexpr (kFlags) {
      f |= uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_max_ps(a, c), vthr, _CMP_GT_OQ)) != 0) << (i >> 4);
    }
    __m256i za, zc;
    sum = _mm256_add_ps(sum, _mm256_add_ps(Exp2Affine8(a, va, vk, &za), Exp2Affine8(c, va, vk, &zc)));
    z_max = _mm256_max_epu32(z_max, _mm256_max_epu32(za, zc));
  }
  for (; i < n8; i += 8) {
    const __m256 a = _mm256_max_ps(vlo, _mm256_loadu_ps(x + i));
    if constexpr (kFlags) f |= uint64_t(_mm256_movemask_ps(_mm256_cmp_ps(a, vthr, _CMP_GT_OQ)) != 0) << (i >> 4);
    __m256i za;
    sum = _mm256_add_ps(sum, Exp2Affine8(a, va, vk, &za));
    z_max = _mm256_max_epu32(z_max, za);
  }
  if constexpr (kFlags) *flags = f;
  if (AnyNonFiniteZ(z_max)) return std::numeric_limits<float>::quiet_NaN();
  *z_top = HorizontalMaxU32(z_max);
  return HorizontalSum(sum);
}

// The max of x[0..n8), n8 a multiple of 8 (no NaN: the caller checked).
TOOLKIT_AVX2 inline float BlockMax(const float* x, int n8) {
  __m256 m0 = _mm256_set1_ps(-kInf), m1 = m0;
  int i = 0;
  for (; i + 16 <= n8; i += 16) {
    m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
    m1 = _mm256_max_ps(m1, _mm256_loadu_ps(x + i + 8));
  }
  if (i < n8) m0 = _mm256_max_ps(m0, _mm256_loadu_ps(x + i));
  return HorizontalMax(_mm256_max_ps(m0, m1));
}

// Appends Compose(key, base + t) for every x[t] (t < n) that compares kCmp against
// thr to out, returning the count. Four vectors are tested per branch: late in a row
// most 32-logit groups hold no candidate, and the branch on each 8-lane mask was the
// scan's cost (mispredicted whenever one did).
template <int kCmp>
TOOLKIT_AVX2 inline size_t AppendCandidates(const float* x, int n, float thr, int64_t base, uint64_t* out) {
  const __m256 vthr = _mm256_set1_ps(thr);
  size_t count = 0;
  auto append = [&](int t) { out[count++] = Compose(OrderKey(x[t]), base + t); };
  int i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256 c0 = _mm256_cmp_ps(_mm256_loadu_ps(x + i), vthr, kCmp);
    const __m256 c1 = _mm256_cmp_ps(_mm256_loadu_ps(x + i + 8), vthr, kCmp);
    const __m256 c2 = _mm256_cmp_ps(_mm256_loadu_ps(x + i + 16), vthr, kCmp);
    const __m256 c3 = _mm256_cmp_ps(_mm256_loadu_ps(x + i + 24), vthr, kCmp);
    if (_mm256_testz_ps(_mm256_or_ps(_mm256_or_ps(c0, c1), _mm256_or_ps(c2, c3)), _mm256_castsi256_ps(
                            _mm256_set1_epi32(-1)))) {
      continue;
    }
    uint32_t mask = uint32_t(_mm256_movemask_ps(c0)) | uint32_t(_mm256_movemask_ps(c1)) << 8 |
                    uint32_t(_mm256_movemask_ps(c2)) << 16 | uint32_t(_mm256_movemask_ps(c3)) << 24;
    while (mask) {
      append(i + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
  for (; i + 8 <= n; i += 8) {
    unsigned mask = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), vthr, kCmp)));
    while (mask) {
      append(i + __builtin_ctz(mask));
      mask &= mask - 1;
    }
  }
  for (; i < n; ++i) {
    if (kCmp == _CMP_GT_OQ ? x[i] > thr : x[i] >= thr) append(i);
  }
  return count;
}

// Candidates of the 16-logit groups marked in `flags` (BlockMaxExpSum<true>):
// AppendCandidates<_CMP_GT_OQ> group by group.
TOOLKIT_AVX2 inline size_t AppendFlaggedCandidates(const float* x, int n, uint64_t flags, float thr, int64_t base,
                                                   uint64_t* out) {
  size_t count = 0;
  while (flags) {
    const int g = __builtin_ctzll(flags) * 16;
    flags &= flags - 1;
    count += AppendCandidates<_CMP_GT_OQ>(x + g, std::min(n - g, 16), thr, base + g, out + count);
  }
  return count;
}

// The first index of `value` in x[0..n) (it is there: the block's max), as a candidate.
// k = 1 needs only that one: ties go to the lower index, and a block whose max beats
// the threshold holds no other candidate. Appending every logit above the threshold
// instead cost a whole block per block on a sorted row (the max rises in every block):
// 9x the time of random logits, slower than ORT's Softmax -> TopK.
TOOLKIT_AVX2 inline size_t AppendFirstOf(const float* x, int n, float value, int64_t base, uint64_t* out) {
  const __m256 v = _mm256_set1_ps(value);
  int i = 0;
  for (; i + 8 <= n; i += 8) {
    const unsigned mask = unsigned(_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + i), v, _CMP_EQ_OQ)));
    if (mask) {
      out[0] = Compose(OrderKey(value), base + i + __builtin_ctz(mask));
      return 1;
    }
  }
  for (; i < n; ++i) {
    if (x[i] == value) {
      out[0] = Compose(OrderKey(value), base + i);
      return 1;
    }
  }
  return 0;
}

// A lower bound of the k-th largest of x[0..n), n a multiple of 64, k <= n / 8: the
// k-th largest of 8-logit group maxima (k distinct logits, one per group, are at
// least that large). Groups are lanes of 8 consecutive vectors, so the maxima are
// vertical max operations. Seeds a chunk's threshold from its first block without
// selecting over the whole block.
TOOLKIT_AVX2 inline float GroupMaxLowerBound(const float* x, int n, size_t k, float* scratch) {
  int groups = 0;
  for (int i = 0; i < n; i += 64) {
    __m256 v = _mm256_loadu_ps(x + i);
    for (int j = 1; j < 8; ++j) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i + 8 * j));
    _mm256_storeu_ps(scratch + groups, v);
    groups += 8;
  }
  std::nth_element(scratch, scratch + (k - 1), scratch + groups, std::greater<float>());
  return scratch[k - 1];
}

// Returns false when the chunk holds a NaN or +inf (the caller then uses the exact path).
template <typename T>
TOOLKIT_AVX2 bool FastScanAvx2(const T* row, int64_t begin, int64_t end, int64_t k, float inv_t, Partial* out) {
  constexpr int kFastBlock = 1024;
  const int64_t len = end - begin;
  const size_t keep = size_t(std::min<int64_t>(k, len));
  // The threshold (the k-th best so far) is refreshed once `refresh` candidates have
  // piled up above it: an nth_element over 2k entries. For k = 1 this keeps the exact
  // running max; a stale threshold lets whole blocks through the max test, and every
  // admitted logit is a mispredicted branch (V = 128256, batch 1: 16% of the time was
  // the candidate scan with a refill every 128 candidates). keep/4 and keep/2 were
  // measured within 2% of keep at k = 50.
  const size_t refresh = std::max<size_t>(1, keep);
  std::vector<uint64_t>& cand = out->cand;
  cand.resize(keep + refresh + kFastBlock);  // one whole block always fits
  size_t n_cand = 0;
  bool have_threshold = false;  // until k candidates exist, every value is one
  float threshold = -kInf;

  // The normaliser: the running max m, the integer c near m a, the clamp lo (ClampFloor) and
  // sum = sum of 2^(x a - c) so far (ExpTerm8); CToMax converts it at the end.
  const float log2e_t = 1.44269504088896341f * inv_t;
  float m = -kInf, c = -kInf, lo = -kInf;
  double sum = 0.0;
  // A new running max: the sum moves from c to the new c exactly (2^(c_old - c_new),
  // a power of two). False when the clamp cannot be formed.
  auto raise_max = [&](float new_m) {
    const float new_c = IntegerOffset(new_m, log2e_t);
    if (sum != 0.0) sum *= std::exp2(double(c) - double(new_c));
    m = new_m;
    c = new_c;
    return ClampFloor(m, log2e_t, c, &lo);
  };
  const __m256 vinf = _mm256_set1_ps(kInf);
  alignas(64) float converted[kFastBlock];

  alignas(32) float group_max[kFastBlock / 8];

  // 3. top-k candidates of a block (strictly above the k-th value: equal later indices lose ties).
  auto select = [&](const float* x, int n, int64_t b, float block_max, const uint64_t* flags) TOOLKIT_AVX2 {
    if (flags && have_threshold) {  // the groups the sweep marked against this same threshold
      // Every group marked (a row that keeps rising, e.g. sorted): admit only logits at
      // or above a lower bound of the block's own k-th largest when that is above the
      // threshold; a logit below it cannot be in the top k. Sorted rows at k = 50 took
      // 9x the time of random logits otherwise. (Random logits mark every group almost
      // never; triggering at a quarter of them cost 10-20% at k = 50, B = 8.)
      float bound = -kInf;
      if (n == kFastBlock && keep <= size_t(kFastBlock / 8) && __builtin_popcountll(*flags) == kFastBlock / 16) {
        bound = GroupMaxLowerBound(x, n, keep, group_max);
      }
      n_cand += bound > threshold ? AppendCandidates<_CMP_GE_OQ>(x, n, bound, b, cand.data() + n_cand)
                                  : AppendFlaggedCandidates(x, n, *flags, threshold, b, cand.data() + n_cand);
    } else if (!have_threshold) {
      if (n == kFastBlock && n_cand == 0 && keep <= size_t(kFastBlock / 8)) {
        // First block: admit only logits >= a lower bound of its k-th largest (at
        // least k of them), instead of selecting over all 1024.
        const float bound = GroupMaxLowerBound(x, n, keep, group_max);
        n_cand += AppendCandidates<_CMP_GE_OQ>(x, n, bound, b, cand.data() + n_cand);
      } else {
        for (int t = 0; t < n; ++t) cand[n_cand++] = Compose(OrderKey(x[t]), b + t);
      }
    } else if (block_max > threshold) {
      n_cand += keep == 1 ? AppendFirstOf(x, n, block_max, b, cand.data() + n_cand)
                          : AppendCandidates<_CMP_GT_OQ>(x, n, threshold, b, cand.data() + n_cand);
    }
    if (have_threshold ? n_cand >= keep + refresh : n_cand >= keep) {
      std::nth_element(cand.begin(), cand.begin() + (keep - 1), cand.begin() + n_cand);
      n_cand = keep;
      threshold = KeyToFloat(KeyOf(cand[keep - 1]));
      have_threshold = true;
    }
  };

  for (int64_t b = begin; b < end; b += kFastBlock) {
    const int n = int(std::min<int64_t>(kFastBlock, end - b));
    const int n8 = n & ~7;
    const float* x;
    if constexpr (std::is_same_v<T, float>) {
      x = row + b;
    } else {
      int i = 0;
      for (; i < n8; i += 8) {
        const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b + i));
        _mm256_store_ps(converted + i, _mm256_cvtph_ps(h));
      }
      for (; i < n; ++i) converted[i] = ToFloat<T>(row[b + i]);
      x = converted;
    }

    // The next block's bytes (fp16 rows: half as many, so half the lines are fetched
    // twice, which is harmless).
    const char* next = reinterpret_cast<const char*>(row + std::min<int64_t>(b + kFastBlock, end - 1));
    // 1+2 in one sweep once a running max exists (whole 8-lane blocks): the usual case.
    if (m != -kInf && n8 == n) {
      // Group flags pay where the threshold is the k-th value for k > 1; at k = 1 a
      // block rarely beats the running max and the plain scan of it is as cheap.
      uint64_t flags = 0;
      uint32_t z_top = 0;
      const bool with_flags = keep > 1 && have_threshold;
      const float block_sum =
          with_flags ? BlockZExpSum<true>(x, n, c, lo, log2e_t, next, threshold, &z_top, &flags)
                     : BlockZExpSum<false>(x, n, c, lo, log2e_t, next, 0.0f, &z_top, nullptr);
      if (std::isfinite(block_sum)) {
        // The block max matters when it may pass m (raise_max) or, at k = 1, the
        // threshold (select); a z_top below the z of the lower of the two proves it
        // passes neither (-inf stands for "below").
        const float ref = with_flags || !have_threshold ? m : std::min(m, threshold);
        const float z_ref = std::fma(ref, log2e_t, kRoundShifter - c);
        const float block_max = int32_t(z_top) < int32_t(Bits(z_ref)) ? -kInf : BlockMax(x, n);
        if (!((block_max - m) * log2e_t > kMaxMergedJump)) {
          sum += double(block_sum);
          if (block_max > m && !raise_max(block_max)) return false;
          select(x, n, b, block_max, with_flags ? &flags : nullptr);
          continue;
        }
      }
      // NaN / +inf (the checking sweep below returns false) or a max that jumps too far:
      // the two sweeps below, against the block's own max.
    }

    // 1. block max and min, and NaN / +inf detection (this sweep is bound by the
    //    first read of the block, so the min comes for free).
    __m256 vmax0 = _mm256_set1_ps(-kInf), vmax1 = vmax0;
    __m256 vmin0 = vinf, vmin1 = vinf;
    __m256 vbad = _mm256_setzero_ps();
    int i = 0;
    for (; i + 16 <= n8; i += 16) {
      const __m256 a = _mm256_loadu_ps(x + i), c = _mm256_loadu_ps(x + i + 8);
      vmax0 = _mm256_max_ps(vmax0, a);
      vmax1 = _mm256_max_ps(vmax1, c);
      vmin0 = _mm256_min_ps(vmin0, a);
      vmin1 = _mm256_min_ps(vmin1, c);
      vbad = _mm256_or_ps(vbad, _mm256_or_ps(_mm256_cmp_ps(a, vinf, _CMP_NLT_UQ), _mm256_cmp_ps(c, vinf, _CMP_NLT_UQ)));
    }
    for (; i < n8; i += 8) {
      const __m256 a = _mm256_loadu_ps(x + i);
      vmax0 = _mm256_max_ps(vmax0, a);
      vmin0 = _mm256_min_ps(vmin0, a);
      vbad = _mm256_or_ps(vbad, _mm256_cmp_ps(a, vinf, _CMP_NLT_UQ));  // NaN or +inf
    }
    float block_max = HorizontalMax(_mm256_max_ps(vmax0, vmax1));
    const float block_min = -HorizontalMax(_mm256_sub_ps(_mm256_setzero_ps(), _mm256_min_ps(vmin0, vmin1)));
    bool bad = _mm256_movemask_ps(vbad) != 0;
    for (int t = n8; t < n; ++t) {
      bad |= !(x[t] < kInf);
      block_max = std::max(block_max, x[t]);
    }
    if (bad) return false;

    // 2. online normaliser.
    if (block_max > m && !raise_max(block_max)) return false;
    if (m != -kInf) {
      // exp((x - m) / T) = 2^((x - m) a), summed as 2^(x a - c) (ExpTerm8). The clamp
      // is only needed when the block's smallest logit is below lo (or is -inf);
      // normal logit spreads never get there.
      float block_sum = block_min >= lo ? BlockExpSum<false>(x, n8, c, lo, log2e_t, next)
                                        : BlockExpSum<true>(x, n8, c, lo, log2e_t, next);
      for (int t = n8; t < n; ++t) block_sum += float(std::exp2(double(x[t]) * double(log2e_t) - double(c)));
      sum += double(block_sum);
    }

    select(x, n, b, block_max, nullptr);
  }
  FinishPartial(keep, n_cand, m, sum == 0.0 ? sum : sum * CToMax(m, log2e_t, c), /*nan=*/false, out);
  return true;
}

TOOLKIT_AVX2 void ScanChunkF32Avx2(const float* row, int64_t begin, int64_t end, int64_t k, float inv_t,
                                   Partial* out) {
  if (FastScanAvx2<float>(row, begin, end, k, inv_t, out)) return;
  ScanChunkImpl<float>(row, begin, end, k, inv_t, out);
}
TOOLKIT_AVX2 void ScanChunkF16Avx2(const uint16_t* row, int64_t begin, int64_t end, int64_t k, float inv_t,
                                   Partial* out) {
  if (FastScanAvx2<uint16_t>(row, begin, end, k, inv_t, out)) return;
  ScanChunkImpl<uint16_t>(row, begin, end, k, inv_t, out);
}
#endif

void ScanChunkF32(const float* row, int64_t begin, int64_t end, int64_t k, float inv_t, Partial* out) {
#ifdef TOOLKIT_HAVE_AVX2_PATH
  if (AvxAvailable()) return ScanChunkF32Avx2(row, begin, end, k, inv_t, out);
#endif
  ScanChunkImpl<float>(row, begin, end, k, inv_t, out);
}
void ScanChunkF16(const uint16_t* row, int64_t begin, int64_t end, int64_t k, float inv_t, Partial* out) {
#ifdef TOOLKIT_HAVE_AVX2_PATH
  if (AvxAvailable()) return ScanChunkF16Avx2(row, begin, end, k, inv_t, out);
#endif
  ScanChunkImpl<uint16_t>(row, begin, end, k, inv_t, out);
}
inline void ScanChunk(const float* row, int64_t b, int64_t e, int64_t k, float inv_t, Partial* out) {
  ScanChunkF32(row, b, e, k, inv_t, out);
}
inline void ScanChunk(const uint16_t* row, int64_t b, int64_t e, int64_t k, float inv_t, Partial* out) {
  ScanChunkF16(row, b, e, k, inv_t, out);
}

// Merges the partials of one row and writes its k outputs.
template <typename T>
void FinishRow(const T* row, Partial* parts, int64_t n_parts, const Attributes& a, T* values, int64_t* indices,
               float* log_norm, std::vector<uint64_t>* scratch) {
  const int64_t k = a.k;
  const double inv_t = 1.0 / double(a.temperature);
  float m = -kInf;
  bool nan = false;
  for (int64_t p = 0; p < n_parts; ++p) {
    m = std::max(m, parts[p].max);
    nan |= parts[p].nan;
  }
  double sum = 0.0;
  if (!nan && m != kInf && m != -kInf) {
    for (int64_t p = 0; p < n_parts; ++p) sum += Rescale(parts[p].sum, parts[p].max, m, inv_t);
  }

  std::vector<uint64_t>* cand = &parts[0].cand;
  if (n_parts > 1) {
    scratch->clear();
    for (int64_t p = 0; p < n_parts; ++p) scratch->insert(scratch->end(), parts[p].cand.begin(), parts[p].cand.end());
    cand = scratch;
  }
  if (int64_t(cand->size()) > k) {
    std::nth_element(cand->begin(), cand->begin() + (k - 1), cand->end());
    cand->resize(size_t(k));
  }
  std::sort(cand->begin(), cand->end());
  const uint64_t* c = cand->data();

  const bool poisoned = nan || m == kInf || m == -kInf;
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  if (log_norm) {
    *log_norm = nan ? qnan : (m == kInf ? kInf : (m == -kInf ? -kInf : float(double(m) * inv_t + std::log(sum))));
  }

  if (poisoned) {
    // Softmax(row) is all-NaN for ORT; TopK of all-NaN keeps indices 0..k-1.
    // TopK first (normalize=1) keeps its order, then softmax of the kept is NaN.
    for (int64_t j = 0; j < k; ++j) {
      values[j] = FromFloat<T>(qnan);
      indices[j] = a.normalize ? IndexOf(c[j]) : j;
    }
    return;
  }

  double ref_max = m;
  double log_sum = std::log(sum);
  if (a.normalize) {
    // Softmax over the kept k only; the first kept is the largest.
    ref_max = ToFloat<T>(row[IndexOf(c[0])]);
    double s = 0.0;
    for (int64_t j = 0; j < k; ++j) s += std::exp((double(ToFloat<T>(row[IndexOf(c[j])])) - ref_max) * inv_t);
    log_sum = std::log(s);
  }
  for (int64_t j = 0; j < k; ++j) {
    const int64_t idx = IndexOf(c[j]);
    const double t = (double(ToFloat<T>(row[idx])) - ref_max) * inv_t;  // -inf for -inf logits
    const double v = a.log_probs ? t - log_sum : std::exp(t - log_sum);
    values[j] = FromFloat<T>(float(v));
    indices[j] = idx;
  }
}

template <typename T>
struct Job {
  const T* x;
  T* values;
  int64_t* indices;
  float* log_norm;
  int64_t rows, V;
  Attributes attrs;
  float inv_t;
  int64_t chunks_per_row, chunk_len;
  std::vector<Partial> parts;  // rows * chunks_per_row, only when chunks_per_row > 1
  // Chunks of each row still running; the chunk that brings it to zero merges the
  // row, so a split row costs one thread-pool dispatch, not two.
  std::unique_ptr<std::atomic<int64_t>[]> pending;
  std::atomic<bool> failed{false};
};

template <typename T>
void RunWholeRow(void* data, size_t r) {
  auto* job = static_cast<Job<T>*>(data);
  try {
    thread_local Partial part;
    thread_local std::vector<uint64_t> scratch;
    const T* row = job->x + int64_t(r) * job->V;
    ScanChunk(row, 0, job->V, job->attrs.k, job->inv_t, &part);
    FinishRow(row, &part, 1, job->attrs, job->values + int64_t(r) * job->attrs.k,
              job->indices + int64_t(r) * job->attrs.k, job->log_norm ? job->log_norm + r : nullptr, &scratch);
  } catch (...) {
    job->failed = true;
  }
}

template <typename T>
void RunChunk(void* data, size_t task) {
  auto* job = static_cast<Job<T>*>(data);
  try {
    const int64_t r = int64_t(task) / job->chunks_per_row;
    const int64_t c = int64_t(task) % job->chunks_per_row;
    const int64_t begin = c * job->chunk_len;
    const int64_t end = std::min(job->V, begin + job->chunk_len);
    ScanChunk(job->x + r * job->V, begin, end, job->attrs.k, job->inv_t, &job->parts[task]);
    if (job->pending[r].fetch_sub(1, std::memory_order_acq_rel) == 1 && !job->failed) {
      thread_local std::vector<uint64_t> scratch;
      FinishRow(job->x + r * job->V, &job->parts[size_t(r * job->chunks_per_row)], job->chunks_per_row, job->attrs,
                job->values + r * job->attrs.k, job->indices + r * job->attrs.k,
                job->log_norm ? job->log_norm + r : nullptr, &scratch);
    }
  } catch (...) {
    job->failed = true;
  }
}

template <typename T>
OrtStatus* Run(Ort::KernelContext& ctx, const T* x, T* values, int64_t* indices, float* log_norm, int64_t rows,
               int64_t V, const Attributes& attrs) {
  Job<T> job;
  job.x = x;
  job.values = values;
  job.indices = indices;
  job.log_norm = log_norm;
  job.rows = rows;
  job.V = V;
  job.attrs = attrs;
  job.inv_t = 1.0f / attrs.temperature;
  job.chunks_per_row = 1;
  if (rows < kTargetTasks && V >= 2 * kMinChunk) {
    job.chunks_per_row = std::min((kTargetTasks + rows - 1) / rows, V / kMinChunk);
  }
  // Chunk boundaries on block multiples; recompute the count so none is empty.
  job.chunk_len = ((V + job.chunks_per_row - 1) / job.chunks_per_row + kBlock - 1) / kBlock * kBlock;
  job.chunks_per_row = (V + job.chunk_len - 1) / job.chunk_len;

  if (job.chunks_per_row == 1) {
    ctx.ParallelFor(&RunWholeRow<T>, size_t(rows), 0, &job);
  } else {
    job.parts.resize(size_t(rows * job.chunks_per_row));
    job.pending.reset(new std::atomic<int64_t>[size_t(rows)]);
    for (int64_t r = 0; r < rows; ++r) job.pending[r].store(job.chunks_per_row, std::memory_order_relaxed);
    ctx.ParallelFor(&RunChunk<T>, job.parts.size(), 0, &job);
  }
  if (job.failed) {
    return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(kOpName) + ": CPU kernel failed (out of memory?)");
  }
  return nullptr;
}

}  // namespace

OrtStatus* PrepareIo(OrtKernelContext* context, const Attributes& attrs, Io* io) {
  Ort::KernelContext ctx(context);
  Ort::ConstValue input = ctx.GetInput(0);
  const auto info = input.GetTensorTypeAndShapeInfo();
  io->shape = info.GetShape();
  if (OrtStatus* st = CheckInput(io->shape, attrs, &io->rows, &io->V)) return st;
  io->fp16 = info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  io->logits = input.GetTensorRawData();

  std::vector<int64_t> out_shape = io->shape;
  out_shape.back() = attrs.k;
  io->values = ctx.GetOutput(0, out_shape).GetTensorMutableRawData();
  io->indices = ctx.GetOutput(1, out_shape).GetTensorMutableData<int64_t>();
  io->log_norm = OptionalFloatOutput(context, 2, {io->shape.begin(), io->shape.end() - 1});
  return nullptr;
}

OrtStatus* RunCpu(OrtKernelContext* context, const Io& io, const Attributes& attrs) {
  if (io.rows == 0) return nullptr;
  Ort::KernelContext ctx(context);
  if (io.fp16) {
    return Run<uint16_t>(ctx, static_cast<const uint16_t*>(io.logits), static_cast<uint16_t*>(io.values),
                         io.indices, io.log_norm, io.rows, io.V, attrs);
  }
  return Run<float>(ctx, static_cast<const float*>(io.logits), static_cast<float*>(io.values), io.indices,
                    io.log_norm, io.rows, io.V, attrs);
}

OrtStatus* ComputeCpu(const Attributes& attrs, OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Io io;
    if (OrtStatus* st = PrepareIo(context, attrs, &io)) return st;
    return RunCpu(context, io, attrs);
  });
}

}  // namespace toolkit::softmax_topk
