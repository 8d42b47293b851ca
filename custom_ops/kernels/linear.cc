#include "linear.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "aligned_buffer.h"
#include "kernel_manifest.h"

namespace fastonnx {
namespace {

void check_args(const LinearArgs& a) {
  if (a.m < 0) throw std::invalid_argument("negative row count");
  if ((a.x == nullptr) == (a.xq == nullptr)) {
    throw std::invalid_argument("exactly one of a float or a uint8 input is required");
  }
  if ((a.x_row_scale == nullptr) != (a.x_row_zero_point == nullptr)) {
    throw std::invalid_argument("per-row input scales and zero points come together");
  }
  if (a.x_row_scale && (!a.xq || a.per_tensor)) {
    throw std::invalid_argument("per-row input quantization needs a uint8 input and no x_scale");
  }
  if (a.xq && !a.per_tensor && !a.x_row_scale) {
    throw std::invalid_argument(
        "a uint8 input needs its x_scale (static quantization) or per-row scales");
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

void quantize_row(const float* x, int64_t k, bool per_tensor, float x_scale, uint8_t x_zp,
                  float* scale, int32_t* zero_point, uint8_t* q) {
  // Quantizing would map NaN to 0 and infinities to the range's end, hiding them; the op's
  // rule is a NaN output row (0 once requantized), which a NaN scale gives.
  if (!std::all_of(x, x + k, [](float v) { return std::isfinite(v); })) {
    *scale = std::numeric_limits<float>::quiet_NaN();
    *zero_point = 0;
    std::fill(q, q + k, uint8_t{0});
    return;
  }
  if (per_tensor) {
    *scale = x_scale;
    *zero_point = x_zp;
  } else {
    row_quant_params(x, k, scale, zero_point);
  }
  const float inv_scale = 1.f / *scale;
  for (int64_t i = 0; i < k; ++i) q[i] = quantize(x[i], inv_scale, *zero_point);
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
  // Row sums from the stored blocks (cells past K or N are zero in the format).
  wsum_.reset(new int32_t[view.n]());
  wscale_.reset(new float[view.n]);
  const BlockShape b = view.block;
  for (uint32_t br = 0; br < view.block_row_count(); ++br) {
    for (uint32_t i = view.row_ptr[br]; i < view.row_ptr[br + 1]; ++i) {
      const int8_t* cells = view.values + size_t{i} * b.rows * b.cols;
      for (uint32_t r = 0; r < b.rows && br * b.rows + r < view.n; ++r) {
        int32_t s = 0;
        for (uint32_t c = 0; c < b.cols; ++c) s += cells[r * b.cols + c];
        wsum_[br * b.rows + r] += s;
      }
    }
  }
  std::copy(view.scale, view.scale + view.n, wscale_.get());
}

namespace {

// A block's rows are quantized and laid out by the first task that needs them; the others
// wait for that thread, which is running (it claimed the block in this section and does not
// block). So a call is one parallel section, not one per stage: with ORT's threads not
// spinning each section costs a worker wake-up (about 16 us measured on a 2-vCPU VM).
enum BlockState : int { kTodo = 0, kBusy = 1, kReady = 2 };

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#else
  std::this_thread::yield();
#endif
}

}  // namespace

template <class Quantize>
void LinearKernel::execute(const uint8_t* xq, int64_t m, const Epilogue& epi,
                           const Runner& runner, const Quantize& quantize) const {
  const Plan p = plan(m);
  const int64_t blocks = (m + p.block_rows - 1) / p.block_rows;
  AlignedBuffer<uint8_t> layout(p.layout_bytes);
  std::unique_ptr<std::atomic<int>[]> state(new std::atomic<int>[size_t(blocks)]);
  for (int64_t b = 0; b < blocks; ++b) state[size_t(b)].store(kTodo, std::memory_order_relaxed);
  // Block-major task order: ORT hands each thread a contiguous shard of tasks first, so the
  // threads start on different blocks.
  auto task = [&](size_t i) {
    const int64_t b = int64_t(i) / p.column_tasks, column = int64_t(i) % p.column_tasks;
    std::atomic<int>& s = state[size_t(b)];
    if (s.load(std::memory_order_acquire) != kReady) {
      int expected = kTodo;
      if (s.compare_exchange_strong(expected, kBusy, std::memory_order_acquire)) {
        const int64_t r0 = b * p.block_rows;
        quantize(r0, std::min(m, r0 + p.block_rows));
        prepare(xq, m, b, layout.data());
        s.store(kReady, std::memory_order_release);
      } else {
        while (s.load(std::memory_order_acquire) != kReady) cpu_relax();
      }
    }
    compute(xq, layout.data(), m, b, column, epi);
  };
  run_tasks(runner, size_t(blocks * p.column_tasks), task);
}

void LinearKernel::run(const LinearArgs& args, const Runner& runner) const {
  check_args(args);
  const int64_t m = args.m;
  if (m == 0) return;
  AlignedBuffer<float> row_scale(static_cast<size_t>(m));
  AlignedBuffer<int32_t> row_zp(static_cast<size_t>(m));
  Epilogue epi;
  epi.n = n_;
  epi.wsum = wsum_.get();
  epi.wscale = wscale_.get();
  epi.row_scale = row_scale.data();
  epi.row_zp = row_zp.data();
  epi.args = &args;
  if (args.x) {
    AlignedBuffer<uint8_t> quantized(size_t(m * k_));
    uint8_t* q = quantized.data();
    execute(q, m, epi, runner, [&](int64_t r0, int64_t r1) {
      quantize_rows(args.x + r0 * k_, r1 - r0, args.per_tensor, args.x_scale, args.x_zero_point,
                    row_scale.data() + r0, row_zp.data() + r0, q + r0 * k_);
    });
    return;
  }
  if (args.x_row_scale) {
    std::copy(args.x_row_scale, args.x_row_scale + m, row_scale.data());
    std::copy(args.x_row_zero_point, args.x_row_zero_point + m, row_zp.data());
  } else {
    std::fill(row_scale.data(), row_scale.data() + m, args.x_scale);
    std::fill(row_zp.data(), row_zp.data() + m, int32_t{args.x_zero_point});
  }
  execute(args.xq, m, epi, runner, [](int64_t, int64_t) {});
}

void LinearKernel::accumulate(const uint8_t* xq, int64_t m, int32_t* acc,
                              const Runner& runner) const {
  if (m <= 0) return;
  Epilogue epi;
  epi.n = n_;
  epi.raw = acc;
  execute(xq, m, epi, runner, [](int64_t, int64_t) {});
}

void LinearKernel::quantize_rows(const float* x, int64_t rows, bool per_tensor, float x_scale,
                                 uint8_t x_zp, float* row_scale, int32_t* row_zp,
                                 uint8_t* out) const {
  for (int64_t r = 0; r < rows; ++r) {
    scalar::quantize_row(x + r * k_, k_, per_tensor, x_scale, x_zp, &row_scale[r], &row_zp[r],
                         out + r * k_);
  }
}

std::unique_ptr<LinearKernel> make_linear_kernel(const PackedWeightView& view,
                                                 std::optional<Isa> isa) {
  return choose_kernel(weight_stats(view), isa).make(view);
}

BlockShape preferred_block_shape(Isa isa) {
  // On AMX CPUs too the pruner should use 1x4 blocks: measured on the Sapphire Rapids class
  // Xeon, a MiniLM-L6 pruned to 90% in 1x4 blocks runs as fast end to end as one in 16x4 blocks
  // (9.9 vs 12.2 ms, batch 1, S=128, 1 thread: the VNNI kernel takes the sparse layers, AMX the
  // dense ones), and a 16x4 student loses 5.4 more points of accuracy at 80% with the demo's
  // recipe. The AMX kernel still skips zero 16x4 blocks of models pruned that way.
  if (isa == Isa::kAmx) return BlockShape{1, 4};
  for (const KernelEntry& e : kernel_manifest()) {
    if (e.isa == isa && e.sparse && !e.emulated) return e.block;
  }
  return BlockShape{1, 4};
}

}  // namespace fastonnx
