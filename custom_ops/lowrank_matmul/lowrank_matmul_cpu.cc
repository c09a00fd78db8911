// CPU kernel of LowRankMatMul, plus the provider-independent shape checks (this
// file never needs nvcc).
//
// y = (x · U) · V + bias as two GEMMs that share one small intermediate t:
//   * many rows (M >= kRowParallelMin): rows are cut into blocks of MB rows (a
//     multiple of the 6-row register tile) sized so that t [MB, r] stays in L2;
//     each task computes its block's t and immediately multiplies it by V, so t
//     never leaves the core's cache. Tasks = row blocks over ORT's thread pool.
//   * few rows (decode, M = 1..31): one block cannot feed several cores, so each
//     GEMM is split over its reduction axis: task p multiplies rows [k0, k1) of
//     the weight (one contiguous slab of memory, read front to back) into its own
//     partial sum, and the partials are added in task order. t [M, r] and the
//     partials are a few KiB to a few hundred KiB. Every core then streams a
//     disjoint, contiguous slice of the weights: at M = 1 the kernel is bound by
//     weight bandwidth, which is why factoring pays. (Splitting over columns
//     instead cuts every weight row into short strided pieces: measured 2x slower.)
// GEMM micro-kernels (AVX2+FMA+F16C, chosen at run time by cpuid; baseline x86-64
// build otherwise): a 6x16 register tile for row-rich blocks, and for <= 8 rows a
// streaming kernel that reads each weight row once, contiguously, into L1-resident
// accumulators. float16 weights are widened with vcvtph2ps on load.
//
// Within a GEMM (or one reduction slab of it), every output element is one fused
// multiply-add chain in ascending k starting at 0 (the register tile, the streaming
// kernel and the scalar std::fma tail all compute exactly that); slabs are summed
// in ascending order. Slabs and blocks depend on the shapes only, never on the
// thread count, so results are bit-identical for any number of threads.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "common/simd_avx2.h"
#include "lowrank_matmul/lowrank_matmul.h"

namespace toolkit::lowrank_matmul {

// ------------------------------------------------------------------ checks

OrtStatus* CheckShapes(const std::vector<int64_t>& x, const std::vector<int64_t>& U, const std::vector<int64_t>& V,
                       const std::vector<int64_t>* bias, int64_t* M, int64_t* K, int64_t* r, int64_t* N) {
  if (x.empty()) return InvalidInputStatus(kOpName, "x", x, "rank >= 1 ([..., K])");
  const int64_t k = x.back();
  if (k < 1) return InvalidInputStatus(kOpName, "x", x, "a non-empty last axis (K >= 1)");
  if (U.size() != 2) {
    return InvalidInputStatus(kOpName, "U", U, "rank 2 ([K, r] with K = " + std::to_string(k) + ", x's last axis)");
  }
  if (U[0] != k) {
    return InvalidInputStatus(kOpName, "U", U,
                              "[K, r] with K = " + std::to_string(k) + " (x's last axis), got K = " +
                                  std::to_string(U[0]));
  }
  if (U[1] < 1) return InvalidInputStatus(kOpName, "U", U, "rank r >= 1 in [K, r]");
  if (V.size() != 2) {
    return InvalidInputStatus(kOpName, "V", V, "rank 2 ([r, N] with r = " + std::to_string(U[1]) + ", U's last axis)");
  }
  if (V[0] != U[1]) {
    return InvalidInputStatus(kOpName, "V", V,
                              "[r, N] with r = " + std::to_string(U[1]) + " (U's last axis), got r = " +
                                  std::to_string(V[0]));
  }
  if (V[1] < 1) return InvalidInputStatus(kOpName, "V", V, "a non-empty output axis (N >= 1) in [r, N]");
  if (bias && !(bias->size() == 1 && (*bias)[0] == V[1])) {
    return InvalidInputStatus(kOpName, "bias", *bias, "[N] with N = " + std::to_string(V[1]) + " (V's last axis)");
  }
  int64_t m = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) m *= x[i];
  *M = m;
  *K = k;
  *r = U[1];
  *N = V[1];
  return nullptr;
}

