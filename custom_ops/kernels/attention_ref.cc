// The scalar fp32 path: the portable fallback and the yardstick of the vector paths.
#include <algorithm>
#include <cmath>
#include <vector>

#include "attention.h"

namespace fastonnx::attention_detail {

void head_ref(const AttentionArgs& a, const Task& t) {
  const int64_t s_len = t.seq, h_len = a.head_size, stride = a.token_stride;
  const int64_t d = a.heads * a.head_size;
  std::vector<float> score(static_cast<size_t>(s_len));
  std::vector<float> acc(static_cast<size_t>(h_len));
  for (int64_t s = 0; s < s_len; ++s) {
    const float* q = t.q + s * stride;
    const float* mask = t.mask ? t.mask + s * t.mask_row_stride : nullptr;
    float* y = t.y + s * d;
    float max = -INFINITY;
    bool any = false;
    for (int64_t j = 0; j < s_len; ++j) {
      if (mask && mask[j] <= kSkipThreshold) continue;
      const float* k = t.k + j * stride;
      float dot = 0.f;
      for (int64_t h = 0; h < h_len; ++h) dot += q[h] * k[h];
      score[size_t(j)] = dot * a.scale + (mask ? mask[j] : 0.f);
      max = any ? std::fmax(max, score[size_t(j)]) : score[size_t(j)];
      any = true;
    }
    std::fill(acc.begin(), acc.end(), 0.f);
    float total = 0.f;
    for (int64_t j = 0; j < s_len; ++j) {
      float p = 1.f;  // every key skipped: uniform over all keys (see attention.h)
      if (any) {
        if (mask && mask[j] <= kSkipThreshold) {
          score[size_t(j)] = 0.f;
          continue;
        }
        p = std::exp(score[size_t(j)] - max);
      }
      score[size_t(j)] = p;
      total += p;
      const float* v = t.v + j * stride;
      for (int64_t h = 0; h < h_len; ++h) acc[size_t(h)] += p * v[h];
    }
    for (int64_t h = 0; h < h_len; ++h) y[h] = acc[size_t(h)] / total;
    if (t.key_scores && any) {
      for (int64_t j = 0; j < s_len; ++j) t.key_scores[j] += score[size_t(j)] / total;
    }
  }
}

}  // namespace fastonnx::attention_detail
