// AVX-512 pieces shared by the AVX-512 VNNI and AMX paths: activation quantization, the
// row-major epilogue (with a vector GELU) and a 16x16 transpose. Everything here is static with
// a target attribute, so no AVX-512 code can leak into a baseline translation unit.
#pragma once

// GCC 12's AVX-512 headers use deliberately uninitialized values in masked intrinsics and warn
// about their own code at every use; silence that for the header only.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop

#include <cstdint>
#include <cstring>

#include "linear.h"

#define FASTONNX_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")))

namespace fastonnx {
namespace avx512 {

// erf via Abramowitz & Stegun 7.1.28: 1 - 1 / (1 + a1 z + ... + a6 z^6)^16 (|error| <= 3e-7),
// odd symmetry for x < 0. About half the operations of an exp-based form, and no exp whose
// tiny results would be denormals. |x| is capped at 4, where erf already rounds to 1.
FASTONNX_AVX512 static inline __m512 erf_ps(__m512 x) {
  const __m512 z = _mm512_min_ps(_mm512_abs_ps(x), _mm512_set1_ps(4.f));
  __m512 p = _mm512_set1_ps(0.0000430638f);
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0002765672f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0001520143f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0092705272f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0422820123f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(0.0705230784f));
  p = _mm512_fmadd_ps(p, z, _mm512_set1_ps(1.f));
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);
  p = _mm512_mul_ps(p, p);  // (1 + ...)^16, in [1, 6e7]
  // 1 / p: a 14-bit reciprocal and one Newton step (relative error about 2^-28).
  const __m512 r0 = _mm512_rcp14_ps(p);
  const __m512 r = _mm512_mul_ps(r0, _mm512_fnmadd_ps(p, r0, _mm512_set1_ps(2.f)));
  const __m512 y = _mm512_sub_ps(_mm512_set1_ps(1.f), r);
  // Copy x's sign onto y.
  const __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y), sign));
}

FASTONNX_AVX512 static inline __m512 gelu_ps(__m512 x) {
  const __m512 e = erf_ps(_mm512_mul_ps(x, _mm512_set1_ps(0.70710678118654752f)));
  return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), x),
                       _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

// round(x * inv_scale) + zero_point, clamped to [0, 255], as int32 lanes (NaN -> 0).
FASTONNX_AVX512 static inline __m512i quantize_ps(__m512 x, __m512 inv_scale, __m512 zero_point) {
  __m512 q = _mm512_roundscale_ps(_mm512_mul_ps(x, inv_scale),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  q = _mm512_add_ps(q, zero_point);
  q = _mm512_min_ps(_mm512_max_ps(q, _mm512_setzero_ps()), _mm512_set1_ps(255.f));
  return _mm512_cvtps_epi32(q);
}

// 64 floats to uint8, the same bytes as quantize_ps on each: x * inv_scale is clamped to
// [-256, 512] (where every result already saturates), rounded by the conversion (MXCSR's
// nearest-even, as roundscale), offset in int32 and saturated by the two packs, which clamp to
// [0, 255] for free; a permute undoes the packs' per-128-bit-lane interleave.
FASTONNX_AVX512 static inline void quantize64(const float* x, __m512 inv_scale, __m512i zero_point,
                                              uint8_t* out) {
  const __m512 lo = _mm512_set1_ps(-256.f), hi = _mm512_set1_ps(512.f);
  __m512i q[4];
  for (int i = 0; i < 4; ++i) {
    const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * i), inv_scale);
    q[i] = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, lo), hi)), zero_point);
  }
  const __m512i bytes = _mm512_packus_epi16(_mm512_packus_epi32(q[0], q[1]), _mm512_packus_epi32(q[2], q[3]));
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  _mm512_storeu_si512(out, _mm512_permutexvar_epi32(order, bytes));
}

FASTONNX_AVX512 static inline __mmask16 tail_mask(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
}

