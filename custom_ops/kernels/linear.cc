#include "linear.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "aligned_buffer.h"

namespace fastonnx {
namespace {

constexpr int64_t kQuantRowsPerTask = 8;
// On the AVX-512 VNNI path, weights with at least this fraction of non-zero 1x4 groups run
// faster through the register-blocked dense kernel (measured crossover: about 50% sparsity for
// the MiniLM/DistilBERT layer shapes at M=128).
constexpr double kDenseMinGroupDensity = 0.5;

void check_args(const LinearArgs& a) {
  if (a.m < 0) throw std::invalid_argument("negative row count");
  if ((a.x == nullptr) == (a.xq == nullptr)) {
    throw std::invalid_argument("exactly one of a float or a uint8 input is required");
  }
  if (a.xq && !a.per_tensor) {
    throw std::invalid_argument("a uint8 input needs its x_scale (static quantization)");
  }
  if (a.per_tensor && !(std::isfinite(a.x_scale) && a.x_scale > 0.f)) {
    throw std::invalid_argument("x_scale must be finite and > 0, got " +
                                std::to_string(a.x_scale));
  }
  if ((a.y == nullptr) == (a.yq == nullptr)) {
    throw std::invalid_argument("exactly one of a float or a uint8 output is required");
  }
  if (a.yq && !(std::isfinite(a.y_scale) && a.y_scale > 0.f)) {
    throw std::invalid_argument("y_scale must be finite and > 0, got " +
                                std::to_string(a.y_scale));
  }
}

// Cost model for choosing between AMX and AVX-512 VNNI per weight on AMX machines: cycles per
// 16 rows. One tdpbusd (a 16x64 weight tile) takes about 16 cycles; one vpdpbusd (a 1x4 group
// against 16 rows) about 0.5-1 cycle, plus the gather of its activations.
constexpr double kAmxCyclesPerTile = 16.0;
constexpr double kVnniCyclesPerGroup = 0.75;

// Fraction of 1x4 weight groups holding a non-zero.
double group_density(const PackedWeightView& view) {
  const std::vector<int8_t> w = unpack_weight(view);
  const uint32_t groups = (view.k + 3) / 4;
  size_t nonzero = 0;
  for (uint32_t n = 0; n < view.n; ++n) {
    for (uint32_t g = 0; g < groups; ++g) {
      bool any = false;
      for (uint32_t k = 4 * g; k < std::min(4 * g + 4, view.k); ++k) any |= w[size_t{n} * view.k + k] != 0;
      nonzero += any;
    }
  }
  return double(nonzero) / (double(view.n) * groups);
}

Isa auto_isa(const PackedWeightView& view) {
  const Isa best = best_isa();
  if (best != Isa::kAmx) return best;
  const std::vector<int8_t> w = unpack_weight(view);
  size_t groups = 0, tiles = 0;
  for (uint32_t n0 = 0; n0 < view.n; n0 += 16) {
    for (uint32_t k0 = 0; k0 < view.k; k0 += 64) {
      bool tile = false;
      for (uint32_t n = n0; n < std::min(n0 + 16, view.n); ++n) {
        for (uint32_t k = k0; k < std::min(k0 + 64, view.k); k += 4) {
          bool group = false;
          for (uint32_t j = k; j < std::min(k + 4, view.k); ++j) group |= w[size_t{n} * view.k + j] != 0;
          groups += group;
          tile |= group;
        }
      }
      tiles += tile;
    }
  }
  return tiles * kAmxCyclesPerTile <= groups * kVnniCyclesPerGroup ? Isa::kAmx : Isa::kAvx512Vnni;
}

}  // namespace

namespace scalar {

void row_quant_params(const float* x, int64_t k, float* scale, int32_t* zero_point) {
  float lo = 0.f, hi = 0.f;
  for (int64_t i = 0; i < k; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  quant_params_from_range(lo, hi, scale, zero_point);
}

void quant_params_from_range(float lo, float hi, float* scale, int32_t* zero_point) {
  const float s = (hi - lo) / 255.f;
  *scale = s > 0.f ? s : 1.f;
  *zero_point = static_cast<int32_t>(std::fmin(std::fmax(std::nearbyint(-lo / *scale), 0.f), 255.f));
}

uint8_t quantize(float x, float inv_scale, int32_t zero_point) {
  // fmax/fmin (not clamp) so NaN maps to 0 exactly as the vector paths do.
  const float q = std::nearbyint(x * inv_scale) + static_cast<float>(zero_point);
  return static_cast<uint8_t>(std::fmin(std::fmax(q, 0.f), 255.f));
}

float gelu(float x) { return 0.5f * x * (1.f + std::erf(x * 0.70710678118654752f)); }

void epilogue(const LinearKernel::Epilogue& e, int64_t row, int64_t n0, int64_t count,
              const int32_t* acc) {
  if (e.args == nullptr) {
    std::memcpy(e.raw + row * e.n + n0, acc, size_t(count) * sizeof(int32_t));
    return;
  }
  const LinearArgs& a = *e.args;
  const float sx = e.row_scale[row];
  const int32_t zp = e.row_zp[row];
  for (int64_t j = 0; j < count; ++j) {
    const int64_t n = n0 + j;
    float y = static_cast<float>(acc[j] - zp * e.wsum[n]) * (sx * e.wscale[n]);
    if (a.bias) y += a.bias[n];
    if (a.activation == Activation::kGelu) y = gelu(y);
    if (a.residual) y += a.residual[row * e.n + n];
    if (a.y) {
      a.y[row * e.n + n] = y;
    } else {
      a.yq[row * e.n + n] = quantize(y, 1.f / a.y_scale, a.y_zero_point);
    }
  }
}

}  // namespace scalar

void LinearKernel::set_channel_data(const PackedWeightView& view) {
  const std::vector<int8_t> w = unpack_weight(view);
  wsum_.reset(new int32_t[view.n]);
  wscale_.reset(new float[view.n]);
  for (uint32_t n = 0; n < view.n; ++n) {
    int32_t s = 0;
    for (uint32_t k = 0; k < view.k; ++k) s += w[size_t{n} * view.k + k];
    wsum_[n] = s;
    wscale_[n] = view.scale[n];
  }
}

void LinearKernel::run(const LinearArgs& args, const Runner& runner) const {
  check_args(args);
  const int64_t m = args.m;
  if (m == 0) return;
  AlignedBuffer<float> row_scale(static_cast<size_t>(m));
  AlignedBuffer<int32_t> row_zp(static_cast<size_t>(m));
  AlignedBuffer<uint8_t> quantized;
  const uint8_t* xq = args.xq;
  if (args.x) {
    quantized = AlignedBuffer<uint8_t>(size_t(m * k_));
    const int64_t tasks = (m + kQuantRowsPerTask - 1) / kQuantRowsPerTask;
    auto quantize_task = [&](size_t t) {
      const int64_t r0 = int64_t(t) * kQuantRowsPerTask;
      const int64_t r1 = std::min(m, r0 + kQuantRowsPerTask);
      quantize_rows(args.x + r0 * k_, r1 - r0, args.per_tensor, args.x_scale,
                    args.x_zero_point, row_scale.data() + r0, row_zp.data() + r0,
                    quantized.data() + r0 * k_);
    };
    run_tasks(runner, size_t(tasks), quantize_task);
    xq = quantized.data();
  } else {
    std::fill(row_scale.data(), row_scale.data() + m, args.x_scale);
    std::fill(row_zp.data(), row_zp.data() + m, int32_t{args.x_zero_point});
  }
  Epilogue epi;
  epi.n = n_;
  epi.wsum = wsum_.get();
  epi.wscale = wscale_.get();
  epi.row_scale = row_scale.data();
  epi.row_zp = row_zp.data();
  epi.args = &args;
  compute(xq, m, epi, runner);
}

void LinearKernel::accumulate(const uint8_t* xq, int64_t m, int32_t* acc,
                              const Runner& runner) const {
  if (m <= 0) return;
  Epilogue epi;
  epi.n = n_;
  epi.raw = acc;
  compute(xq, m, epi, runner);
}

void LinearKernel::quantize_rows(const float* x, int64_t rows, bool per_tensor, float x_scale,
                                 uint8_t x_zp, float* row_scale, int32_t* row_zp,
                                 uint8_t* out) const {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * k_;
    if (per_tensor) {
      row_scale[r] = x_scale;
      row_zp[r] = x_zp;
    } else {
      scalar::row_quant_params(xr, k_, &row_scale[r], &row_zp[r]);
    }
    const float inv_scale = 1.f / row_scale[r];
    for (int64_t i = 0; i < k_; ++i) out[r * k_ + i] = scalar::quantize(xr[i], inv_scale, row_zp[r]);
  }
}

std::unique_ptr<LinearKernel> make_linear_kernel(const PackedWeightView& view,
                                                 std::optional<Isa> isa) {
  if (!isa) isa = forced_isa_from_env();
  const Isa chosen = isa ? *isa : auto_isa(view);
  const std::string why = isa_unavailable_reason(chosen);
  if (!why.empty()) {
    throw std::invalid_argument(std::string("kernel path '") + isa_name(chosen) +
                                "' cannot run here: " + why);
  }
  switch (chosen) {
    case Isa::kRef: return make_linear_ref(view);
    case Isa::kAvx2: return make_linear_avx2(view);
    case Isa::kAvx512Vnni:
      if (group_density(view) >= kDenseMinGroupDensity) return make_linear_avx512_dense(view);
      return make_linear_avx512_vnni(view);
    case Isa::kAmx: return make_linear_amx(view);
  }
  throw std::invalid_argument("unknown kernel path");
}

BlockShape preferred_block_shape(Isa isa) {
  return isa == Isa::kAmx ? BlockShape{16, 64} : BlockShape{1, 4};
}

}  // namespace fastonnx
