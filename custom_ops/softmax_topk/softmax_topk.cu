// CUDA kernels of FusedSoftmaxTopK (contract in softmax_topk.h). One block per row:
//   1. online softmax normaliser: per-thread running (max, sum) over a strided slice,
//      merged with warp shuffles, then across warps (Milakov & Gimelshein 2018);
//   2. radix select of the k-th largest order key (4 passes of 8 bits, shared
//      histogram), giving the key threshold and how many ties at it to keep;
//   3. compaction of the k winners (ties at the threshold in index order through a
//      block-wide ballot scan) into a buffer of (key desc, index asc) uint64;
//   4. bitonic sort of that buffer: in shared memory for k <= kSharedSort, else in
//      a global scratch buffer (cudaMallocAsync on the stream), so every k <= V works;
//   5. values from the row statistics.
// The row stays in L2 across the passes, so DRAM traffic is ~one read of the logits.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "softmax_topk/softmax_topk.cuh"

namespace toolkit::softmax_topk {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;
constexpr int kSharedSort = 2048;  // uint64 entries: 16 KiB of shared memory

__device__ __forceinline__ float Load(const float* p, int64_t i) { return p[i]; }
__device__ __forceinline__ float Load(const __half* p, int64_t i) { return __half2float(p[i]); }
__device__ __forceinline__ void Store(float* p, int64_t i, float v) { p[i] = v; }
__device__ __forceinline__ void Store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }

// Larger float -> larger key; NaN (any sign) above +inf; -0 == +0 (ORT's TopK order).
__device__ __forceinline__ uint32_t OrderKey(float f) {
  const uint32_t b = __float_as_uint(f);
  const uint32_t mag = b & 0x7fffffffu;
  if (mag > 0x7f800000u) return 0xffffffffu;
  if (mag == 0) return 0x80000000u;
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// Ascending uint64 order = key descending, then index ascending.
__device__ __forceinline__ uint64_t Compose(uint32_t key, int64_t index) {
  return (uint64_t(~key) << 32) | uint64_t(uint32_t(index));
}

__device__ __forceinline__ void MergeStats(float& m, float& s, float m2, float s2, float inv_t) {
  const float nm = fmaxf(m, m2);
  const float a = s == 0.0f ? 0.0f : s * expf((m - nm) * inv_t);
  const float b = s2 == 0.0f ? 0.0f : s2 * expf((m2 - nm) * inv_t);
  m = nm;
  s = a + b;
}

__device__ float BlockSum(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w) total += red[w];
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    SoftmaxTopKRowKernel(const T* __restrict__ logits, int64_t V, int64_t k, float inv_t, int normalize,
                         int log_probs, T* __restrict__ values, int64_t* __restrict__ indices,
                         float* __restrict__ log_norm, uint64_t* __restrict__ global_buf, int64_t n2) {
  __shared__ uint64_t shared_buf[kSharedSort];
  __shared__ uint32_t hist[256];
  __shared__ float red_m[kWarps], red_s[kWarps];
  __shared__ int warp_count[kWarps];
  __shared__ uint32_t sel_digit;
  __shared__ int64_t sel_remaining;
  __shared__ unsigned long long gt_count;

  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  uint64_t* buf = n2 <= kSharedSort ? shared_buf : global_buf + row * n2;

  // 1. online (max, sum); NaN / +inf only flagged (they poison the row).
  float m = -INFINITY, s = 0.0f;
  int nan = 0, pinf = 0;
  for (int64_t i = tid; i < V; i += kThreads) {
    const float v = Load(x, i);
    if (v != v) {
      nan = 1;
    } else if (v == INFINITY) {
      pinf = 1;
    } else if (v != -INFINITY) {
      if (v > m) {
        s = s * expf((m - v) * inv_t) + 1.0f;
        m = v;
      } else {
        s += expf((v - m) * inv_t);
      }
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o);
    const float s2 = __shfl_xor_sync(0xffffffffu, s, o);
    MergeStats(m, s, m2, s2, inv_t);
  }
  if (lane == 0) red_m[warp] = m, red_s[warp] = s;
  nan = __syncthreads_or(nan);
  pinf = __syncthreads_or(pinf);
  m = red_m[0];
  s = red_s[0];
  for (int w = 1; w < kWarps; ++w) MergeStats(m, s, red_m[w], red_s[w], inv_t);
  const bool poisoned = nan || pinf || m == -INFINITY;

  // 2. radix select of the k-th largest key.
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t i = tid; i < V; i += kThreads) {
      const uint32_t u = OrderKey(Load(x, i));
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 0xffu], 1u);
    }
    __syncthreads();
    if (tid == 0) {
      int64_t above = 0;
      int d = 255;
      for (; d > 0; --d) {
        if (above + hist[d] >= remaining) break;
        above += hist[d];
      }
      sel_digit = uint32_t(d);
      sel_remaining = remaining - above;
      gt_count = 0;
    }
    __syncthreads();
    prefix |= sel_digit << shift;
    mask |= 0xffu << shift;
    remaining = sel_remaining;
    __syncthreads();
  }
  const uint32_t kth = prefix;
  const int64_t take_eq = remaining;  // ties at kth to keep, lowest indices first
  const int64_t n_gt = k - take_eq;

  // 3. compaction.
  for (int64_t i = tid; i < V; i += kThreads) {
    const uint32_t u = OrderKey(Load(x, i));
    if (u > kth) buf[atomicAdd(&gt_count, 1ull)] = Compose(u, i);
  }
  int64_t taken = 0;
  for (int64_t base = 0; base < V && taken < take_eq; base += kThreads) {
    const int64_t i = base + tid;
    const bool eq = i < V && OrderKey(Load(x, i)) == kth;
    const unsigned ballot = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    const int64_t pos = taken + before + __popc(ballot & ((1u << lane) - 1u));
    if (eq && pos < take_eq) buf[n_gt + pos] = Compose(kth, i);
    taken += total;
    __syncthreads();
  }
  for (int64_t j = k + tid; j < n2; j += kThreads) buf[j] = ~0ull;
  __syncthreads();

  // 4. bitonic sort, ascending.
  for (int64_t size = 2; size <= n2; size <<= 1) {
    for (int64_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (int64_t t = tid; t < n2 / 2; t += kThreads) {
        const int64_t a = 2 * t - (t & (stride - 1));
        const int64_t b = a + stride;
        const uint64_t va = buf[a], vb = buf[b];
        const bool ascending = (a & size) == 0;
        if ((va > vb) == ascending) {
          buf[a] = vb;
          buf[b] = va;
        }
      }
      __syncthreads();
    }
  }

  // 5. values.
  float ref_max = m;
  float log_sum = logf(s);
  if (normalize && !poisoned) {
    ref_max = Load(x, int64_t(buf[0] & 0xffffffffu));
    float part = 0.0f;
    for (int64_t j = tid; j < k; j += kThreads) {
      part += expf((Load(x, int64_t(buf[j] & 0xffffffffu)) - ref_max) * inv_t);
    }
    log_sum = logf(BlockSum(part, red_s));
  }
  T* out_v = values + row * k;
  int64_t* out_i = indices + row * k;
  for (int64_t j = tid; j < k; j += kThreads) {
    const int64_t idx = int64_t(buf[j] & 0xffffffffu);
    if (poisoned) {
      out_i[j] = normalize ? idx : j;  // ORT: softmax row all-NaN -> TopK keeps 0..k-1
      Store(out_v, j, NAN);
    } else {
      const float t = (Load(x, idx) - ref_max) * inv_t;
      out_i[j] = idx;
      Store(out_v, j, log_probs ? t - log_sum : expf(t - log_sum));
    }
  }
  if (log_norm && tid == 0) {
    log_norm[row] = nan ? NAN : (pinf ? INFINITY : (m == -INFINITY ? -INFINITY : m * inv_t + logf(s)));
  }
}

}  // namespace

