// QuantKVAttention: attribute/shape checks shared by all providers, and the CPU kernel.
//
// CPU plan. Work items are (batch, KV head, slice of key positions): each item reads
// every key/value row of its slice once, as codes (scales folded into the query or
// the probabilities, see AttendSliceImpl), and uses it for all Hq/Hkv query heads of
// the group and all S queries (GQA reuse), keeping flash-decoding partials (running
// max, sum, weighted V) per query row; the head's last slice to finish merges them
// and writes the present cache. Long contexts at batch 1 thus use every thread. The
// hot loops are compiled for AVX2+FMA+F16C (Avx2Ops) and for the baseline ISA
// (ScalarOps); the AVX2 set is picked at run time when the CPU has it.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "common/simd_avx2.h"
#include "kv_attention/kv_attention.h"
#include "kv_attention/kv_math.h"

namespace toolkit::kv_attention {

namespace {

std::string Dims(std::initializer_list<int64_t> d) { return ShapeToString(std::vector<int64_t>(d)); }

OrtStatus* CheckShape(const char* name, const std::vector<int64_t>& got, const std::vector<int64_t>& want,
                      const std::string& why) {
  if (got != want) return InvalidInputStatus(kOpName, name, got, ShapeToString(want) + " (" + why + ")");
  return nullptr;
}

}  // namespace

OrtStatus* ReadAttributes(const OrtKernelInfo* info, Attributes* attrs) {
  for (auto [name, v] : {std::pair<const char*, int64_t*>{"bits", &attrs->bits},
                         {"key_per_channel", &attrs->key_per_channel},
                         {"key_group", &attrs->key_group},
                         {"value_group", &attrs->value_group},
                         {"residual", &attrs->residual},
                         {"symmetric", &attrs->symmetric},
                         {"quantize_query", &attrs->quantize_query}}) {
    if (OrtStatus* st = ReadIntAttribute(info, kOpName, name, v)) return st;
  }
  if (OrtStatus* st = ReadFloatAttribute(info, kOpName, "scale", &attrs->scale)) return st;
  const std::string error = AttributeError(*attrs);
  if (!error.empty()) return MakeStatus(ORT_INVALID_ARGUMENT, std::string(kOpName) + ": " + error);
  return nullptr;
}

OrtStatus* Prepare(OrtKernelContext* context, const Attributes& a, Io* io) {
  Ort::KernelContext ctx(context);
  auto shape_of = [&](size_t i) -> std::vector<int64_t> {
    Ort::ConstValue v = ctx.GetInput(i);
    if (!v) return {};
    return v.GetTensorTypeAndShapeInfo().GetShape();
  };
  const auto qs = shape_of(0);
  if (qs.size() != 4) return InvalidInputStatus(kOpName, "query", qs, "rank 4 [batch, q_heads, seq, head_dim]");
  const int64_t B = qs[0], Hq = qs[1], S = qs[2], D = qs[3];
  const auto ks = shape_of(1);
  if (ks.size() != 4 || ks[0] != B || ks[2] != S || ks[3] != D || ks[1] <= 0 || Hq % ks[1] != 0) {
    return InvalidInputStatus(kOpName, "key", ks,
                              "[batch, kv_heads, seq, head_dim] with batch, seq, head_dim of query " +
                                  ShapeToString(qs) + " and kv_heads dividing the query heads");
  }
  const int64_t Hkv = ks[1];
  if (OrtStatus* st = CheckShape("value", shape_of(2), ks, "the shape of key")) return st;
  const int64_t per = 8 / a.bits;
  if (D % per != 0 || D % a.value_group != 0 || (!a.key_per_channel && D % a.key_group != 0)) {
    return InvalidInputStatus(kOpName, "query", qs,
                              "head_dim divisible by " + std::to_string(per) + " (" + std::to_string(a.bits) +
                                  "-bit packing), by value_group=" + std::to_string(a.value_group) +
                                  (a.key_per_channel ? "" : " and by key_group=" + std::to_string(a.key_group)));
  }
  const int64_t row_bytes = D / per;
  const auto kq = shape_of(3);
  const bool capacity = bool(ctx.GetInput(12));
  if (kq.size() != 4 || kq[0] != B || kq[1] != Hkv || kq[3] != row_bytes) {
    return InvalidInputStatus(kOpName, "past_key_q", kq,
                              Dims({B, Hkv, -1, row_bytes}) + " ([batch, kv_heads, " +
                                  (capacity ? "capacity" : "quantized_tokens") + ", head_dim*" +
                                  std::to_string(a.bits) + "/8])");
  }
  const int64_t Nc = kq[2];  // token dimension: the length (growing) or the capacity
  if (a.key_per_channel && Nc % a.key_group != 0) {
    return InvalidInputStatus(kOpName, "past_key_q", kq,
                              std::string("a ") + (capacity ? "capacity" : "quantized length") +
                                  " that is a multiple of key_group=" + std::to_string(a.key_group));
  }
  const std::vector<int64_t> kscale = a.key_per_channel ? std::vector<int64_t>{B, Hkv, Nc / a.key_group, D}
                                                        : std::vector<int64_t>{B, Hkv, Nc, D / a.key_group};
  if (OrtStatus* st = CheckShape("past_key_scale", shape_of(4), kscale,
                                  "one float16 per key group of past_key_q " + ShapeToString(kq) +
                                      "; if past_key_q is the tensor of the wrong length, fix that one")) return st;
  const bool has_kz = bool(ctx.GetInput(5)), has_vz = bool(ctx.GetInput(9));
  if (has_kz == bool(a.symmetric) || has_vz == bool(a.symmetric)) {
    return MakeStatus(ORT_INVALID_ARGUMENT,
                      std::string(kOpName) + ": inputs 'past_key_zero' and 'past_value_zero' must be " +
                          (a.symmetric ? "absent (symmetric=1 has no zero point)" : "given (symmetric=0)"));
  }
  if (has_kz) {
    if (OrtStatus* st = CheckShape("past_key_zero", shape_of(5), kscale, "the shape of past_key_scale")) return st;
  }
  const auto kr = shape_of(6);
  if (kr.size() != 4 || kr[0] != B || kr[1] != Hkv || kr[3] != D) {
    return InvalidInputStatus(kOpName, "past_key_res", kr,
                              Dims({B, Hkv, -1, D}) + " ([batch, kv_heads, " + (capacity ? "slots" : "r") +
                                  ", head_dim])");
  }
  const int64_t Rc = kr[2];
  if (OrtStatus* st = CheckShape("past_value_q", shape_of(7), kq, "the shape of past_key_q")) return st;
  const std::vector<int64_t> vscale{B, Hkv, Nc, D / a.value_group};
  if (OrtStatus* st = CheckShape("past_value_scale", shape_of(8), vscale,
                                  "one float16 per value group of past_value_q " + ShapeToString(kq))) return st;
  if (has_vz) {
    if (OrtStatus* st = CheckShape("past_value_zero", shape_of(9), vscale, "the shape of past_value_scale")) return st;
  }
  if (OrtStatus* st = CheckShape("past_value_res", shape_of(10), kr, "the shape of past_key_res")) return st;

  int64_t N = Nc, r = Rc;
  if (capacity) {
    const auto ls = shape_of(12);
    if (ls != std::vector<int64_t>{2}) {
      return InvalidInputStatus(kOpName, "cache_lengths", ls, "[2] (quantized tokens N, residual tokens r)");
    }
    const int64_t* len = ctx.GetInput(12).GetTensorData<int64_t>();
    N = len[0], r = len[1];
    const std::string got = "cache_lengths = (" + std::to_string(N) + ", " + std::to_string(r) + ")";
    if (N < 0 || N > Nc || (a.key_per_channel && N % a.key_group != 0)) {
      return MakeStatus(ORT_INVALID_ARGUMENT,
                        std::string(kOpName) + ": input " + got + ": N must be in [0, " + std::to_string(Nc) +
                            "] (the capacity of past_key_q " + ShapeToString(kq) + ")" +
                            (a.key_per_channel ? " and a multiple of key_group=" + std::to_string(a.key_group)
                                               : std::string()));
    }
    if (r < 0 || r > Rc) {
      return MakeStatus(ORT_INVALID_ARGUMENT, std::string(kOpName) + ": input " + got + ": r must be in [0, " +
                                                  std::to_string(Rc) + "] (the slots of past_key_res " +
                                                  ShapeToString(kr) + ")");
    }
  }
  if ((a.residual == 0 && r != 0) || (a.residual > 0 && r >= a.residual)) {
    return InvalidInputStatus(kOpName, capacity ? "cache_lengths" : "past_key_res",
                              capacity ? std::vector<int64_t>{N, r} : kr,
                              "fewer than residual=" + std::to_string(a.residual) +
                                  " residual tokens (a full window is quantized by the call that fills it)");
  }

  const int64_t T = N + r + S;
  io->bias_batch = 0;
  if (ctx.GetInput(11)) {
    const auto bs = shape_of(11);
    if (bs.size() != 4 || (bs[0] != B && bs[0] != 1) || bs[1] != 1 || bs[2] != S || bs[3] != T) {
      return InvalidInputStatus(kOpName, "attn_bias", bs,
                                Dims({B, 1, S, T}) + " (or batch 1): [batch, 1, seq, past + seq] with past = " +
                                    std::to_string(N) + " quantized + " + std::to_string(r) + " residual tokens");
    }
    io->bias_batch = bs[0];
    io->bias = ctx.GetInput(11).GetTensorData<float>();
  }

  io->B = B, io->Hq = Hq, io->Hkv = Hkv, io->S = S, io->D = D, io->N = N, io->r = r, io->T = T;
  io->F = a.residual > 0 ? (r + S) / a.residual * a.residual : r + S;
  const int64_t N2 = N + io->F, r2 = r + S - io->F;
  io->capacity = capacity;
  io->Nc = Nc, io->Rc = Rc;
  io->N2c = capacity ? Nc : N2;
  io->R2c = capacity ? Rc : r2;
  if (capacity && (N2 > Nc || r2 > Rc)) {
    return MakeStatus(ORT_INVALID_ARGUMENT,
                      std::string(kOpName) + ": the cache is full: " + std::to_string(S) + " new tokens after " +
                          std::to_string(N) + " quantized + " + std::to_string(r) + " residual need " +
                          std::to_string(N2) + " quantized slots (past_key_q " + ShapeToString(kq) + " has " +
                          std::to_string(Nc) + ") and " + std::to_string(r2) + " residual slots (past_key_res " +
                          ShapeToString(kr) + " has " + std::to_string(Rc) + "); allocate a larger cache");
  }
  io->row_bytes = row_bytes;
  io->key_params_per_token = a.key_per_channel ? 0 : D / a.key_group;
  io->value_params = D / a.value_group;
  io->scale = a.scale > 0.0f ? a.scale : 1.0f / std::sqrt(float(D));

  io->query = ctx.GetInput(0).GetTensorData<float>();
  io->key = ctx.GetInput(1).GetTensorData<float>();
  io->value = ctx.GetInput(2).GetTensorData<float>();
  io->key_q = ctx.GetInput(3).GetTensorData<uint8_t>();
  io->key_scale = reinterpret_cast<const uint16_t*>(ctx.GetInput(4).GetTensorRawData());
  io->key_zero = has_kz ? reinterpret_cast<const uint16_t*>(ctx.GetInput(5).GetTensorRawData()) : nullptr;
  io->key_res = ctx.GetInput(6).GetTensorData<float>();
  io->value_q = ctx.GetInput(7).GetTensorData<uint8_t>();
  io->value_scale = reinterpret_cast<const uint16_t*>(ctx.GetInput(8).GetTensorRawData());
  io->value_zero = has_vz ? reinterpret_cast<const uint16_t*>(ctx.GetInput(9).GetTensorRawData()) : nullptr;
  io->value_res = ctx.GetInput(10).GetTensorData<float>();

  const int64_t P = io->N2c, PR = io->R2c;  // token dimensions of the present tensors
  io->out = ctx.GetOutput(0, qs).GetTensorMutableData<float>();
  io->p_key_q = ctx.GetOutput(1, {B, Hkv, P, row_bytes}).GetTensorMutableData<uint8_t>();
  const std::vector<int64_t> kscale2 = a.key_per_channel ? std::vector<int64_t>{B, Hkv, P / a.key_group, D}
                                                         : std::vector<int64_t>{B, Hkv, P, D / a.key_group};
  io->p_key_scale = reinterpret_cast<uint16_t*>(ctx.GetOutput(2, kscale2).GetTensorMutableRawData());
  io->p_key_zero = nullptr;
  io->p_value_zero = nullptr;
  // present_key_zero / present_value_zero are optional outputs (symmetric schemes have
  // no zeros): an asymmetric node must name both, and an empty name gives a null value.
  const bool zeros_named = ctx.GetOutputCount() > 7;
  Ort::UnownedValue key_zero_out =
      !a.symmetric && zeros_named ? ctx.GetOutput(3, kscale2) : Ort::UnownedValue(nullptr);
  io->p_key_res = ctx.GetOutput(4, {B, Hkv, PR, D}).GetTensorMutableData<float>();
  io->p_value_q = ctx.GetOutput(5, {B, Hkv, P, row_bytes}).GetTensorMutableData<uint8_t>();
  const std::vector<int64_t> vscale2{B, Hkv, P, D / a.value_group};
  io->p_value_scale = reinterpret_cast<uint16_t*>(ctx.GetOutput(6, vscale2).GetTensorMutableRawData());
  Ort::UnownedValue value_zero_out =
      !a.symmetric && zeros_named ? ctx.GetOutput(7, vscale2) : Ort::UnownedValue(nullptr);
  if (!a.symmetric) {
    if (!key_zero_out || !value_zero_out) {
      return MakeStatus(ORT_INVALID_ARGUMENT,
                        std::string(kOpName) + ": symmetric=0 (bits=" + std::to_string(a.bits) +
                            ") needs the outputs present_key_zero (3) and present_value_zero (7), but " +
                            (!key_zero_out && !value_zero_out ? "both are" : !key_zero_out ? "present_key_zero is"
                                                                                          : "present_value_zero is") +
                            " left out; name them in the node (the next step feeds them back as past_key_zero / "
                            "past_value_zero)");
    }
    io->p_key_zero = reinterpret_cast<uint16_t*>(key_zero_out.GetTensorMutableRawData());
    io->p_value_zero = reinterpret_cast<uint16_t*>(value_zero_out.GetTensorMutableRawData());
  }
  io->p_value_res = ctx.GetOutput(8, {B, Hkv, PR, D}).GetTensorMutableData<float>();
  io->p_lengths = nullptr;
  if (ctx.GetOutputCount() > 9) {
    if (Ort::UnownedValue lengths = ctx.GetOutput(9, {2})) {
      if (!capacity) {
        return MakeStatus(ORT_INVALID_ARGUMENT, std::string(kOpName) +
                                                    ": output 'present_cache_lengths' needs the input "
                                                    "'cache_lengths' (fixed-capacity cache)");
      }
      io->p_lengths = lengths.GetTensorMutableData<int64_t>();
    }
  }
  return nullptr;
}

// ---------------------------------------------------------------- CPU kernel

namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Dequantization parameters of one token row, per-token groups: G channels share
// one scale/zero (values, and keys quantized per token; per-channel keys fold their
// scales into the query instead, see key_scores).
struct RowParams {
  const float* s;
  const float* z;
  int64_t G;
};

// Scale and zero of parameter slot i of a float16 scale / zero pair; a symmetric cache
// has no zero tensor (its unsigned codes are offset by 128, so z = -128 s).
inline void ScaleZeroAt(const uint16_t* scale, const uint16_t* zero, int64_t i, float* s, float* z) {
  *s = HalfToFloat(scale[i]);
  *z = zero ? HalfToFloat(zero[i]) : -128.0f * *s;
}

// The int8 query rows of a row block (quantize_query=1): codes c (row r at c + r * D),
// their sums and the per-row scales (q' = scale * c).
struct QueryInt8 {
  const int8_t* c;
  const int32_t* sum;
  const float* scale;
};

// q'.codes of one query row and one 8-bit code row: the exact integer sum_d c_d code_d
// times the row scale. Every path computes this same integer, so the scalar and
// AVX2 kernels agree bit for bit.
inline float IntDotValue(const QueryInt8& q, int64_t r, int32_t dot) { return q.scale[r] * float(dot); }

// quantize_query=1: rounds a scaled query row to int8 in place (toolkit/ops/kv_quant.py:
// quantize_query): a = max |q|, c = round(q 127 / a) in [-127, 127], q' = c (a / 127).
// Writes the codes and the scale a / 127, returns sum(c). A row of zeros stays zero; a
// row holding inf or NaN gets scale NaN (its scores are NaN, as without rounding).
inline int32_t QuantizeQueryRow(float* q, int64_t D, int8_t* codes, float* scale) {
  float amax = 0.0f;
  bool finite = true;
  for (int64_t d = 0; d < D; ++d) {
    const float m = std::fabs(q[d]);
    finite = finite && m <= std::numeric_limits<float>::max();
    amax = std::max(amax, m);
  }
  int32_t sum = 0;
  if (!finite || amax == 0.0f) {
    *scale = finite ? 0.0f : std::numeric_limits<float>::quiet_NaN();
    for (int64_t d = 0; d < D; ++d) q[d] = *scale, codes[d] = 0;
    return 0;
  }
  const float inv = 127.0f / amax;
  *scale = amax / 127.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float c = QueryCode(q[d], inv);
    codes[d] = int8_t(c);
    sum += int32_t(c);
    q[d] = c * *scale;
  }
  return sum;
}

