// Padding removal for packed (padding-free) execution.
//
// Dimensions: B batch, S sequence, D features per token, T valid tokens (the mask's ones).
// The attention mask is int32 or int64 [B, S] with values 0 (padding) or 1 (a token), any
// pattern: right or left padding, holes, rows with no token at all. Packed rows are the valid
// tokens in row-major order (sequence by sequence, position by position); offsets [B + 1] are
// cumulative: sequence b is packed rows [offsets[b], offsets[b+1]).
#pragma once

#include <cstdint>

#include "linear.h"  // Runner

namespace fastonnx {

// The attention mask, untrusted: every value is checked to be 0 or 1 before it is used.
struct TokenMask {
  const int64_t* i64 = nullptr;  // exactly one of the two is set
  const int32_t* i32 = nullptr;
  int64_t batch = 0, seq = 0;
  int64_t at(int64_t i) const { return i64 ? i64[i] : int64_t(i32[i]); }
};

// Throws std::invalid_argument naming the first bad entry unless `offsets` (B + 1 values,
// untrusted) rise from 0 to `tokens`, each sequence at most `max_sequence` tokens.
void check_token_offsets(const int64_t* offsets, int64_t batch, int64_t tokens,
                         int64_t max_sequence);

// Fills offsets[0 .. B] from the mask. Throws std::invalid_argument naming the first value
// that is not 0 or 1 (and its position).
void token_offsets(const TokenMask& mask, int64_t* offsets);

// Throws std::invalid_argument unless `offsets` (B + 1 values, untrusted) are exactly the
// mask's (token_offsets) and offsets[B] == tokens.
void check_offsets_match_mask(const TokenMask& mask, const int64_t* offsets, int64_t tokens);

// packed[T, D] = the rows of x[B, S, D] where the mask is 1. `offsets` must be the mask's.
void pack_tokens(const float* x, const TokenMask& mask, int64_t d, const int64_t* offsets,
                 float* packed, const Runner& runner);

// y[B, S, D]: the packed rows back at their positions, exactly 0 where the mask is 0.
// `offsets` must be the mask's.
void unpack_tokens(const float* packed, const TokenMask& mask, int64_t d, const int64_t* offsets,
                   float* y, const Runner& runner);

}  // namespace fastonnx
