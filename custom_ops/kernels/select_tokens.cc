#include "select_tokens.h"

#include "pack_tokens.h"  // check_token_offsets

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <stdexcept>
#include <string>

namespace fastonnx {

void check_keep_ratio(float keep_ratio) {
  if (!(keep_ratio > 0.f && keep_ratio <= 1.f)) {
    throw std::invalid_argument("keep_ratio must be in (0, 1], got " + std::to_string(keep_ratio));
  }
}

int64_t tokens_kept(int64_t n, float keep_ratio) {
  if (n <= 0) return 0;
  // In double, with a margin under ceil, so 0.7f * 10 keeps 7, not 8.
  const double k = std::ceil(double(keep_ratio) * double(n) - 1e-9);
  return std::clamp<int64_t>(int64_t(k), 1, n);
}

std::vector<int64_t> kept_offsets(const int64_t* offsets, int64_t batch, int64_t tokens,
                                  float keep_ratio) {
  check_keep_ratio(keep_ratio);
  if (batch < 0) throw std::invalid_argument("negative batch");
  check_token_offsets(offsets, batch, tokens, std::numeric_limits<int64_t>::max());
  std::vector<int64_t> out(size_t(batch + 1), 0);
  for (int64_t b = 0; b < batch; ++b) {
    out[size_t(b + 1)] = out[size_t(b)] + tokens_kept(offsets[b + 1] - offsets[b], keep_ratio);
  }
  return out;
}

void select_tokens(const float* scores, const int64_t* offsets, int64_t batch,
                   const int64_t* new_offsets, int64_t* kept) {
  std::vector<int64_t> order;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t first = offsets[b], n = offsets[b + 1] - first;
    const int64_t k = new_offsets[b + 1] - new_offsets[b];
    int64_t* out = kept + new_offsets[b];
    if (k == 0) continue;
    if (k == n) {
      std::iota(out, out + n, first);
      continue;
    }
    // The first token, then the k - 1 best of the rest.
    order.resize(size_t(n - 1));
    std::iota(order.begin(), order.end(), first + 1);
    auto better = [&](int64_t a, int64_t c) {  // a strict weak order: NaN ranks last
      const float sa = scores[a], sc = scores[c];
      const bool na = std::isnan(sa), nc = std::isnan(sc);
      if (na != nc) return nc;
      if (!na && sa != sc) return sa > sc;
      return a < c;
    };
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), better);
    std::sort(order.begin(), order.begin() + (k - 1));
    out[0] = first;
    std::copy(order.begin(), order.begin() + (k - 1), out + 1);
  }
}

}  // namespace fastonnx
