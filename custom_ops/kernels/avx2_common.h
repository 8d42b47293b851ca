// What the AVX2 code shares: the row quantizer of the linear kernels (also LayerNorm's), bit
// identical to the scalar one (linear.cc). Static functions with a target attribute, so no AVX2
// code leaks into baseline code.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "linear.h"

#define FASTONNX_AVX2 __attribute__((target("avx2,fma")))

namespace fastonnx::avx2 {

FASTONNX_AVX2 static inline __m256i first_lanes(int64_t n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const int32_t c = n < 0 ? 0 : n > 8 ? 8 : int32_t(n);
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(c), lane);
}

// All-ones lanes where v is NaN or infinite (v * 0 is NaN exactly there).
FASTONNX_AVX2 static inline __m256 non_finite(__m256 v) {
  return _mm256_cmp_ps(_mm256_mul_ps(v, _mm256_setzero_ps()), _mm256_setzero_ps(), _CMP_NEQ_UQ);
}

FASTONNX_AVX2 static inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

FASTONNX_AVX2 static inline float hmin(__m256 v) {
  __m128 x = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_min_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_min_ss(x, _mm_movehdup_ps(x)));
}

FASTONNX_AVX2 static inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

// 8 floats to 8 int32 codes, the scalar quantize's: x * inv_scale clamped to [-256, 512]
// (where every result already saturates), rounded to nearest even by the conversion (MXCSR's
// default, as nearbyint), plus the zero point; the packs saturate to [0, 255].
FASTONNX_AVX2 static inline __m256i codes(const float* x, __m256 inv_scale, __m256i zp) {
  const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x), inv_scale);
  const __m256 c = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-256.f)), _mm256_set1_ps(512.f));
  return _mm256_add_epi32(_mm256_cvtps_epi32(c), zp);
}

// 32 floats to uint8; a permute undoes the packs' per-128-bit-lane interleave.
FASTONNX_AVX2 static inline void quantize32(const float* x, __m256 inv_scale, __m256i zp,
                                            uint8_t* out) {
  const __m256i a = _mm256_packus_epi32(codes(x, inv_scale, zp), codes(x + 8, inv_scale, zp));
  const __m256i b = _mm256_packus_epi32(codes(x + 16, inv_scale, zp), codes(x + 24, inv_scale, zp));
  const __m256i bytes = _mm256_packus_epi16(a, b);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(bytes, order));
}

// Rows of X to uint8, bit-identical to LinearKernel::quantize_rows: a row holding a NaN or an
// infinity gets scale NaN, zero point 0 and zero bytes.
FASTONNX_AVX2 static inline void quantize_rows(const float* x, int64_t rows, int64_t k,
                                               bool per_tensor, float x_scale, uint8_t x_zp,
                                               float* row_scale, int32_t* row_zp, uint8_t* out) {
  const int64_t full = k / 8 * 8;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k;
    uint8_t* qr = out + r * k;
    __m256 lo = _mm256_setzero_ps(), hi = lo, bad = lo;
    for (int64_t i = 0; i < full; i += 8) {
      const __m256 v = _mm256_loadu_ps(xr + i);
      bad = _mm256_or_ps(bad, non_finite(v));
      lo = _mm256_min_ps(lo, v);
      hi = _mm256_max_ps(hi, v);
    }
    float lo_s = hmin(lo), hi_s = hmax(hi);
    bool bad_s = _mm256_movemask_ps(bad) != 0;
    for (int64_t i = full; i < k; ++i) {
      bad_s |= !std::isfinite(xr[i]);
      lo_s = std::min(lo_s, xr[i]);
      hi_s = std::max(hi_s, xr[i]);
    }
    if (bad_s) {
      row_scale[r] = __builtin_nanf("");
      row_zp[r] = 0;
      std::memset(qr, 0, size_t(k));
      continue;
    }
    if (per_tensor) {
      row_scale[r] = x_scale;
      row_zp[r] = x_zp;
    } else {
      scalar::quant_params_from_range(lo_s, hi_s, &row_scale[r], &row_zp[r]);
    }
    const float inv = 1.f / row_scale[r];
    const __m256 inv_scale = _mm256_set1_ps(inv);
    const __m256i zp = _mm256_set1_epi32(row_zp[r]);
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) quantize32(xr + i, inv_scale, zp, qr + i);
    for (; i < k; ++i) qr[i] = scalar::quantize(xr[i], inv, row_zp[r]);
  }
}

}  // namespace fastonnx::avx2
