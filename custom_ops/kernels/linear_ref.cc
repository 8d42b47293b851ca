// Portable reference path: the weight decoded to dense int8, plain loops. It is the fallback on
// CPUs without AVX2 and the yardstick the vector paths are tested against.
#include <algorithm>
#include <vector>

#include "linear.h"

namespace fastonnx {
namespace {

constexpr int64_t kRowsPerTask = 4;

class LinearRef final : public LinearKernel {
 public:
  explicit LinearRef(const PackedWeightView& view)
      : LinearKernel(view.n, view.k), w_(unpack_weight(view)) {
    set_channel_data(view);
  }
  Isa isa() const override { return Isa::kRef; }
  std::string name() const override { return "s8u8_dense__ref"; }

 protected:
  Plan plan(int64_t) const override { return Plan{kRowsPerTask, 1, 0}; }
  void compute(const uint8_t* xq, const uint8_t*, int64_t m, int64_t block, int64_t,
               const Epilogue& epi) const override {
    const int64_t n = this->n(), k = this->k();
    std::vector<int32_t> acc(static_cast<size_t>(n));
    const int64_t r1 = std::min(m, (block + 1) * kRowsPerTask);
    for (int64_t r = block * kRowsPerTask; r < r1; ++r) {
      const uint8_t* x = xq + r * k;
      for (int64_t j = 0; j < n; ++j) {
        const int8_t* w = w_.data() + j * k;
        int32_t s = 0;
        for (int64_t i = 0; i < k; ++i) s += int32_t{x[i]} * int32_t{w[i]};
        acc[size_t(j)] = s;
      }
      scalar::epilogue(epi, r, 0, n, acc.data());
    }
  }

 private:
  std::vector<int8_t> w_;  // dense [n, k]
};

}  // namespace

std::unique_ptr<LinearKernel> make_linear_ref(const PackedWeightView& view) {
  return std::make_unique<LinearRef>(view);
}

}  // namespace fastonnx
