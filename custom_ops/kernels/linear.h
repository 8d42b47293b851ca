// Sparse INT8 linear layer: Y = act(dequant(quant(X) @ W^T) + bias) + residual.
//
// Dimensions: M rows of X (all leading dimensions flattened), K input features, N output
// features. X is quantized to uint8 with a per-row (dynamic) or per-tensor (static) scale and
// zero point; W is int8 with one scale per output channel (see packed_weight.h). Accumulation is
// exact int32; the epilogue applies, in order: zero-point compensation, both scales, bias,
// activation, residual add, and (for a uint8 output) requantization. A row of a float X holding
// a NaN or an infinity gives a NaN row of Y (a 0 row of a uint8 Y), as the float layer would.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "cpu_features.h"
#include "packed_weight.h"

namespace fastonnx {

enum class Activation { kNone, kGelu };  // GELU in its exact erf form

// Runs fn(ctx, i) for i in [0, count), possibly concurrently. Kernels know no thread pool; the
// ORT adapter plugs in ORT's intra-op pool so `intra_op_num_threads` is what users get.
struct Runner {
  using TaskFn = void (*)(void* ctx, size_t index);
  virtual ~Runner() = default;
  virtual void parallel_for(size_t count, TaskFn fn, void* ctx) const = 0;
};

struct SerialRunner final : Runner {
  void parallel_for(size_t count, TaskFn fn, void* ctx) const override {
    for (size_t i = 0; i < count; ++i) fn(ctx, i);
  }
};

// Calls f(i) for each task through a Runner.
template <class F>
void run_tasks(const Runner& runner, size_t count, F& f) {
  runner.parallel_for(count, [](void* ctx, size_t i) { (*static_cast<F*>(ctx))(i); }, &f);
}

struct LinearArgs {
  int64_t m = 0;
  // Input: exactly one of x (float [m, k]) or xq (uint8 [m, k], needs per_tensor quantization).
  const float* x = nullptr;
  const uint8_t* xq = nullptr;
  bool per_tensor = false;  // static quantization with x_scale / x_zero_point
  float x_scale = 1.f;
  uint8_t x_zero_point = 0;
  // Or, for a uint8 xq, per-row quantization parameters ([m] each), as a fastonnx LayerNorm
  // emits them (layer_norm.h). A NaN scale gives a NaN output row.
  const float* x_row_scale = nullptr;
  const uint8_t* x_row_zero_point = nullptr;
  const float* bias = nullptr;      // [n] or null
  const float* residual = nullptr;  // [m, n] or null
  Activation activation = Activation::kNone;
  // Output: exactly one of y (float [m, n]) or yq (uint8 [m, n], requantized with y_scale/y_zp).
  float* y = nullptr;
  uint8_t* yq = nullptr;
  float y_scale = 1.f;
  uint8_t y_zero_point = 0;
};

// A weight re-laid-out for one kernel path. Created once (at ORT kernel creation), then run
// concurrently from any number of threads (run is const and keeps no state).
class LinearKernel {
 public:
  virtual ~LinearKernel() = default;
  virtual Isa isa() const = 0;
  // Kernel name, e.g. "s8s8_spmm_1x4__avx512_vnni".
  virtual std::string name() const = 0;
  int64_t n() const { return n_; }
  int64_t k() const { return k_; }

  // Throws std::invalid_argument for inconsistent arguments.
  void run(const LinearArgs& args, const Runner& runner) const;
  // Raw int32 accumulators acc[m, n] = sum_k xq[m, k] * W[n, k] (no zero-point compensation):
  // the exact-arithmetic test hook.
  void accumulate(const uint8_t* xq, int64_t m, int32_t* acc, const Runner& runner) const;

  // Everything the epilogue needs besides the accumulators; shared by every kernel path.
  struct Epilogue {
    int64_t n = 0;
    const int32_t* wsum = nullptr;    // [n] sum_k W[n, k], for zero-point compensation
    const float* wscale = nullptr;    // [n]
    const float* row_scale = nullptr;  // [m] activation scale per row
    const int32_t* row_zp = nullptr;   // [m] activation zero point per row
    const LinearArgs* args = nullptr;  // null: store raw accumulators into `raw`
    int32_t* raw = nullptr;
  };

 protected:
  LinearKernel(int64_t n, int64_t k) : n_(n), k_(k) {}