// Quantizes rows of X to uint8, bit-identical to LinearKernel::quantize_rows (linear.cc): a row
// holding a NaN or an infinity gets scale NaN, zero point 0 and zero bytes, so its output row is
// NaN (0 once requantized). The check rides on the passes that read X anyway.
FASTONNX_AVX512 static inline void quantize_rows(const float* x, int64_t rows, int64_t k,
                                                 bool per_tensor, float x_scale, uint8_t x_zp,
                                                 float* row_scale, int32_t* row_zp, uint8_t* out) {
  constexpr int kNonFinite = 0x99;  // vfpclassps: QNaN, SNaN, +inf, -inf
  const int64_t full = k / 16 * 16;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    uint8_t* qr = out + r * k;
    auto non_finite_row = [&] {
      row_scale[r] = __builtin_nanf("");
      row_zp[r] = 0;
      std::memset(qr, 0, size_t(k));
    };
    __mmask16 bad = 0;
    if (per_tensor) {
      row_scale[r] = x_scale;
      row_zp[r] = x_zp;
    } else {
      __m512 lo0 = _mm512_setzero_ps(), hi0 = lo0, lo1 = lo0, hi1 = lo0;
      int64_t i = 0;
      for (; i + 32 <= full; i += 32) {  // two independent chains
        const __m512 v0 = _mm512_loadu_ps(xr + i), v1 = _mm512_loadu_ps(xr + i + 16);
        bad |= _mm512_fpclass_ps_mask(v0, kNonFinite) | _mm512_fpclass_ps_mask(v1, kNonFinite);
        lo0 = _mm512_min_ps(lo0, v0);
        hi0 = _mm512_max_ps(hi0, v0);
        lo1 = _mm512_min_ps(lo1, v1);
        hi1 = _mm512_max_ps(hi1, v1);
      }
      for (; i < k; i += 16) {
        const __m512 v = _mm512_maskz_loadu_ps(tail_mask(k - i), xr + i);
        bad |= _mm512_fpclass_ps_mask(v, kNonFinite);
        lo0 = _mm512_min_ps(lo0, v);
        hi0 = _mm512_max_ps(hi0, v);
      }
      if (bad) {
        non_finite_row();
        continue;
      }
      scalar::quant_params_from_range(_mm512_reduce_min_ps(_mm512_min_ps(lo0, lo1)),
                                      _mm512_reduce_max_ps(_mm512_max_ps(hi0, hi1)),
                                      &row_scale[r], &row_zp[r]);
    }
    const __m512 inv_scale = _mm512_set1_ps(1.f / row_scale[r]);
    const __m512 zp = _mm512_set1_ps(static_cast<float>(row_zp[r]));
    int64_t i = 0;
    if (!per_tensor) {  // per-tensor rows check each vector for NaN and infinities below
      const __m512i zp_int = _mm512_set1_epi32(row_zp[r]);
      for (; i + 64 <= full; i += 64) quantize64(xr + i, inv_scale, zp_int, qr + i);
    }
    for (; i < full; i += 16) {
      const __m512 v = _mm512_loadu_ps(xr + i);
      if (per_tensor) bad |= _mm512_fpclass_ps_mask(v, kNonFinite);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(qr + i),
                       _mm512_cvtepi32_epi8(quantize_ps(v, inv_scale, zp)));
    }
    if (full < k) {
      const __mmask16 m = tail_mask(k - full);
      const __m512 v = _mm512_maskz_loadu_ps(m, xr + full);
      if (per_tensor) bad |= _mm512_fpclass_ps_mask(v, kNonFinite);
      _mm_mask_storeu_epi8(qr + full, m, _mm512_cvtepi32_epi8(quantize_ps(v, inv_scale, zp)));
    }
    if (bad) non_finite_row();
  }
}

// The epilogue of one 16-channel block, specialized at compile time on which terms are present
// (bias, GELU, residual, float or uint8 output): the row loop then has no branches, and every
// pointer and per-channel term is a local, not reloaded through `args` after each store.
template <bool kBias, bool kGelu, bool kResidual, bool kFloatOut>
struct EpilogueBlock {
  const int32_t* row_zp;
  const float* row_scale;
  const float* residual;
  float* y;
  uint8_t* yq;
  int64_t n, n0;
  __mmask16 m;
  __m512i wsum;
  __m512 wscale, bias, inv_y_scale, y_zp;

