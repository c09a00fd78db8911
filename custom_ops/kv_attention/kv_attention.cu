// CUDA kernels of QuantKVAttention: the algorithm of kv_attention_cpu.cc on a GPU.
//
// Attention (flash decoding, Dao et al. 2023 "Flash-Decoding for long-context
// inference"): one thread block per (batch, KV head, tile of kTileRows query rows,
// slice of key positions). A block walks its slice kTileK positions at a time,
// dequantizes each key/value row once into shared memory and uses it for every
// query row of the tile (rows are the Hq/Hkv heads of the group x the S queries:
// GQA reuse), keeping an online softmax per row: one warp owns a row, its lanes are
// the kTileK positions. A second kernel merges the slices' (max, sum, weighted V)
// partials. Masking: a -inf bias drops a position, a row with every position dropped
// outputs zeros, no attn_bias = causal, as on the CPU. A NaN score makes the row NaN
// (a NaN query or key, a NaN bias), as on the CPU. One difference: the CPU forms the dot product of a
// dropped position too, so a NaN or inf key under a -inf bias makes its row NaN there;
// here the position is skipped (no dot product).
//
// Both cache layouts of kv_attention.h: the growing cache (present = past + new
// tokens) and the fixed-capacity one (input cache_lengths; token strides Nc / Rc of
// the past and N2c / R2c of the present; the present may be bound to the past's
// buffers, which is why the new residual rows are written after the flushed tokens
// were quantized from the old ones, and copies onto themselves are skipped).
//
// Present cache: the past quantized parts and the remaining residual are strided
// device copies; the F flushed tokens are quantized by one block per token (values,
// per-token keys) or per key group (per-channel keys), with the scalar rules of
// kv_math.h applied in the CPU kernel's order (min/max scans, one IEEE division,
// rintf), so codes, scales and zeros are bit-identical to the CPU kernel and to
// toolkit/ops/kv_quant.py. nvcc's default IEEE division (no --use_fast_math) is
// required for that; the dequantization s * code is exact in float32 (11-bit
// scale x 8-bit code), so contracting s * code + z into an FMA changes nothing.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "kv_attention/kv_attention.cuh"
#include "kv_attention/kv_math.h"

