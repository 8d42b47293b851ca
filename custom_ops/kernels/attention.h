// Encoder self-attention: Y = softmax(Q K^T * scale + mask) V, per batch entry and head.
//
// Two layouts share one code path (a task is one sequence and head, whatever the layout):
// - padded: Q, K, V and Y are [B, S, *], every sequence S tokens long;
// - packed: they are [T, *], the valid tokens of B sequences back to back, sequence b being
//   tokens [offsets[b], offsets[b+1]) (int64 [B + 1], cumulative). Attention runs over each
//   sequence's own tokens only, so there is no mask (and none is accepted).
//
// Dimensions: B batch, S sequence (queries and keys: self-attention), N heads, H head size,
// D = N * H hidden size. Q, K and V are float [B, S, D] views with a common token stride (D for
// three separate tensors, 3D for one packed [B, S, 3D] projection laid out [Q | K | V]); head n
// occupies features [n*H, (n+1)*H) of each. The optional additive mask is float
// [Mb, Mn, Ms, S] with Mb in {1, B}, Mn in {1, N}, Ms in {1, S} (broadcast axes have stride 0).
//
// Keys whose mask value is <= kSkipThreshold (the exporters' -inf / lowest-float fill) are
// skipped: they get probability exactly 0 and cost no work. A query row whose keys are all
// skipped returns the mean of V over all S keys: what the exporters' lowest-float masks give in
// fp32 (every score becomes the same lowest value, so softmax is uniform) and what the fused
// MultiHeadAttention model gives; never NaN.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "linear.h"  // Runner

namespace fastonnx {

// Mask values at or below this skip the key (see above).
constexpr float kSkipThreshold = -1e30f;
// Bounds checked before any allocation (scratch grows linearly with S, never S x S).
constexpr int64_t kMaxAttentionSequence = 16384;
constexpr int64_t kMaxAttentionHeads = 1024;
constexpr int64_t kMaxAttentionHeadSize = 512;

// Attention kernel paths, portable first.
enum class AttentionPath { kRef = 0, kAvx512Bf16 = 1, kAmxBf16 = 2, kAvx512F32 = 3, kAvx2F32 = 4 };

const char* attention_path_name(AttentionPath path);
// The kernel's full name, e.g. "bf16_attention_8x32__avx512_bf16".
const char* attention_kernel_name(AttentionPath path);
std::optional<AttentionPath> parse_attention_path(const std::string& name);
std::string attention_path_unavailable_reason(AttentionPath path);
std::vector<AttentionPath> all_attention_paths();
std::vector<AttentionPath> available_attention_paths();
// The attention path of a linear-kernel ISA level, which FASTONNX_ISA names: ref -> ref, avx2 ->
// avx2_f32, avx512_vnni -> avx512_attention_path(), amx -> amx_bf16.
AttentionPath attention_path_for_isa(Isa isa);
// The faster AVX-512 path on this CPU: avx512_f32 on Intel (bf16 dot products at half the
// fp32 rate), avx512_bf16 elsewhere.
AttentionPath avx512_attention_path();
// FASTONNX_ISA's attention path if set, else the best available. Throws std::invalid_argument
// when the forced path cannot run here.
AttentionPath choose_attention_path();

struct AttentionArgs {
  int64_t batch = 0, seq = 0, heads = 0, head_size = 0;  // seq: S (padded layout only)
  // Packed layout when set: B + 1 cumulative token offsets (untrusted: validated) into the
  // `tokens` (T) rows of q, k, v and y.
  const int64_t* offsets = nullptr;
  int64_t tokens = 0;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  int64_t token_stride = 0;  // floats between consecutive tokens of q, k and v
  // Additive mask (null: none) with its dims; the last axis (keys) is contiguous.
  const float* mask = nullptr;
  int64_t mask_dims[4] = {0, 0, 0, 0};
  float scale = 1.f;
  float* y = nullptr;  // [B, S, D] or [T, D], contiguous
  // Optional output [B, S] or [T]: for each key token, the attention it receives, summed over
  // heads and over the queries of its sequence (each query's probabilities sum to 1). Skipped
  // keys receive 0, and a query whose keys are all skipped gives none. Token dropping reads it.
  float* key_scores = nullptr;
};

// Throws std::invalid_argument naming what is wrong (sizes beyond the limits, bad mask dims,
// offsets that do not rise from 0 to T or a sequence longer than the limit).
void validate_attention(const AttentionArgs& args);

// Validates, then runs on `path` (which must be available) over B x N tasks.
void run_attention(const AttentionArgs& args, AttentionPath path, const Runner& runner);

// One sequence and head, for each path (one file each). `task` = b * N + n.
namespace attention_detail {
struct Task {
  int64_t seq;  // this sequence's tokens (queries and keys)
  const float* q;  // first token of this head's Q (stride token_stride)
  const float* k;
  const float* v;
  const float* mask;  // this (b, n)'s mask plane or null
  int64_t mask_row_stride;  // 0 when the mask is broadcast over queries
  float* y;  // first token of this head's output (stride D)
  float* key_scores;  // null, or this head's [seq] received attention, accumulated (+=)
};
Task task_of(const AttentionArgs& args, int64_t task);
void head_ref(const AttentionArgs& args, const Task& t);
void head_avx2_f32(const AttentionArgs& args, const Task& t);
void head_avx512_f32(const AttentionArgs& args, const Task& t);
void head_avx512_bf16(const AttentionArgs& args, const Task& t);
void head_amx_bf16(const AttentionArgs& args, const Task& t);
}  // namespace attention_detail

}  // namespace fastonnx
