// CPU kernel of LowRankMatMul, plus the provider-independent shape checks (this
// file never needs nvcc).
//
// y = (x · U) · V + bias as two GEMMs, t = x · U [M, r] then y = t · V, each the
// classic packed-panel scheme (as in BLIS / MLAS):
//   * the weight is packed in panels of 16 columns, [panels][rows][16] (PackedWeight):
//     once at kernel creation when it is a constant initializer, else every call.
//     A panel is one contiguous stream of memory, so at M = 1 the kernel streams the
//     weights front to back (bandwidth bound, which is why factoring pays) and no
//     weight row is ever read with a large stride;
//   * the reduction axis is cut into blocks of kKC = 256: a 256 x 16 slice of a panel
//     (16 KiB) stays in L1 while up to 32 register tiles of rows (192 rows) use it,
//     so up to M = 192 each weight is read from memory once per call (with blocks of
//     8 tiles, M = 128 read it three times and ran at 0.82-0.94x of MLAS; now
//     1.02-1.05x at r = d/4, toolkit/bench/results/lowrank_cpu.json), and the next
//     panel's slice is prefetched meanwhile; the
//     activations are packed once per GEMM, tile-interleaved (up to 6 floats per k,
//     read front to back by the broadcasts);
//   * a 6 x 16 register tile (12 ymm accumulators, AVX2+FMA, F16C for float16
//     weights) continues each output's chain across reduction blocks: it loads the
//     partial sums, adds 256 more terms, stores them;
//   * tasks are (block of 32 row tiles) x (group of panels), about kTargetTasks of them,
//     run on ORT's thread pool: at M = 1 the panels (columns) are split over the
//     threads, at large M the rows.
// Every output element (and every element of t, rounded to float32) is one fused
// multiply-add chain in ascending k starting at 0; the bias is added last. Blocks
// and tasks depend on the shapes only, never on the thread count, so results are
// bit-identical for any number of threads, and the packed-at-creation and
// packed-per-call paths give the same bits. The portable path (no AVX2: scalar
// std::fma) computes the same chains.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "common/half.h"
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
  io->int8 = u_info.GetElementType() == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  // Column scales: required with int8 weights, meaningless (so rejected) otherwise.
  const char* names[2] = {"U_scale", "V_scale"};
  const int64_t lengths[2] = {io->r, io->N};
  const float* scales[2] = {nullptr, nullptr};
  for (size_t i = 0; i < 2; ++i) {
    Ort::ConstValue sv{nullptr};
    if (ctx.GetInputCount() > 4 + i) sv = ctx.GetInput(4 + i);
    if (!io->int8) {
      if (sv) {
        return MakeStatus(ORT_INVALID_ARGUMENT, std::string(kOpName) + ": input '" + names[i] +
                                                    "' is only for int8 weights; U and V here are floating point "
                                                    "(drop the input, or quantize U and V to int8)");
      }
      continue;
    }
    const std::vector<int64_t> shape = sv ? sv.GetTensorTypeAndShapeInfo().GetShape() : std::vector<int64_t>{};
    if (!sv || shape != std::vector<int64_t>{lengths[i]}) {
      return InvalidInputStatus(kOpName, names[i], shape,
                                "[" + std::to_string(lengths[i]) + "]: one float32 scale per column of " +
                                    (i == 0 ? "U" : "V") + " (required with int8 weights)");
    }
    scales[i] = sv.GetTensorData<float>();
  }
  io->u_scale = scales[0];
  io->v_scale = scales[1];
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

constexpr int kMR = 6;                // register tile rows (6 x 16 = 12 ymm accumulators)
constexpr int64_t kKC = 256;          // reduction block
constexpr int64_t kTilesPerBlock = 32;  // register tiles per task block
constexpr int64_t kTargetTasks = 16;  // tasks per GEMM when the shapes allow
constexpr int kWide = 4;              // panels per pass of the one-row kernel (MicroWide1)

inline float Widen(float w) { return w; }
inline float Widen(uint16_t w) { return HalfToFloat(w); }
inline float Widen(int8_t w) { return float(w); }

inline int64_t Panels(int64_t cols) { return (cols + kPanel - 1) / kPanel; }