// Portable row operations; the AVX2 set below has the same interface.
struct ScalarOps {
  static inline int32_t QuantizeQuery(float* q, int64_t D, int8_t* codes, float* scale) {
    return QuantizeQueryRow(q, D, codes, scale);
  }
  // out[r * stride + t] = q'_r . code row t for nt 8-bit code rows (int8 query).
  static inline void IntDotsBlock(const QueryInt8& q, int64_t rows, const uint8_t* codes, int64_t row_bytes,
                                  int64_t nt, int64_t D, float* out, int64_t stride) {
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* x = q.c + r * D;
      for (int64_t t = 0; t < nt; ++t) {
        const uint8_t* c = codes + t * row_bytes;
        int32_t dot = 0;
        for (int64_t d = 0; d < D; ++d) dot += int32_t(x[d]) * int32_t(c[d]);
        out[r * stride + t] = IntDotValue(q, r, dot);
      }
    }
  }
  // 4-bit keys quantized per token in groups of G channels (G, D multiples of 32), int8
  // query in nibble order (PermuteForNibbles): out[r * stride + t] = scale_r *
  // sum_g s[t][g] (integer dot of group g); the zero terms are the caller's.
  static inline void IntDotsBlock4(const QueryInt8& q, int64_t rows, const uint8_t* codes, int64_t row_bytes,
                                   int64_t nt, int64_t D, int64_t G, const float* s, float* out, int64_t stride) {
    const int64_t ng = D / G;
    for (int64_t r = 0; r < rows; ++r) {
      const int8_t* x = q.c + r * D;
      for (int64_t t = 0; t < nt; ++t) {
        const uint8_t* c = codes + t * row_bytes;
        float acc = 0.0f;
        for (int64_t d0 = 0; d0 < D; d0 += 32) {  // one 32-channel chunk: 16 bytes
          int32_t dot = 0;
          for (int64_t i = 0; i < 16; ++i) {
            dot += int32_t(x[d0 + i]) * int32_t(c[d0 / 2 + i] & 15) + int32_t(x[d0 + 16 + i]) * int32_t(c[d0 / 2 + i] >> 4);
          }
          acc += s[t * ng + d0 / G] * float(dot);
        }
        out[r * stride + t] = q.scale[r] * acc;
      }
    }
  }
  static inline void Dequant(const uint8_t* q, int bits, int64_t D, const RowParams& p, float* out) {
    const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int64_t d = 0; d < D; ++d) {
      const float c = float((q[d / per] >> ((d % per) * bits)) & mask);
      out[d] = p.s[d / p.G] * c + p.z[d / p.G];
    }
  }
  // out[r * stride + t] = dot(q + r * D, k + t * D) for nt consecutive float key rows.
  static inline void FloatDotsBlock(const float* q, int64_t rows, const float* k, int64_t nt, int64_t D, float* out,
                                    int64_t stride) {
    for (int64_t t = 0; t < nt; ++t) DotRows(q, rows, k + t * D, D, out + t, stride);
  }
  // out[r] = dot(q + r * D, k) for `rows` query rows.
  static inline void DotRows(const float* q, int64_t rows, const float* k, int64_t D, float* out, int64_t stride) {
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += q[r * D + d] * k[d];
      out[r * stride] = acc;
    }
  }
  // out[r] = dot(q + r * D, codes as floats) (no scale or zero: the caller folds them).
  static inline void CodeDots(const float* q, int64_t rows, const uint8_t* codes, int bits, int64_t D, float* out,
                              int64_t stride) {
    const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int64_t r = 0; r < rows; ++r) {
      float acc = 0.0f;
      for (int64_t d = 0; d < D; ++d) acc += q[r * D + d] * float((codes[d / per] >> ((d % per) * bits)) & mask);
      out[r * stride] = acc;
    }
  }
  // CodeDots for nt consecutive code rows (row t at codes + t * row_bytes, scores at out + t).
  static inline void CodeDotsBlock(const float* q, int64_t rows, const uint8_t* codes, int64_t row_bytes,
                                   int64_t nt, int bits, int64_t D, float* out, int64_t stride) {
    for (int64_t t = 0; t < nt; ++t) CodeDots(q, rows, codes + t * row_bytes, bits, D, out + t, stride);
  }
  // QuantScores for nt consecutive key rows quantized per token; s / z [nt][D/G].
  static inline void QuantScoresBlock(const float* q, int64_t rows, const uint8_t* codes, int64_t row_bytes,
                                      int64_t nt, int bits, int64_t D, const float* s, const float* z, int64_t G,
                                      float* buf, float* /*z8*/, float* out, int64_t stride) {
    for (int64_t t = 0; t < nt; ++t) {
      QuantScores(q, rows, codes + t * row_bytes, bits, D, RowParams{s + t * (D / G), z + t * (D / G), G}, buf,
                  out + t, stride);
    }
  }
  // out[r] = dot(q + r * D, dequantized row) with the row dequantized on the fly.
  static inline void QuantScores(const float* q, int64_t rows, const uint8_t* codes, int bits, int64_t D,
                                 const RowParams& p, float* buf, float* out, int64_t stride) {
    Dequant(codes, bits, D, p, buf);
    DotRows(q, rows, buf, D, out, stride);
  }
  // acc[r] += p[r * stride] * v for `rows` rows.
  static inline void AxpyRows(const float* p, int64_t stride, int64_t rows, const float* v, int64_t D, float* acc) {
    for (int64_t r = 0; r < rows; ++r) {
      const float w = p[r * stride];
      if (w == 0.0f) continue;
      for (int64_t d = 0; d < D; ++d) acc[r * D + d] += w * v[d];
    }
  }
  // acc[r] += sum_t p[r * stride + t] * v[t] over a block of nt dequantized rows.
  static inline void AccumulateBlock(const float* p, int64_t stride, int64_t rows, const float* v, int64_t nt,
                                     int64_t D, float* acc) {
    for (int64_t t = 0; t < nt; ++t) AxpyRows(p + t, stride, rows, v + t * D, D, acc);
  }
  // acc[r * D + d] += sum_t w[(r * nt + t) * ng + d / G] * code_t[d] over nt code rows
  // (row t at codes + t * row_bytes): value rows with their scale folded into w.
  static inline void AccumulateCodes(const float* w, int64_t rows, int64_t ng, int64_t G, const uint8_t* codes,
                                     int64_t row_bytes, int bits, int64_t nt, int64_t D, float* acc) {
    const int per = 8 / bits, mask = (1 << bits) - 1;
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t t = 0; t < nt; ++t) {
        const uint8_t* q = codes + t * row_bytes;
        for (int64_t d = 0; d < D; ++d) {
          acc[r * D + d] += w[(r * nt + t) * ng + d / G] * float((q[d / per] >> ((d % per) * bits)) & mask);
        }
      }
    }
  }
  // out[c * rows + r] = in[r * cols + c].
  static inline void Transpose(const float* in, int64_t rows, int64_t cols, float* out) {
    for (int64_t c = 0; c < cols; ++c) {
      for (int64_t r = 0; r < rows; ++r) out[c * rows + r] = in[r * cols + c];
    }
  }
  // n float16 scales (and zeros; none: symmetric, z = -128 s) of consecutive slots as floats.
  static inline void LoadScales(const uint16_t* s16, const uint16_t* z16, int64_t n, float* s, float* z) {
    for (int64_t i = 0; i < n; ++i) ScaleZeroAt(s16, z16, i, &s[i], &z[i]);
  }
  // One query row's probabilities p[0..nt) against a block of nt value rows with ng
  // (scale, zero) groups each, s / z [nt][ng]: w[t * ng + g] = p[t] s[t][g] and
  // zsum[g] += sum_t p[t] z[t][g].
  static inline void FoldWeights(const float* p, int64_t nt, int64_t ng, const float* s, const float* z, float* w,
                                 float* zsum) {
    for (int64_t g = 0; g < ng; ++g) {
      float zs = 0.0f;
      for (int64_t t = 0; t < nt; ++t) {
        w[t * ng + g] = p[t] * s[t * ng + g];
        zs += p[t] * z[t * ng + g];
      }
      zsum[g] += zs;
    }
  }
  // max(-inf, x[0..n)), NaNs skipped.
  static inline float RowMax(const float* x, int64_t n) {
    float m = kNegInf;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
    return m;
  }
  // x = exp(x - m) in place; returns the sum.
  static inline float ExpShift(float* x, int64_t n, float m) {
    float sum = 0.0f;
    for (int64_t i = 0; i < n; ++i) sum += (x[i] = std::exp(x[i] - m));
    return sum;
  }
};

