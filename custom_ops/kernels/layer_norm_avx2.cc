// AVX2 path of LayerNorm + quantize: the AVX-512 path's three passes over a row in L1 (sum; sum
// of squared deviations; normalize and store y) with 8-float vectors, then the AVX2 linear
// kernel's quantizer (avx2_common.h), so yq and its scale are what SparseLinear computes from y.
#include <algorithm>
#include <cmath>
#include <limits>

#include "avx2_common.h"
#include "layer_norm.h"

namespace fastonnx::layer_norm_detail {

FASTONNX_AVX2 void rows_avx2(const LayerNormArgs& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d, full = d / 8 * 8;
  const __m256i tail = avx2::first_lanes(d - full);
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = a.x + r * d;
    float* y = a.y + r * d;
    __m256 s0 = _mm256_setzero_ps(), s1 = s0;
    int64_t i = 0;
    for (; i + 16 <= full; i += 16) {
      s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
      s1 = _mm256_add_ps(s1, _mm256_loadu_ps(x + i + 8));
    }
    for (; i < full; i += 8) s0 = _mm256_add_ps(s0, _mm256_loadu_ps(x + i));
    if (full < d) s1 = _mm256_add_ps(s1, _mm256_maskload_ps(x + full, tail));
    const float mean = avx2::hsum(_mm256_add_ps(s0, s1)) / float(d);
    const __m256 vmean = _mm256_set1_ps(mean);
    s0 = _mm256_setzero_ps();
    for (i = 0; i < full; i += 8) {
      const __m256 c = _mm256_sub_ps(_mm256_loadu_ps(x + i), vmean);
      s0 = _mm256_fmadd_ps(c, c, s0);
    }
    if (full < d) {
      const __m256 c = _mm256_and_ps(_mm256_castsi256_ps(tail),
                                     _mm256_sub_ps(_mm256_maskload_ps(x + full, tail), vmean));
      s0 = _mm256_fmadd_ps(c, c, s0);
    }
    const float var = avx2::hsum(s0) / float(d);
    const __m256 vrstd = _mm256_set1_ps(1.f / std::sqrt(var + a.epsilon));
    // Plain loads and stores where the vector is full: on AMD Zen a masked store costs about
    // ten times a plain one (110 vs 30 us for 128 x 384 on a Zen 3).
    for (i = 0; i < full; i += 8) {
      const __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), vmean), vrstd);
      const __m256 b = a.beta ? _mm256_loadu_ps(a.beta + i) : _mm256_setzero_ps();
      _mm256_storeu_ps(y + i, _mm256_fmadd_ps(c, _mm256_loadu_ps(a.gamma + i), b));
    }
    if (full < d) {
      const __m256 c = _mm256_mul_ps(_mm256_sub_ps(_mm256_maskload_ps(x + full, tail), vmean), vrstd);
      const __m256 b = a.beta ? _mm256_maskload_ps(a.beta + full, tail) : _mm256_setzero_ps();
      _mm256_maskstore_ps(y + full, tail, _mm256_fmadd_ps(c, _mm256_maskload_ps(a.gamma + full, tail), b));
    }
    // A NaN or infinite y makes the quantizer's scale NaN; the whole y row then becomes NaN.
    int32_t zp = 0;
    avx2::quantize_rows(y, 1, d, false, 1.f, 0, &a.row_scale[r], &zp, a.yq + r * d);
    a.row_zero_point[r] = uint8_t(zp);
    if (std::isnan(a.row_scale[r])) std::fill(y, y + d, std::numeric_limits<float>::quiet_NaN());
  }
}

}  // namespace fastonnx::layer_norm_detail
