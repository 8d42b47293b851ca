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
// K is walked in chunks of this many groups (512 bytes) for all channels of a task before the
// next chunk, so the block's activations in use (64 rows x 512 bytes) stay in L1.
constexpr int64_t kChunkGroups = 128;

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

// Adds one output channel's dot products over T tiles to out[t * 16 + r] (row 16t + r of the
// block). Two accumulator sets (even and odd groups) keep enough vpdpbusd chains in flight; they
// are named variables, not arrays, so they stay in registers.
template <int T>
FASTONNX_AVX512 static void dot_channel(const uint8_t* xb, const Group* g, const Group* end,
                                        int32_t* out) {
  if (g == end) return;
  __m512i a0 = _mm512_load_si512(out), a1 = a0, a2 = a0, a3 = a0;
  if constexpr (T > 1) a1 = _mm512_load_si512(out + 16);
  if constexpr (T > 2) a2 = _mm512_load_si512(out + 32);
  if constexpr (T > 3) a3 = _mm512_load_si512(out + 48);
  const __m512i zero = _mm512_setzero_si512();
  __m512i b0 = zero, b1 = zero, b2 = zero, b3 = zero;
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

class LinearAvx512Vnni final : public avx512::Kernel {
 public:
  explicit LinearAvx512Vnni(const PackedWeightView& view)
      : avx512::Kernel(view.n, view.k), groups_along_k_((int64_t{view.k} + 3) / 4) {
    set_channel_data(view);
    const RowGroups rg = row_groups_1x4(view);
    chunks_ = (groups_along_k_ + kChunkGroups - 1) / kChunkGroups;
    chunk_ptr_.reserve(size_t(view.n * (chunks_ + 1)));
    for (uint32_t n = 0; n < view.n; ++n) {
      uint32_t i = rg.row_ptr[n];
      for (int64_t c = 0; c <= chunks_; ++c) {
        while (i < rg.row_ptr[n + 1] && rg.kg[i] < c * kChunkGroups) ++i;
        chunk_ptr_.push_back(i);
      }
      chunk_ptr_.back() = rg.row_ptr[n + 1];
    }
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
  void compute(const uint8_t* xq, int64_t m, const Epilogue& epi,
               const Runner& runner) const override {
    const int64_t kp = groups_along_k_ * 4;
    const int64_t mp = (m + kTileRows - 1) / kTileRows * kTileRows;
    const int64_t blocks = (mp + kBlockRows - 1) / kBlockRows;
    AlignedBuffer<uint8_t> packed(size_t(mp * kp));

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

  // Writes every byte of block b (padding rows and the ragged last group as zeros).
  FASTONNX_AVX512 void pack_block(const uint8_t* xq, int64_t m, int64_t mp, int64_t b,
                                  uint8_t* packed) const {
    const int64_t k = this->k(), groups = groups_along_k_, T = tiles_in_block(mp, b);
    uint8_t* block = packed + b * kBlockRows * groups * 4;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row0 = b * kBlockRows + t * kTileRows;
      const int64_t valid = std::clamp<int64_t>(m - row0, 0, kTileRows);
      int64_t g0 = 0;
      if (valid == kTileRows && k % 4 == 0) {
        // 16 rows x 16 groups of 4 bytes is a 16x16 int32 transpose.
        const auto* src = reinterpret_cast<const int32_t*>(xq + row0 * k);
        for (; g0 + 16 <= groups; g0 += 16) {
          avx512::transpose16x16(src + g0, k / 4,
                                 reinterpret_cast<int32_t*>(block + (g0 * T + t) * 64), T * 16);
        }
      }
      for (int64_t g = g0; g < groups; ++g) {
        uint8_t* dst = block + (g * T + t) * 64;
        for (int64_t r = 0; r < kTileRows; ++r) {
          const int64_t bytes = r < valid ? std::min<int64_t>(4, k - 4 * g) : 0;
          if (bytes > 0) std::memcpy(dst + r * 4, xq + (row0 + r) * k + 4 * g, size_t(bytes));
          if (bytes < 4) std::memset(dst + r * 4 + bytes, 0, size_t(4 - bytes));
        }
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
    const DotFn dot = kDot[T];
    std::memset(acc, 0, sizeof(acc));
    for (int64_t c = 0; c < chunks_; ++c) {
      for (int64_t j = 0; j < count; ++j) {
        const uint32_t* ptr = chunk_ptr_.data() + (n0 + j) * (chunks_ + 1) + c;
        dot(xb, groups_.data() + ptr[0], groups_.data() + ptr[1], acc[j]);
      }
    }
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row0 = b * kBlockRows + t * kTileRows;
      const int64_t valid = std::min(kTileRows, m - row0);
      avx512::epilogue_tile_transposed(epi, row0, valid, n0, count, &acc[0][t * kTileRows],
                                       kBlockRows);
    }
  }

  int64_t groups_along_k_;
  int64_t chunks_ = 1;
  std::vector<uint32_t> chunk_ptr_;  // [n][chunks + 1] offsets into groups_
  AlignedBuffer<Group> groups_;
};

}  // namespace

std::unique_ptr<LinearKernel> make_linear_avx512_vnni(const PackedWeightView& view) {
  return std::make_unique<LinearAvx512Vnni>(view);
}

}  // namespace fastonnx