#if defined(__x86_64__) && defined(__GNUC__)
#define TOOLKIT_KV_AVX2 1
struct Avx2Ops {
  // QuantizeQueryRow, 8 channels at a time (the same float32 products and
  // round-half-to-even: bit-identical codes and rounded rows).
  TOOLKIT_AVX2 static inline int32_t QuantizeQuery(float* q, int64_t D, int8_t* codes, float* scale) {
    if (D % 8 != 0) return QuantizeQueryRow(q, D, codes, scale);
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 big = _mm256_set1_ps(std::numeric_limits<float>::max());
    __m256 amax = _mm256_setzero_ps(), ok = _mm256_castsi256_ps(_mm256_set1_epi32(-1));
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 m = _mm256_and_ps(_mm256_loadu_ps(q + d), abs_mask);
      ok = _mm256_and_ps(ok, _mm256_cmp_ps(m, big, _CMP_LE_OQ));  // false for inf and NaN
      amax = _mm256_max_ps(amax, m);
    }
    const float a = HorizontalMax(amax);
    if (_mm256_movemask_ps(ok) != 0xff || a == 0.0f) return QuantizeQueryRow(q, D, codes, scale);  // (its rules)
    const __m256 inv = _mm256_set1_ps(127.0f / a), lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
    *scale = a / 127.0f;
    const __m256 sv = _mm256_set1_ps(*scale);
    __m256i sum = _mm256_setzero_si256();
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(q + d), inv),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 c = _mm256_min_ps(hi, _mm256_max_ps(lo, r));
      const __m256i ci = _mm256_cvtps_epi32(c);
      sum = _mm256_add_epi32(sum, ci);
      const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(ci), _mm256_extracti128_si256(ci, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + d), _mm_packs_epi16(w, w));
      _mm256_storeu_ps(q + d, _mm256_mul_ps(c, sv));
    }
    return HorizontalSumI32(sum);
  }
  // 8 codes starting at channel d as floats (d a multiple of 8).
  template <int kBits>
  TOOLKIT_AVX2 static inline __m256 Codes8(const uint8_t* q, int64_t d) {
    if constexpr (kBits == 8) {
      return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + d))));
    } else if constexpr (kBits == 4) {
      // The chunk's 4 bytes broadcast straight from memory (one load, no scalar move).
      const __m256i w = _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(q + d / 2)));
      const __m256i sh = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, sh), _mm256_set1_epi32(15)));
    } else {
      // 2 bytes per chunk: the 4-byte word of its 16-channel pair (inside the row:
      // D is a multiple of 8), shifted by 16 more for the odd chunk.
      const __m256i w =
          _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(q + (d >> 4) * 4)));
      const __m256i sh = _mm256_add_epi32(_mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14),
                                          _mm256_set1_epi32(int((d & 8) << 1)));
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(w, sh), _mm256_set1_epi32(3)));
    }
  }
  template <int kBits>
  TOOLKIT_AVX2 static inline void DequantBits(const uint8_t* q, int64_t D, const RowParams& p, float* out) {
    for (int64_t g = 0, d = 0; d < D; ++g) {  // one (scale, zero) per group of G channels
      const __m256 s = _mm256_set1_ps(p.s[g]), z = _mm256_set1_ps(p.z[g]);
      for (const int64_t end = d + p.G; d < end; d += 8) {
        _mm256_storeu_ps(out + d, _mm256_fmadd_ps(s, Codes8<kBits>(q, d), z));
      }
    }
  }
  // The largest head dim (in 8-channel chunks) the AVX2 path takes; larger ones run
  // the portable path (see ComputeCpu).
  static constexpr int64_t kMaxChunks = 512 / 8;
  // Scores of a quantized key row: each 8-channel chunk is dequantized in a register
  // and used by four query rows before the next chunk is decoded.
  // out[r] = dot(q + r * D, row) for `rows` query rows, where load(d) gives channels
  // d..d+7 of the key row (a float row, or codes dequantized in a register): four
  // query rows share each loaded chunk.
  template <typename Load>
  TOOLKIT_AVX2 static inline void DotRowsWith(const float* q, int64_t rows, const Load& load, int64_t D, float* out,
                                              int64_t stride) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      // Two accumulators per query row (even / odd chunks): eight independent FMA
      // chains, so the loop is bound by issue width, not by the FMA latency of four chains.
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      const float *q0 = q + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
      int64_t d = 0;
      for (; d + 16 <= D; d += 16) {
        const __m256 k = load(d), k2 = load(d + 8);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), k, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d), k, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + d), k, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + d), k, a3);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d + 8), k2, b0);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d + 8), k2, b1);
        b2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + d + 8), k2, b2);
        b3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + d + 8), k2, b3);
      }
      if (d < D) {  // D = 16 m + 8
        const __m256 k = load(d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + d), k, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q1 + d), k, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q2 + d), k, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q3 + d), k, a3);
      }
      out[r * stride] = HorizontalSum(_mm256_add_ps(a0, b0));
      out[(r + 1) * stride] = HorizontalSum(_mm256_add_ps(a1, b1));
      out[(r + 2) * stride] = HorizontalSum(_mm256_add_ps(a2, b2));
      out[(r + 3) * stride] = HorizontalSum(_mm256_add_ps(a3, b3));
    }
    for (; r < rows; ++r) {
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + r * D + d), load(d), a);
      out[r * stride] = HorizontalSum(a);
    }
  }
  struct FloatRow {
    const float* k;
    TOOLKIT_AVX2 __m256 operator()(int64_t d) const { return _mm256_loadu_ps(k + d); }
  };
  // The 4 query rows x 2 tokens tile of the two-token dot products: sums in lanes
  // (row 0, t), (0, t + 1), (1, t), ..., (3, t + 1), stored to o[i * stride + 0..2).
  TOOLKIT_AVX2 static inline void Store4x2(__m256 sums, float* o, int64_t stride) {
    const __m128 lo = _mm256_castps256_ps128(sums), hi = _mm256_extractf128_ps(sums, 1);
    _mm_storel_pi(reinterpret_cast<__m64*>(o), lo);
    _mm_storeh_pi(reinterpret_cast<__m64*>(o + stride), lo);
    _mm_storel_pi(reinterpret_cast<__m64*>(o + 2 * stride), hi);
    _mm_storeh_pi(reinterpret_cast<__m64*>(o + 3 * stride), hi);
  }
  // A per-row value of 4 rows in the tile's lane order: [v0, v0, v1, v1, v2, v2, v3, v3].
  template <typename T>
  TOOLKIT_AVX2 static inline __m256 PerPair(const T* v) {
    return _mm256_setr_ps(float(v[0]), float(v[0]), float(v[1]), float(v[1]), float(v[2]), float(v[2]), float(v[3]),
                          float(v[3]));
  }
  // [sum(a), sum(b), ..., sum(h)] of eight vectors.
  TOOLKIT_AVX2 static inline __m256 Sum8(__m256 a, __m256 b, __m256 c, __m256 d, __m256 e, __m256 f, __m256 g,
                                         __m256 h) {
    const __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));  // per 128-bit half
    const __m256 efgh = _mm256_hadd_ps(_mm256_hadd_ps(e, f), _mm256_hadd_ps(g, h));
    return _mm256_add_ps(_mm256_permute2f128_ps(abcd, efgh, 0x20), _mm256_permute2f128_ps(abcd, efgh, 0x31));
  }
  // Key rows of a token block for the two-token dot products: row(t, d) gives channels
  // d..d+7 of token t as floats. Codes (CodeRow8: scale and zero folded elsewhere), or
  // codes with per-token groups dequantized in a register from [nt][D/8] chunk scales /
  // zeros (no division by the group size in the inner loop).
  template <int kBits>
  struct AffineRowAt {
    const uint8_t* codes;
    int64_t row_bytes;
    const float* s8;  // [nt][chunks]
    const float* z8;
    int64_t chunks;
    TOOLKIT_AVX2 __m256 operator()(int64_t t, int64_t d) const {
      const int64_t c = t * chunks + (d >> 3);
      return _mm256_fmadd_ps(_mm256_broadcast_ss(s8 + c), Codes8<kBits>(codes + t * row_bytes, d),
                             _mm256_broadcast_ss(z8 + c));
    }
  };
  template <typename RowAt>
  struct OneRow {  // token t of a RowAt, as DotRowsWith's load(d)
    const RowAt& rows;
    int64_t t;
    TOOLKIT_AVX2 __m256 operator()(int64_t d) const { return rows(t, d); }
  };
  // Scores of nt consecutive key rows for `rows` query rows: four query rows and two
  // key rows at a time, so each loaded query chunk serves two tokens (eight
  // accumulator chains; 6 loads per 8 FMAs instead of 10) and the eight sums are
  // reduced together.
  template <typename RowAt>
  TOOLKIT_AVX2 static inline void DotsBlock(const float* q, int64_t rows, const RowAt& key, int64_t nt, int64_t D,
                                            float* out, int64_t stride) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      const float *q0 = q + r * D, *q1 = q0 + D, *q2 = q1 + D, *q3 = q2 + D;
      float* o = out + r * stride;
      int64_t t = 0;
      for (; t + 2 <= nt; t += 2) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
               a31 = a00;
#pragma GCC unroll 4
        for (int64_t d = 0; d < D; d += 8) {
          const __m256 k0 = key(t, d), k1 = key(t + 1, d);
          const __m256 x0 = _mm256_loadu_ps(q0 + d), x1 = _mm256_loadu_ps(q1 + d);
          a00 = _mm256_fmadd_ps(x0, k0, a00), a01 = _mm256_fmadd_ps(x0, k1, a01);
          a10 = _mm256_fmadd_ps(x1, k0, a10), a11 = _mm256_fmadd_ps(x1, k1, a11);
          const __m256 x2 = _mm256_loadu_ps(q2 + d), x3 = _mm256_loadu_ps(q3 + d);
          a20 = _mm256_fmadd_ps(x2, k0, a20), a21 = _mm256_fmadd_ps(x2, k1, a21);
          a30 = _mm256_fmadd_ps(x3, k0, a30), a31 = _mm256_fmadd_ps(x3, k1, a31);
        }
        const __m256 sums = Sum8(a00, a01, a10, a11, a20, a21, a30, a31);
        Store4x2(sums, o + t, stride);
      }
      if (t < nt) DotRowsWith(q0, 4, OneRow<RowAt>{key, t}, D, o + t, stride);
    }
    if (r < rows) {
      for (int64_t t = 0; t < nt; ++t) DotRowsWith(q + r * D, rows - r, OneRow<RowAt>{key, t}, D, out + r * stride + t, stride);
    }
  }
  // [sum(a), sum(b), ..., sum(h)] of eight int32 vectors.
  TOOLKIT_AVX2 static inline __m256i Sum8i(__m256i a, __m256i b, __m256i c, __m256i d, __m256i e, __m256i f,
                                           __m256i g, __m256i h) {
    const __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    const __m256i efgh = _mm256_hadd_epi32(_mm256_hadd_epi32(e, f), _mm256_hadd_epi32(g, h));
    return _mm256_add_epi32(_mm256_permute2x128_si256(abcd, efgh, 0x20), _mm256_permute2x128_si256(abcd, efgh, 0x31));
  }
  // sum_d x_d (c_d - 128) over 32 channels, into 8 int32 lanes: the codes are made
  // signed (k = c - 128) and the sign moved onto the query, so the unsigned operand
  // of the 8-bit multiply-add is |k| <= 128 and the signed one |x| <= 127 (a pair of
  // products stays below 2^15: no saturation).
  TOOLKIT_AVX2 static inline __m256i Int8Dot32(__m256i x, __m256i k, __m256i k_abs, __m256i acc) {
    const __m256i p16 = _mm256_maddubs_epi16(k_abs, _mm256_sign_epi8(x, k));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
  }
  struct KeyCodes {  // 32 codes of token t from channel d, made signed (c - 128)
    const uint8_t* codes;
    int64_t row_bytes;
    TOOLKIT_AVX2 __m256i operator()(int64_t t, int64_t d) const {
      const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(codes + t * row_bytes + d));
      return _mm256_xor_si256(c, _mm256_set1_epi8(char(0x80)));
    }
  };
  struct QueryCodes {  // 32 query codes of row r from channel d
    const int8_t* c;
    int64_t D;
    TOOLKIT_AVX2 __m256i operator()(int64_t r, int64_t d) const {
      return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + r * D + d));
    }
  };
  // One (query row, token) pair of IntDotsBlock.
  TOOLKIT_AVX2 static inline void IntDotOne(const QueryInt8& q, const KeyCodes& key, const QueryCodes& qrow,
                                            int64_t r, int64_t t, int64_t D, float* out, int64_t stride) {
    __m256i a = _mm256_setzero_si256();
    for (int64_t d = 0; d < D; d += 32) {
      const __m256i k = key(t, d);
      a = Int8Dot32(qrow(r, d), k, _mm256_abs_epi8(k), a);
    }
    out[r * stride + t] = IntDotValue(q, r, HorizontalSumI32(a) + 128 * q.sum[r]);
  }
  struct Nibbles32 {  // channels d..d+31 of 4-bit token t as bytes: [even channels | odd channels]
    const uint8_t* codes;
    int64_t row_bytes;
    TOOLKIT_AVX2 __m256i operator()(int64_t t, int64_t d) const {
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + t * row_bytes + d / 2));
      const __m128i m = _mm_set1_epi8(15);
      return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
    }
  };
  // sum over 32 channels of x * code (codes 0..15 as the unsigned operand: no sign
  // trick needed), as 8 int32 lanes converted to float.
  TOOLKIT_AVX2 static inline __m256 Nibble32Dot(__m256i x, __m256i c) {
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(c, x), _mm256_set1_epi16(1)));
  }
  // ScalarOps::IntDotsBlock4 with 8-bit multiply-adds, four query rows and two tokens
  // at a time; each 32-channel chunk's integer sums are scaled by its group's scale.
  TOOLKIT_AVX2 static inline void IntDotsBlock4(const QueryInt8& q, int64_t rows, const uint8_t* codes,
                                                int64_t row_bytes, int64_t nt, int64_t D, int64_t G, const float* s,
                                                float* out, int64_t stride) {
    const Nibbles32 key{codes, row_bytes};
    const QueryCodes qrow{q.c, D};
    const int64_t ng = D / G;
    auto one = [&](int64_t r, int64_t t) TOOLKIT_AVX2 {
      __m256 a = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 32) {
        a = _mm256_fmadd_ps(_mm256_broadcast_ss(s + t * ng + d / G), Nibble32Dot(qrow(r, d), key(t, d)), a);
      }
      out[r * stride + t] = q.scale[r] * HorizontalSum(a);
    };
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      const __m256 scale = PerPair(q.scale + r);
      float* o = out + r * stride;
      int64_t t = 0;
      for (; t + 2 <= nt; t += 2) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
               a31 = a00;
        const float *s0 = s + t * ng, *s1 = s0 + ng;