namespace toolkit::kv_attention {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;
constexpr int kTileK = 32;  // key positions per step: one per lane
constexpr int kTileRows = 8;  // query rows per block
constexpr int kRowsPerWarp = kTileRows / kWarps;
constexpr int64_t kMinSliceLen = 2 * kTileK;
static_assert(kTileK == 32, "a warp's lanes are the positions of one tile");
static_assert(kTileRows % kWarps == 0, "every warp owns the same number of rows");

__device__ __forceinline__ float WarpMax(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

__device__ __forceinline__ float WarpSum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// As BiasAt of the CPU kernel.
__device__ __forceinline__ float BiasAt(const Io& io, int64_t b, int64_t s, int64_t t) {
  if (io.bias_batch == 0) return t <= io.N + io.r + s ? 0.0f : -INFINITY;
  const int64_t bb = io.bias_batch == 1 ? 0 : b;
  return io.bias[(bb * io.S + s) * io.T + t];
}

// Full-precision row of position t >= N of (batch, KV head) bh: residual, then new tokens.
__device__ __forceinline__ const float* FpRow(const Io& io, const float* res, const float* fresh, int64_t bh,
                                              int64_t t) {
  const int64_t i = t - io.N;
  if (i < io.r) return res + (bh * io.Rc + i) * io.D;
  return fresh + (bh * io.S + (i - io.r)) * io.D;
}

// Code of channel d in a packed token row (channel j*P + i in bits [i*bits, (i+1)*bits) of byte j).
// Channel and group indices inside a row are 32-bit here and in KeyAt / ValueAt
// (64-bit integer division is a long emulated sequence on NVIDIA GPUs); positions
// and offsets into the cache stay 64-bit. P = 8 / bits is a power of two: shifts.
__device__ __forceinline__ float CodeAt(const uint8_t* row, int d, int bits) {
  const int log2_per = bits == 8 ? 0 : (bits == 4 ? 1 : 2);
  return float((row[d >> log2_per] >> ((d & ((1 << log2_per) - 1)) * bits)) & ((1 << bits) - 1));
}

// Dequantized key or value element (t, d) of bh. Per-token parameters are read
// through the same rule for keys and values; per-channel keys use group t / G.
__device__ __forceinline__ float KeyAt(const Io& io, int bits, bool per_channel, int G, int64_t bh, int64_t t,
                                       int d) {
  if (t >= io.N) return FpRow(io, io.key_res, io.key, bh, t)[d];
  const float c = CodeAt(io.key_q + (bh * io.Nc + t) * io.row_bytes, d, bits);
  if (per_channel) {
    const int64_t tg = t <= INT32_MAX ? int64_t(int(t) / G) : t / G;  // (32-bit where it fits: always, in practice)
    const int64_t p = (bh * (io.Nc / G) + tg) * io.D + d;
    return HalfToFloat(io.key_scale[p]) * c + HalfToFloat(io.key_zero[p]);
  }
  const int64_t p = (bh * io.Nc + t) * (io.D / G) + d / G;  // (d / G: 32-bit)
  const float s = HalfToFloat(io.key_scale[p]);
  const float z = io.key_zero ? HalfToFloat(io.key_zero[p]) : -128.0f * s;
  return s * c + z;
}

__device__ __forceinline__ float ValueAt(const Io& io, int bits, int G, int64_t bh, int64_t t, int d) {
  if (t >= io.N) return FpRow(io, io.value_res, io.value, bh, t)[d];
  const float c = CodeAt(io.value_q + (bh * io.Nc + t) * io.row_bytes, d, bits);
  const int64_t p = (bh * io.Nc + t) * (io.D / G) + d / G;
  const float s = HalfToFloat(io.value_scale[p]);
  const float z = io.value_zero ? HalfToFloat(io.value_zero[p]) : -128.0f * s;
  return s * c + z;
}

struct Plan {
  int64_t rows = 0;       // query rows per (batch, KV head): rep * S
  int64_t row_tiles = 0;  // ceil(rows / kTileRows)
  int64_t slices = 1;
  int64_t slice_len = 0;  // a multiple of kTileK
};

// Shared memory of AttendKernel, in floats.
__host__ __device__ __forceinline__ int64_t AttendSmemFloats(int64_t D) {
  return kTileRows * D          // scaled queries
         + kTileK * (D + 1)     // keys (padded rows: lane t reads row t without bank conflicts)
         + kTileK * D           // values
         + kTileRows * D        // accumulators
         + kTileRows * kTileK   // softmax weights of the tile
         + kTileRows;           // per-row rescale factor of the tile
}

// quantize_query=1: one scaled query row (in shared memory) rounded to int8 by one
// warp, with the CPU kernel's float32 operations (QuantizeQueryRow: a = max |q|,
// round-half-to-even of q * (127 / a), clamp, times a / 127; a row holding inf or
// NaN becomes NaN, a zero row stays zero), so both providers attend with the same
// rounded query.
__device__ void RoundQueryRowWarp(float* qr, int64_t D, int lane) {
  float amax = 0.0f;
  int finite = 1;
  for (int64_t d = lane; d < D; d += 32) {
    const float m = fabsf(qr[d]);
    finite &= int(m <= 3.402823466e38f);  // false for inf and NaN
    amax = fmaxf(amax, m);
  }
  for (int off = 16; off > 0; off >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    finite &= __shfl_xor_sync(0xffffffffu, finite, off);
  }
  if (!finite || amax == 0.0f) {
    const float v = finite ? 0.0f : __int_as_float(0x7fc00000);
    for (int64_t d = lane; d < D; d += 32) qr[d] = v;
    return;
  }
  const float inv = 127.0f / amax, scale = amax / 127.0f;
  for (int64_t d = lane; d < D; d += 32) qr[d] = QueryCode(qr[d], inv) * scale;
}

// Partials [(bh * rows + row) * slices + slice] x {max, sum, acc[D]}.
__global__ void __launch_bounds__(kThreads) AttendKernel(const Io io, const int bits, const bool key_per_channel,
                                                         const int64_t key_group, const int64_t value_group,
                                                         const bool quantize_query, const Plan plan,
                                                         float* __restrict__ partials) {
  extern __shared__ float smem[];
  const int64_t D = io.D;
  float* q = smem;
  float* k = q + kTileRows * D;
  float* v = k + kTileK * (D + 1);
  float* acc = v + kTileK * D;
  float* p = acc + kTileRows * D;
  float* corr = p + kTileRows * kTileK;

  const int warp = int(threadIdx.x) / 32, lane = int(threadIdx.x) % 32;
  const int64_t blk = blockIdx.x;
  const int64_t slice = blk % plan.slices;
  const int64_t rt = (blk / plan.slices) % plan.row_tiles;
  const int64_t bh = blk / plan.slices / plan.row_tiles;
  const int64_t b = bh / io.Hkv, h = bh % io.Hkv, S = io.S, rep = io.Hq / io.Hkv;
  const int64_t row0 = rt * kTileRows;
  const int nrows = int(plan.rows - row0 < kTileRows ? plan.rows - row0 : kTileRows);
  const int64_t t_begin = slice * plan.slice_len;
  const int64_t t_end = t_begin + plan.slice_len < io.T ? t_begin + plan.slice_len : io.T;

  // Query row r of the tile is head h*rep + j, query s, with row0 + r = j*S + s.
  const int Di = int(D);  // (a head dimension: tile indices are 32-bit)
  for (int idx = threadIdx.x; idx < kTileRows * Di; idx += kThreads) {
    const int r = idx / Di, d = idx % Di;
    float x = 0.0f;
    if (r < nrows) {
      const int64_t j = (row0 + r) / S, s = (row0 + r) % S;
      x = io.query[((b * io.Hq + h * rep + j) * S + s) * D + d] * io.scale;
    }
    q[idx] = x;
    acc[idx] = 0.0f;
  }
  float m[kRowsPerWarp], l[kRowsPerWarp];
  bool nan_seen[kRowsPerWarp];  // a NaN score in the row (warp-uniform)
  for (int jj = 0; jj < kRowsPerWarp; ++jj) m[jj] = -INFINITY, l[jj] = 0.0f, nan_seen[jj] = false;
  __syncthreads();
  if (quantize_query) {  // warp w rounds rows w, w + kWarps, ... (the rows it scores)
    for (int jj = 0; jj < kRowsPerWarp; ++jj) {
      const int r = warp + jj * kWarps;
      if (r < nrows) RoundQueryRowWarp(q + r * D, D, lane);  // warp-uniform
    }
    __syncthreads();
  }

  for (int64_t t0 = t_begin; t0 < t_end; t0 += kTileK) {
    for (int idx = threadIdx.x; idx < kTileK * Di; idx += kThreads) {
      const int i = idx / Di, d = idx % Di;
      k[i * (Di + 1) + d] = t0 + i < t_end ? KeyAt(io, bits, key_per_channel, int(key_group), bh, t0 + i, d) : 0.0f;
    }
    __syncthreads();
    // Scores of this tile and the online-softmax update; warp w owns rows w, w + kWarps, ...
    int valid_any = 0;
    for (int jj = 0; jj < kRowsPerWarp; ++jj) {
      const int r = warp + jj * kWarps;
      if (r >= nrows) continue;  // warp-uniform
      const int64_t s = (row0 + r) % S, t = t0 + lane;
      float x = -INFINITY;
      if (t < t_end) {
        const float bias = BiasAt(io, b, s, t);
        if (bias != -INFINITY) {
          const float* qr = q + r * D;
          const float* kr = k + lane * (D + 1);
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) dot = fmaf(qr[d], kr[d], dot);
          x = dot + bias;
        }
      }
      const bool valid = x > -INFINITY;  // false for NaN too: NaN stays out of the max
      nan_seen[jj] |= __any_sync(0xffffffffu, x != x);
      const float m_new = fmaxf(m[jj], WarpMax(valid ? x : -INFINITY));
      float c = 1.0f, pt = 0.0f;
      if (m_new > -INFINITY) {
        c = expf(m[jj] - m_new);  // 0 for the first finite score
        pt = valid ? expf(x - m_new) : 0.0f;
      }
      l[jj] = l[jj] * c + WarpSum(pt);
      m[jj] = m_new;
      p[r * kTileK + lane] = pt;
      if (lane == 0) corr[r] = c;
      valid_any |= int(valid);
    }
    // Also the barrier after the last read of k. No position of the tile is seen by
    // any row: skip its values (masked rows may hold anything, even inf).
    if (!__syncthreads_or(valid_any)) continue;
    for (int idx = threadIdx.x; idx < kTileK * Di; idx += kThreads) {
      const int i = idx / Di, d = idx % Di;
      v[idx] = t0 + i < t_end ? ValueAt(io, bits, int(value_group), bh, t0 + i, d) : 0.0f;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nrows * Di; idx += kThreads) {
      const int r = idx / Di, d = idx % Di;
      const float* pr = p + r * kTileK;
      float sum = 0.0f;
      for (int i = 0; i < kTileK; ++i) {
        const float w = pr[i];
        sum += w != 0.0f ? w * v[i * D + d] : 0.0f;  // a dropped position contributes nothing, even 0 * inf
      }
      acc[idx] = acc[idx] * corr[r] + sum;
    }
    __syncthreads();
  }

  // A NaN score in the slice: its sum is NaN, as the CPU's exp(NaN - m) makes it, and
  // the output with it, after the merge too. A slice of NaN (and -inf) scores alone
  // gets a finite max, as on the CPU, so the merge does not take it for masked.
  for (int jj = 0; jj < kRowsPerWarp; ++jj) {
    if (nan_seen[jj]) {
      if (!(m[jj] > -INFINITY)) m[jj] = 0.0f;
      l[jj] = NAN;
    }
  }
  if (plan.slices == 1) {
    // The whole row in this block: the output directly, as MergeKernel would write it
    // from this one partial (zeros when every position is masked). No partials
    // buffer: at prefill it would hold B * Hq * S * (D + 2) floats.
    for (int jj = 0; jj < kRowsPerWarp; ++jj) {
      const int r = warp + jj * kWarps;
      if (r < nrows && lane == 0) corr[r] = m[jj] > -INFINITY ? 1.0f / l[jj] : 0.0f;
    }
    __syncthreads();
    for (int64_t idx = threadIdx.x; idx < nrows * D; idx += kThreads) {
      const int64_t r = idx / D, d = idx % D;
      const int64_t j = (row0 + r) / S, s = (row0 + r) % S;
      const float inv = corr[r];
      io.out[((b * io.Hq + h * rep + j) * S + s) * D + d] = inv != 0.0f ? acc[idx] * inv : 0.0f;
    }
    return;
  }
  const int64_t D2 = D + 2;
  for (int jj = 0; jj < kRowsPerWarp; ++jj) {
    const int r = warp + jj * kWarps;
    if (r < nrows && lane == 0) {
      float* dst = partials + ((bh * plan.rows + row0 + r) * plan.slices + slice) * D2;
      dst[0] = m[jj];
      dst[1] = l[jj];
    }
  }
  for (int64_t idx = threadIdx.x; idx < nrows * D; idx += kThreads) {
    const int64_t r = idx / D, d = idx % D;
    partials[((bh * plan.rows + row0 + r) * plan.slices + slice) * D2 + 2 + d] = acc[idx];
  }
}

// One block per (bh, row): the slices' partials -> output row (zeros when every
// position is masked), as MergeSlices of the CPU kernel.
__global__ void __launch_bounds__(kThreads) MergeKernel(const Io io, const Plan plan,
                                                        const float* __restrict__ partials) {
  const int64_t blk = blockIdx.x;
  const int64_t bh = blk / plan.rows, rr = blk % plan.rows;
  const int64_t b = bh / io.Hkv, h = bh % io.Hkv, S = io.S, D = io.D, rep = io.Hq / io.Hkv;
  const int64_t j = rr / S, s = rr % S, D2 = D + 2;
  const float* part = partials + blk * plan.slices * D2;
  float* out = io.out + ((b * io.Hq + h * rep + j) * S + s) * D;
  float mx = -INFINITY;
  for (int64_t c = 0; c < plan.slices; ++c) mx = fmaxf(mx, part[c * D2]);
  if (!(mx > -INFINITY)) {
    for (int64_t d = threadIdx.x; d < D; d += kThreads) out[d] = 0.0f;
    return;
  }
  float denom = 0.0f;
  for (int64_t c = 0; c < plan.slices; ++c) {
    const float mc = part[c * D2];
    if (mc > -INFINITY) denom += expf(mc - mx) * part[c * D2 + 1];
  }
  const float inv = 1.0f / denom;
  for (int64_t d = threadIdx.x; d < D; d += kThreads) {
    float sum = 0.0f;
    for (int64_t c = 0; c < plan.slices; ++c) {
      const float mc = part[c * D2];
      if (mc > -INFINITY) sum += expf(mc - mx) * part[c * D2 + 2 + d];
    }
    out[d] = sum * inv;
  }
}

// ---------------------------------------------------------------- present cache

// Per-token groups of G channels of one row x (global), as per_token of the CPU
// kernel: params by one thread per group scanning in channel order, then one
// thread per packed byte. `params` is shared scratch of 2 * D / G floats.
__device__ void QuantizeTokenRow(const float* x, int64_t D, int64_t G, int bits, bool symmetric, uint16_t* s_out,
                                 uint16_t* z_out, uint8_t* q_out, float* params) {
  const int64_t ng = D / G;
  float* sf = params;
  float* zf = params + ng;
  for (int64_t g = threadIdx.x; g < ng; g += blockDim.x) {
    const float* xg = x + g * G;
    if (symmetric) {
      float amax = 0.0f;
      for (int64_t i = 0; i < G; ++i) {
        amax = NanMax(amax, fabsf(xg[i]));
      }
      s_out[g] = FloatToHalf(amax / 127.0f);
      sf[g] = HalfToFloat(s_out[g]);
    } else {
      float mn = xg[0], mx = xg[0];
      for (int64_t i = 1; i < G; ++i) {
        mn = NanMin(mn, xg[i]);
        mx = NanMax(mx, xg[i]);
      }
      uint16_t s16, z16;
      AsymmetricParams(mn, mx, bits, &s16, &z16);
      s_out[g] = s16;
      z_out[g] = z16;
      sf[g] = HalfToFloat(s16);
      zf[g] = HalfToFloat(z16);
    }
  }
  __syncthreads();
  const int per = 8 / bits;
  for (int64_t jb = threadIdx.x; jb < D / per; jb += blockDim.x) {
    unsigned byte = 0;
    for (int i = 0; i < per; ++i) {
      const int64_t d = jb * per + i, g = d / G;
      const unsigned code = symmetric ? SymmetricCode(x[d], sf[g]) : AsymmetricCode(x[d], sf[g], zf[g], bits);
      byte |= code << (i * bits);
    }
    q_out[jb] = uint8_t(byte);
  }
  __syncthreads();  // params is reused by the next row
}

// One block per (bh, flushed token i): the value row, and the key row when keys are per token.
__global__ void __launch_bounds__(kThreads) QuantizeTokensKernel(const Io io, const int bits, const bool symmetric,
                                                                 const bool key_per_channel, const int64_t key_group,
                                                                 const int64_t value_group) {
  extern __shared__ float params[];
  const int64_t bh = blockIdx.x / io.F, i = blockIdx.x % io.F;
  const int64_t N = io.N, P = io.N2c, rb = io.row_bytes, t = N + i;  // P: the present's token stride
  const int64_t vp = io.value_params;
  QuantizeTokenRow(FpRow(io, io.value_res, io.value, bh, t), io.D, value_group, bits, symmetric,
                   io.p_value_scale + (bh * P + t) * vp,
                   io.p_value_zero ? io.p_value_zero + (bh * P + t) * vp : nullptr, io.p_value_q + (bh * P + t) * rb,
                   params);
  if (!key_per_channel) {
    const int64_t kp = io.key_params_per_token;
    QuantizeTokenRow(FpRow(io, io.key_res, io.key, bh, t), io.D, key_group, bits, symmetric,
                     io.p_key_scale + (bh * P + t) * kp, io.p_key_zero ? io.p_key_zero + (bh * P + t) * kp : nullptr,
                     io.p_key_q + (bh * P + t) * rb, params);
  }
}

// One block per (bh, key group of G flushed tokens), per-channel keys (always
// asymmetric): one thread per channel scans the group's tokens in order, leaving out
// padding (bias at the last query row <= kMaskedBias), then one thread per packed byte.
__global__ void __launch_bounds__(kThreads) QuantizeKeyChannelsKernel(const Io io, const int bits, const int64_t G) {
  extern __shared__ float params[];  // 2 * D
  const int64_t groups = io.F / G;
  const int64_t bh = blockIdx.x / groups, g0 = (blockIdx.x % groups) * G;
  const int64_t b = bh / io.Hkv, D = io.D, N = io.N, P = io.N2c, rb = io.row_bytes;
  const int64_t gi = (N + g0) / G;
  uint16_t* s_out = io.p_key_scale + (bh * (P / G) + gi) * D;
  uint16_t* z_out = io.p_key_zero + (bh * (P / G) + gi) * D;
  float* sf = params;
  float* zf = params + D;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float mn = INFINITY, mx = -INFINITY;
    for (int64_t i = 0; i < G; ++i) {
      const int64_t t = N + g0 + i;
      if (io.bias_batch && !(BiasAt(io, b, io.S - 1, t) > kMaskedBias)) continue;
      const float x = FpRow(io, io.key_res, io.key, bh, t)[d];
      mn = NanMin(mn, x);
      mx = NanMax(mx, x);
    }
    if (mn > mx) mn = mx = 0.0f;  // no valid token in the group
    uint16_t s16, z16;
    AsymmetricParams(mn, mx, bits, &s16, &z16);
    s_out[d] = s16;
    z_out[d] = z16;
    sf[d] = HalfToFloat(s16);
    zf[d] = HalfToFloat(z16);
  }
  __syncthreads();
  const int per = 8 / bits;
  for (int64_t idx = threadIdx.x; idx < G * rb; idx += blockDim.x) {
    const int64_t i = idx / rb, jb = idx % rb;
    const float* x = FpRow(io, io.key_res, io.key, bh, N + g0 + i);
    unsigned byte = 0;
    for (int k = 0; k < per; ++k) {
      const int64_t d = jb * per + k;
      byte |= unsigned(AsymmetricCode(x[d], sf[d], zf[d], bits)) << (k * bits);
    }
    io.p_key_q[(bh * P + N + g0 + i) * rb + jb] = uint8_t(byte);
  }
}

