// AVX-512 VNNI path: weight-stationary sparse GEMM on 1x4 groups, vectorized along M.
//
// For each output channel n and each of its non-zero 1x4 groups (4 weights at K = 4g..4g+3) one
// vpdpbusd multiplies the broadcast weights with the 4 activations of 16 rows. Activations are
// laid out so the 16 rows x 4 bytes of a group are one 64-byte vector:
//   blocks of up to 64 rows (T = 1..4 tiles of 16 rows); inside a block,
//   byte ((g * T + t) * 16 + r) * 4 + j  =  xq[row 16t + r][4g + j].
// Accumulators come out as [n][m]; a 16x16 transpose hands rows to the row-major epilogue.
#include <algorithm>

#include "aligned_buffer.h"
#include "avx512_common.h"
#include "sparse_groups.h"

namespace fastonnx {
namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kMaxTiles = 4;                       // rows per block: 64
constexpr int64_t kBlockRows = kTileRows * kMaxTiles;
constexpr int64_t kChannelsPerTask = 16;

struct Group {
  uint32_t kg;
  int32_t w;  // the 4 int8 weights, little-endian
};

// acc += dot(u8 activations at ptr, s8 weights w) over 4-byte groups. Inline asm because GCC 12
// wraps every _mm512_dpbusd_epi32 on an accumulator in register copies (a much slower loop).
// AT&T operand order: s8 source, u8 source, accumulator.
#define FASTONNX_DPBUSD(acc, w, ptr) \
  asm("vpdpbusd %2, %1, %0"          \
      : "+v"(acc)                    \
      : "v"(_mm512_load_si512(ptr)), "v"(w))

// Accumulates one output channel over T tiles: out[t * 16 + r] for row 16t + r of the block.
// Two accumulator sets (even and odd groups) keep enough vpdpbusd chains in flight; they are
// named variables, not arrays, so they stay in registers.
template <int T>
FASTONNX_AVX512 static void dot_channel(const uint8_t* xb, const Group* g, const Group* end,
                                        int32_t* out) {
  __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
  __m512i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
  for (; g + 1 < end; g += 2) {
    const __m512i w0 = _mm512_set1_epi32(g[0].w), w1 = _mm512_set1_epi32(g[1].w);
    const uint8_t* p0 = xb + size_t{g[0].kg} * (T * 64);
    const uint8_t* p1 = xb + size_t{g[1].kg} * (T * 64);
    FASTONNX_DPBUSD(a0, w0, p0);
    FASTONNX_DPBUSD(b0, w1, p1);
    if constexpr (T > 1) {
      FASTONNX_DPBUSD(a1, w0, p0 + 64);
      FASTONNX_DPBUSD(b1, w1, p1 + 64);
    }
    if constexpr (T > 2) {
      FASTONNX_DPBUSD(a2, w0, p0 + 128);
      FASTONNX_DPBUSD(b2, w1, p1 + 128);
    }
    if constexpr (T > 3) {
      FASTONNX_DPBUSD(a3, w0, p0 + 192);
      FASTONNX_DPBUSD(b3, w1, p1 + 192);
    }
  }
  if (g < end) {
    const __m512i w0 = _mm512_set1_epi32(g->w);
    const uint8_t* p0 = xb + size_t{g->kg} * (T * 64);
    FASTONNX_DPBUSD(a0, w0, p0);
    if constexpr (T > 1) FASTONNX_DPBUSD(a1, w0, p0 + 64);
    if constexpr (T > 2) FASTONNX_DPBUSD(a2, w0, p0 + 128);
    if constexpr (T > 3) FASTONNX_DPBUSD(a3, w0, p0 + 192);
  }
  _mm512_store_si512(out, _mm512_add_epi32(a0, b0));
  if constexpr (T > 1) _mm512_store_si512(out + 16, _mm512_add_epi32(a1, b1));
  if constexpr (T > 2) _mm512_store_si512(out + 32, _mm512_add_epi32(a2, b2));
  if constexpr (T > 3) _mm512_store_si512(out + 48, _mm512_add_epi32(a3, b3));
}

using DotFn = void (*)(const uint8_t*, const Group*, const Group*, int32_t*);
constexpr DotFn kDot[kMaxTiles + 1] = {nullptr, dot_channel<1>, dot_channel<2>, dot_channel<3>,
                                       dot_channel<4>};

class LinearAvx512Vnni final : public LinearKernel {
 public:
  explicit LinearAvx512Vnni(const PackedWeightView& view)
      : LinearKernel(view.n, view.k), groups_along_k_((int64_t{view.k} + 3) / 4) {
    set_channel_data(view);
    const RowGroups rg = row_groups_1x4(view);
    row_ptr_ = rg.row_ptr;
    groups_ = AlignedBuffer<Group>(rg.kg.size());
    for (size_t i = 0; i < rg.kg.size(); ++i) {
      int32_t w;
      std::memcpy(&w, rg.w[i].data(), 4);
      groups_[i] = Group{rg.kg[i], w};
    }
  }
  Isa isa() const override { return Isa::kAvx512Vnni; }
  std::string name() const override { return "s8u8_spmm_1x4_m64__avx512_vnni"; }