#pragma GCC unroll 4
        for (int64_t d = 0; d < D; d += 32) {
          const __m256i k0 = key(t, d), k1 = key(t + 1, d);
          const __m256 g0 = _mm256_broadcast_ss(s0 + d / G), g1 = _mm256_broadcast_ss(s1 + d / G);
          __m256i x = qrow(r, d);
          a00 = _mm256_fmadd_ps(g0, Nibble32Dot(x, k0), a00), a01 = _mm256_fmadd_ps(g1, Nibble32Dot(x, k1), a01);
          x = qrow(r + 1, d);
          a10 = _mm256_fmadd_ps(g0, Nibble32Dot(x, k0), a10), a11 = _mm256_fmadd_ps(g1, Nibble32Dot(x, k1), a11);
          x = qrow(r + 2, d);
          a20 = _mm256_fmadd_ps(g0, Nibble32Dot(x, k0), a20), a21 = _mm256_fmadd_ps(g1, Nibble32Dot(x, k1), a21);
          x = qrow(r + 3, d);
          a30 = _mm256_fmadd_ps(g0, Nibble32Dot(x, k0), a30), a31 = _mm256_fmadd_ps(g1, Nibble32Dot(x, k1), a31);
        }
        const __m256 sums = _mm256_mul_ps(scale, Sum8(a00, a01, a10, a11, a20, a21, a30, a31));
        Store4x2(sums, o + t, stride);
      }
      if (t < nt) {
        for (int64_t j = 0; j < 4; ++j) one(r + j, t);
      }
    }
    for (; r < rows; ++r) {
      for (int64_t t = 0; t < nt; ++t) one(r, t);
    }
  }
  // ScalarOps::IntDotsBlock with 8-bit multiply-adds (32 channels per instruction
  // instead of 8 per FMA): four query rows and two code rows at a time, as DotsBlock.
  // sum_d x_d c_d = sum_d x_d (c_d - 128) + 128 sum_d x_d, the same exact integer.
  TOOLKIT_AVX2 static inline void IntDotsBlock(const QueryInt8& q, int64_t rows, const uint8_t* codes,
                                               int64_t row_bytes, int64_t nt, int64_t D, float* out,
                                               int64_t stride) {
    if (D % 32 != 0) return ScalarOps::IntDotsBlock(q, rows, codes, row_bytes, nt, D, out, stride);
    const KeyCodes key{codes, row_bytes};
    const QueryCodes qrow{q.c, D};
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      // Lanes of Sum8i: (row r, t), (r, t + 1), (r + 1, t), ..., (r + 3, t + 1).
      const __m256i bias = _mm256_slli_epi32(_mm256_cvtps_epi32(PerPair(q.sum + r)), 7);  // 128 sum, exact
      const __m256 scale = PerPair(q.scale + r);
      float* o = out + r * stride;
      int64_t t = 0;
      for (; t + 2 <= nt; t += 2) {
        __m256i a00 = _mm256_setzero_si256(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00,
                a31 = a00;
#pragma GCC unroll 4
        for (int64_t d = 0; d < D; d += 32) {
          const __m256i k0 = key(t, d), k1 = key(t + 1, d);
          const __m256i b0 = _mm256_abs_epi8(k0), b1 = _mm256_abs_epi8(k1);
          __m256i x = qrow(r, d);
          a00 = Int8Dot32(x, k0, b0, a00), a01 = Int8Dot32(x, k1, b1, a01);
          x = qrow(r + 1, d);
          a10 = Int8Dot32(x, k0, b0, a10), a11 = Int8Dot32(x, k1, b1, a11);
          x = qrow(r + 2, d);
          a20 = Int8Dot32(x, k0, b0, a20), a21 = Int8Dot32(x, k1, b1, a21);
          x = qrow(r + 3, d);
          a30 = Int8Dot32(x, k0, b0, a30), a31 = Int8Dot32(x, k1, b1, a31);
        }
        const __m256i dots = _mm256_add_epi32(Sum8i(a00, a01, a10, a11, a20, a21, a30, a31), bias);
        const __m256 sums = _mm256_mul_ps(scale, _mm256_cvtepi32_ps(dots));
        Store4x2(sums, o + t, stride);
      }
      if (t < nt) {
        for (int64_t j = 0; j < 4; ++j) IntDotOne(q, key, qrow, r + j, t, D, out, stride);
      }
    }
    for (; r < rows; ++r) {
      for (int64_t t = 0; t < nt; ++t) IntDotOne(q, key, qrow, r, t, D, out, stride);
    }
  }
  TOOLKIT_AVX2 static inline void CodeDotsBlock(const float* q, int64_t rows, const uint8_t* codes,
                                                int64_t row_bytes, int64_t nt, int bits, int64_t D, float* out,
                                                int64_t stride) {
    if (bits == 8) return DotsBlock(q, rows, CodeRow8<8>{codes, row_bytes}, nt, D, out, stride);
    if (bits == 4) return DotsBlock(q, rows, CodeRow8<4>{codes, row_bytes}, nt, D, out, stride);
    DotsBlock(q, rows, CodeRow8<2>{codes, row_bytes}, nt, D, out, stride);
  }
  // Scores of nt key rows quantized per token in groups of G channels; s / z [nt][D/G].
  TOOLKIT_AVX2 static inline void QuantScoresBlock(const float* q, int64_t rows, const uint8_t* codes,
                                                   int64_t row_bytes, int64_t nt, int bits, int64_t D,
                                                   const float* s, const float* z, int64_t G, float* s8, float* z8,
                                                   float* out, int64_t stride) {
    const int64_t chunks = D / 8, ng = D / G, per_group = G / 8;
    for (int64_t t = 0; t < nt; ++t) {  // no division per chunk (an idiv costs more than the chunk's FMAs)
      float *st = s8 + t * chunks, *zt = z8 + t * chunks;
      for (int64_t g = 0; g < ng; ++g) {
        const float sg = s[t * ng + g], zg = z[t * ng + g];
        for (int64_t i = 0; i < per_group; ++i) st[g * per_group + i] = sg, zt[g * per_group + i] = zg;
      }
    }
    if (bits == 8) return DotsBlock(q, rows, AffineRowAt<8>{codes, row_bytes, s8, z8, chunks}, nt, D, out, stride);
    if (bits == 4) return DotsBlock(q, rows, AffineRowAt<4>{codes, row_bytes, s8, z8, chunks}, nt, D, out, stride);
    DotsBlock(q, rows, AffineRowAt<2>{codes, row_bytes, s8, z8, chunks}, nt, D, out, stride);
  }
  TOOLKIT_AVX2 static inline void Dequant(const uint8_t* q, int bits, int64_t D, const RowParams& p, float* out) {
    if (bits == 8) return DequantBits<8>(q, D, p, out);
    if (bits == 4) return DequantBits<4>(q, D, p, out);
    DequantBits<2>(q, D, p, out);
  }
  TOOLKIT_AVX2 static inline void DotRows(const float* q, int64_t rows, const float* k, int64_t D, float* out,
                                          int64_t stride) {
    DotRowsWith(q, rows, FloatRow{k}, D, out, stride);
  }
  struct FloatRowAt {  // token t of consecutive float key rows, as DotsBlock's key(t, d)
    const float* k;
    int64_t D;
    TOOLKIT_AVX2 __m256 operator()(int64_t t, int64_t d) const { return _mm256_loadu_ps(k + t * D + d); }
  };
  // Full-precision keys (residual, new tokens): four query rows and two key rows a tile.
  TOOLKIT_AVX2 static inline void FloatDotsBlock(const float* q, int64_t rows, const float* k, int64_t nt, int64_t D,
                                                 float* out, int64_t stride) {
    DotsBlock(q, rows, FloatRowAt{k, D}, nt, D, out, stride);
  }
  TOOLKIT_AVX2 static inline void AxpyRows(const float* p, int64_t stride,
                                                                          int64_t rows, const float* v, int64_t D,
                                                                          float* acc) {
    for (int64_t r = 0; r < rows; ++r) {
      const float w = p[r * stride];
      if (w == 0.0f) continue;
      const __m256 wv = _mm256_set1_ps(w);
      float* a = acc + r * D;
      for (int64_t d = 0; d < D; d += 8) {
        _mm256_storeu_ps(a + d, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + d), _mm256_loadu_ps(a + d)));
      }
    }
  }
  // Rows of a value block, two 8-channel chunks at a time: float rows [nt][D] (the
  // second chunk zero past D), or code rows widened in registers.
  struct FloatRows {
    const float* v;
    int64_t D;
    bool two;
    TOOLKIT_AVX2 void operator()(int64_t t, int64_t d, __m256* v0, __m256* v1) const {
      *v0 = _mm256_loadu_ps(v + t * D + d);
      *v1 = two ? _mm256_loadu_ps(v + t * D + d + 8) : _mm256_setzero_ps();
    }
  };
  template <int kBits>
  struct CodeRows {
    const uint8_t* codes;
    int64_t row_bytes;
    TOOLKIT_AVX2 void operator()(int64_t t, int64_t d, __m256* v0, __m256* v1) const {
      const uint8_t* q = codes + t * row_bytes;
      *v0 = Codes8<kBits>(q, d);
      *v1 = Codes8<kBits>(q, d + 8);
    }
  };
  // Register-blocked PV: o[i * D + 0..16) += sum_t w[i][t] * row_t[d..d+16) for 4 query
  // rows, the 8 accumulators kept in registers over the nt rows (one store per block,
  // not per token); `two` = false stores only the first 8 channels.
  template <typename Rows>
  TOOLKIT_AVX2 static inline void Tile4x16(const float* w0, const float* w1, const float* w2, const float* w3,
                                           int64_t ws, int64_t nt, const Rows& rows, int64_t d, float* o, int64_t D,
                                           bool two) {
    __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
#pragma GCC unroll 4
    for (int64_t t = 0; t < nt; ++t) {
      __m256 v0, v1;
      rows(t, d, &v0, &v1);
      const __m256 x0 = _mm256_broadcast_ss(w0 + t * ws), x1 = _mm256_broadcast_ss(w1 + t * ws);
      const __m256 x2 = _mm256_broadcast_ss(w2 + t * ws), x3 = _mm256_broadcast_ss(w3 + t * ws);
      a00 = _mm256_fmadd_ps(x0, v0, a00), a01 = _mm256_fmadd_ps(x0, v1, a01);
      a10 = _mm256_fmadd_ps(x1, v0, a10), a11 = _mm256_fmadd_ps(x1, v1, a11);
      a20 = _mm256_fmadd_ps(x2, v0, a20), a21 = _mm256_fmadd_ps(x2, v1, a21);
      a30 = _mm256_fmadd_ps(x3, v0, a30), a31 = _mm256_fmadd_ps(x3, v1, a31);
    }
    const __m256 first[4] = {a00, a10, a20, a30}, second[4] = {a01, a11, a21, a31};
    for (int i = 0; i < 4; ++i) {
      float* oi = o + i * D;
      _mm256_storeu_ps(oi, _mm256_add_ps(_mm256_loadu_ps(oi), first[i]));
      if (two) _mm256_storeu_ps(oi + 8, _mm256_add_ps(_mm256_loadu_ps(oi + 8), second[i]));
    }
  }
  // One query row: o[0..D) += sum_t w[t * ws] * row_t over the nt rows, 8 channels at a time.
  template <typename Row8>
  TOOLKIT_AVX2 static inline void Row1(const float* w, int64_t ws, int64_t nt, const Row8& row8, int64_t d, float* o) {
    __m256 a = _mm256_setzero_ps();
    for (int64_t t = 0; t < nt; ++t) a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + t * ws), row8(t, d), a);
    _mm256_storeu_ps(o, _mm256_add_ps(_mm256_loadu_ps(o), a));
  }
  TOOLKIT_AVX2 static inline void AccumulateBlock(const float* p, int64_t stride, int64_t rows, const float* v,
                                                  int64_t nt, int64_t D, float* acc) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      const float* p0 = p + r * stride;
      for (int64_t d = 0; d < D; d += 16) {
        const bool two = d + 16 <= D;
        Tile4x16(p0, p0 + stride, p0 + 2 * stride, p0 + 3 * stride, 1, nt, FloatRows{v, D, two}, d,
                 acc + r * D + d, D, two);
      }
    }
    for (; r < rows; ++r) {
      for (int64_t d = 0; d < D; d += 8) Row1(p + r * stride, 1, nt, FloatRow8{v, D}, d, acc + r * D + d);
    }
  }
  struct FloatRow8 {
    const float* v;
    int64_t D;
    TOOLKIT_AVX2 __m256 operator()(int64_t t, int64_t d) const { return _mm256_loadu_ps(v + t * D + d); }
  };
  template <int kBits>
  struct CodeRow8 {
    const uint8_t* codes;
    int64_t row_bytes;
    TOOLKIT_AVX2 __m256 operator()(int64_t t, int64_t d) const { return Codes8<kBits>(codes + t * row_bytes, d); }
  };
  // PV straight from the codes (G and D multiples of 16): the row's scale is already in
  // the weights w [rows][nt][ng]; no dequantized copy.
  template <int kBits>
  TOOLKIT_AVX2 static inline void AccumulateCodesBits(const float* w, int64_t rows, int64_t ng, int64_t G,
                                                      const uint8_t* codes, int64_t row_bytes, int64_t nt,
                                                      int64_t D, float* acc) {
    int64_t r = 0;
    const int64_t rs = nt * ng;  // weights of one query row, [nt][ng]
    for (; r + 4 <= rows; r += 4) {
      for (int64_t d = 0; d < D; d += 16) {
        const float* w0 = w + r * rs + d / G;
        Tile4x16(w0, w0 + rs, w0 + 2 * rs, w0 + 3 * rs, ng, nt, CodeRows<kBits>{codes, row_bytes}, d,
                 acc + r * D + d, D, true);
      }
    }
    for (; r < rows; ++r) {
      for (int64_t d = 0; d < D; d += 8) {
        Row1(w + r * rs + d / G, ng, nt, CodeRow8<kBits>{codes, row_bytes}, d, acc + r * D + d);
      }
    }
  }
  TOOLKIT_AVX2 static inline void LoadScales(const uint16_t* s16, const uint16_t* z16, int64_t n, float* s,
                                             float* z) {
    int64_t i = 0;
    const __m256 m128 = _mm256_set1_ps(-128.0f);
    for (; i + 8 <= n; i += 8) {
      const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s16 + i)));
      _mm256_storeu_ps(s + i, sv);
      _mm256_storeu_ps(z + i, z16 ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(z16 + i)))
                                  : _mm256_mul_ps(m128, sv));
    }
    for (; i < n; ++i) ScaleZeroAt(s16, z16, i, &s[i], &z[i]);
  }
  // ScalarOps::FoldWeights, 8 weights at a time where ng divides 8 (lane l: token
  // t + l / ng, group l % ng) or 8 divides ng.
  TOOLKIT_AVX2 static inline void FoldWeights(const float* p, int64_t nt, int64_t ng, const float* s, const float* z,
                                              float* w, float* zsum) {
    const int64_t n = nt * ng;
    if (ng % 8 == 0) {
      for (int64_t c = 0; c < ng; c += 8) {
        __m256 za = _mm256_setzero_ps();
        for (int64_t t = 0; t < nt; ++t) {
          const __m256 pv = _mm256_broadcast_ss(p + t);
          _mm256_storeu_ps(w + t * ng + c, _mm256_mul_ps(pv, _mm256_loadu_ps(s + t * ng + c)));
          za = _mm256_fmadd_ps(pv, _mm256_loadu_ps(z + t * ng + c), za);
        }
        _mm256_storeu_ps(zsum + c, _mm256_add_ps(_mm256_loadu_ps(zsum + c), za));
      }
      return;
    }
    if (8 % ng != 0) return ScalarOps::FoldWeights(p, nt, ng, s, z, w, zsum);
    const int per = int(8 / ng);  // tokens per vector
    const __m256i lane_token = ng == 1 ? _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
                               : ng == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                               : ng == 4 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)
                                         : _mm256_setzero_si256();
    __m256 za = _mm256_setzero_ps();
    int64_t j = 0;
    const float* pt = p;  // the vector's `per` tokens, all < nt (advanced, not divided: no idiv)
    for (; j + 8 <= n; j += 8, pt += per) {
      __m256 raw;
      if (per == 8) {
        raw = _mm256_loadu_ps(pt);
      } else if (per == 4) {
        raw = _mm256_castps128_ps256(_mm_loadu_ps(pt));
      } else if (per == 2) {
        raw = _mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(pt))));
      } else {
        raw = _mm256_broadcast_ss(pt);
      }
      const __m256 pv = _mm256_permutevar8x32_ps(raw, lane_token);
      _mm256_storeu_ps(w + j, _mm256_mul_ps(pv, _mm256_loadu_ps(s + j)));
      za = _mm256_fmadd_ps(pv, _mm256_loadu_ps(z + j), za);
    }
    // Lane l holds group l % ng (ng = 1, 2 or 4): fold the lanes in registers (a store
    // and eight dependent scalar adds through memory cost more than the fold itself).
    const __m128 h = _mm_add_ps(_mm256_castps256_ps128(za), _mm256_extractf128_ps(za, 1));
    if (ng == 4) {
      _mm_storeu_ps(zsum, _mm_add_ps(_mm_loadu_ps(zsum), h));
    } else {
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));  // [g0 + g2, g1 + g3]
      if (ng == 2) {
        zsum[0] += _mm_cvtss_f32(h2);
        zsum[1] += _mm_cvtss_f32(_mm_shuffle_ps(h2, h2, 1));
      } else {
        zsum[0] += _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
      }
    }
    for (; j < n; ++j) {
      w[j] = p[j / ng] * s[j];
      zsum[j % ng] += p[j / ng] * z[j];
    }
  }
  TOOLKIT_AVX2 static inline void AccumulateCodes(const float* w, int64_t rows, int64_t ng, int64_t G,
                                                  const uint8_t* codes, int64_t row_bytes, int bits, int64_t nt,
                                                  int64_t D, float* acc) {
    if (bits == 8) return AccumulateCodesBits<8>(w, rows, ng, G, codes, row_bytes, nt, D, acc);
    if (bits == 4) return AccumulateCodesBits<4>(w, rows, ng, G, codes, row_bytes, nt, D, acc);
    AccumulateCodesBits<2>(w, rows, ng, G, codes, row_bytes, nt, D, acc);
  }
  // ScalarOps::Transpose; 4 columns (four key groups) by 4x4 register transposes.
  TOOLKIT_AVX2 static inline void Transpose(const float* in, int64_t rows, int64_t cols, float* out) {
    if (cols != 4) return ScalarOps::Transpose(in, rows, cols, out);
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
      __m128 a = _mm_loadu_ps(in + r * 4), b = _mm_loadu_ps(in + r * 4 + 4), c = _mm_loadu_ps(in + r * 4 + 8),
             d = _mm_loadu_ps(in + r * 4 + 12);
      _MM_TRANSPOSE4_PS(a, b, c, d);
      _mm_storeu_ps(out + r, a);
      _mm_storeu_ps(out + rows + r, b);
      _mm_storeu_ps(out + 2 * rows + r, c);
      _mm_storeu_ps(out + 3 * rows + r, d);
    }
    for (; r < rows; ++r) {
      for (int64_t c = 0; c < 4; ++c) out[c * rows + r] = in[r * 4 + c];
    }
  }
  // Same as ScalarOps::RowMax: maxps returns its second operand (the running max)
  // when the first is NaN, as std::max(m, NaN) keeps m.
  TOOLKIT_AVX2 static inline float RowMax(const float* x, int64_t n) {
    __m256 m0 = _mm256_set1_ps(kNegInf), m1 = m0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
      m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
      m1 = _mm256_max_ps(_mm256_loadu_ps(x + i + 8), m1);
    }
    for (; i + 8 <= n; i += 8) m0 = _mm256_max_ps(_mm256_loadu_ps(x + i), m0);
    float m = HorizontalMax(_mm256_max_ps(m0, m1));
    for (; i < n; ++i) m = std::max(m, x[i]);
    return m;
  }
  TOOLKIT_AVX2 static inline float ExpShift(float* x, int64_t n, float m) {
    const __m256 mv = _mm256_set1_ps(m);
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
      const __m256 e = Exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), mv));
      _mm256_storeu_ps(x + i, e);
      acc = _mm256_add_ps(acc, e);
    }
    float sum = HorizontalSum(acc);
    for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - m));
    return sum;
  }
};
#endif