// rows x width bytes from src (pitch spitch) to dst (pitch dpitch); nothing when empty
// or when dst is src with the same pitch (a present bound to its past's buffer).
cudaError_t Copy2D(void* dst, int64_t dpitch, const void* src, int64_t spitch, int64_t width, int64_t rows,
                   cudaStream_t s) {
  if (width <= 0 || rows <= 0 || (dst == src && dpitch == spitch)) return cudaSuccess;
  return cudaMemcpy2DAsync(dst, size_t(dpitch), src, size_t(spitch), size_t(width), size_t(rows),
                           cudaMemcpyDeviceToDevice, s);
}

// present_cache_lengths: an output, so in device memory on this provider.
__global__ void WriteLengthsKernel(int64_t* out, int64_t n, int64_t r) {
  out[0] = n;
  out[1] = r;
}

cudaError_t WritePresent(const Io& io, const Attributes& a, cudaStream_t s) {
  const int64_t heads = io.B * io.Hkv, D = io.D, N = io.N, F = io.F, rb = io.row_bytes;
  const int64_t Nc = io.Nc, P = io.N2c, PR = io.R2c;  // token strides: past, present, present residual
  const int64_t r2 = io.r + io.S - F;
  const int bits = int(a.bits);
  // The past: a growing cache copies its N rows; a fixed-capacity one whole tensors
  // (nothing where the present is bound to the past: Copy2D skips dst == src).
  const int64_t rows = io.capacity ? Nc : N;
  cudaError_t err = Copy2D(io.p_key_q, P * rb, io.key_q, Nc * rb, rows * rb, heads, s);
  if (err == cudaSuccess) err = Copy2D(io.p_value_q, P * rb, io.value_q, Nc * rb, rows * rb, heads, s);
  constexpr int64_t h2 = sizeof(uint16_t);
  const int64_t kp_dst = KeyParams(io, a, P) * h2, kp_src = KeyParams(io, a, Nc) * h2;
  const int64_t kp_width = KeyParams(io, a, rows) * h2;
  if (err == cudaSuccess) err = Copy2D(io.p_key_scale, kp_dst, io.key_scale, kp_src, kp_width, heads, s);
  if (err == cudaSuccess && io.p_key_zero) err = Copy2D(io.p_key_zero, kp_dst, io.key_zero, kp_src, kp_width, heads, s);
  const int64_t vp = io.value_params;
  if (err == cudaSuccess) {
    err = Copy2D(io.p_value_scale, P * vp * h2, io.value_scale, Nc * vp * h2, rows * vp * h2, heads, s);
  }
  if (err == cudaSuccess && io.p_value_zero) {
    err = Copy2D(io.p_value_zero, P * vp * h2, io.value_zero, Nc * vp * h2, rows * vp * h2, heads, s);
  }
  constexpr int64_t f4 = sizeof(float);
  if (io.capacity) {  // the whole past residual (unused slots too), before its kept rows are rewritten
    if (err == cudaSuccess) err = Copy2D(io.p_key_res, PR * D * f4, io.key_res, io.Rc * D * f4, io.Rc * D * f4, heads, s);
    if (err == cudaSuccess) {
      err = Copy2D(io.p_value_res, PR * D * f4, io.value_res, io.Rc * D * f4, io.Rc * D * f4, heads, s);
    }
  }
  if (err != cudaSuccess) return err;

  // The F flushed tokens, quantized from the past residual and the new tokens. This
  // runs before the residual rows below are written: a present bound to the past
  // overwrites that past residual.
  if (F > 0 && heads > 0 && D > 0) {
    const size_t token_smem = size_t(2 * D) * sizeof(float);  // 2 * (D / G) <= 2 * D params
    QuantizeTokensKernel<<<unsigned(heads * F), kThreads, token_smem, s>>>(io, bits, a.symmetric != 0,
                                                                           a.key_per_channel != 0, a.key_group,
                                                                           a.value_group);
    err = cudaGetLastError();
    if (err == cudaSuccess && a.key_per_channel) {
      QuantizeKeyChannelsKernel<<<unsigned(heads * (F / a.key_group)), kThreads, token_smem, s>>>(io, bits,
                                                                                                   a.key_group);
      err = cudaGetLastError();
    }
    if (err != cudaSuccess) return err;
  }

  // The residual that stays in full precision: flushed-window leftovers of the past
  // residual (positions F.. of it), then the new tokens not flushed. (After a flush,
  // F >= residual > r, so every kept row is a new token; without one, the past rows
  // stay where they are, which a bound present skips as a copy onto itself.)
  const int64_t from_res = io.r > F ? io.r - F : 0;
  const int64_t fresh0 = F > io.r ? F - io.r : 0, from_fresh = io.S - fresh0;
  using Rows = std::tuple<float*, const float*, const float*>;  // present residual, past residual, new tokens
  for (const auto& [dst, res, fresh] : {Rows{io.p_key_res, io.key_res, io.key},
                                        Rows{io.p_value_res, io.value_res, io.value}}) {
    if (err == cudaSuccess) err = Copy2D(dst, PR * D * f4, res + F * D, io.Rc * D * f4, from_res * D * f4, heads, s);
    if (err == cudaSuccess) {
      err = Copy2D(dst + from_res * D, PR * D * f4, fresh + fresh0 * D, io.S * D * f4, from_fresh * D * f4, heads, s);
    }
  }
  if (err == cudaSuccess && io.p_lengths) {
    WriteLengthsKernel<<<1, 1, 0, s>>>(io.p_lengths, N + F, r2);
    err = cudaGetLastError();
  }
  return err;
}

