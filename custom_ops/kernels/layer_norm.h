// LayerNorm over the last axis that also quantizes its output for the next linear layer:
//
//   y[r, :]  = (x[r, :] - mean) / sqrt(var + epsilon) * gamma + beta
//   yq[r, :] = the per-row dynamic uint8 quantization of y[r, :] (the SparseLinear rule:
//              range [min(y, 0), max(y, 0)] onto [0, 255]), with its scale and zero point.
//
// In an encoder every LayerNorm but the last feeds the next block's first linear layer (the
// packed QKV projection, or the FFN's first layer): that layer then reads yq instead of
// quantizing y itself, and y stays the float residual of the block. A row holding a NaN or an
// infinity (or one that overflows) gets a NaN y row, a 0 yq row, scale NaN and zero point 0, so a
// SparseLinear reading it returns a NaN row, as it would for the float row.
#pragma once

#include <cstdint>

#include "cpu_features.h"
#include "linear.h"  // Runner

namespace fastonnx {

struct LayerNormArgs {
  int64_t rows = 0, d = 0;     // rows of X (leading dimensions flattened), features per row
  const float* x = nullptr;    // [rows, d]
  const float* gamma = nullptr;  // [d]
  const float* beta = nullptr;   // [d] or null (zero)
  float epsilon = 1e-5f;
  float* y = nullptr;            // [rows, d]
  uint8_t* yq = nullptr;         // [rows, d]
  float* row_scale = nullptr;    // [rows]
  uint8_t* row_zero_point = nullptr;  // [rows]
};

enum class LayerNormPath { kScalar, kAvx2, kAvx512 };
// The path a linear-kernel ISA level selects: AVX-512 from kAvx512Vnni up, AVX2 at kAvx2,
// else scalar.
LayerNormPath layer_norm_path(Isa isa);
const char* layer_norm_path_name(LayerNormPath path);  // "scalar", "avx2", "avx512"

// Throws std::invalid_argument naming what is wrong in the inputs (sizes, epsilon): callers
// check before allocating outputs.
void validate_layer_norm(const LayerNormArgs& args);

// Validates, then runs on the path `isa` selects (which must be available), 16 rows per task.
void run_layer_norm(const LayerNormArgs& args, Isa isa, const Runner& runner);

namespace layer_norm_detail {
// Rows [r0, r1) on each path (the vector ones in their own files).
void rows_ref(const LayerNormArgs& args, int64_t r0, int64_t r1);
void rows_avx2(const LayerNormArgs& args, int64_t r0, int64_t r1);
void rows_avx512(const LayerNormArgs& args, int64_t r0, int64_t r1);
}  // namespace layer_norm_detail

}  // namespace fastonnx
