// AMX-INT8 path: tile GEMM that skips all-zero 16x64 weight tiles.
//
// The weight is cut into strips of 16 output channels and tiles of 64 input features; only
// tiles holding a non-zero are kept, each in the VNNI layout tdpbusd wants for its B operand:
//   byte q * 64 + c * 4 + j  =  W[16 * strip + c][64 * kt + 4 * q + j].
// Activations stay row-major (uint8, K padded to 64) and are loaded as A tiles of 16 rows.
// A task computes 32 rows x 16 channels in two accumulator tiles, then runs the row-major
// AVX-512 epilogue. 16x64 blocks (preferred_block_shape) make every pruned block a skipped tile.
#include <algorithm>

#include "aligned_buffer.h"
#include "avx512_common.h"

#define FASTONNX_AMX                                                                    \
  __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni," \
                        "fma")))

namespace fastonnx {
namespace {

constexpr int64_t kTileRows = 16;
constexpr int64_t kTileK = 64;
constexpr int64_t kStrip = 16;
constexpr int64_t kRowsPerTask = 32;
constexpr size_t kTileBytes = 1024;

struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-1: accumulators (16x16 int32), 2-3: activations (16x64 u8), 4: weights (16x64 s8).
TileConfig make_config() {
  TileConfig cfg;
  for (int t = 0; t < 5; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  return cfg;
}

template <int Tiles>
FASTONNX_AMX static void strip_tiles(const uint8_t* a, int64_t lda, const uint32_t* kt,
                                     const int8_t* b, size_t count, int32_t* c) {
  _tile_zero(0);
  if (Tiles == 2) _tile_zero(1);
  for (size_t i = 0; i < count; ++i) {
    _tile_loadd(4, b + i * kTileBytes, 64);
    _tile_loadd(2, a + size_t{kt[i]} * kTileK, lda);
    _tile_dpbusd(0, 2, 4);
    if (Tiles == 2) {
      _tile_loadd(3, a + kTileRows * lda + size_t{kt[i]} * kTileK, lda);
      _tile_dpbusd(1, 3, 4);
    }
  }
  _tile_stored(0, c, 64);
  if (Tiles == 2) _tile_stored(1, c + kTileRows * kStrip, 64);
}

class LinearAmx final : public avx512::Kernel {
 public:
  explicit LinearAmx(const PackedWeightView& view)
      : avx512::Kernel(view.n, view.k), kp_((int64_t{view.k} + kTileK - 1) / kTileK * kTileK) {
    set_channel_data(view);
    const std::vector<int8_t> w = unpack_weight(view);
    const int64_t n = view.n, k = view.k, strips = (n + kStrip - 1) / kStrip;
    std::vector<int8_t> data;
    strip_ptr_.push_back(0);
    int8_t tile[kTileBytes];
    for (int64_t s = 0; s < strips; ++s) {
      for (int64_t t = 0; t < kp_ / kTileK; ++t) {
        bool any = false;
        for (int64_t q = 0; q < 16; ++q) {
          for (int64_t c = 0; c < kStrip; ++c) {
            for (int64_t j = 0; j < 4; ++j) {
              const int64_t row = s * kStrip + c, col = t * kTileK + 4 * q + j;
              const int8_t v = (row < n && col < k) ? w[size_t(row * k + col)] : int8_t{0};
              tile[q * 64 + c * 4 + j] = v;
              any |= v != 0;
            }
          }
        }
        if (any) {
          tile_k_.push_back(uint32_t(t));
          data.insert(data.end(), tile, tile + kTileBytes);
        }
      }
      strip_ptr_.push_back(tile_k_.size());
    }
    tiles_ = AlignedBuffer<int8_t>(data.size());
    std::copy(data.begin(), data.end(), tiles_.data());
  }
  Isa isa() const override { return Isa::kAmx; }
  std::string name() const override { return "s8u8_tile_skip_16x64__amx"; }

 protected:
  void compute(const uint8_t* xq, int64_t m, const Epilogue& epi,
               const Runner& runner) const override {
    const int64_t mp = (m + kTileRows - 1) / kTileRows * kTileRows;
    AlignedBuffer<uint8_t> a(size_t(mp * kp_), /*zero=*/true);
    for (int64_t r = 0; r < m; ++r) std::memcpy(a.data() + r * kp_, xq + r * k(), size_t(k()));
    const int64_t row_blocks = (mp + kRowsPerTask - 1) / kRowsPerTask;
    const int64_t strips = int64_t(strip_ptr_.size()) - 1;
    auto task = [&](size_t i) {
      run_task(a.data(), m, mp, int64_t(i) / strips, int64_t(i) % strips, epi);
    };
    run_tasks(runner, size_t(row_blocks * strips), task);
  }

 private:
  FASTONNX_AMX void run_task(const uint8_t* a, int64_t m, int64_t mp, int64_t rb, int64_t s,
                             const Epilogue& epi) const {
    static const TileConfig config = make_config();
    alignas(64) int32_t c[kRowsPerTask * kStrip];
    const int64_t row0 = rb * kRowsPerTask;
    const size_t first = strip_ptr_[size_t(s)], count = strip_ptr_[size_t(s) + 1] - first;
    const uint8_t* a0 = a + row0 * kp_;
    // Tile configuration is per thread, and ORT may run this task on any pool thread.
    _tile_loadconfig(&config);
    if (mp - row0 >= kRowsPerTask) {
      strip_tiles<2>(a0, kp_, tile_k_.data() + first, tiles_.data() + first * kTileBytes, count, c);
    } else {
      strip_tiles<1>(a0, kp_, tile_k_.data() + first, tiles_.data() + first * kTileBytes, count, c);
    }
    _tile_release();
    const int64_t n0 = s * kStrip, cols = std::min(kStrip, n() - n0);
    const int64_t rows = std::min(kRowsPerTask, m - row0);
    avx512::epilogue_tile(epi, row0, rows, n0, cols, c, kStrip);
  }

  int64_t kp_;
  std::vector<size_t> strip_ptr_;
  std::vector<uint32_t> tile_k_;
  AlignedBuffer<int8_t> tiles_;
};

}  // namespace

std::unique_ptr<LinearKernel> make_linear_amx(const PackedWeightView& view) {
  return std::make_unique<LinearAmx>(view);
}

}  // namespace fastonnx