Plan MakePlan(const Io& io, int sms) {
  Plan plan;
  const int64_t heads = io.B * io.Hkv;
  plan.rows = (io.Hq / io.Hkv) * io.S;
  plan.row_tiles = (plan.rows + kTileRows - 1) / kTileRows;
  // About two blocks per SM when batch x heads x row tiles alone does not fill the
  // GPU (decode at small batch), each slice at least kMinSliceLen positions.
  const int64_t base = heads * plan.row_tiles;
  const int64_t want = (2 * int64_t(sms) + base - 1) / base;
  const int64_t most = (io.T + kMinSliceLen - 1) / kMinSliceLen;
  const int64_t slices = want < most ? want : most;
  plan.slice_len = (io.T + (slices > 1 ? slices : 1) - 1) / (slices > 1 ? slices : 1);
  plan.slice_len = (plan.slice_len + kTileK - 1) / kTileK * kTileK;
  plan.slices = (io.T + plan.slice_len - 1) / plan.slice_len;
  return plan;
}

cudaError_t Attend(const Io& io, const Attributes& a, cudaStream_t s) {
  const int64_t heads = io.B * io.Hkv;
  if (heads == 0 || io.T == 0 || io.D == 0 || io.Hq == 0 || io.S == 0) return cudaSuccess;
  int device = 0, sms = 0, smem_optin = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  const size_t smem = size_t(AttendSmemFloats(io.D)) * sizeof(float);
  if (smem > size_t(smem_optin)) return cudaErrorInvalidValue;  // head_dim too large
  if (smem > 48 * 1024) {
    err = cudaFuncSetAttribute(AttendKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (err != cudaSuccess) return err;
  }
  const Plan plan = MakePlan(io, sms);
  const int64_t blocks = heads * plan.row_tiles * plan.slices;
  const int64_t merge_blocks = heads * plan.rows;
  if (blocks > INT32_MAX || (plan.slices > 1 && merge_blocks > INT32_MAX)) return cudaErrorInvalidValue;
  float* partials = nullptr;  // only with several slices (AttendKernel writes the output otherwise)
  if (plan.slices > 1) {
    err = cudaMallocAsync(reinterpret_cast<void**>(&partials),
                          size_t(merge_blocks * plan.slices * (io.D + 2)) * sizeof(float), s);
    if (err != cudaSuccess) return err;
  }
  AttendKernel<<<unsigned(blocks), kThreads, smem, s>>>(io, int(a.bits), a.key_per_channel != 0, a.key_group,
                                                        a.value_group, a.quantize_query != 0, plan, partials);
  err = cudaGetLastError();
  if (err == cudaSuccess && partials) {
    MergeKernel<<<unsigned(merge_blocks), kThreads, 0, s>>>(io, plan, partials);
    err = cudaGetLastError();
  }
  const cudaError_t free_err = partials ? cudaFreeAsync(partials, s) : cudaSuccess;
  return err != cudaSuccess ? err : free_err;
}

}  // namespace