  FASTONNX_AVX512 EpilogueBlock(const LinearKernel::Epilogue& e, int64_t first_channel,
                                int64_t count) {
    const LinearArgs& args = *e.args;
    row_zp = e.row_zp;
    row_scale = e.row_scale;
    residual = args.residual;
    y = args.y;
    yq = args.yq;
    n = e.n;
    n0 = first_channel;
    m = tail_mask(count);
    wsum = _mm512_maskz_loadu_epi32(m, e.wsum + n0);
    wscale = _mm512_maskz_loadu_ps(m, e.wscale + n0);
    bias = kBias ? _mm512_maskz_loadu_ps(m, args.bias + n0) : _mm512_setzero_ps();
    inv_y_scale = _mm512_set1_ps(1.f / args.y_scale);
    y_zp = _mm512_set1_ps(static_cast<float>(args.y_zero_point));
  }

  // Output row `row` from its 16 accumulators.
  FASTONNX_AVX512 inline void row(int64_t r, __m512i a) const {
    const __m512i d = _mm512_sub_epi32(a, _mm512_mullo_epi32(_mm512_set1_epi32(row_zp[r]), wsum));
    __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(_mm512_set1_ps(row_scale[r]), wscale));
    if constexpr (kBias) v = _mm512_add_ps(v, bias);
    if constexpr (kGelu) v = gelu_ps(v);
    const int64_t off = r * n + n0;
    if constexpr (kResidual) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(m, residual + off));
    if constexpr (kFloatOut) {
      _mm512_mask_storeu_ps(y + off, m, v);
    } else {
      _mm_mask_storeu_epi8(yq + off, m, _mm512_cvtepi32_epi8(quantize_ps(v, inv_y_scale, y_zp)));
    }
  }
};

// Lane r of dst[c] = src[r * src_stride + c] for a 16x16 block of int32.
FASTONNX_AVX512 static inline void transpose16x16(const int32_t* src, int64_t src_stride,
                                                  __m512i dst[16]) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(src + i * src_stride);
  for (int i = 0; i < 8; ++i) {  // 32-bit interleave of row pairs
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // 64-bit interleave: r[4i+j] lane L = column 4L+j of rows 4i..
    r[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {  // 4x4 transpose of 128-bit lanes across row groups
    const __m512i x0 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x44);
    const __m512i x1 = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xEE);
    const __m512i x2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x44);
    const __m512i x3 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xEE);
    dst[0 + j] = _mm512_shuffle_i32x4(x0, x2, 0x88);
    dst[4 + j] = _mm512_shuffle_i32x4(x0, x2, 0xDD);
    dst[8 + j] = _mm512_shuffle_i32x4(x1, x3, 0x88);
    dst[12 + j] = _mm512_shuffle_i32x4(x1, x3, 0xDD);
  }
}

// dst[c * dst_stride + r] = src[r * src_stride + c].
FASTONNX_AVX512 static inline void transpose16x16(const int32_t* src, int64_t src_stride,
                                                  int32_t* dst, int64_t dst_stride = 16) {
  __m512i t[16];
  transpose16x16(src, src_stride, t);
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(dst + i * dst_stride, t[i]);
}