  // How a path splits one call: row blocks (block b holds rows [b * block_rows,
  // min(m, (b + 1) * block_rows))) times column tasks per block, and the bytes of the
  // activation layout it builds per call (0: it reads the quantized rows as they are).
  struct Plan {
    int64_t block_rows = 1;
    int64_t column_tasks = 1;
    size_t layout_bytes = 0;
  };
  virtual Plan plan(int64_t m) const = 0;
  // Lays out block b's quantized rows (row stride k) in `layout`: once per block and call,
  // before any of the block's tasks runs; it must not throw (other tasks wait on it).
  virtual void prepare(const uint8_t* xq, int64_t m, int64_t block, uint8_t* layout) const {
    (void)xq, (void)m, (void)block, (void)layout;
  }
  // One task: block b's rows against column task `column`'s channels, through the epilogue.
  virtual void compute(const uint8_t* xq, const uint8_t* layout, int64_t m, int64_t block,
                       int64_t column, const Epilogue& epi) const = 0;
  // Quantizes `rows` rows of X (row stride k) to uint8 and records each row's scale and zero
  // point; a row holding a NaN or an infinity gets scale NaN (so its output row is NaN, or 0
  // once requantized). The scalar version here is exact; vector paths override it with
  // bit-identical code.
  virtual void quantize_rows(const float* x, int64_t rows, bool per_tensor, float x_scale,
                             uint8_t x_zp, float* row_scale, int32_t* row_zp,
                             uint8_t* out) const;
  const int32_t* wsum() const { return wsum_.get(); }
  const float* wscale() const { return wscale_.get(); }
  // Kernels call this from their constructor with the decoded weight.
  void set_channel_data(const PackedWeightView& view);

 private:
  // Runs every task of a call in one parallel section; `quantize(r0, r1)` fills rows
  // [r0, r1) of xq (and their scales) first when the input is float.
  template <class Quantize>
  void execute(const uint8_t* xq, int64_t m, const Epilogue& epi, const Runner& runner,
               const Quantize& quantize) const;

  int64_t n_, k_;
  std::unique_ptr<int32_t[]> wsum_;
  std::unique_ptr<float[]> wscale_;
};

// Creates the kernel the manifest chooses (kernel_manifest.h: FASTONNX_KERNEL, then `isa` or
// FASTONNX_ISA, else the cheapest for this weight on this CPU). Throws std::invalid_argument
// when the request cannot run here.
std::unique_ptr<LinearKernel> make_linear_kernel(const PackedWeightView& view,
                                                 std::optional<Isa> isa = std::nullopt);

// The block shape the kernels on this machine (or the given ISA) exploit best: what the
// upstream pruner should use.
BlockShape preferred_block_shape(Isa isa);

// Per-path constructors (one file each).
std::unique_ptr<LinearKernel> make_linear_ref(const PackedWeightView& view);
std::unique_ptr<LinearKernel> make_linear_avx2(const PackedWeightView& view);
std::unique_ptr<LinearKernel> make_linear_avx512_vnni(const PackedWeightView& view);
std::unique_ptr<LinearKernel> make_linear_avx512_vnni_4x4(const PackedWeightView& view);
std::unique_ptr<LinearKernel> make_linear_avx512_dense(const PackedWeightView& view);
std::unique_ptr<LinearKernel> make_linear_amx(const PackedWeightView& view);
// The AMX kernel's code on emulated tiles (amx_tiles.h): needs AVX-512 VNNI only.
std::unique_ptr<LinearKernel> make_linear_amx_emulated(const PackedWeightView& view);

// Scalar pieces shared by the paths (and the reference of the vector ones).
namespace scalar {
// Dynamic quantization parameters of one row: the range [min(x, 0), max(x, 0)] onto [0, 255].
void row_quant_params(const float* x, int64_t k, float* scale, int32_t* zero_point);
// The same from a known range (lo <= 0 <= hi); vector paths reduce the range themselves.
void quant_params_from_range(float lo, float hi, float* scale, int32_t* zero_point);
// round(x * inv_scale) + zero_point clamped to [0, 255]; multiplying by the reciprocal (not
// dividing) keeps the vector paths fast, and every path does exactly this.
uint8_t quantize(float x, float inv_scale, int32_t zero_point);
// One row of X to uint8, per tensor (x_scale, x_zp) or dynamically, with the non-finite rule:
// a row holding a NaN or an infinity gets scale NaN, zero point 0 and zero bytes.
void quantize_row(const float* x, int64_t k, bool per_tensor, float x_scale, uint8_t x_zp,
                  float* scale, int32_t* zero_point, uint8_t* q);
float gelu(float x);
// Epilogue for acc[0..count) = row `row`, columns n0..n0+count.
void epilogue(const LinearKernel::Epilogue& e, int64_t row, int64_t n0, int64_t count,
              const int32_t* acc);
}  // namespace scalar

}  // namespace fastonnx