// B [K, n] (row-major) -> panels [Panels(n)][K][kPanel], zero-padded. Reads B front to back.
template <typename W>
void PackPanels(const W* B, int64_t K, int64_t n, W* out) {
  const int64_t P = Panels(n);
  for (int64_t k = 0; k < K; ++k) {
    const W* src = B + k * n;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t c0 = p * kPanel, w = std::min<int64_t>(kPanel, n - c0);
      W* dst = out + (p * K + k) * kPanel;
      std::memcpy(dst, src + c0, size_t(w) * sizeof(W));
      if (w < kPanel) std::memset(dst + w, 0, size_t(kPanel - w) * sizeof(W));
    }
  }
}

// The panels of element type W in a PackedWeight (const or not).
template <typename W, typename P>
auto& Storage(P& p) {
  if constexpr (std::is_same_v<W, float>) return p.f32;
  else if constexpr (std::is_same_v<W, uint16_t>) return p.f16;
  else return p.i8;
}

// C[0:rows, 0:16] (+)= A · B over kc reduction steps: A packed [kc][rows], B one
// panel slice [kc][16]. `load` continues the chains stored in C.
template <typename W>
void MicroScalar(int rows, int64_t kc, const float* A, const W* B, float* C, int64_t ldc, bool load) {
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < kPanel; ++j) {
      float acc = load ? C[i * ldc + j] : 0.0f;
      for (int64_t k = 0; k < kc; ++k) acc = std::fma(A[k * rows + i], Widen(B[k * kPanel + j]), acc);
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
TOOLKIT_AVX2 inline __m256 Load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// The accumulators are named variables, not arrays: GCC turned a zero-initialised
// __m256 array into a memset and kept it on the stack, spilling every FMA.
#define TK_ROW(i)                                                                                  \
  __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();                             \
  if constexpr (MR > i) {                                                                          \
    if (load) c##i##0 = _mm256_loadu_ps(C + i * ldc), c##i##1 = _mm256_loadu_ps(C + i * ldc + 8);  \
  }
#define TK_FMA(i)                                                                                  \
  if constexpr (MR > i) {                                                                          \
    const __m256 a = _mm256_broadcast_ss(A + k * MR + i);                                          \
    c##i##0 = _mm256_fmadd_ps(a, b0, c##i##0);                                                     \
    c##i##1 = _mm256_fmadd_ps(a, b1, c##i##1);                                                     \
  }
#define TK_STORE(i)                                                                                \
  if constexpr (MR > i) {                                                                          \
    _mm256_storeu_ps(C + i * ldc, c##i##0);                                                        \
    _mm256_storeu_ps(C + i * ldc + 8, c##i##1);                                                    \
  }

template <int MR, typename W>
TOOLKIT_AVX2 void MicroAvx2(int64_t kc, const float* A, const W* B, float* C, int64_t ldc, bool load) {
  TK_ROW(0) TK_ROW(1) TK_ROW(2) TK_ROW(3) TK_ROW(4) TK_ROW(5)
#pragma GCC unroll 4
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = Load8(B + k * kPanel), b1 = Load8(B + k * kPanel + 8);
    TK_FMA(0) TK_FMA(1) TK_FMA(2) TK_FMA(3) TK_FMA(4) TK_FMA(5)
  }
  TK_STORE(0) TK_STORE(1) TK_STORE(2) TK_STORE(3) TK_STORE(4) TK_STORE(5)
}
#undef TK_ROW
#undef TK_FMA
#undef TK_STORE

// One row, kWide panels at once (16 kWide columns): at M = 1 a single panel gives
// only two FMA chains, so the loop waits on FMA latency (measured: int8 weights
// streamed at ~10 GB/s); four panels give eight independent chains. Each output is
// still the same single chain in ascending k, so results do not change.
template <typename W>
TOOLKIT_AVX2 void MicroWide1(int64_t kc, const float* A, const W* B, int64_t panel_stride, float* C, bool load) {
  static_assert(kWide == 4, "MicroWide1 is written out for four panels");
  const W* b0 = B;
  const W* b1 = B + panel_stride;
  const W* b2 = B + 2 * panel_stride;
  const W* b3 = B + 3 * panel_stride;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
  if (load) {
    c00 = _mm256_loadu_ps(C), c01 = _mm256_loadu_ps(C + 8), c10 = _mm256_loadu_ps(C + 16);
    c11 = _mm256_loadu_ps(C + 24), c20 = _mm256_loadu_ps(C + 32), c21 = _mm256_loadu_ps(C + 40);
    c30 = _mm256_loadu_ps(C + 48), c31 = _mm256_loadu_ps(C + 56);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 a = _mm256_broadcast_ss(A + k);
    const int64_t o = k * kPanel;
    c00 = _mm256_fmadd_ps(a, Load8(b0 + o), c00), c01 = _mm256_fmadd_ps(a, Load8(b0 + o + 8), c01);
    c10 = _mm256_fmadd_ps(a, Load8(b1 + o), c10), c11 = _mm256_fmadd_ps(a, Load8(b1 + o + 8), c11);
    c20 = _mm256_fmadd_ps(a, Load8(b2 + o), c20), c21 = _mm256_fmadd_ps(a, Load8(b2 + o + 8), c21);
    c30 = _mm256_fmadd_ps(a, Load8(b3 + o), c30), c31 = _mm256_fmadd_ps(a, Load8(b3 + o + 8), c31);
  }
  _mm256_storeu_ps(C, c00), _mm256_storeu_ps(C + 8, c01), _mm256_storeu_ps(C + 16, c10);
  _mm256_storeu_ps(C + 24, c11), _mm256_storeu_ps(C + 32, c20), _mm256_storeu_ps(C + 40, c21);
  _mm256_storeu_ps(C + 48, c30), _mm256_storeu_ps(C + 56, c31);
}

// Two rows (A packed [kc][2]), two panels at once: eight chains instead of four.
template <typename W>
TOOLKIT_AVX2 void MicroWide2(int64_t kc, const float* A, const W* B, int64_t panel_stride, float* C, int64_t ldc,
                             bool load) {
  const W* b0 = B;
  const W* b1 = B + panel_stride;
  float* r0 = C;
  float* r1 = C + ldc;
  __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  if (load) {
    c00 = _mm256_loadu_ps(r0), c01 = _mm256_loadu_ps(r0 + 8), c02 = _mm256_loadu_ps(r0 + 16);
    c03 = _mm256_loadu_ps(r0 + 24), c10 = _mm256_loadu_ps(r1), c11 = _mm256_loadu_ps(r1 + 8);
    c12 = _mm256_loadu_ps(r1 + 16), c13 = _mm256_loadu_ps(r1 + 24);
  }
  for (int64_t k = 0; k < kc; ++k) {
    const int64_t o = k * kPanel;
    const __m256 w0 = Load8(b0 + o), w1 = Load8(b0 + o + 8), w2 = Load8(b1 + o), w3 = Load8(b1 + o + 8);
    const __m256 a0 = _mm256_broadcast_ss(A + 2 * k), a1 = _mm256_broadcast_ss(A + 2 * k + 1);
    c00 = _mm256_fmadd_ps(a0, w0, c00), c01 = _mm256_fmadd_ps(a0, w1, c01);
    c02 = _mm256_fmadd_ps(a0, w2, c02), c03 = _mm256_fmadd_ps(a0, w3, c03);
    c10 = _mm256_fmadd_ps(a1, w0, c10), c11 = _mm256_fmadd_ps(a1, w1, c11);
    c12 = _mm256_fmadd_ps(a1, w2, c12), c13 = _mm256_fmadd_ps(a1, w3, c13);
  }
  _mm256_storeu_ps(r0, c00), _mm256_storeu_ps(r0 + 8, c01), _mm256_storeu_ps(r0 + 16, c02);
  _mm256_storeu_ps(r0 + 24, c03), _mm256_storeu_ps(r1, c10), _mm256_storeu_ps(r1 + 8, c11);
  _mm256_storeu_ps(r1 + 16, c12), _mm256_storeu_ps(r1 + 24, c13);
}

template <typename W>
TOOLKIT_AVX2 void Micro(int rows, int64_t kc, const float* A, const W* B, float* C, int64_t ldc, bool load) {
  switch (rows) {
    case 1: return MicroAvx2<1, W>(kc, A, B, C, ldc, load);
    case 2: return MicroAvx2<2, W>(kc, A, B, C, ldc, load);
    case 3: return MicroAvx2<3, W>(kc, A, B, C, ldc, load);
    case 4: return MicroAvx2<4, W>(kc, A, B, C, ldc, load);
    case 5: return MicroAvx2<5, W>(kc, A, B, C, ldc, load);
    default: return MicroAvx2<6, W>(kc, A, B, C, ldc, load);
  }
}

#endif

// One GEMM C [M, n] = A [M, K] · B (+ bias), B packed in panels.
template <typename W>
struct Gemm {
  const float* A = nullptr;
  int64_t lda = 0, M = 0, K = 0;
  const W* B = nullptr;  // packed [Panels(n)][K][kPanel]
  int64_t n = 0;
  float* C = nullptr;
  int64_t ldc = 0;
  const float* bias = nullptr;
  const float* scale = nullptr;  // int8 weights: per-column scale, applied after the chain
  bool avx2 = false;
  int64_t row_blocks = 0, groups = 0, group_panels = 0;
  std::atomic<bool> failed{false};

  void Plan() {
    row_blocks = (Tiles() + kTilesPerBlock - 1) / kTilesPerBlock;
    const int64_t P = Panels(n);
    groups = std::clamp<int64_t>((kTargetTasks + row_blocks - 1) / row_blocks, 1, P);
    group_panels = (P + groups - 1) / groups;
    if (M <= 2) group_panels = (group_panels + kWide - 1) / kWide * kWide;  // whole MicroWide1/2 passes
    groups = (P + group_panels - 1) / group_panels;
  }
  size_t Tasks() const { return size_t(row_blocks * groups); }

  // A, tile-interleaved once for all tasks: register tile t (rows TileStart(t) ..
  // + TileRows(t)) is [K][rows] at apack + TileStart(t) K, so a tile's k-block is
  // contiguous. [M, K], filled by PackTile.
  float* apack = nullptr;
  // Rows are cut into Tiles() register tiles of balanced height (8 rows: 4 + 4, not
  // 6 + 2, whose 2-row tile has too few FMA chains to hide the latency).
  int64_t Tiles() const { return (M + kMR - 1) / kMR; }
  int64_t TileStart(int64_t t) const { return t * (M / Tiles()) + std::min(t, M % Tiles()); }
  int64_t TileRows(int64_t t) const { return M / Tiles() + (t < M % Tiles() ? 1 : 0); }
  void PackTile(size_t tile) {
    const int64_t t = int64_t(tile), rows = TileRows(t), start = TileStart(t);
    float* dst = apack + start * K;
    for (int64_t i = 0; i < rows; ++i) {
      const float* src = A + (start + i) * lda;
      for (int64_t k = 0; k < K; ++k) dst[k * rows + i] = src[k];
    }
  }

  void RunTask(size_t task) {
    const int64_t rb = int64_t(task) / groups, g = int64_t(task) % groups;
    const int64_t t0 = rb * kTilesPerBlock, t1 = std::min(Tiles(), t0 + kTilesPerBlock);
    const int64_t i0 = TileStart(t0), m = TileStart(t1 - 1) + TileRows(t1 - 1) - i0;
    const int64_t p0 = g * group_panels, p1 = std::min(Panels(n), p0 + group_panels);
    alignas(32) float edge[kMR * kPanel];
    // One or two register tiles of rows (decode, small batches): a panel slice is
    // reused at most twice, so each panel is streamed front to back in one pass (the
    // second tile reads it from L2) instead of restarting the hardware prefetch
    // every kKC rows.
    const int64_t block = t1 - t0 <= 2 ? K : kKC;
    for (int64_t k0 = 0; k0 < K; k0 += block) {
      const int64_t kc = std::min(block, K - k0);
      const bool load = k0 > 0;
      int64_t p = p0;
#ifdef TOOLKIT_HAVE_AVX2_PATH
      if (avx2 && m == 1) {  // one row: kWide full panels per pass (more FMA chains in flight)
        for (; p + kWide <= p1 && (p + kWide) * kPanel <= n; p += kWide) {
          MicroWide1<W>(kc, apack + k0, B + (p * K + k0) * kPanel, K * kPanel, C + i0 * ldc + p * kPanel, load);
        }
      } else if (avx2 && m == 2) {  // two rows: two full panels per pass
        for (; p + 2 <= p1 && (p + 2) * kPanel <= n; p += 2) {
          MicroWide2<W>(kc, apack + 2 * k0, B + (p * K + k0) * kPanel, K * kPanel, C + i0 * ldc + p * kPanel, ldc,
                        load);
        }
      }
#endif
      for (; p < p1; ++p) {
        const W* b = B + (p * K + k0) * kPanel;
        const int64_t c0 = p * kPanel, w = std::min<int64_t>(kPanel, n - c0);
        // The next panel's slice (kc x 16 weights, 256 KiB away) is prefetched a few
        // lines per register tile while this one is in use: the hardware prefetcher
        // does not follow that jump, and with many tiles per block the slice is read
        // once from memory per block of rows. Not for one or two tiles: those stream
        // each panel whole, which the hardware prefetcher follows.
        const char* next = reinterpret_cast<const char*>(b + K * kPanel);
        const int64_t next_lines = p + 1 < p1 && t1 - t0 > 2 ? int64_t(kc * kPanel * sizeof(W)) / 64 : 0;
        const int64_t per_tile = (next_lines + (t1 - t0) - 1) / (t1 - t0);
        for (int64_t t = t0; t < t1; ++t) {
          for (int64_t l = (t - t0) * per_tile, le = std::min(next_lines, l + per_tile); l < le; ++l) {
            __builtin_prefetch(next + 64 * l);
          }
          const int rows = int(TileRows(t));
          const float* a = apack + TileStart(t) * K + k0 * rows;
          float* c = C + TileStart(t) * ldc + c0;
          if (w == kPanel) {
            Tile(rows, kc, a, b, c, ldc, load);
          } else {  // the last, partial panel: through a 16-wide scratch tile
            for (int r = 0; r < rows && load; ++r) std::memcpy(edge + r * kPanel, c + r * ldc, size_t(w) * 4);
            Tile(rows, kc, a, b, edge, kPanel, load);
            for (int r = 0; r < rows; ++r) std::memcpy(c + r * ldc, edge + r * kPanel, size_t(w) * 4);
          }
        }
      }
    }
    const int64_t c0 = p0 * kPanel, c1 = std::min(n, p1 * kPanel);
    if (scale) {
      for (int64_t i = i0; i < i0 + m; ++i) {
        for (int64_t j = c0; j < c1; ++j) C[i * ldc + j] *= scale[j];
      }
    }
    if (bias) {
      for (int64_t i = i0; i < i0 + m; ++i) {
        for (int64_t j = c0; j < c1; ++j) C[i * ldc + j] += bias[j];
      }
    }
  }

  void Tile(int rows, int64_t kc, const float* a, const W* b, float* c, int64_t ldc_, bool load) const {
#ifdef TOOLKIT_HAVE_AVX2_PATH
    if (avx2) return Micro<W>(rows, kc, a, b, c, ldc_, load);
#endif
    MicroScalar<W>(rows, kc, a, b, c, ldc_, load);
  }
};

template <typename W>
void PackGemmTile(void* data, size_t tile) {
  static_cast<Gemm<W>*>(data)->PackTile(tile);
}

template <typename W>
void RunGemmTask(void* data, size_t task) {
  auto* gemm = static_cast<Gemm<W>*>(data);
  try {
    gemm->RunTask(task);
  } catch (...) {
    gemm->failed = true;
  }
}

// The weight's panels: packed at kernel creation, or now into `own`.
template <typename W>
const W* PanelsOf(const std::shared_ptr<const PackedWeight>& packed, const W* raw, int64_t rows, int64_t cols,
                  std::vector<W>& own) {
  if (packed && packed->rows == rows && packed->cols == cols && !Storage<W>(*packed).empty()) {
    return Storage<W>(*packed).data();
  }
  own.resize(size_t(Panels(cols) * rows * kPanel));
  PackPanels<W>(raw, rows, cols, own.data());
  return own.data();
}

// Per-call buffers (t and the packed activations), kept by the calling thread across
// calls: fresh multi-MiB allocations every call cost page faults and zeroing.
struct Scratch {
  std::vector<float> t, a1, a2;
};
inline float* Grow(std::vector<float>& v, int64_t n) {
  if (v.size() < size_t(n)) v.resize(size_t(n));
  return v.data();
}

template <typename W>
OrtStatus* Run(Ort::KernelContext& ctx, const Io& io, const Attributes& attrs) {
  thread_local Scratch scratch;
  std::vector<W> own_u, own_v;
  const W* U = PanelsOf<W>(attrs.U, static_cast<const W*>(io.U), io.K, io.r, own_u);
  const W* V = PanelsOf<W>(attrs.V, static_cast<const W*>(io.V), io.r, io.N, own_v);
  float* t = Grow(scratch.t, io.M * io.r);
  bool avx2 = false;
#ifdef TOOLKIT_HAVE_AVX2_PATH
  // TOOLKIT_LOWRANK_SCALAR=1 forces the portable path (tests compare the two bit for bit).
  const char* force_scalar = std::getenv("TOOLKIT_LOWRANK_SCALAR");
  avx2 = AvxAvailable() && !(force_scalar != nullptr && force_scalar[0] == '1');
#endif
  Gemm<W> first;  // t = x · U
  first.A = io.x, first.lda = io.K, first.M = io.M, first.K = io.K;
  first.B = U, first.n = io.r, first.C = t, first.ldc = io.r, first.scale = io.u_scale, first.avx2 = avx2;
  first.apack = Grow(scratch.a1, io.M * io.K);
  first.Plan();
  ctx.ParallelFor(&PackGemmTile<W>, size_t(first.Tiles()), 0, &first);
  ctx.ParallelFor(&RunGemmTask<W>, first.Tasks(), 0, &first);
  Gemm<W> second;  // y = t · V + bias
  second.A = t, second.lda = io.r, second.M = io.M, second.K = io.r;
  second.B = V, second.n = io.N, second.C = io.y, second.ldc = io.N, second.bias = io.bias, second.avx2 = avx2;
  second.scale = io.v_scale;
  second.apack = Grow(scratch.a2, io.M * io.r);
  second.Plan();
  if (!first.failed) {
    ctx.ParallelFor(&PackGemmTile<W>, size_t(second.Tiles()), 0, &second);
    ctx.ParallelFor(&RunGemmTask<W>, second.Tasks(), 0, &second);
  }
  if (first.failed || second.failed) {
    return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(kOpName) + ": CPU kernel failed (out of memory?)");
  }
  return nullptr;
}

template <typename W>
std::shared_ptr<const PackedWeight> PackConstant(const Ort::ConstValue& value, const std::vector<int64_t>& shape) {
  auto packed = std::make_shared<PackedWeight>();
  packed->rows = shape[0];
  packed->cols = shape[1];
  std::vector<W>& dst = Storage<W>(*packed);
  dst.resize(size_t(Panels(shape[1]) * shape[0] * kPanel));
  PackPanels<W>(static_cast<const W*>(value.GetTensorRawData()), shape[0], shape[1], dst.data());
  return packed;
}

}  // namespace

