// AVX-512 path of LayerNorm + quantize: three passes over a row that stays in L1 (sum; sum of
// squared deviations; normalize, store y and track its range), then the same vector quantizer
// as the linear kernels' (avx512_common.h), so yq is bit-identical to what SparseLinear computes
// from y on its own.
#include <cmath>
#include <cstring>
#include <limits>

#include "avx512_common.h"
#include "layer_norm.h"

namespace fastonnx::layer_norm_detail {

FASTONNX_AVX512 void rows_avx512(const LayerNormArgs& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d, full = d / 16 * 16;
  const __mmask16 tail = avx512::tail_mask(d - full);
  // QNaN, SNaN, +inf, -inf (vfpclassps categories 0x01, 0x80, 0x08, 0x10).
  constexpr int kNonFinite = 0x99;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = a.x + r * d;
    float* y = a.y + r * d;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 32 <= full; i += 32) {
      s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + i));
      s1 = _mm512_add_ps(s1, _mm512_loadu_ps(x + i + 16));
    }
    for (; i < full; i += 16) s0 = _mm512_add_ps(s0, _mm512_loadu_ps(x + i));
    if (tail) s1 = _mm512_add_ps(s1, _mm512_maskz_loadu_ps(tail, x + full));
    const float mean = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / float(d);
    const __m512 vmean = _mm512_set1_ps(mean);
    s0 = _mm512_setzero_ps();
    s1 = s0;
    for (i = 0; i < full; i += 16) {
      const __m512 c = _mm512_sub_ps(_mm512_loadu_ps(x + i), vmean);
      s0 = _mm512_fmadd_ps(c, c, s0);
    }
    if (tail) {
      const __m512 c = _mm512_maskz_sub_ps(tail, _mm512_maskz_loadu_ps(tail, x + full), vmean);
      s1 = _mm512_fmadd_ps(c, c, s1);
    }
    const float var = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / float(d);
    const float rstd = 1.f / std::sqrt(var + a.epsilon);
    const __m512 vrstd = _mm512_set1_ps(rstd);
    __m512 lo = _mm512_setzero_ps(), hi = lo;
    __mmask16 bad = std::isfinite(rstd) ? 0 : 1;
    for (i = 0; i < d; i += 16) {
      const __mmask16 m = i < full ? __mmask16(0xffff) : tail;
      const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vmean), vrstd);
      const __m512 b = a.beta ? _mm512_maskz_loadu_ps(m, a.beta + i) : _mm512_setzero_ps();
      const __m512 v = _mm512_maskz_mov_ps(m, _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, a.gamma + i), b));
      bad |= _mm512_fpclass_ps_mask(v, kNonFinite);
      lo = _mm512_min_ps(lo, v);
      hi = _mm512_max_ps(hi, v);
      _mm512_mask_storeu_ps(y + i, m, v);
    }
    uint8_t* q = a.yq + r * d;
    if (bad) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      for (i = 0; i < d; ++i) y[i] = nan;
      std::memset(q, 0, size_t(d));
      a.row_scale[r] = nan;
      a.row_zero_point[r] = 0;
      continue;
    }
    float scale = 1.f;
    int32_t zp = 0;
    scalar::quant_params_from_range(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi), &scale, &zp);
    float* row_scale = &a.row_scale[r];
    int32_t row_zp = zp;
    avx512::quantize_rows(y, 1, d, true, scale, uint8_t(zp), row_scale, &row_zp, q);
    a.row_zero_point[r] = uint8_t(zp);
  }
}

}  // namespace fastonnx::layer_norm_detail