// Scratch buffers of the attention work items, kept per thread: an ORT pool thread
// runs many work items, and after its first one a work item allocates and clears
// nothing. Buffers are handed out in the same order every time (the i-th Take
// reuses the i-th buffer, grown when too small) and their contents are unspecified:
// every buffer is written before it is read. Sanitizer and debug builds fill them
// with NaN bytes on every Take, so a read before a write fails the op tests there.
template <typename T>
struct Buf {
  T* p = nullptr;
  size_t n = 0;
  T* data() const { return p; }
  T* begin() const { return p; }
  T* end() const { return p + n; }
  size_t size() const { return n; }
  T& operator[](size_t i) const { return p[i]; }
};

class Scratch {
 public:
  // The calling thread's scratch, rewound for a new work item. Buffers above
  // kKeepBytes (long prefills) are released at the next rewind instead of kept.
  static Scratch& ForThisThread() {
    thread_local Scratch scratch;
    for (Chunk& c : scratch.chunks_) {
      if (c.bytes > kKeepBytes) c = Chunk{};
    }
    scratch.next_ = 0;
    return scratch;
  }
  template <typename T>
  Buf<T> Take(size_t n) {
    const size_t bytes = std::max<size_t>(n * sizeof(T), 1);
    if (next_ == chunks_.size()) chunks_.emplace_back();
    Chunk& c = chunks_[next_++];
    if (c.bytes < bytes) {
      c.mem.reset(new char[bytes]);  // (new char[] is aligned for any scalar type)
      c.bytes = bytes;
    }
#if defined(__SANITIZE_ADDRESS__) || !defined(NDEBUG)
    std::memset(c.mem.get(), 0xff, bytes);  // NaN floats, -1 integers
#endif
    return Buf<T>{reinterpret_cast<T*>(c.mem.get()), n};
  }

 private:
  static constexpr size_t kKeepBytes = size_t(1) << 22;
  struct Chunk {
    std::unique_ptr<char[]> mem;
    size_t bytes = 0;
  };
  std::vector<Chunk> chunks_;
  size_t next_ = 0;
};

struct Job {
  const Io* io;
  const Attributes* a;
  int64_t slices = 1;  // key-position slices per (batch, kv head)
  int64_t slice_len = 0;
  int64_t rows = 0;  // query rows per (batch, kv head): rep * S
  bool avx2 = false;
  bool codes_copied = false;  // the attention pass copied the past codes into the present
  bool skip_masked = true;    // positions every row of a block masks may be skipped (AttendSliceImpl)
  // partials[(bh * slices + slice) * rows + row] -> {max, sum, acc[D]}
  std::vector<float> partials;
  // Slices of each (batch, kv head) still running: the last one to finish merges the
  // head's partials and writes its present cache, so a call costs one thread-pool
  // dispatch instead of three.
  std::unique_ptr<std::atomic<int64_t>[]> pending;
  std::atomic<bool> failed{false};
};