const char* CudaErrorString(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int LaunchCuda(const Io& io, const Attributes& attrs, void* stream) {
  if (io.Hkv <= 0 || io.Hq % io.Hkv != 0 || (attrs.bits != 8 && attrs.bits != 4 && attrs.bits != 2) ||
      attrs.key_group <= 0 || attrs.value_group <= 0) {
    return int(cudaErrorInvalidValue);
  }
  auto s = static_cast<cudaStream_t>(stream);
  const cudaError_t err = Attend(io, attrs, s);
  if (err != cudaSuccess) return int(err);
  return int(WritePresent(io, attrs, s));
}

}  // namespace toolkit::kv_attention

namespace {

// The C entries: Io from raw arguments, with the checks ReadAttributes and Prepare
// make on the ORT path (these callers are unchecked). capacity: the past tensors
// (and the presents, same shapes) have token dimensions Nc / Rc, and (N, r) are the
// cache_lengths; otherwise the growing layout.
int RunCEntry(const int64_t* dims, const int64_t* attrs, float scale, const void* const* inputs,
              void* const* outputs, void* stream, bool capacity) {
  using namespace toolkit::kv_attention;
  Attributes a;
  a.bits = attrs[0], a.key_per_channel = attrs[1], a.key_group = attrs[2], a.value_group = attrs[3];
  a.residual = attrs[4], a.symmetric = attrs[5], a.quantize_query = attrs[6], a.scale = scale;
  Io io;
  io.B = dims[0], io.Hq = dims[1], io.Hkv = dims[2], io.S = dims[3], io.D = dims[4], io.N = dims[5], io.r = dims[6];
  io.bias_batch = dims[7];
  if (!AttributeError(a).empty() || (a.symmetric != 0 && a.symmetric != 1)) return int(cudaErrorInvalidValue);
  if (io.B < 0 || io.Hq < 0 || io.S < 0 || io.D < 0 || io.N < 0 || io.r < 0 ||
      (io.bias_batch != 0 && io.bias_batch != 1 && io.bias_batch != io.B) || io.D % (8 / a.bits) != 0 ||
      io.D % a.value_group != 0 || (!a.key_per_channel && io.D % a.key_group != 0) ||
      (a.key_per_channel && io.N % a.key_group != 0) || (a.residual == 0 ? io.r != 0 : io.r >= a.residual)) {
    return int(cudaErrorInvalidValue);
  }
  // The derived fields, as Prepare computes them.
  io.T = io.N + io.r + io.S;
  io.F = a.residual > 0 ? (io.r + io.S) / a.residual * a.residual : io.r + io.S;
  io.capacity = capacity;
  if (capacity) {
    io.Nc = io.N2c = dims[8], io.Rc = io.R2c = dims[9];
    if (io.N + io.F > io.Nc || io.r + io.S - io.F > io.Rc || (a.key_per_channel && io.Nc % a.key_group != 0)) {
      return int(cudaErrorInvalidValue);  // the cache is full, or a capacity the key groups do not divide
    }
  } else {
    io.Nc = io.N, io.Rc = io.r, io.N2c = io.N + io.F, io.R2c = io.r + io.S - io.F;
  }
  io.row_bytes = io.D * a.bits / 8;
  io.key_params_per_token = a.key_per_channel ? 0 : io.D / a.key_group;
  io.value_params = io.D / a.value_group;
  io.scale = scale > 0.0f ? scale : 1.0f / std::sqrt(float(io.D));
  io.query = static_cast<const float*>(inputs[0]);
  io.key = static_cast<const float*>(inputs[1]);
  io.value = static_cast<const float*>(inputs[2]);
  io.key_q = static_cast<const uint8_t*>(inputs[3]);
  io.key_scale = static_cast<const uint16_t*>(inputs[4]);
  io.key_zero = static_cast<const uint16_t*>(inputs[5]);
  io.key_res = static_cast<const float*>(inputs[6]);
  io.value_q = static_cast<const uint8_t*>(inputs[7]);
  io.value_scale = static_cast<const uint16_t*>(inputs[8]);
  io.value_zero = static_cast<const uint16_t*>(inputs[9]);
  io.value_res = static_cast<const float*>(inputs[10]);
  io.bias = io.bias_batch ? static_cast<const float*>(inputs[11]) : nullptr;
  io.out = static_cast<float*>(outputs[0]);
  io.p_key_q = static_cast<uint8_t*>(outputs[1]);
  io.p_key_scale = static_cast<uint16_t*>(outputs[2]);
  io.p_key_zero = a.symmetric ? nullptr : static_cast<uint16_t*>(outputs[3]);
  io.p_key_res = static_cast<float*>(outputs[4]);
  io.p_value_q = static_cast<uint8_t*>(outputs[5]);
  io.p_value_scale = static_cast<uint16_t*>(outputs[6]);
  io.p_value_zero = a.symmetric ? nullptr : static_cast<uint16_t*>(outputs[7]);
  io.p_value_res = static_cast<float*>(outputs[8]);
  io.p_lengths = capacity ? static_cast<int64_t*>(outputs[9]) : nullptr;
  const int64_t past_tokens = capacity ? io.Nc : io.N;
  if (!a.symmetric && ((past_tokens > 0 && (!io.key_zero || !io.value_zero)) ||
                       (io.N2c > 0 && (!io.p_key_zero || !io.p_value_zero)))) {
    return int(cudaErrorInvalidValue);  // symmetric=0 has zero points in and out
  }
  return LaunchCuda(io, a, stream);
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int toolkit_quant_kv_attention_cuda(
    const int64_t* dims, const int64_t* attrs, float scale, const void* const* inputs, void* const* outputs,
    void* stream) {
  return RunCEntry(dims, attrs, scale, inputs, outputs, stream, /*capacity=*/false);
}

extern "C" __attribute__((visibility("default"))) int toolkit_quant_kv_attention_cuda_capacity(
    const int64_t* dims, const int64_t* attrs, float scale, const void* const* inputs, void* const* outputs,
    void* stream) {
  return RunCEntry(dims, attrs, scale, inputs, outputs, stream, /*capacity=*/true);
}
