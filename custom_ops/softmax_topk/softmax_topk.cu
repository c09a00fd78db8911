// CUDA kernels of FusedSoftmaxTopK (contract in softmax_topk.h). One block per row
// (long rows at small batch: one block per chunk of a row, then a merge; see
// ChunkTopKKernel):
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

// 4. Bitonic sort of buf[0..n2), ascending, n2 a power of two, by the whole block.
__device__ void BitonicSort(uint64_t* buf, int64_t n2) {
  const int tid = threadIdx.x;
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
}

struct RowStats {
  float m, s;      // running max and sum of exp((x - m) / T) over the finite logits
  int nan, pinf;   // the range holds a NaN / a +inf
};

// Steps 1-4 over x[0..len) by the whole block: the range's statistics, and its
// min(k, len) best logits as Compose(key, base + i), sorted ascending into buf[0..n2)
// (entries from k on are padding ~0). k <= len, n2 = the power of two >= k.
template <typename T>
__device__ RowStats SelectTopK(const T* __restrict__ x, int64_t len, int64_t base, int64_t k, float inv_t,
                               uint64_t* buf, int64_t n2) {
  __shared__ uint32_t hist[256];
  __shared__ float red_m[kWarps], red_s[kWarps];
  __shared__ int warp_count[kWarps];
  __shared__ uint32_t sel_digit;
  __shared__ int64_t sel_remaining;
  __shared__ unsigned long long gt_count;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  // 1. online (max, sum); NaN / +inf only flagged (they poison the row).
  float m = -INFINITY, s = 0.0f;
  int nan = 0, pinf = 0;
  for (int64_t i = tid; i < len; i += kThreads) {
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

  // 2. radix select of the k-th largest key.
  uint32_t prefix = 0, mask = 0;
  int64_t remaining = k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = tid; i < 256; i += kThreads) hist[i] = 0;
    __syncthreads();
    for (int64_t i = tid; i < len; i += kThreads) {
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
  for (int64_t i = tid; i < len; i += kThreads) {
    const uint32_t u = OrderKey(Load(x, i));
    if (u > kth) buf[atomicAdd(&gt_count, 1ull)] = Compose(u, base + i);
  }
  int64_t taken = 0;
  for (int64_t b0 = 0; b0 < len && taken < take_eq; b0 += kThreads) {
    const int64_t i = b0 + tid;
    const bool eq = i < len && OrderKey(Load(x, i)) == kth;
    const unsigned ballot = __ballot_sync(0xffffffffu, eq);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, total = 0;
    for (int w = 0; w < kWarps; ++w) {
      before += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    const int64_t pos = taken + before + __popc(ballot & ((1u << lane) - 1u));
    if (eq && pos < take_eq) buf[n_gt + pos] = Compose(kth, base + i);
    taken += total;
    __syncthreads();
  }
  for (int64_t j = k + tid; j < n2; j += kThreads) buf[j] = ~0ull;
  __syncthreads();
  BitonicSort(buf, n2);
  return RowStats{m, s, nan, pinf};
}

// 5. The k outputs of one row from its statistics and its sorted best entries
// (indices into the row x).
template <typename T>
__device__ void WriteRow(const T* __restrict__ x, const RowStats& st, const uint64_t* buf, int64_t k, float inv_t,
                         int normalize, int log_probs, T* __restrict__ out_v, int64_t* __restrict__ out_i,
                         float* __restrict__ log_norm) {
  __shared__ float red[kWarps];
  const int tid = threadIdx.x;
  const bool poisoned = st.nan || st.pinf || st.m == -INFINITY;
  float ref_max = st.m;
  float log_sum = logf(st.s);
  if (normalize && !poisoned) {
    ref_max = Load(x, int64_t(buf[0] & 0xffffffffu));
    float part = 0.0f;
    for (int64_t j = tid; j < k; j += kThreads) {
      part += expf((Load(x, int64_t(buf[j] & 0xffffffffu)) - ref_max) * inv_t);
    }
    log_sum = logf(BlockSum(part, red));
  }
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
    *log_norm = st.nan ? NAN : (st.pinf ? INFINITY : (st.m == -INFINITY ? -INFINITY : st.m * inv_t + logf(st.s)));
  }
}

// One block per row.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    SoftmaxTopKRowKernel(const T* __restrict__ logits, int64_t V, int64_t k, float inv_t, int normalize,
                         int log_probs, T* __restrict__ values, int64_t* __restrict__ indices,
                         float* __restrict__ log_norm, uint64_t* __restrict__ global_buf, int64_t n2) {
  __shared__ uint64_t shared_buf[kSharedSort];
  const int64_t row = blockIdx.x;
  const T* x = logits + row * V;
  uint64_t* buf = n2 <= kSharedSort ? shared_buf : global_buf + row * n2;
  const RowStats st = SelectTopK(x, V, 0, k, inv_t, buf, n2);
  WriteRow(x, st, buf, k, inv_t, normalize, log_probs, values + row * k, indices + row * k,
           log_norm ? log_norm + row : nullptr);
}