namespace detail {
// acc[r * acc_stride + c] (row-major) or, kTransposed, acc[c * acc_stride + r] (a channel-major
// 16x16 tile, transposed here in registers).
template <bool kTransposed, bool kBias, bool kGelu, bool kResidual, bool kFloatOut>
FASTONNX_AVX512 static void epilogue_block(const LinearKernel::Epilogue& e, int64_t row0,
                                           int64_t rows, int64_t n0, int64_t count,
                                           const int32_t* acc, int64_t acc_stride) {
  const EpilogueBlock<kBias, kGelu, kResidual, kFloatOut> block(e, n0, count);
  if constexpr (kTransposed) {
    __m512i t[16];
    transpose16x16(acc, acc_stride, t);
#pragma GCC unroll 16
    for (int r = 0; r < 16; ++r) {
      if (r < rows) block.row(row0 + r, t[r]);
    }
  } else {
    for (int64_t r = 0; r < rows; ++r) {
      block.row(row0 + r, _mm512_maskz_loadu_epi32(block.m, acc + r * acc_stride));
    }
  }
}

using EpilogueFn = void (*)(const LinearKernel::Epilogue&, int64_t, int64_t, int64_t, int64_t,
                            const int32_t*, int64_t);

template <bool kTransposed, int kFlags>
constexpr EpilogueFn epilogue_entry() {
  return &epilogue_block<kTransposed, (kFlags & 1) != 0, (kFlags & 2) != 0, (kFlags & 4) != 0,
                         (kFlags & 8) != 0>;
}

template <bool kTransposed>
static inline EpilogueFn epilogue_fn(const LinearArgs& a) {
  static constexpr EpilogueFn kTable[16] = {
      epilogue_entry<kTransposed, 0>(),  epilogue_entry<kTransposed, 1>(),
      epilogue_entry<kTransposed, 2>(),  epilogue_entry<kTransposed, 3>(),
      epilogue_entry<kTransposed, 4>(),  epilogue_entry<kTransposed, 5>(),
      epilogue_entry<kTransposed, 6>(),  epilogue_entry<kTransposed, 7>(),
      epilogue_entry<kTransposed, 8>(),  epilogue_entry<kTransposed, 9>(),
      epilogue_entry<kTransposed, 10>(), epilogue_entry<kTransposed, 11>(),
      epilogue_entry<kTransposed, 12>(), epilogue_entry<kTransposed, 13>(),
      epilogue_entry<kTransposed, 14>(), epilogue_entry<kTransposed, 15>()};
  const int flags = (a.bias ? 1 : 0) | (a.activation == Activation::kGelu ? 2 : 0) |
                    (a.residual ? 4 : 0) | (a.y ? 8 : 0);
  return kTable[flags];
}
}  // namespace detail

// Epilogue of `rows` output rows starting at `row0`, channels n0..n0+count (count <= 16), from
// accumulators acc[r * acc_stride + c].
FASTONNX_AVX512 static inline void epilogue_tile(const LinearKernel::Epilogue& e, int64_t row0,
                                                 int64_t rows, int64_t n0, int64_t count,
                                                 const int32_t* acc, int64_t acc_stride) {
  if (e.args == nullptr) {
    const __mmask16 m = tail_mask(count);
    for (int64_t r = 0; r < rows; ++r) {
      _mm512_mask_storeu_epi32(e.raw + (row0 + r) * e.n + n0, m,
                               _mm512_maskz_loadu_epi32(m, acc + r * acc_stride));
    }
    return;
  }
  detail::epilogue_fn<false>(*e.args)(e, row0, rows, n0, count, acc, acc_stride);
}

// The same from a channel-major tile acc[c * acc_stride + r], r < 16 (what the AMX and VNNI
// sparse kernels accumulate), transposed in registers on the way.
FASTONNX_AVX512 static inline void epilogue_tile_transposed(const LinearKernel::Epilogue& e,
                                                            int64_t row0, int64_t rows, int64_t n0,
                                                            int64_t count, const int32_t* acc,
                                                            int64_t acc_stride) {
  if (e.args == nullptr) {
    alignas(64) int32_t t[16 * 16];
    transpose16x16(acc, acc_stride, t);
    epilogue_tile(e, row0, rows, n0, count, t, 16);
    return;
  }
  detail::epilogue_fn<true>(*e.args)(e, row0, rows, n0, count, acc, acc_stride);
}

// Base of the AVX-512 paths (VNNI sparse, VNNI dense, AMX): they share the vector quantizer.
class Kernel : public LinearKernel {
 protected:
  using LinearKernel::LinearKernel;
  void quantize_rows(const float* x, int64_t rows, bool per_tensor, float x_scale, uint8_t x_zp,
                     float* row_scale, int32_t* row_zp, uint8_t* out) const override {
    avx512::quantize_rows(x, rows, k(), per_tensor, x_scale, x_zp, row_scale, row_zp, out);
  }
};

}  // namespace avx512
}  // namespace fastonnx