inline float BiasAt(const Io& io, int64_t b, int64_t s, int64_t t) {
  if (io.bias_batch == 0) return t <= io.N + io.r + s ? 0.0f : kNegInf;
  const int64_t bb = io.bias_batch == 1 ? 0 : b;
  return io.bias[(bb * io.S + s) * io.T + t];
}

// Full-precision row of position t >= N (residual, then the new tokens).
inline const float* FpRow(const Io& io, const float* res, const float* fresh, int64_t b, int64_t h, int64_t t) {
  const int64_t i = t - io.N;
  if (i < io.r) return res + ((b * io.Hkv + h) * io.Rc + i) * io.D;
  return fresh + ((b * io.Hkv + h) * io.S + (i - io.r)) * io.D;
}

// The int8 query codes of one row in the order 4-bit key chunks unpack to: per 32
// channels, the 16 even channels (low nibbles) then the 16 odd ones (high nibbles).
inline void PermuteForNibbles(const int8_t* codes, int64_t D, int8_t* out) {
  for (int64_t d0 = 0; d0 < D; d0 += 32) {
    for (int64_t i = 0; i < 16; ++i) {
      out[d0 + i] = codes[d0 + 2 * i];
      out[d0 + 16 + i] = codes[d0 + 2 * i + 1];
    }
  }
}

// One (batch, KV head, slice of positions) work item, two passes over the slice:
// scores for every query row of the group (each key row dequantized once), then
// exp against the slice max, then the probability-weighted values (each value row
// dequantized once). Query rows are processed in blocks so the score block stays
// small for long prefills.
template <typename Ops>
inline __attribute__((always_inline)) void AttendSliceImpl(Job* job, size_t index) {
  const Io& io = *job->io;
  const Attributes& a = *job->a;
  const int64_t D = io.D, S = io.S, rep = io.Hq / io.Hkv, rows = job->rows;
  const int64_t bh = int64_t(index) / job->slices, slice = int64_t(index) % job->slices;
  const int64_t b = bh / io.Hkv, h = bh % io.Hkv;
  const int64_t t0 = slice * job->slice_len, t1 = std::min(io.T, t0 + job->slice_len), len = t1 - t0;
  const int bits = int(a.bits);
  const int64_t groups = io.Nc / a.key_group;  // per-channel key group slots

  Scratch& scratch = Scratch::ForThisThread();  // (every buffer below is written before it is read)
  const auto sc = scratch.Take<float>(size_t(D)), zc = scratch.Take<float>(size_t(D)),
             vsc = scratch.Take<float>(size_t(D)), vzc = scratch.Take<float>(size_t(D));
  int64_t loaded_group = -1;
  // Scores of position t for the nr query rows q (written with stride len).
  // Keys: the scale and zero are folded into the query side where they are shared,
  // so the hot loop is dot(query, codes) with no dequantization:
  //   per channel (KIVI, one (s, z) vector per group of key_group tokens):
  //     q.k = (q * s).codes + q.z, with q * s and q.z formed once per group;
  //   per token, one group per row (int8): q.k = s (q.codes) + z sum(q);
  //   per token, several groups: dequantized in registers chunk by chunk.
  constexpr int64_t kTokenBlock = 32;  // key / value rows handled together
  constexpr int64_t kRowBlock = 64;    // query rows handled together
  const int64_t block_rows = std::min(rows, kRowBlock);
  const auto qs = scratch.Take<float>(a.key_per_channel ? size_t(block_rows * D) : 0);
  const auto qz = scratch.Take<float>(a.key_per_channel ? size_t(block_rows) : 0);
  const auto qsum = scratch.Take<float>(size_t(block_rows));
  // Per-token key groups: a block's scales / zeros, and their per-chunk expansion (s8, z8).
  const auto kbs = scratch.Take<float>(size_t(kTokenBlock * io.key_params_per_token)),
             kbz = scratch.Take<float>(kbs.size());
  // quantize_query=1: the row block's query codes, their sums and scales. Integer dot
  // products score 8-bit keys with one (scale, zero) per token (qint) and 4-bit keys
  // per token in groups of whole 32-channel chunks (qint4: the codes in nibble order,
  // the rounded query's sum per key group, a block of key zeros transposed); other
  // schemes use the rounded query (written back into q) in their float dot products.
  const auto qcode = scratch.Take<int8_t>(a.quantize_query ? size_t(block_rows * D) : 0);
  const auto qcsum = scratch.Take<int32_t>(a.quantize_query ? size_t(block_rows) : 0);
  const auto qscale = scratch.Take<float>(qcsum.size());
  const QueryInt8 query_int8{qcode.data(), qcsum.data(), qscale.data()};
  // (one group per row, G = D, takes the per-token branch of key_scores like int8 keys)
  const bool int4_path = a.quantize_query && bits == 4 && !a.key_per_channel && a.key_group % 32 == 0 &&
                         D % 32 == 0 && io.key_params_per_token > 1;
  const auto qperm = scratch.Take<int8_t>(int4_path ? qcode.size() : 0);
  const QueryInt8 query_int4{qperm.data(), qcsum.data(), qscale.data()};
  const auto qgsum = scratch.Take<float>(int4_path ? size_t(block_rows * io.key_params_per_token) : 0);  // [rows][groups]
  const auto kzt = scratch.Take<float>(int4_path ? kbs.size() : 0);                                      // [group][token]
  const QueryInt8* const qint =
      a.quantize_query && bits == 8 && !a.key_per_channel && io.key_params_per_token == 1 ? &query_int8 : nullptr;
  const QueryInt8* const qint4 = int4_path ? &query_int4 : nullptr;
  const auto kblk = scratch.Take<float>(size_t(2 * kTokenBlock * std::max<int64_t>(D / 8, 1) + D));
  // Scores of positions [ta, tb) (one token block) for the nr query rows q, written
  // at out[r * stride + t - ta].
  auto key_scores = [&](int64_t ta, int64_t tb, const float* q, int64_t nr, float* out, int64_t stride) {
    int64_t t = ta;
    const int64_t tq = std::min(tb, io.N);  // quantized positions end here
    auto codes = [&](int64_t pos) { return io.key_q + (bh * io.Nc + pos) * io.row_bytes; };
    if (a.key_per_channel) {
      while (t < tq) {
        const int64_t g = t / a.key_group, tg = std::min(tq, (g + 1) * a.key_group);
        if (g != loaded_group) {
          const int64_t slot = (bh * groups + g) * D;
          Ops::LoadScales(io.key_scale + slot, io.key_zero + slot, D, sc.data(), zc.data());
          for (int64_t r = 0; r < nr; ++r) {
            for (int64_t d = 0; d < D; ++d) qs[size_t(r * D + d)] = q[r * D + d] * sc[size_t(d)];
          }
          Ops::DotRows(q, nr, zc.data(), D, qz.data(), 1);
          loaded_group = g;
        }
        Ops::CodeDotsBlock(qs.data(), nr, codes(t), io.row_bytes, tg - t, bits, D, out + (t - ta), stride);
        for (int64_t r = 0; r < nr; ++r) {
          for (int64_t i = t; i < tg; ++i) out[r * stride + (i - ta)] += qz[size_t(r)];
        }
        t = tg;
      }
    } else if (io.key_params_per_token == 1) {
      // Raw code dots; the caller applies s (q.codes) + z sum(q) to the whole token
      // block at once (a vector loop over tokens instead of a strided store per row).
      // An int8 query scores 8-bit codes with integer dot products.
      if (t < tq && qint) {
        Ops::IntDotsBlock(*qint, nr, codes(t), io.row_bytes, tq - t, D, out, stride);
      } else if (t < tq) {
        Ops::CodeDotsBlock(q, nr, codes(t), io.row_bytes, tq - t, bits, D, out, stride);
      }
      t = std::max(t, tq);
    } else if (t < tq) {  // per token, several groups: the block's scales, then dequantized in registers
      const int64_t ng = io.key_params_per_token, slot = (bh * io.Nc + t) * ng;
      Ops::LoadScales(io.key_scale + slot, io.key_zero ? io.key_zero + slot : nullptr, (tq - t) * ng, kbs.data(),
                      kbz.data());
      if (qint4) {  // integer group dots
        // (the zero terms are added by the caller, from kbz)
        Ops::IntDotsBlock4(*qint4, nr, codes(t), io.row_bytes, tq - t, D, a.key_group, kbs.data(), out, stride);
      } else {
        Ops::QuantScoresBlock(q, nr, codes(t), io.row_bytes, tq - t, bits, D, kbs.data(), kbz.data(), a.key_group,
                              kblk.data(), kblk.data() + kTokenBlock * (D / 8), out, stride);
      }
      t = tq;
    }
    // Full-precision rows: the residual's, then the new tokens' (each run contiguous).
    for (const int64_t end : {std::min(tb, io.N + io.r), tb}) {
      if (t < end) {
        Ops::FloatDotsBlock(q, nr, FpRow(io, io.key_res, io.key, b, h, t), end - t, D, out + (t - ta), stride);
        t = end;
      }
    }
  };
  auto value_row = [&](int64_t t, float* dst) {
    if (t >= io.N) {
      std::memcpy(dst, FpRow(io, io.value_res, io.value, b, h, t), size_t(D) * sizeof(float));
      return;
    }
    const int64_t ng = io.value_params;
    for (int64_t g = 0; g < ng; ++g) {
      ScaleZeroAt(io.value_scale, io.value_zero, (bh * io.Nc + t) * ng + g, &vsc[size_t(g)], &vzc[size_t(g)]);
    }
    Ops::Dequant(io.value_q + (bh * io.Nc + t) * io.row_bytes, bits, D,
                 RowParams{vsc.data(), vzc.data(), a.value_group}, dst);
  };

  // Past code rows [ta, tb) of this head (quantized positions only) into the present
  // (a growing cache; a fixed-capacity one is copied, if at all, by WritePresent).
  auto copy_codes = [&](const uint8_t* past, uint8_t* present, int64_t ta, int64_t tb) {
    tb = std::min(tb, io.N);
    if (job->codes_copied && ta < tb) {
      std::memcpy(present + (bh * io.N2c + ta) * io.row_bytes, past + (bh * io.Nc + ta) * io.row_bytes,
                  size_t((tb - ta) * io.row_bytes));
    }
  };
  // Query rows of this KV head, pre-scaled: row j*S + s is head h*rep + j, query s.
  const auto q = scratch.Take<float>(size_t(block_rows * D));
  const auto score = scratch.Take<float>(size_t(block_rows * len));
  const auto acc = scratch.Take<float>(q.size());
  const auto vblk = scratch.Take<float>(size_t(kTokenBlock * D));
  const auto ks = scratch.Take<float>(size_t(kTokenBlock)), kz = scratch.Take<float>(size_t(kTokenBlock));  // int8 keys: per-token s, z of a block
  // Value blocks read as codes (see pass 2): per-(row, group) scales and zeros of a
  // block, the scale-folded weights [rows][tokens][groups] and the zero sums.
  const int64_t ng = io.value_params;
  const bool fold_values = ng > 0 && a.value_group % 16 == 0 && D % 16 == 0;
  const auto bs = scratch.Take<float>(size_t(kTokenBlock * ng)), bz = scratch.Take<float>(bs.size());
  const auto wq = scratch.Take<float>(size_t(block_rows * ng * kTokenBlock));
  const auto zsum = scratch.Take<float>(size_t(block_rows * ng));
  float* part = job->partials.data() + size_t((bh * job->slices + slice) * rows) * size_t(D + 2);
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const int64_t nr = std::min(kRowBlock, rows - r0);
    for (int64_t rr = 0; rr < nr; ++rr) {
      const int64_t j = (r0 + rr) / S, s = (r0 + rr) % S;
      const float* src = io.query + (((b * io.Hq + h * rep + j) * S + s) * D);
      for (int64_t d = 0; d < D; ++d) q[size_t(rr * D + d)] = src[d] * io.scale;
    }
    if (a.quantize_query) {
      for (int64_t rr = 0; rr < nr; ++rr) {
        qcsum[size_t(rr)] = Ops::QuantizeQuery(q.data() + rr * D, D, qcode.data() + rr * D, &qscale[size_t(rr)]);
      }
      if (qint4) {
        const int64_t ng = io.key_params_per_token;
        for (int64_t rr = 0; rr < nr; ++rr) {
          PermuteForNibbles(qcode.data() + rr * D, D, qperm.data() + rr * D);
          for (int64_t g = 0; g < ng; ++g) {
            int32_t sum = 0;
            for (int64_t d = g * a.key_group; d < (g + 1) * a.key_group; ++d) sum += qcode[size_t(rr * D + d)];
            qgsum[size_t(rr * ng + g)] = qscale[size_t(rr)] * float(sum);
          }
        }
      }
    }
    if (!a.key_per_channel && io.key_params_per_token == 1) {  // int8 keys: z * sum(q)
      std::fill(qsum.begin(), qsum.begin() + nr, 0.0f);
      for (int64_t rr = 0; rr < nr; ++rr) {
        if (a.quantize_query) {  // the rounded row's sum, from its integer codes
          qsum[size_t(rr)] = qscale[size_t(rr)] * float(qcsum[size_t(rr)]);
          continue;
        }
        for (int64_t d = 0; d < D; ++d) qsum[size_t(rr)] += q[size_t(rr * D + d)];
      }
    }
    // Positions from te_rows on are masked for every row of the block (causal, or a
    // bias <= kMaskedBias: the causal part of a prefill): not scored, not summed. Exact:
    // a row that sees some position (bias > kMaskedBias / 2: a call with a bias in
    // between skips nothing, job->skip_masked) gives a masked one exp(bias + score -
    // max) = 0 for scores within 5e7 of each other (a NaN bias counts as seen); a row
    // that sees none (a padding query, every bias finite and tiny: softmax spreads it
    // over all T positions) keeps the whole slice.
    // Keys and values of skipped positions are not read, so an inf or NaN stored there
    // reaches no row (as in ONNX Runtime's GroupQueryAttention; README). Rows are
    // scanned last-first: the latest query usually sees the most and ends the others'
    // scans at once.
    int64_t te_rows = job->skip_masked ? t0 : t1;
    const auto masked = [](float x) { return x <= kMaskedBias; };
    for (int64_t rr = nr - 1; rr >= 0 && te_rows < t1; --rr) {
      const int64_t s = (r0 + rr) % S;
      if (!io.bias_batch) {
        te_rows = std::max(te_rows, std::min(t1, io.N + io.r + s + 1));
        continue;
      }
      const float* br = io.bias + ((io.bias_batch == 1 ? 0 : b) * S + s) * io.T;
      int64_t t = t1;
      while (t > te_rows && masked(br[t - 1])) --t;
      if (t == te_rows && std::all_of(br, br + io.T, masked)) t = t1;
      te_rows = t;
    }
    const int64_t seen = te_rows - t0;  // scored positions of the slice, [t0, te_rows)
    // Pass 1: scores [nr, seen] (+ bias), stride len. The first row block also copies
    // the slice's past key codes into the present cache, kTokenBlock rows at a time
    // right after scoring them (still in L1), instead of re-reading the whole cache
    // from memory in WritePresent.
    loaded_group = -1;
    for (int64_t tb = t0; tb < te_rows; tb += kTokenBlock) {
      const int64_t te = std::min(te_rows, tb + kTokenBlock);
      key_scores(tb, te, q.data(), nr, score.data() + (tb - t0), len);
      const int64_t tq = std::min(te, io.N);  // quantized positions of the block
      if (!a.key_per_channel && io.key_params_per_token == 1 && tb < tq) {
        const int64_t slot = bh * io.Nc + tb;
        Ops::LoadScales(io.key_scale + slot, io.key_zero ? io.key_zero + slot : nullptr, tq - tb, ks.data(),
                        kz.data());
        for (int64_t rr = 0; rr < nr; ++rr) {
          float* sr = score.data() + rr * len + (tb - t0);
          const float qs_r = qsum[size_t(rr)];
          for (int64_t i = 0; i < tq - tb; ++i) sr[i] = ks[size_t(i)] * sr[i] + kz[size_t(i)] * qs_r;
        }
      }
      if (qint4 && tb < tq) {  // int4 keys, int8 query: + sum_g z[t][g] sum(q' over group g)
        const int64_t nt = tq - tb, ng = io.key_params_per_token;
        Ops::Transpose(kbz.data(), nt, ng, kzt.data());  // group-major: the loop below runs along tokens
        for (int64_t rr = 0; rr < nr; ++rr) {
          float* sr = score.data() + rr * len + (tb - t0);
          for (int64_t g = 0; g < ng; ++g) {
            const float qg = qgsum[size_t(rr * ng + g)];
            const float* z = kzt.data() + g * nt;
            for (int64_t i = 0; i < nt; ++i) sr[i] += qg * z[i];
          }
        }
      }
      if (r0 == 0) copy_codes(io.key_q, io.p_key_q, tb, te);
    }
    if (r0 == 0) {  // the skipped positions' codes too
      copy_codes(io.key_q, io.p_key_q, te_rows, t1);
      copy_codes(io.value_q, io.p_value_q, te_rows, t1);
    }
    for (int64_t rr = 0; rr < nr; ++rr) {
      const int64_t s = (r0 + rr) % S;
      float* sr = score.data() + rr * len;
      if (io.bias_batch) {
        const float* br = io.bias + ((io.bias_batch == 1 ? 0 : b) * S + s) * io.T + t0;
        for (int64_t i = 0; i < seen; ++i) sr[i] += br[i];
      } else {
        for (int64_t t = std::max(t0, io.N + io.r + s + 1); t < te_rows; ++t) sr[t - t0] = kNegInf;
      }
    }
    // Softmax numerators against the slice max.
    for (int64_t rr = 0; rr < nr; ++rr) {
      float* sr = score.data() + rr * len;
      const float m = Ops::RowMax(sr, seen);
      float* dst = part + (r0 + rr) * (D + 2);
      dst[0] = m;
      if (!(m > kNegInf)) {  // every position of the slice masked, or NaN (RowMax skips NaN)
        // Masked: the slice adds nothing. NaN scores (a NaN query or key, a NaN bias):
        // a finite max with a NaN sum makes the merged row NaN, as ONNX Softmax does.
        const bool nan = std::any_of(sr, sr + seen, [](float x) { return std::isnan(x); });
        dst[0] = nan ? 0.0f : m;
        dst[1] = nan ? std::numeric_limits<float>::quiet_NaN() : 0.0f;
        std::fill(sr, sr + seen, 0.0f);
        continue;
      }
      dst[1] = Ops::ExpShift(sr, seen, m);
    }
    // Pass 2: probability-weighted values, kTokenBlock rows at a time. A block of
    // quantized rows is read as codes: with v = s c + z per (row, group),
    //   sum_t p_t v_t = sum_t (p_t s_t) c_t + sum_t p_t z_t,
    // so the scales go into the weights and the zeros into one sum per group; other
    // blocks (the residual / new rows, or group sizes that are not multiples of 16)
    // are dequantized rows.
    std::fill(acc.begin(), acc.begin() + nr * D, 0.0f);
    std::fill(zsum.begin(), zsum.begin() + nr * ng, 0.0f);
    for (int64_t tb = t0; tb < te_rows; tb += kTokenBlock) {
      const int64_t nt = std::min(kTokenBlock, te_rows - tb);
      if (fold_values && tb + nt <= io.N) {
        const int64_t slot = (bh * io.Nc + tb) * ng;  // the block's rows are consecutive slots
        Ops::LoadScales(io.value_scale + slot, io.value_zero ? io.value_zero + slot : nullptr, nt * ng, bs.data(),
                        bz.data());
        for (int64_t rr = 0; rr < nr; ++rr) {
          Ops::FoldWeights(score.data() + rr * len + (tb - t0), nt, ng, bs.data(), bz.data(),
                           wq.data() + rr * nt * ng, zsum.data() + rr * ng);
        }
        Ops::AccumulateCodes(wq.data(), nr, ng, a.value_group, io.value_q + (bh * io.Nc + tb) * io.row_bytes,
                             io.row_bytes, bits, nt, D, acc.data());
      } else {
        for (int64_t i = 0; i < nt; ++i) value_row(tb + i, vblk.data() + i * D);
        Ops::AccumulateBlock(score.data() + (tb - t0), len, nr, vblk.data(), nt, D, acc.data());
      }
      if (r0 == 0) copy_codes(io.value_q, io.p_value_q, tb, tb + nt);
    }
    for (int64_t rr = 0; rr < nr; ++rr) {
      float* dst = part + (r0 + rr) * (D + 2) + 2;
      const float* src = acc.data() + rr * D;
      for (int64_t g = 0, d = 0; g < ng; ++g) {  // (a loop per value group: no division per channel)
        const float z = zsum[size_t(rr * ng + g)];
        for (const int64_t end = d + a.value_group; d < end; ++d) dst[d] = src[d] + z;
      }
    }
  }
}

