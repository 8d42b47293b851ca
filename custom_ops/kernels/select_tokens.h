// Token dropping for length-adaptive inference on packed tokens.
//
// Dimensions: B sequences, T packed tokens (sequence b is rows [offsets[b], offsets[b+1])), T'
// tokens kept. Each sequence of n tokens keeps k = ceil(keep_ratio * n) of them (at least 1
// when n > 0): its first token (the classification token) always, then the other tokens with
// the highest scores (ties: the earlier position first; NaN scores rank last). The kept rows
// are listed in their original order, so the output is packed tokens again.
#pragma once

#include <cstdint>
#include <vector>

namespace fastonnx {

// Throws std::invalid_argument unless 0 < keep_ratio <= 1 (finite).
void check_keep_ratio(float keep_ratio);

// Tokens a sequence of n keeps: 0 for n = 0, else ceil(keep_ratio * n) within [1, n].
int64_t tokens_kept(int64_t n, float keep_ratio);

// Tokens kept per sequence for `offsets` (B + 1 values, untrusted: check_token_offsets'
// rules, else std::invalid_argument naming the entry), cumulative: new_offsets[B + 1].
std::vector<int64_t> kept_offsets(const int64_t* offsets, int64_t batch, int64_t tokens,
                                  float keep_ratio);

// kept[new_offsets[B]]: the packed rows kept, per sequence in position order.
// `new_offsets` must come from kept_offsets for the same offsets and ratio.
void select_tokens(const float* scores, const int64_t* offsets, int64_t batch,
                   const int64_t* new_offsets, int64_t* kept);

}  // namespace fastonnx