 protected:
  void quantize_rows(const float* x, int64_t rows, bool per_tensor, float x_scale, uint8_t x_zp,
                     float* row_scale, int32_t* row_zp, uint8_t* out) const override {
    avx512::quantize_rows(x, rows, k(), per_tensor, x_scale, x_zp, row_scale, row_zp, out);
  }

  void compute(const uint8_t* xq, int64_t m, const Epilogue& epi,
               const Runner& runner) const override {
    const int64_t kp = groups_along_k_ * 4;
    const int64_t mp = (m + kTileRows - 1) / kTileRows * kTileRows;
    const int64_t blocks = (mp + kBlockRows - 1) / kBlockRows;
    AlignedBuffer<uint8_t> packed(size_t(mp * kp), /*zero=*/true);

    auto pack_task = [&](size_t b) { pack_block(xq, m, mp, int64_t(b), packed.data()); };
    run_tasks(runner, size_t(blocks), pack_task);

    const int64_t chunks = (n() + kChannelsPerTask - 1) / kChannelsPerTask;
    auto gemm_task = [&](size_t task) {
      gemm_block(packed.data(), m, mp, int64_t(task) / chunks, int64_t(task) % chunks, epi);
    };
    run_tasks(runner, size_t(blocks * chunks), gemm_task);
  }

 private:
  static int64_t tiles_in_block(int64_t mp, int64_t b) {
    return std::min(kMaxTiles, (mp - b * kBlockRows) / kTileRows);
  }

  FASTONNX_AVX512 void pack_block(const uint8_t* xq, int64_t m, int64_t mp, int64_t b, uint8_t* packed) const {
    const int64_t k = this->k(), kp = groups_along_k_ * 4, T = tiles_in_block(mp, b);
    uint8_t* dst = packed + b * kBlockRows * kp;
    const int64_t r1 = std::min(m, b * kBlockRows + T * kTileRows);
    for (int64_t row = b * kBlockRows; row < r1; ++row) {
      const int64_t local = row - b * kBlockRows, t = local / kTileRows, r = local % kTileRows;
      const uint8_t* src = xq + row * k;
      const int64_t full = k / 4;
      for (int64_t g = 0; g < full; ++g) {
        std::memcpy(dst + ((g * T + t) * kTileRows + r) * 4, src + 4 * g, 4);
      }
      if (full < groups_along_k_) {  // ragged K: the rest of the last group stays zero
        std::memcpy(dst + ((full * T + t) * kTileRows + r) * 4, src + 4 * full, size_t(k - 4 * full));
      }
    }
  }

  FASTONNX_AVX512 void gemm_block(const uint8_t* packed, int64_t m, int64_t mp, int64_t b, int64_t chunk,
                  const Epilogue& epi) const {
    const int64_t kp = groups_along_k_ * 4, T = tiles_in_block(mp, b);
    const uint8_t* xb = packed + b * kBlockRows * kp;
    const int64_t n0 = chunk * kChannelsPerTask;
    const int64_t count = std::min(kChannelsPerTask, n() - n0);
    alignas(64) int32_t acc[kChannelsPerTask][kBlockRows];  // [n][m]
    alignas(64) int32_t rows[kTileRows][kChannelsPerTask];   // [m][n]
    const DotFn dot = kDot[T];
    for (int64_t j = 0; j < count; ++j) {
      const Group* g = groups_.data() + row_ptr_[size_t(n0 + j)];
      dot(xb, g, groups_.data() + row_ptr_[size_t(n0 + j + 1)], acc[j]);
    }
    for (int64_t j = count; j < kChannelsPerTask; ++j) std::fill_n(acc[j], kBlockRows, 0);
    for (int64_t t = 0; t < T; ++t) {
      avx512::transpose16x16(&acc[0][t * kTileRows], kBlockRows, &rows[0][0]);
      const int64_t row0 = b * kBlockRows + t * kTileRows;
      const int64_t valid = std::min(kTileRows, m - row0);
      for (int64_t r = 0; r < valid; ++r) avx512::epilogue_row(epi, row0 + r, n0, count, rows[r]);
    }
  }

  int64_t groups_along_k_;
  std::vector<uint32_t> row_ptr_;
  AlignedBuffer<Group> groups_;
};

}  // namespace

std::unique_ptr<LinearKernel> make_linear_avx512_vnni(const PackedWeightView& view) {
  return std::make_unique<LinearAvx512Vnni>(view);
}

}  // namespace fastonnx