void AttendSliceScalar(Job* job, size_t index) { AttendSliceImpl<ScalarOps>(job, index); }
#ifdef TOOLKIT_KV_AVX2
TOOLKIT_AVX2 void AttendSliceAvx2(Job* job, size_t index) { AttendSliceImpl<Avx2Ops>(job, index); }
#endif

void MergeSlices(void* data, size_t index);
void WritePresent(void* data, size_t index);

void AttendSlice(void* data, size_t index) {
  Job* job = static_cast<Job*>(data);
  try {
#ifdef TOOLKIT_KV_AVX2
    if (job->avx2) {
      AttendSliceAvx2(job, index);
    } else {
      AttendSliceScalar(job, index);
    }
#else
    AttendSliceScalar(job, index);
#endif
  } catch (...) {
    job->failed = true;
  }
  // acq_rel: the last slice of the head sees every other slice's partials. The merge
  // reads the slices in order, whichever thread runs it (bit-identical results).
  const size_t bh = index / size_t(job->slices);
  if (job->pending[bh].fetch_sub(1, std::memory_order_acq_rel) == 1 && !job->failed) {
    MergeSlices(data, bh);
    WritePresent(data, bh);
  }
}

void MergeSlices(void* data, size_t index) {
  Job* job = static_cast<Job*>(data);
  const Io& io = *job->io;
  const int64_t D = io.D, S = io.S, rep = io.Hq / io.Hkv, rows = job->rows;
  const int64_t bh = int64_t(index);
  const int64_t b = bh / io.Hkv, h = bh % io.Hkv;
  for (int64_t rr = 0; rr < rows; ++rr) {
    const int64_t j = rr / S, s = rr % S;
    float* out = io.out + (((b * io.Hq + h * rep + j) * S + s) * D);
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t c = 0; c < job->slices; ++c) {
      mx = std::max(mx, job->partials[size_t(((bh * job->slices + c) * rows + rr) * (D + 2))]);
    }
    std::fill(out, out + D, 0.0f);
    if (!(mx > -std::numeric_limits<float>::infinity())) continue;  // every position masked
    float denom = 0.0f;
    for (int64_t c = 0; c < job->slices; ++c) {
      const float* p = job->partials.data() + size_t(((bh * job->slices + c) * rows + rr) * (D + 2));
      if (!(p[0] > -std::numeric_limits<float>::infinity())) continue;
      const float w = std::exp(p[0] - mx);
      denom += w * p[1];
      for (int64_t d = 0; d < D; ++d) out[d] += w * p[2 + d];
    }
    const float inv = 1.0f / denom;
    for (int64_t d = 0; d < D; ++d) out[d] *= inv;
  }
}

// ---------------------------------------------------------------- present cache