// Long rows at small batch (normalize = 0 only): a row split into `chunks` blocks.
// Each chunk's statistics and its k best entries (global indices) go to scratch;
// then one block per row merges the statistics (as the warps of a block do) and
// sorts the chunks * k entries, whose first k are the row's top k: Compose orders
// by key, then by the global index, so ties still go to the lower index.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    ChunkTopKKernel(const T* __restrict__ logits, int64_t V, int64_t k, float inv_t, int64_t chunk_len,
                    int64_t chunks, int64_t n2, uint64_t* __restrict__ cand, float4* __restrict__ stats) {
  __shared__ uint64_t buf[kSharedSort];
  const int64_t row = blockIdx.x / chunks, c = blockIdx.x % chunks;
  const int64_t begin = c * chunk_len;
  const int64_t len = V - begin < chunk_len ? V - begin : chunk_len;
  const RowStats st = SelectTopK(logits + row * V + begin, len, begin, k, inv_t, buf, n2);
  for (int64_t j = threadIdx.x; j < k; j += kThreads) cand[blockIdx.x * k + j] = buf[j];
  if (threadIdx.x == 0) stats[blockIdx.x] = make_float4(st.m, st.s, float(st.nan), float(st.pinf));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    MergeChunksKernel(const T* __restrict__ logits, int64_t V, int64_t k, float inv_t, int64_t chunks, int64_t n2,
                      int log_probs, const uint64_t* __restrict__ cand, const float4* __restrict__ stats,
                      T* __restrict__ values, int64_t* __restrict__ indices, float* __restrict__ log_norm) {
  __shared__ uint64_t buf[kSharedSort];
  const int64_t row = blockIdx.x;
  RowStats st{-INFINITY, 0.0f, 0, 0};
  for (int64_t c = 0; c < chunks; ++c) {  // every thread, in chunk order: the same result in each
    const float4 p = stats[row * chunks + c];
    MergeStats(st.m, st.s, p.x, p.y, inv_t);
    st.nan |= int(p.z != 0.0f);
    st.pinf |= int(p.w != 0.0f);
  }
  const int64_t n = chunks * k;
  for (int64_t j = threadIdx.x; j < n2; j += kThreads) buf[j] = j < n ? cand[row * n + j] : ~0ull;
  __syncthreads();
  BitonicSort(buf, n2);
  WriteRow(logits + row * V, st, buf, k, inv_t, /*normalize=*/0, log_probs, values + row * k, indices + row * k,
           log_norm ? log_norm + row : nullptr);
}

// The split of long rows at small batch (see ChunkTopKKernel): with at most half as
// many rows as SMs, a row of V >= kMinSplitV logits takes enough chunks of at least
// kMinChunk logits to give about two blocks per SM, as long as every chunk's k best
// and the chunks * k entries of the merge fit the shared sort buffer.
constexpr int64_t kMinSplitV = 32768;
constexpr int64_t kMinChunk = 8192;
// The smallest power of two >= n (n >= 1): the bitonic sort's buffer length.
int64_t PowerOfTwoAtLeast(int64_t n) {
  int64_t p = 1;
  while (p < n) p <<= 1;
  return p;
}
struct SplitPlan {
  int64_t chunks = 1, chunk_len = 0, merge_n2 = 0;
};
SplitPlan PlanSplit(int64_t rows, int64_t V, int64_t k, int normalize, int64_t n2) {
  SplitPlan p;
  if (normalize || V < kMinSplitV || n2 > kSharedSort / 2) return p;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
    cudaGetLastError();  // (clear it: the one-block-per-row path needs neither)
    return p;
  }
  if (2 * rows > sms) return p;
  int64_t chunks = 2 * int64_t(sms) / rows;
  chunks = chunks < V / kMinChunk ? chunks : V / kMinChunk;
  while (chunks > 1 && chunks * n2 > kSharedSort) --chunks;  // the merge's entries fit
  if (chunks < 2) return p;
  p.chunk_len = (V + chunks - 1) / chunks;
  p.chunks = (V + p.chunk_len - 1) / p.chunk_len;  // (every chunk holds >= kMinChunk / 2 >= k logits)
  p.merge_n2 = PowerOfTwoAtLeast(p.chunks * k);
  return p;
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
  const float inv_t = 1.0f / temperature;
  const int64_t n2 = PowerOfTwoAtLeast(k);
  const SplitPlan split = PlanSplit(rows, V, k, normalize, n2);
  if (split.chunks > 1) {
    // Scratch: chunks * k entries and the chunks' statistics per row.
    const size_t cand_bytes = (size_t(rows * split.chunks * k) * sizeof(uint64_t) + 15) / 16 * 16;
    void* scratch = nullptr;
    cudaError_t err = cudaMallocAsync(&scratch, cand_bytes + size_t(rows * split.chunks) * sizeof(float4), s);
    if (err != cudaSuccess) return err;
    auto* cand = static_cast<uint64_t*>(scratch);
    auto* stats = reinterpret_cast<float4*>(static_cast<char*>(scratch) + cand_bytes);  // 16-byte aligned
    const unsigned blocks = unsigned(rows * split.chunks);
    if (is_fp16) {
      ChunkTopKKernel<__half><<<blocks, kThreads, 0, s>>>(static_cast<const __half*>(logits), V, k, inv_t,
                                                          split.chunk_len, split.chunks, n2, cand, stats);
    } else {
      ChunkTopKKernel<float><<<blocks, kThreads, 0, s>>>(static_cast<const float*>(logits), V, k, inv_t,
                                                         split.chunk_len, split.chunks, n2, cand, stats);
    }
    err = cudaGetLastError();
    if (err == cudaSuccess) {
      if (is_fp16) {
        MergeChunksKernel<__half><<<unsigned(rows), kThreads, 0, s>>>(
            static_cast<const __half*>(logits), V, k, inv_t, split.chunks, split.merge_n2, log_probs, cand, stats,
            static_cast<__half*>(values), indices, log_norm);
      } else {
        MergeChunksKernel<float><<<unsigned(rows), kThreads, 0, s>>>(
            static_cast<const float*>(logits), V, k, inv_t, split.chunks, split.merge_n2, log_probs, cand, stats,
            static_cast<float*>(values), indices, log_norm);
      }
      err = cudaGetLastError();
    }
    const cudaError_t free_err = cudaFreeAsync(scratch, s);
    return err != cudaSuccess ? err : free_err;
  }
  uint64_t* scratch = nullptr;
  if (n2 > kSharedSort) {
    cudaError_t err = cudaMallocAsync(reinterpret_cast<void**>(&scratch), size_t(rows * n2) * sizeof(uint64_t), s);
    if (err != cudaSuccess) return err;
  }
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