const char* CudaErrorString(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int LaunchCuda(const void* logits, bool is_fp16, int64_t rows, int64_t V, int64_t k, float temperature,
               int normalize, int log_probs, void* values, int64_t* indices, float* log_norm, void* stream) {
  // (the op's CheckInput has already refused these; the C entry gets them unchecked)
  if (rows < 0 || V < 1 || V > INT32_MAX || k < 1 || k > V || !(temperature > 0.0f) || !std::isfinite(temperature) ||
      rows > INT32_MAX || (normalize != 0 && normalize != 1) || (log_probs != 0 && log_probs != 1)) {
    return cudaErrorInvalidValue;
  }
  if (rows == 0) return cudaSuccess;
  auto s = static_cast<cudaStream_t>(stream);
  int64_t n2 = 1;
  while (n2 < k) n2 <<= 1;
  uint64_t* scratch = nullptr;
  if (n2 > kSharedSort) {
    cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&scratch), size_t(rows * n2) * sizeof(uint64_t), s);
    if (err != cudaSuccess) return err;
  }
  const float inv_t = 1.0f / temperature;
  if (is_fp16) {
    SoftmaxTopKRowKernel<__half><<<unsigned(rows), kThreads, 0, s>>>(
        static_cast<const __half*>(logits), V, k, inv_t, normalize, log_probs, static_cast<__half*>(values),
        indices, log_norm, scratch, n2);
  } else {
    SoftmaxTopKRowKernel<float><<<unsigned(rows), kThreads, 0, s>>>(
        static_cast<const float*>(logits), V, k, inv_t, normalize, log_probs, static_cast<float*>(values),
        indices, log_norm, scratch, n2);
  }
  cudaError_t err = cudaGetLastError();
  if (scratch) {
    const cudaError_t free_err = cudaFreeAsync(scratch, s);
    if (err == cudaSuccess) err = free_err;
  }
  return err;
}

}  // namespace toolkit::softmax_topk

extern "C" __attribute__((visibility("default"))) int toolkit_softmax_topk_cuda(
    const void* logits, int is_fp16, int64_t rows, int64_t V, int64_t k, float temperature, int normalize,
    int log_probs, void* values, int64_t* indices, float* log_norm, void* stream) {
  return toolkit::softmax_topk::LaunchCuda(logits, is_fp16 != 0, rows, V, k, temperature, normalize, log_probs,
                                           values, indices, log_norm, stream);
}
