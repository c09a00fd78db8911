// The sampling step of SampleTopKTopP on k sorted candidates, shared by the CPU
// kernel, the CUDA kernel (compiled as __host__ __device__) and mirrored by the
// NumPy reference in toolkit/ops/reference.py. Keep the three in step.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TOOLKIT_HD __host__ __device__ __forceinline__
#else
#define TOOLKIT_HD inline
#endif

namespace toolkit::sample_topk {

// SplitMix64 (Steele, Lea & Flood 2014): a counter-based generator, so row r of a
// call with seed s draws the same number on every provider and thread count.
TOOLKIT_HD uint64_t SplitMix64(uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform double in [0, 1) for (seed, row): 53 random bits.
TOOLKIT_HD double Uniform(int64_t seed, int64_t row) {
  const uint64_t bits = SplitMix64(SplitMix64(uint64_t(seed)) ^ uint64_t(row));
  return double(bits >> 11) * (1.0 / 9007199254740992.0);
}

// The uniform row r of a call draws: one seed for the call, Uniform(seed, r); per-row
// seeds (row_seeds non-null), Uniform(row_seeds[r], 0), what the row would draw alone
// in a call with its seed, whatever its slot in the batch (continuous batching).
TOOLKIT_HD double RowUniform(int64_t seed, const int64_t* row_seeds, int64_t r) {
  return row_seeds ? Uniform(row_seeds[r], 0) : Uniform(seed, r);
}

// The seed a host feeds for call `call` of a run with base seed `seed` (toolkit.generate
// and the C++ host). Hashing the base keeps runs with nearby base seeds apart: with
// seed + call, base seed s's call i + 1 drew what base seed s + 1's call i drew, so
// runs with consecutive seeds were shifted copies of one stream of uniforms.
TOOLKIT_HD int64_t CallSeed(int64_t seed, int64_t call) {
  return int64_t(SplitMix64(uint64_t(seed)) + uint64_t(call));
}

// probs[0..k) are the top-k probabilities under softmax(x / T) over the whole row,
// in descending order. The filters run in transformers' order (its top-k, top-p and
// min-p logits warpers): the shortest prefix whose mass reaches top_p of the top-k
// mass (zero probabilities after the first left out), then those of it >= min_p *
// probs[0]; one of them is drawn in proportion to its probability with u in [0, 1).
// Returns the chosen position in [0, k). A NaN probability (a NaN/+inf row) selects
// position 0.
template <typename GetProb>
TOOLKIT_HD int64_t SamplePosition(GetProb prob, int64_t k, double top_p, double min_p, double u) {
  const double p0 = prob(0);
  if (!(p0 == p0)) return 0;
  int64_t m = 0;
  double total = 0.0;
  for (; m < k; ++m) {
    const double p = prob(m);
    if (m > 0 && !(p > 0.0)) break;  // sorted: everything after is zero too
    total += p;
  }
  // top-p: stop at the first prefix reaching top_p of the top-k mass.
  int64_t n = 0;
  double mass = 0.0;
  const double target_mass = top_p * total;
  while (n < m) {
    mass += prob(n);
    ++n;
    if (mass >= target_mass) break;
  }
  // min-p within it (relative to the largest, so the renormalisation does not matter).
  const double floor_p = min_p * p0;
  int64_t q = 1;  // (p0 >= min_p * p0 for min_p < 1)
  double kept = p0;
  for (; q < n; ++q) {
    const double p = prob(q);
    if (!(p >= floor_p)) break;
    kept += p;
  }
  const double target = u * kept;
  double c = 0.0;
  for (int64_t j = 0; j < q; ++j) {
    c += prob(j);
    if (c > target) return j;
  }
  return q - 1;
}

}  // namespace toolkit::sample_topk