#ifdef TOOLKIT_KV_AVX2
// One per-token group of WritePresent, 8 channels at a time: the same float32
// operations as the scalar path (the range, AsymmetricParams, IEEE division and
// round-half-to-even of SymmetricCode / AsymmetricCode), so the same codes, scale
// and zero. G is a multiple of 8; zero is null when symmetric.
TOOLKIT_AVX2 void QuantizeGroupAvx2(const float* x, int64_t G, bool symmetric, int bits, uint16_t* scale,
                                    uint16_t* zero, uint8_t* codes) {
  float s = 0.0f, z = 0.0f;
  if (symmetric) {
    // max skips NaN lanes (it returns its second operand, amax); an unordered
    // compare flags them, and a flagged group's range is NaN (NanMax).
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 amax = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < G; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      amax = _mm256_max_ps(_mm256_and_ps(v, abs_mask), amax);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    const float m = _mm256_movemask_ps(nan) ? std::numeric_limits<float>::quiet_NaN() : HorizontalMax(amax);
    *scale = FloatToHalf(m / 127.0f);
    s = HalfToFloat(*scale);
  } else {
    __m256 mn = _mm256_set1_ps(x[0]), mx = mn, nan = _mm256_setzero_ps();
    for (int64_t i = 0; i < G; i += 8) {
      const __m256 v = _mm256_loadu_ps(x + i);
      mn = _mm256_min_ps(v, mn), mx = _mm256_max_ps(v, mx);
      nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float a = std::numeric_limits<float>::quiet_NaN(), b = a;
    if (!_mm256_movemask_ps(nan)) {
      alignas(32) float lo[8], hi[8];
      _mm256_store_ps(lo, mn), _mm256_store_ps(hi, mx);
      a = lo[0], b = hi[0];
      for (int l = 1; l < 8; ++l) a = std::min(a, lo[l]), b = std::max(b, hi[l]);
    }
    AsymmetricParams(a, b, bits, scale, zero);
    s = HalfToFloat(*scale), z = HalfToFloat(*zero);
  }
  if (!(s > 0.0f)) {  // a zero or NaN scale: the scalar rules' fixed code
    std::memset(codes, symmetric ? 128 : 0, size_t(G));
    return;
  }
  const __m256 sv = _mm256_set1_ps(s), zv = _mm256_set1_ps(z);
  const __m256 lo = _mm256_set1_ps(symmetric ? -127.0f : 0.0f);
  const __m256 hi = _mm256_set1_ps(symmetric ? 127.0f : float((1 << bits) - 1));
  const __m256i offset = _mm256_set1_epi32(symmetric ? 128 : 0);
  for (int64_t i = 0; i < G; i += 8) {
    __m256 v = _mm256_loadu_ps(x + i);
    if (!symmetric) v = _mm256_sub_ps(v, zv);
    const __m256 r = _mm256_round_ps(_mm256_div_ps(v, sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    // NaN -> the lower bound, as the scalar clamps do (q >= lo is false for NaN).
    const __m256 c = _mm256_blendv_ps(lo, _mm256_min_ps(r, hi), _mm256_cmp_ps(r, lo, _CMP_GE_OQ));
    const __m256i ci = _mm256_add_epi32(_mm256_cvtps_epi32(c), offset);
    const __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(ci), _mm256_extracti128_si256(ci, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + i), _mm_packus_epi16(w, w));
  }
}
#endif

// Copies the past cache into the present one (unless they share a buffer) and
// quantizes the F flushed tokens; one (batch, kv head) per call.
void WritePresent(void* data, size_t index) {
  Job* job = static_cast<Job*>(data);
  try {
    const Io& io = *job->io;
    const Attributes& a = *job->a;
    const int64_t bh = int64_t(index), b = bh / io.Hkv, h = bh % io.Hkv, D = io.D;
    const int64_t N = io.N, F = io.F, r2 = io.r + io.S - F, rb = io.row_bytes;
    // Token strides: past Nc / Rc, present P / PR (equal for a fixed capacity).
    const int64_t Nc = io.Nc, P = io.N2c, PR = io.R2c;
    const int bits = int(a.bits), per = 8 / bits;
    auto copy = [](auto* dst, const auto* src, int64_t n) {
      if (n > 0 && static_cast<const void*>(dst) != static_cast<const void*>(src)) {
        std::memcpy(dst, src, size_t(n) * sizeof(*src));
      }
    };
    // The past: a growing cache copies its N rows (the codes were already copied by
    // the attention pass); a fixed-capacity one copies whole tensors, and nothing at
    // all where the present is bound to the past's buffer (copy skips dst == src).
    const int64_t rows = io.capacity ? Nc : N;
    if (!job->codes_copied) {
      copy(io.p_key_q + bh * P * rb, io.key_q + bh * Nc * rb, rows * rb);
      copy(io.p_value_q + bh * P * rb, io.value_q + bh * Nc * rb, rows * rb);
    }
    const int64_t kp_present = KeyParams(io, a, P), kp_past = KeyParams(io, a, Nc), kp_rows = KeyParams(io, a, rows);
    copy(io.p_key_scale + bh * kp_present, io.key_scale + bh * kp_past, kp_rows);
    if (io.p_key_zero) copy(io.p_key_zero + bh * kp_present, io.key_zero + bh * kp_past, kp_rows);
    const int64_t vp = io.value_params;
    copy(io.p_value_scale + bh * P * vp, io.value_scale + bh * Nc * vp, rows * vp);
    if (io.p_value_zero) copy(io.p_value_zero + bh * P * vp, io.value_zero + bh * Nc * vp, rows * vp);
    if (io.capacity) {
      copy(io.p_key_res + bh * PR * D, io.key_res + bh * io.Rc * D, io.Rc * D);
      copy(io.p_value_res + bh * PR * D, io.value_res + bh * io.Rc * D, io.Rc * D);
    }

    auto fp_key = [&](int64_t i) { return FpRow(io, io.key_res, io.key, b, h, N + i); };
    auto fp_value = [&](int64_t i) { return FpRow(io, io.value_res, io.value, b, h, N + i); };
    std::vector<uint8_t> codes(static_cast<size_t>(D));
    auto pack_row = [&](uint8_t* dst) {  // per-width loops with constant shifts (they vectorise)
      const uint8_t* c = codes.data();
      if (per == 1) {
        std::memcpy(dst, c, size_t(rb));
      } else if (per == 2) {
        for (int64_t j = 0; j < rb; ++j) dst[j] = uint8_t(c[2 * j] | (c[2 * j + 1] << 4));
      } else {
        for (int64_t j = 0; j < rb; ++j) {
          dst[j] = uint8_t(c[4 * j] | (c[4 * j + 1] << 2) | (c[4 * j + 2] << 4) | (c[4 * j + 3] << 6));
        }
      }
    };
    // Per-token groups (values always; keys unless per channel).
    auto per_token = [&](const float* x, int64_t G, uint16_t* s_out, uint16_t* z_out, uint8_t* q_out) {
      for (int64_t g = 0; g < D / G; ++g) {
        const float* xg = x + g * G;
#ifdef TOOLKIT_KV_AVX2
        if (job->avx2 && G % 8 == 0) {  // (G % 8 == 0 whenever the AVX2 path is taken)
          QuantizeGroupAvx2(xg, G, a.symmetric, bits, &s_out[g], a.symmetric ? nullptr : &z_out[g],
                            codes.data() + g * G);
          continue;
        }
#endif
        if (a.symmetric) {
          float amax = 0.0f;
          for (int64_t i = 0; i < G; ++i) amax = NanMax(amax, std::fabs(xg[i]));
          s_out[g] = FloatToHalf(amax / 127.0f);
          const float s = HalfToFloat(s_out[g]);
          for (int64_t i = 0; i < G; ++i) codes[size_t(g * G + i)] = SymmetricCode(xg[i], s);
        } else {
          float mn = xg[0], mx = xg[0];
          for (int64_t i = 1; i < G; ++i) mn = NanMin(mn, xg[i]), mx = NanMax(mx, xg[i]);
          AsymmetricParams(mn, mx, bits, &s_out[g], &z_out[g]);
          const float s = HalfToFloat(s_out[g]), z = HalfToFloat(z_out[g]);
          for (int64_t i = 0; i < G; ++i) codes[size_t(g * G + i)] = AsymmetricCode(xg[i], s, z, bits);
        }
      }
      pack_row(q_out);
    };
    for (int64_t i = 0; i < F; ++i) {
      // z_out is only written when asymmetric, where the zero outputs exist.
      per_token(fp_value(i), a.value_group, io.p_value_scale + (bh * P + N + i) * vp,
                io.p_value_zero ? io.p_value_zero + (bh * P + N + i) * vp : nullptr,
                io.p_value_q + (bh * P + N + i) * rb);
      if (!a.key_per_channel) {
        const int64_t kp = io.key_params_per_token;
        per_token(fp_key(i), a.key_group, io.p_key_scale + (bh * P + N + i) * kp,
                  io.p_key_zero ? io.p_key_zero + (bh * P + N + i) * kp : nullptr,
                  io.p_key_q + (bh * P + N + i) * rb);
      }
    }
    if (a.key_per_channel) {
      const int64_t G = a.key_group, groups2 = P / G;
      std::vector<uint8_t> block(size_t(G * D));
      for (int64_t g0 = 0; g0 < F; g0 += G) {
        const int64_t gi = (N + g0) / G;
        uint16_t* s_out = io.p_key_scale + (bh * groups2 + gi) * D;
        uint16_t* z_out = io.p_key_zero + (bh * groups2 + gi) * D;
        for (int64_t d = 0; d < D; ++d) {
          float mn = std::numeric_limits<float>::infinity(), mx = -mn;
          for (int64_t i = 0; i < G; ++i) {
            const int64_t t = N + g0 + i;
            if (io.bias_batch && !(BiasAt(io, b, io.S - 1, t) > kMaskedBias)) continue;
            const float x = fp_key(g0 + i)[d];
            mn = NanMin(mn, x), mx = NanMax(mx, x);
          }
          if (mn > mx) mn = mx = 0.0f;  // no valid token in the group
          AsymmetricParams(mn, mx, bits, &s_out[d], &z_out[d]);
          const float s = HalfToFloat(s_out[d]), z = HalfToFloat(z_out[d]);
          for (int64_t i = 0; i < G; ++i) block[size_t(i * D + d)] = AsymmetricCode(fp_key(g0 + i)[d], s, z, bits);
        }
        for (int64_t i = 0; i < G; ++i) {
          std::memcpy(codes.data(), block.data() + i * D, size_t(D));
          pack_row(io.p_key_q + (bh * P + N + g0 + i) * rb);
        }
      }
    }
    // The residual that stays in full precision. Sharing a buffer, rows that stay
    // where they are (no flush) are their own source and are skipped; after a flush
    // (F >= R > r) every kept row is a new token.
    for (int64_t i = 0; i < r2; ++i) {
      copy(io.p_key_res + (bh * PR + i) * D, fp_key(F + i), D);
      copy(io.p_value_res + (bh * PR + i) * D, fp_value(F + i), D);
    }

  } catch (...) {
    job->failed = true;
  }
}

}  // namespace

// TOOLKIT_KV_SCALAR=1 forces the portable path (tests run both paths).
static bool ForceScalar() {
  const char* v = std::getenv("TOOLKIT_KV_SCALAR");
  return v != nullptr && v[0] == '1';
}

OrtStatus* ComputeCpu(const Attributes& attrs, OrtKernelContext* context) {
  return GuardStatus(kOpName, [&]() -> OrtStatus* {
    Io io;
    if (OrtStatus* st = Prepare(context, attrs, &io)) return st;
    Ort::KernelContext ctx(context);
    Job job;
    job.io = &io;
    job.a = &attrs;
    const int64_t heads = io.B * io.Hkv;
    job.rows = (io.Hq / io.Hkv) * io.S;
#ifdef TOOLKIT_KV_AVX2
    // The AVX2 row operations work on 8 channels at a time, one scale per 8.
    // (head dims beyond Avx2Ops::kMaxChunks * 8 = 512 take the portable path)
    // 2-bit rows are read 4 bytes (16 channels) at a time: D a multiple of 16 there.
    job.avx2 = AvxAvailable() && !ForceScalar() && io.D % (attrs.bits == 2 ? 16 : 8) == 0 &&
               io.D <= 8 * Avx2Ops::kMaxChunks &&
               attrs.value_group % 8 == 0 &&
               (attrs.key_per_channel || attrs.key_group % 8 == 0);
#endif
    if (heads > 0 && io.T > 0 && job.rows > 0) {
      // Enough slices for every thread at small batch, each at least 256 positions.
      constexpr int64_t kTargetTasks = 16, kMinSlice = 256;
      job.slices = std::max<int64_t>(1, std::min((kTargetTasks + heads - 1) / heads, (io.T + kMinSlice - 1) / kMinSlice));
      job.slice_len = (io.T + job.slices - 1) / job.slices;
      job.slices = (io.T + job.slice_len - 1) / job.slice_len;
      job.partials.resize(size_t(heads * job.slices * job.rows * (io.D + 2)));
      job.codes_copied = !io.capacity;
      // A bias within (kMaskedBias, kMaskedBias / 2] would leave a masked position
      // (<= kMaskedBias) less than 5e7 below a seen one, where exp need not underflow:
      // no skipping in such a call (no real mask has one: 0 / -inf / finfo.min / -1e9).
      if (io.bias_batch) {
        const float* end = io.bias + (io.bias_batch == 1 ? 1 : io.B) * io.S * io.T;
        job.skip_masked = std::none_of(io.bias, end, [](float x) { return x > kMaskedBias && x <= kMaskedBias / 2; });
      }
      job.pending.reset(new std::atomic<int64_t>[size_t(heads)]);
      for (int64_t i = 0; i < heads; ++i) job.pending[size_t(i)].store(job.slices, std::memory_order_relaxed);
      ctx.ParallelFor(&AttendSlice, size_t(heads * job.slices), 0, &job);  // also merges and writes
    } else if (heads > 0) {
      ctx.ParallelFor(&WritePresent, size_t(heads), 0, &job);  // nothing to attend to
    }
    if (io.p_lengths) io.p_lengths[0] = io.N + io.F, io.p_lengths[1] = io.r + io.S - io.F;
    if (job.failed) {
      return MakeStatus(ORT_RUNTIME_EXCEPTION, std::string(kOpName) + ": CPU kernel failed (out of memory?)");
    }
    return nullptr;
  });
}

}  // namespace toolkit::kv_attention
