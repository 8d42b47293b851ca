// AVX-512 path of LayerNorm + quantize: three passes over a row that stays in L1 (sum; sum of
// squared deviations; normalize and store y), then the linear kernels' vector quantizer in its
// dynamic mode (avx512_common.h), so yq, its scale and the non-finite rule are bit-identical to
// what SparseLinear computes from y on its own.
#include <algorithm>
#include <cmath>
#include <limits>

#include "avx512_common.h"
#include "layer_norm.h"

namespace fastonnx::layer_norm_detail {

FASTONNX_AVX512 void rows_avx512(const LayerNormArgs& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d, full = d / 16 * 16;
  const __mmask16 tail = avx512::tail_mask(d - full);
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
    for (i = 0; i < d; i += 16) {
      const __mmask16 m = i < full ? __mmask16(0xffff) : tail;
      const __m512 c = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, x + i), vmean), vrstd);
      const __m512 b = a.beta ? _mm512_maskz_loadu_ps(m, a.beta + i) : _mm512_setzero_ps();
      _mm512_mask_storeu_ps(y + i, m, _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(m, a.gamma + i), b));
    }
    // A NaN or infinite y (from X, a zero variance with epsilon 0, or an overflow) makes the
    // quantizer's scale NaN; the whole y row then becomes NaN too.
    int32_t zp = 0;
    avx512::quantize_rows(y, 1, d, false, 1.f, 0, &a.row_scale[r], &zp, a.yq + r * d);
    a.row_zero_point[r] = uint8_t(zp);
    if (std::isnan(a.row_scale[r])) std::fill(y, y + d, std::numeric_limits<float>::quiet_NaN());
  }
}

}  // namespace fastonnx::layer_norm_detail
