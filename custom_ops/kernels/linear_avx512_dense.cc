// AVX-512 VNNI dense path, for weights too dense for the 1x4-group path to win.
//
// Register-blocked GEMM: 6 rows x 64 channels in 24 zmm accumulators. Per 4-byte K group, four
// 64-byte weight vectors (16 channels x 4 weights each) meet six broadcast activation groups:
// 10 loads feed 24 vpdpbusd, where the sparse path needs one load per vpdpbusd.
// Weights are laid out in panels of 64 channels:
//   byte ((panel * groups + g) * 4 + s) * 64 + c * 4 + j  =  W[64 * panel + 16 * s + c][4g + j]
// (zero past N and K). Activations are read row-major; a ragged row block is copied into a
// zero-padded scratch first.
#include <algorithm>

#include "aligned_buffer.h"
#include "avx512_common.h"
#include "sparse_groups.h"

namespace fastonnx {
namespace {

constexpr int64_t kRows = 6;
constexpr int64_t kPanel = 64;
constexpr int64_t kRowBlocksPerTask = 8;

// acc += dot(u8 x, s8 w); see linear_avx512_vnni.cc for why this is inline asm.
#define FASTONNX_DP(acc, w, x) asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w))

// Computes a 6 x 64 int32 tile: out[r * 64 + c]. x rows have stride ldx (>= 4 * groups bytes).
FASTONNX_AVX512 static void tile_6x64(const uint8_t* x, int64_t ldx, const int8_t* w,
                                      int64_t groups, int32_t* out) {
  __m512i a00 = _mm512_setzero_si512(), a01 = a00, a02 = a00, a03 = a00;
  __m512i a10 = a00, a11 = a00, a12 = a00, a13 = a00;
  __m512i a20 = a00, a21 = a00, a22 = a00, a23 = a00;
  __m512i a30 = a00, a31 = a00, a32 = a00, a33 = a00;
  __m512i a40 = a00, a41 = a00, a42 = a00, a43 = a00;
  __m512i a50 = a00, a51 = a00, a52 = a00, a53 = a00;
  for (int64_t g = 0; g < groups; ++g) {
    const int8_t* wg = w + g * 4 * 64;
    const __m512i w0 = _mm512_load_si512(wg), w1 = _mm512_load_si512(wg + 64);
    const __m512i w2 = _mm512_load_si512(wg + 128), w3 = _mm512_load_si512(wg + 192);
    const uint8_t* xg = x + 4 * g;
    __m512i b;
#define FASTONNX_ROW(r)                                                      \
  b = _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(xg + (r) * ldx)); \
  FASTONNX_DP(a##r##0, w0, b);                                               \
  FASTONNX_DP(a##r##1, w1, b);                                               \
  FASTONNX_DP(a##r##2, w2, b);                                               \
  FASTONNX_DP(a##r##3, w3, b);
    FASTONNX_ROW(0)
    FASTONNX_ROW(1)
    FASTONNX_ROW(2)
    FASTONNX_ROW(3)
    FASTONNX_ROW(4)
    FASTONNX_ROW(5)
#undef FASTONNX_ROW
  }
#define FASTONNX_STORE(r)                                 \
  _mm512_store_si512(out + (r) * 64 + 0, a##r##0);        \
  _mm512_store_si512(out + (r) * 64 + 16, a##r##1);       \
  _mm512_store_si512(out + (r) * 64 + 32, a##r##2);       \
  _mm512_store_si512(out + (r) * 64 + 48, a##r##3);
  FASTONNX_STORE(0)
  FASTONNX_STORE(1)
  FASTONNX_STORE(2)
  FASTONNX_STORE(3)
  FASTONNX_STORE(4)
  FASTONNX_STORE(5)
#undef FASTONNX_STORE
}

class LinearAvx512Dense final : public avx512::Kernel {
 public:
  explicit LinearAvx512Dense(const PackedWeightView& view)
      : avx512::Kernel(view.n, view.k),
        groups_((int64_t{view.k} + 3) / 4),
        panels_((int64_t{view.n} + kPanel - 1) / kPanel),
        w_(size_t(panels_ * groups_ * 4 * 64), /*zero=*/true) {
    set_channel_data(view);
    const std::vector<int8_t> dense = unpack_weight(view);
    for (int64_t n = 0; n < view.n; ++n) {
      const int64_t panel = n / kPanel, s = (n % kPanel) / 16, c = n % 16;
      for (int64_t k = 0; k < view.k; ++k) {
        const int64_t g = k / 4, j = k % 4;
        w_[size_t((((panel * groups_ + g) * 4 + s) * 64) + c * 4 + j)] = dense[size_t(n * view.k + k)];
      }
    }
  }
  Isa isa() const override { return Isa::kAvx512Vnni; }
  std::string name() const override { return "s8u8_gemm_6x64__avx512_vnni"; }

 protected:
  Plan plan(int64_t) const override { return Plan{kRowBlocksPerTask * kRows, panels_, 0}; }
  void compute(const uint8_t* xq, const uint8_t*, int64_t m, int64_t block, int64_t panel,
               const Epilogue& epi) const override {
    run_task(xq, m, block, panel, epi);
  }

 private:
  FASTONNX_AVX512 void run_task(const uint8_t* xq, int64_t m, int64_t row_task, int64_t panel,
                                const Epilogue& epi) const {
    const int64_t k = this->k(), kp = groups_ * 4;
    alignas(64) int32_t acc[kRows * kPanel];
    AlignedBuffer<uint8_t> padded;  // for row blocks that are ragged in M or K
    const int8_t* w = w_.data() + panel * groups_ * 4 * 64;
    const int64_t n0 = panel * kPanel;
    const int64_t first = row_task * kRowBlocksPerTask * kRows;
    const int64_t last = std::min(m, first + kRowBlocksPerTask * kRows);
    for (int64_t row0 = first; row0 < last; row0 += kRows) {
      const int64_t rows = std::min(kRows, m - row0);
      const uint8_t* x = xq + row0 * k;
      int64_t ldx = k;
      if (rows < kRows || k % 4 != 0) {
        if (padded.size() == 0) padded = AlignedBuffer<uint8_t>(size_t(kRows * kp));
        std::memset(padded.data(), 0, padded.size());
        for (int64_t r = 0; r < rows; ++r) std::memcpy(padded.data() + r * kp, x + r * k, size_t(k));
        x = padded.data();
        ldx = kp;
      }
      tile_6x64(x, ldx, w, groups_, acc);
      for (int64_t s = 0; s < kPanel / 16; ++s) {
        const int64_t count = std::min<int64_t>(16, n() - (n0 + 16 * s));
        if (count <= 0) break;
        avx512::epilogue_tile(epi, row0, rows, n0 + 16 * s, count, acc + 16 * s, kPanel);
      }
    }
  }

  int64_t groups_;
  int64_t panels_;
  AlignedBuffer<int8_t> w_;
};

}  // namespace

std::unique_ptr<LinearKernel> make_linear_avx512_dense(const PackedWeightView& view) {
  return std::make_unique<LinearAvx512Dense>(view);
}

}  // namespace fastonnx