OrtStatus* PrepareIo(OrtKernelContext* context, Io* io) {
  Ort::KernelContext ctx(context);
  Ort::ConstValue x = ctx.GetInput(0), U = ctx.GetInput(1), V = ctx.GetInput(2);
  Ort::ConstValue bias{nullptr};
  if (ctx.GetInputCount() > 3) bias = ctx.GetInput(3);
  io->x_shape = x.GetTensorTypeAndShapeInfo().GetShape();
  const auto u_info = U.GetTensorTypeAndShapeInfo();
  const std::vector<int64_t> u_shape = u_info.GetShape();
  const std::vector<int64_t> v_shape = V.GetTensorTypeAndShapeInfo().GetShape();
  std::vector<int64_t> b_shape;
  if (bias) b_shape = bias.GetTensorTypeAndShapeInfo().GetShape();
  if (OrtStatus* st = CheckShapes(io->x_shape, u_shape, v_shape, bias ? &b_shape : nullptr, &io->M, &io->K, &io->r,
                                  &io->N)) {
    return st;
  }
  io->fp16 = u_info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  io->x = x.GetTensorData<float>();
  io->U = U.GetTensorRawData();
  io->V = V.GetTensorRawData();
  io->bias = bias ? bias.GetTensorData<float>() : nullptr;
  std::vector<int64_t> y_shape = io->x_shape;
  y_shape.back() = io->N;
  io->y = ctx.GetOutput(0, y_shape).GetTensorMutableData<float>();
  return nullptr;
}

// ------------------------------------------------------------------ numerics