OrtStatus* ReadCpu(const OrtKernelInfo* info, Attributes* attrs) {
  const OrtApi& api = Ort::GetApi();
  for (size_t index : {size_t(1), size_t(2)}) {
    int is_constant = 0;
    const OrtValue* value = nullptr;
    if (OrtStatus* st = api.KernelInfoGetConstantInput_tensor(info, index, &is_constant, &value)) {
      api.ReleaseStatus(st);  // not constant (or not known yet): packed per call
      continue;
    }
    if (!is_constant || value == nullptr) continue;
    Ort::ConstValue v{value};
    const auto type_shape = v.GetTensorTypeAndShapeInfo();
    const std::vector<int64_t> shape = type_shape.GetShape();
    if (shape.size() != 2 || shape[0] < 1 || shape[1] < 1) continue;  // Compute reports the shape error
    const auto type = type_shape.GetElementType();
    std::shared_ptr<const PackedWeight> packed;
    if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) packed = PackConstant<float>(v, shape);
    else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16) packed = PackConstant<uint16_t>(v, shape);
    else if (type == ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8) packed = PackConstant<int8_t>(v, shape);
    (index == 1 ? attrs->U : attrs->V) = packed;
  }
  return nullptr;
}

OrtStatus* ComputeCpu(const Attributes& attrs, OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Io io;
    if (OrtStatus* st = PrepareIo(context, &io)) return st;
    if (io.M == 0) return nullptr;
    Ort::KernelContext ctx(context);
    if (io.int8) return Run<int8_t>(ctx, io, attrs);
    return io.fp16 ? Run<uint16_t>(ctx, io, attrs) : Run<float>(ctx, io, attrs);
  });
}

}  // namespace toolkit::lowrank_matmul
