#include "layer_norm.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace fastonnx {
namespace {
constexpr int64_t kRowsPerTask = 16;
}

LayerNormPath layer_norm_path(Isa isa) {
  if (isa >= Isa::kAvx512Vnni) return LayerNormPath::kAvx512;
  return isa == Isa::kAvx2 ? LayerNormPath::kAvx2 : LayerNormPath::kScalar;
}

const char* layer_norm_path_name(LayerNormPath path) {
  switch (path) {
    case LayerNormPath::kScalar: return "scalar";
    case LayerNormPath::kAvx2: return "avx2";
    case LayerNormPath::kAvx512: return "avx512";
  }
  return "?";
}

void validate_layer_norm(const LayerNormArgs& a) {
  auto bad = [](const std::string& what) { throw std::invalid_argument("LayerNorm: " + what); };
  if (a.rows < 0) bad("negative row count");
  if (a.d < 1) bad("the normalized axis must have at least one element, got " + std::to_string(a.d));
  if (!(std::isfinite(a.epsilon) && a.epsilon >= 0.f)) {
    bad("epsilon must be finite and >= 0, got " + std::to_string(a.epsilon));
  }
  if (!a.gamma) bad("missing gamma");
  if (a.rows > 0 && !a.x) bad("missing input");
}

void run_layer_norm(const LayerNormArgs& args, Isa isa, const Runner& runner) {
  validate_layer_norm(args);
  const std::string why = isa_unavailable_reason(isa);
  if (!why.empty()) throw std::invalid_argument("LayerNorm: " + std::string(isa_name(isa)) + ": " + why);
  if (args.rows == 0) return;
  if (!args.y || !args.yq || !args.row_scale || !args.row_zero_point) {
    throw std::invalid_argument("LayerNorm: missing output buffer");
  }
  using RowsFn = void (*)(const LayerNormArgs&, int64_t, int64_t);
  const LayerNormPath path = layer_norm_path(isa);
  const RowsFn rows = path == LayerNormPath::kAvx512 ? layer_norm_detail::rows_avx512
                      : path == LayerNormPath::kAvx2 ? layer_norm_detail::rows_avx2
                                                     : layer_norm_detail::rows_ref;
  const int64_t tasks = (args.rows + kRowsPerTask - 1) / kRowsPerTask;
  auto task = [&](size_t t) {
    const int64_t r0 = int64_t(t) * kRowsPerTask, r1 = std::min(args.rows, r0 + kRowsPerTask);
    rows(args, r0, r1);
  };
  run_tasks(runner, size_t(tasks), task);
}

namespace layer_norm_detail {

void rows_ref(const LayerNormArgs& a, int64_t r0, int64_t r1) {
  const int64_t d = a.d;
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = a.x + r * d;
    float* y = a.y + r * d;
    float sum = 0.f;
    for (int64_t i = 0; i < d; ++i) sum += x[i];
    const float mean = sum / float(d);
    float sq = 0.f;
    for (int64_t i = 0; i < d; ++i) sq += (x[i] - mean) * (x[i] - mean);
    const float rstd = 1.f / std::sqrt(sq / float(d) + a.epsilon);
    for (int64_t i = 0; i < d; ++i) {
      y[i] = (x[i] - mean) * rstd * a.gamma[i] + (a.beta ? a.beta[i] : 0.f);
    }
    // A NaN or infinite y (from X, or a zero variance with epsilon 0, or an overflow) makes the
    // quantizer's scale NaN; the whole y row then becomes NaN too.
    int32_t zp = 0;
    scalar::quantize_row(y, d, false, 1.f, 0, &a.row_scale[r], &zp, a.yq + r * d);
    a.row_zero_point[r] = uint8_t(zp);
    if (std::isnan(a.row_scale[r])) std::fill(y, y + d, std::numeric_limits<float>::quiet_NaN());
  }
}

}  // namespace layer_norm_detail
}  // namespace fastonnx