namespace {

constexpr int kTileRows = 6;         // register tile: 6 rows x 16 columns = 12 ymm accumulators
constexpr int kTileCols = 16;
constexpr int kStreamRows = 8;       // the streaming kernel handles up to 8 rows at once
constexpr int kStreamAccBytes = 16 * 1024;  // accumulators of one streaming pass: half of L1
constexpr int64_t kRowParallelMin = 32;          // below: split columns instead of rows
constexpr int64_t kBlockBytes = 256 * 1024;      // t of one row block: half the L2 of a core
constexpr int64_t kMaxBlockRows = 96;
constexpr int64_t kSlabTasks = 8;                // reduction slabs per GEMM at few rows
constexpr int64_t kMinSlab = 128;                // ... of at least 128 weight rows

inline float HalfToFloat(uint16_t h) {
  // IEEE half -> float, exact (same as softmax_topk_cpu.cc).
  const uint32_t em = h & 0x7fffu;
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = em << 13;
  auto from_bits = [](uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  };
  const float normal = from_bits(e + (112u << 23));
  const float sub = from_bits(e + (113u << 23)) - 0x1p-14f;
  const float special = from_bits(e | 0x7f800000u);
  const float f = em < 0x400u ? sub : (em >= 0x7c00u ? special : normal);
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return from_bits(bits | sign);
}

inline float Widen(float w) { return w; }
inline float Widen(uint16_t w) { return HalfToFloat(w); }

// C[i, j] = sum_k A[i, k] B[k, j] for i < m, n0 <= j < n1: one std::fma chain per
// element. The portable path, and the column tail (< 8 columns) of the AVX2 path.
template <typename W>
void GemmScalar(const float* A, int64_t lda, int64_t m, int64_t K, const W* B, int64_t ldb, int64_t n0, int64_t n1,
                float* C, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = n0; j < n1; ++j) {
      float acc = 0.0f;
      for (int64_t k = 0; k < K; ++k) acc = std::fma(A[i * lda + k], Widen(B[k * ldb + j]), acc);
      C[i * ldc + j] = acc;
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
#define TOOLKIT_HAVE_AVX2_PATH 1

TOOLKIT_AVX2 inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }
TOOLKIT_AVX2 inline __m256 Load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// MR x 16 register tile over the whole reduction axis.
template <int MR, typename W>
TOOLKIT_AVX2 void TileAvx2(const float* A, int64_t lda, int64_t K, const W* B, int64_t ldb, float* C, int64_t ldc) {
  __m256 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const W* b = B + k * ldb;
    const __m256 b0 = Load8(b), b1 = Load8(b + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(A + i * lda + k);
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(C + i * ldc, c0[i]);
    _mm256_storeu_ps(C + i * ldc + 8, c1[i]);
  }
}

// MR (<= 8) rows x up to 16 KiB / (4 MR) columns (a multiple of 8): each weight row
// slice is read once, contiguously, and added into accumulators held in L1.
template <int MR, typename W>
TOOLKIT_AVX2 void StreamAvx2(const float* A, int64_t lda, int64_t K, const W* B, int64_t ldb, int64_t cols, float* C,
                             int64_t ldc) {
  alignas(32) float acc[MR][kStreamAccBytes / (4 * MR)];
  for (int i = 0; i < MR; ++i) std::memset(acc[i], 0, sizeof(float) * size_t(cols));
  const int nv = int(cols / 8);
  for (int64_t k = 0; k < K; ++k) {
    __m256 a[MR];
    for (int i = 0; i < MR; ++i) a[i] = _mm256_broadcast_ss(A + i * lda + k);
    const W* b = B + k * ldb;
    int v = 0;
    for (; v + 2 <= nv; v += 2) {
      const __m256 b0 = Load8(b + 8 * v), b1 = Load8(b + 8 * v + 8);
      for (int i = 0; i < MR; ++i) {
        _mm256_storeu_ps(acc[i] + 8 * v, _mm256_fmadd_ps(a[i], b0, _mm256_loadu_ps(acc[i] + 8 * v)));
        _mm256_storeu_ps(acc[i] + 8 * v + 8, _mm256_fmadd_ps(a[i], b1, _mm256_loadu_ps(acc[i] + 8 * v + 8)));
      }
    }
    for (; v < nv; ++v) {
      const __m256 b0 = Load8(b + 8 * v);
      for (int i = 0; i < MR; ++i) {
        _mm256_storeu_ps(acc[i] + 8 * v, _mm256_fmadd_ps(a[i], b0, _mm256_loadu_ps(acc[i] + 8 * v)));
      }
    }
  }
  for (int i = 0; i < MR; ++i) std::memcpy(C + i * ldc, acc[i], sizeof(float) * size_t(cols));
}

template <typename W>
TOOLKIT_AVX2 void Tile(int rows, const float* A, int64_t lda, int64_t K, const W* B, int64_t ldb, float* C,
                       int64_t ldc) {
  switch (rows) {
    case 1: return TileAvx2<1, W>(A, lda, K, B, ldb, C, ldc);
    case 2: return TileAvx2<2, W>(A, lda, K, B, ldb, C, ldc);
    case 3: return TileAvx2<3, W>(A, lda, K, B, ldb, C, ldc);
    case 4: return TileAvx2<4, W>(A, lda, K, B, ldb, C, ldc);
    case 5: return TileAvx2<5, W>(A, lda, K, B, ldb, C, ldc);
    default: return TileAvx2<6, W>(A, lda, K, B, ldb, C, ldc);
  }
}

template <typename W>
TOOLKIT_AVX2 void Stream(int rows, const float* A, int64_t lda, int64_t K, const W* B, int64_t ldb, int64_t cols,
                         float* C, int64_t ldc) {
  switch (rows) {
    case 1: return StreamAvx2<1, W>(A, lda, K, B, ldb, cols, C, ldc);
    case 2: return StreamAvx2<2, W>(A, lda, K, B, ldb, cols, C, ldc);
    case 3: return StreamAvx2<3, W>(A, lda, K, B, ldb, cols, C, ldc);
    case 4: return StreamAvx2<4, W>(A, lda, K, B, ldb, cols, C, ldc);
    case 5: return StreamAvx2<5, W>(A, lda, K, B, ldb, cols, C, ldc);
    case 6: return StreamAvx2<6, W>(A, lda, K, B, ldb, cols, C, ldc);
    case 7: return StreamAvx2<7, W>(A, lda, K, B, ldb, cols, C, ldc);
    default: return StreamAvx2<8, W>(A, lda, K, B, ldb, cols, C, ldc);
  }
}

template <typename W>
TOOLKIT_AVX2 void GemmAvx2(const float* A, int64_t lda, int64_t m, int64_t K, const W* B, int64_t ldb, int64_t n0,
                           int64_t n1, float* C, int64_t ldc) {
  const int64_t n8 = n0 + (n1 - n0) / 8 * 8;
  int64_t c = n0;
  if (m > kStreamRows) {
    // Column panel outer, row tiles inner: the K x 16 weight panel is reused from L2.
    for (; c + kTileCols <= n8; c += kTileCols) {
      for (int64_t i = 0; i < m; i += kTileRows) {
        Tile<W>(int(std::min<int64_t>(kTileRows, m - i)), A + i * lda, lda, K, B + c, ldb, C + i * ldc + c, ldc);
      }
    }
  }
  for (int64_t i = 0; i < m; i += kStreamRows) {
    const int rows = int(std::min<int64_t>(kStreamRows, m - i));
    // Widest pass whose accumulators stay in L1: whole weight rows at M = 1..4.
    const int64_t width = std::max<int64_t>(8, kStreamAccBytes / (4 * rows) / 8 * 8);
    for (int64_t cc = c; cc < n8; cc += width) {
      const int64_t cols = std::min<int64_t>(width, n8 - cc);
      Stream<W>(rows, A + i * lda, lda, K, B + cc, ldb, cols, C + i * ldc + cc, ldc);
    }
  }
  if (n8 < n1) GemmScalar<W>(A, lda, m, K, B, ldb, n8, n1, C, ldc);
}

#endif

// C[0:m, n0:n1] = A[0:m, 0:K] · B[0:K, n0:n1] (row-major, leading dimensions lda/ldb/ldc).
template <typename W>
void Gemm(const float* A, int64_t lda, int64_t m, int64_t K, const W* B, int64_t ldb, int64_t n0, int64_t n1,
          float* C, int64_t ldc) {
#ifdef TOOLKIT_HAVE_AVX2_PATH
  if (AvxAvailable()) return GemmAvx2<W>(A, lda, m, K, B, ldb, n0, n1, C, ldc);
#endif
  GemmScalar<W>(A, lda, m, K, B, ldb, n0, n1, C, ldc);
}

inline void AddBias(const float* bias, int64_t m, int64_t n0, int64_t n1, float* C, int64_t ldc) {
  if (!bias) return;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = n0; j < n1; ++j) C[i * ldc + j] += bias[j];
  }
}

template <typename W>
struct Job {
  const float* x;
  const W* U;
  const W* V;
  const float* bias;
  float* y;
  int64_t M, K, r, N;
  int64_t block_rows = 0;                // row-block mode
  int64_t slab1 = 0, slab2 = 0;          // slab mode: rows of U / V per task
  int64_t tasks1 = 0, tasks2 = 0;
  std::vector<float> t;                  // slab mode: the whole [M, r] intermediate
  std::vector<float> part1, part2;       // slab mode: partial sums [tasks, M, r] / [tasks, M, N]
  std::atomic<bool> failed{false};
};

template <typename W>
void RunRowBlock(void* data, size_t task) {
  auto* job = static_cast<Job<W>*>(data);
  try {
    thread_local std::vector<float> t;
    const int64_t i0 = int64_t(task) * job->block_rows;
    const int64_t m = std::min(job->block_rows, job->M - i0);
    t.resize(size_t(m * job->r));
    Gemm<W>(job->x + i0 * job->K, job->K, m, job->K, job->U, job->r, 0, job->r, t.data(), job->r);
    float* y = job->y + i0 * job->N;
    Gemm<W>(t.data(), job->r, m, job->r, job->V, job->N, 0, job->N, y, job->N);
    AddBias(job->bias, m, 0, job->N, y, job->N);
  } catch (...) {
    job->failed = true;
  }
}

template <typename W>
void RunFirstSlab(void* data, size_t task) {  // part1[p] = x[:, k0:k1] · U[k0:k1, :]
  auto* job = static_cast<Job<W>*>(data);
  const int64_t k0 = int64_t(task) * job->slab1, k1 = std::min(job->K, k0 + job->slab1);
  float* out = job->tasks1 == 1 ? job->t.data() : job->part1.data() + int64_t(task) * job->M * job->r;
  Gemm<W>(job->x + k0, job->K, job->M, k1 - k0, job->U + k0 * job->r, job->r, 0, job->r, out, job->r);
}

template <typename W>
void RunSecondSlab(void* data, size_t task) {  // part2[p] = t[:, k0:k1] · V[k0:k1, :]
  auto* job = static_cast<Job<W>*>(data);
  const int64_t k0 = int64_t(task) * job->slab2, k1 = std::min(job->r, k0 + job->slab2);
  float* out = job->tasks2 == 1 ? job->y : job->part2.data() + int64_t(task) * job->M * job->N;
  Gemm<W>(job->t.data() + k0, job->r, job->M, k1 - k0, job->V + k0 * job->N, job->N, 0, job->N, out, job->N);
}

// out[i] = sum over p of parts[p][i] (ascending p), for i in one chunk of `total`.
inline void SumParts(const float* parts, int64_t n_parts, int64_t total, int64_t i0, int64_t i1, float* out) {
  for (int64_t i = i0; i < i1; ++i) out[i] = parts[i];
  for (int64_t p = 1; p < n_parts; ++p) {
    const float* src = parts + p * total;
    for (int64_t i = i0; i < i1; ++i) out[i] += src[i];
  }
}

constexpr int64_t kSumChunk = 4096;

template <typename W>
void RunSumFirst(void* data, size_t task) {
  auto* job = static_cast<Job<W>*>(data);
  const int64_t total = job->M * job->r, i0 = int64_t(task) * kSumChunk;
  SumParts(job->part1.data(), job->tasks1, total, i0, std::min(total, i0 + kSumChunk), job->t.data());
}

template <typename W>
void RunSumSecond(void* data, size_t task) {  // y = sum of partials + bias, by row chunks
  auto* job = static_cast<Job<W>*>(data);
  const int64_t total = job->M * job->N, i0 = int64_t(task) * kSumChunk;
  const int64_t i1 = std::min(total, i0 + kSumChunk);
  if (job->tasks2 > 1) SumParts(job->part2.data(), job->tasks2, total, i0, i1, job->y);
  if (job->bias) {
    for (int64_t i = i0; i < i1; ++i) job->y[i] += job->bias[i % job->N];
  }
}

// Rows of the weight per slab: kSlabTasks slabs, none shorter than kMinSlab rows.
inline int64_t Slab(int64_t rows) {
  return std::max<int64_t>(kMinSlab, (rows + kSlabTasks - 1) / kSlabTasks);
}

template <typename W>
OrtStatus* Run(Ort::KernelContext& ctx, const Io& io) {
  Job<W> job;
  job.x = io.x;
  job.U = static_cast<const W*>(io.U);
  job.V = static_cast<const W*>(io.V);
  job.bias = io.bias;
  job.y = io.y;
  job.M = io.M;
  job.K = io.K;
  job.r = io.r;
  job.N = io.N;
  if (io.M >= kRowParallelMin) {
    // At least 4 blocks (threads), at most what keeps t in L2, whole register tiles.
    int64_t rows = std::min<int64_t>(kMaxBlockRows, std::max<int64_t>(kTileRows, kBlockBytes / (4 * io.r)));
    rows = std::min(rows, (io.M + 3) / 4);
    job.block_rows = std::max<int64_t>(kTileRows, (rows + kTileRows - 1) / kTileRows * kTileRows);
    const int64_t blocks = (io.M + job.block_rows - 1) / job.block_rows;
    ctx.ParallelFor(&RunRowBlock<W>, size_t(blocks), 1, &job);
  } else {
    job.t.resize(size_t(io.M * io.r));
    job.slab1 = Slab(io.K);
    job.slab2 = Slab(io.r);
    job.tasks1 = (io.K + job.slab1 - 1) / job.slab1;
    job.tasks2 = (io.r + job.slab2 - 1) / job.slab2;
    if (job.tasks1 > 1) job.part1.resize(size_t(job.tasks1 * io.M * io.r));
    if (job.tasks2 > 1) job.part2.resize(size_t(job.tasks2 * io.M * io.N));
    const auto chunks = [](int64_t total) { return size_t((total + kSumChunk - 1) / kSumChunk); };
    ctx.ParallelFor(&RunFirstSlab<W>, size_t(job.tasks1), 1, &job);
    if (job.tasks1 > 1) ctx.ParallelFor(&RunSumFirst<W>, chunks(io.M * io.r), 1, &job);
    ctx.ParallelFor(&RunSecondSlab<W>, size_t(job.tasks2), 1, &job);
    if (job.tasks2 > 1 || job.bias) ctx.ParallelFor(&RunSumSecond<W>, chunks(io.M * io.N), 1, &job);
  }
  if (job.failed) {
    return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(kOpName) + ": CPU kernel failed (out of memory?)");
  }
  return nullptr;
}

}  // namespace

OrtStatus* ComputeCpu(const Attributes& /*attrs*/, OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Io io;
    if (OrtStatus* st = PrepareIo(context, &io)) return st;
    if (io.M == 0) return nullptr;
    Ort::KernelContext ctx(context);
    return io.fp16 ? Run<uint16_t>(ctx, io) : Run<float>(ctx, io);
  });
}

}  // namespace toolkit::lowrank_matmul
