// AMX-INT8 path: sparse GEMM on 16x4 blocks (16 output channels x one 4-byte K group), the
// finest block shape whose zeros AMX can skip.
//
// tdpbsud takes the weights as its signed A operand and the activations as its unsigned B
// operand: C[c][r] += sum_k W[c][k] * X[r][k] for 16 channels x 16 rows over 16 K groups. Per
// strip of 16 channels, the K groups where any channel is non-zero are taken 16 at a time into
// chunks; each chunk is one pre-packed A tile: byte c * 64 + q * 4 + j = W[16 s + c][4 g_q + j].
// Activations are transposed once per call to group-major XT (byte g * ldxt + r * 4 + j =
// X[r][4 g + j]), so the B tile of a chunk of 16 consecutive groups is one strided tile load; a
// chunk of scattered groups is first gathered into scratch rows (one 64-byte copy per group and
// row tile). Work thus scales with the non-zero 16x4 blocks, and 16x64 blocks and dense weights
// take the strided path only.
//
// A task runs up to 4 row tiles (64 rows) over a group of strips: C tiles 0-3 accumulate, tile 4
// holds the weights, tiles 6 and 7 alternate as B so a load need not wait for the previous
// product. Results are transposed to row-major for the shared AVX-512 epilogue.
//
// The kernel is a template over the tile backend (amx_tiles.h): the hardware one is the AMX
// path, the emulated one runs the same code on any AVX-512 CPU for the tests.
#include <algorithm>
#include <limits>

#include "aligned_buffer.h"
#include "amx_tiles.h"
#include "avx512_common.h"
#include "sparse_groups.h"

namespace fastonnx {
namespace {

constexpr int64_t kStrip = 16;          // output channels per A tile
constexpr int64_t kChunkGroups = 16;    // K groups per A tile
constexpr int64_t kTileRows = 16;       // activation rows per B tile
constexpr int64_t kMaxRowTiles = 4;     // accumulator tiles per task
constexpr int64_t kTaskChunks = 8;      // a task's strips hold at least this many chunks...
constexpr int64_t kTaskStrips = 16;     // ...or this many strips
constexpr uint32_t kNone = std::numeric_limits<uint32_t>::max();  // no group here

template <class Tiles, int T>
FASTONNX_AVX512 static inline void zero_acc() {
  Tiles::template zero<0>();
  if constexpr (T > 1) Tiles::template zero<1>();
  if constexpr (T > 2) Tiles::template zero<2>();
  if constexpr (T > 3) Tiles::template zero<3>();
}

// Accumulates one chunk: the weights are in tile 4, b points at row tile 0 of the B operand.
template <class Tiles, int T>
FASTONNX_AVX512 static inline void chunk_product(const uint8_t* b, int64_t stride) {
  Tiles::template load<6>(b, stride);
  Tiles::template dpbsud<0, 4, 6>();
  if constexpr (T > 1) {
    Tiles::template load<7>(b + 64, stride);
    Tiles::template dpbsud<1, 4, 7>();
  }
  if constexpr (T > 2) {
    Tiles::template load<6>(b + 128, stride);
    Tiles::template dpbsud<2, 4, 6>();
  }
  if constexpr (T > 3) {
    Tiles::template load<7>(b + 192, stride);
    Tiles::template dpbsud<3, 4, 7>();
  }
}

template <class Tiles, int T>
FASTONNX_AVX512 static inline void store_acc(int32_t* c) {
  constexpr size_t kTileInts = amx::kTileBytes / 4;
  Tiles::template store<0>(c, 64);
  if constexpr (T > 1) Tiles::template store<1>(c + kTileInts, 64);
  if constexpr (T > 2) Tiles::template store<2>(c + 2 * kTileInts, 64);
  if constexpr (T > 3) Tiles::template store<3>(c + 3 * kTileInts, 64);
}

template <class Tiles>
class LinearAmx final : public avx512::Kernel {
 public:
  explicit LinearAmx(const PackedWeightView& view)
      : avx512::Kernel(view.n, view.k), groups_((int64_t{view.k} + 3) / 4) {
    set_channel_data(view);
    pack(view);
  }
  Isa isa() const override { return Isa::kAmx; }
  std::string name() const override {
    return Tiles::kEmulated ? "s8u8_spmm_16x4__amx_emulated" : "s8u8_spmm_16x4__amx";
  }

 protected:
  // Blocks are ranges of at most kMaxRowTiles row tiles, spread evenly; the layout is XT, every
  // row tile's rows transposed group by group (row stride ldxt).
  Plan plan(int64_t m) const override {
    const Ranges r(m);
    return Plan{r.per_range * kTileRows, int64_t(task_strips_.size()) - 1,
                size_t(groups_ * r.ldxt)};
  }
  void prepare(const uint8_t* xq, int64_t m, int64_t block, uint8_t* layout) const override {
    const Ranges r(m);
    const int64_t tile0 = block * r.per_range;
    for (int64_t t = tile0; t < std::min(r.row_tiles, tile0 + r.per_range); ++t) {
      transpose_rows(xq, m, t, r.ldxt, layout);
    }
  }
  void compute(const uint8_t*, const uint8_t* layout, int64_t m, int64_t block, int64_t group,
               const Epilogue& epi) const override {
    const Ranges r(m);
    const int64_t tile0 = block * r.per_range;
    run_task(layout, r.ldxt, m, tile0, std::min(r.per_range, r.row_tiles - tile0),
             task_strips_[size_t(group)], task_strips_[size_t(group) + 1], epi);
  }

 private:
  struct Ranges {
    int64_t row_tiles, per_range, ldxt;
    explicit Ranges(int64_t m) : row_tiles((m + kTileRows - 1) / kTileRows) {
      const int64_t ranges = (row_tiles + kMaxRowTiles - 1) / kMaxRowTiles;
      per_range = (row_tiles + ranges - 1) / ranges;
      ldxt = row_tiles * kTileRows * 4;
    }
  };

  void pack(const PackedWeightView& view) {
    const RowGroups rg = row_groups_1x4(view);
    const int64_t n = view.n, strips = (n + kStrip - 1) / kStrip;
    std::vector<int32_t> w(size_t(kStrip * groups_), 0);  // one strip, [c][g], zero between strips
    std::vector<uint32_t> seen(size_t(groups_), 0);       // strip + 1 where the strip uses g
    std::vector<uint32_t> used;
    std::vector<int8_t> tiles;
    chunk_ptr_.push_back(0);
    int64_t group_chunks = 0;
    task_strips_.push_back(0);
    for (int64_t s = 0; s < strips; ++s) {
      used.clear();
      for (int64_t c = 0; c < kStrip && s * kStrip + c < n; ++c) {
        const size_t row = size_t(s * kStrip + c);
        for (uint32_t i = rg.row_ptr[row]; i < rg.row_ptr[row + 1]; ++i) {
          const uint32_t g = rg.kg[i];
          std::memcpy(&w[size_t(c * groups_ + g)], rg.w[i].data(), 4);
          if (seen[g] != uint32_t(s + 1)) {
            seen[g] = uint32_t(s + 1);
            used.push_back(g);
          }
        }
      }
      std::sort(used.begin(), used.end());
      for (size_t q0 = 0; q0 < used.size(); q0 += kChunkGroups) {
        const size_t count = std::min<size_t>(kChunkGroups, used.size() - q0);
        const bool contiguous = count == kChunkGroups && used[q0 + count - 1] - used[q0] == count - 1;
        chunk_first_.push_back(contiguous ? used[q0] : kNone);
        gather_ptr_.push_back(gathered_.size());
        if (!contiguous) {  // the gather list is kept only for chunks that need one
          for (size_t q = 0; q < kChunkGroups; ++q) gathered_.push_back(q < count ? used[q0 + q] : kNone);
        }
        const size_t base = tiles.size();
        tiles.resize(base + amx::kTileBytes, 0);
        for (size_t q = 0; q < count; ++q) {
          for (int64_t c = 0; c < kStrip; ++c) {
            std::memcpy(&tiles[base + size_t(c) * 64 + q * 4], &w[size_t(c * groups_) + used[q0 + q]], 4);
          }
        }
      }
      for (uint32_t g : used) {
        for (int64_t c = 0; c < kStrip; ++c) w[size_t(c * groups_ + g)] = 0;
      }
      chunk_ptr_.push_back(chunk_first_.size());
      group_chunks += int64_t(chunk_ptr_.back() - chunk_ptr_[chunk_ptr_.size() - 2]);
      const int64_t group_strips = s + 1 - int64_t(task_strips_.back());
      if (group_chunks >= kTaskChunks || group_strips >= kTaskStrips || s + 1 == strips) {
        task_strips_.push_back(size_t(s + 1));
        group_chunks = 0;
      }
    }
    tiles_ = AlignedBuffer<int8_t>(tiles.size());
    std::copy(tiles.begin(), tiles.end(), tiles_.data());
  }

  // XT rows of row tile t: 16 rows x every group, zero past m and past k.
  FASTONNX_AVX512 void transpose_rows(const uint8_t* xq, int64_t m, int64_t t, int64_t ldxt,
                                      uint8_t* xt) const {
    const int64_t k = this->k(), row0 = t * kTileRows;
    const int64_t valid = std::min(kTileRows, m - row0);
    int64_t g0 = 0;
    if (valid == kTileRows && k % 4 == 0) {
      const auto* src = reinterpret_cast<const int32_t*>(xq + row0 * k);
      for (; g0 + 16 <= groups_; g0 += 16) {
        avx512::transpose16x16(src + g0, k / 4, reinterpret_cast<int32_t*>(xt + g0 * ldxt + row0 * 4),
                               ldxt / 4);
      }
    }
    for (int64_t g = g0; g < groups_; ++g) {
      uint8_t* dst = xt + g * ldxt + row0 * 4;
      for (int64_t r = 0; r < kTileRows; ++r) {
        const int64_t bytes = r < valid ? std::min<int64_t>(4, k - 4 * g) : 0;
        if (bytes > 0) std::memcpy(dst + r * 4, xq + (row0 + r) * k + 4 * g, size_t(bytes));
        if (bytes < 4) std::memset(dst + r * 4 + bytes, 0, size_t(4 - bytes));
      }
    }
  }

  FASTONNX_AVX512 void run_task(const uint8_t* xt, int64_t ldxt, int64_t m, int64_t tile0,
                                int64_t tiles, size_t strip0, size_t strip1,
                                const Epilogue& epi) const {
    switch (tiles) {
      case 1: return run_strips<1>(xt, ldxt, m, tile0, strip0, strip1, epi);
      case 2: return run_strips<2>(xt, ldxt, m, tile0, strip0, strip1, epi);
      case 3: return run_strips<3>(xt, ldxt, m, tile0, strip0, strip1, epi);
      default: return run_strips<4>(xt, ldxt, m, tile0, strip0, strip1, epi);
    }
  }

  // Copies the rows of a gathered chunk's 16 groups for T row tiles into dst (stride T * 64).
  template <int T>
  FASTONNX_AVX512 void gather_chunk(const uint8_t* xt, int64_t ldxt, int64_t row0, size_t ch,
                                    uint8_t* dst) const {
    const uint32_t* g = gathered_.data() + gather_ptr_[ch];
    for (int64_t q = 0; q < kChunkGroups; ++q, dst += T * 64) {
      if (g[q] == kNone) {  // padding of a short chunk: zero weights meet zero rows
        std::memset(dst, 0, T * 64);
        continue;
      }
      const uint8_t* src = xt + g[q] * ldxt + row0 * 4;
      for (int t = 0; t < T; ++t) _mm512_store_si512(dst + t * 64, _mm512_loadu_si512(src + t * 64));
    }
  }

  template <int T>
  FASTONNX_AVX512 void run_strips(const uint8_t* xt, int64_t ldxt, int64_t m, int64_t tile0,
                                  size_t strip0, size_t strip1, const Epilogue& epi) const {
    constexpr int64_t kGatherStride = T * 64;
    // Two gather buffers: chunk i + 1 is gathered before the products of chunk i are issued, so
    // its stores have retired by the time its tile loads read them (a tile load right after the
    // stores that wrote its rows stalls on them).
    alignas(64) uint8_t gather[2][kChunkGroups * kGatherStride];
    alignas(64) int32_t acc[T][kStrip * kTileRows];  // [t][c][r]
    static const amx::TileConfig config = amx::full_tiles();
    // Tile configuration is per thread and ORT may run this task on any pool thread, so each
    // task configures (tasks hold kTaskChunks or more chunks to amortize it).
    Tiles::configure(config);
    const int64_t row0 = tile0 * kTileRows;
    const size_t last = chunk_ptr_[strip1];
    auto gathered = [&](size_t ch) { return ch < last && chunk_first_[ch] == kNone; };
    if (gathered(chunk_ptr_[strip0])) {
      gather_chunk<T>(xt, ldxt, row0, chunk_ptr_[strip0], gather[chunk_ptr_[strip0] & 1]);
    }
    for (size_t s = strip0; s < strip1; ++s) {
      zero_acc<Tiles, T>();
      for (size_t ch = chunk_ptr_[s]; ch < chunk_ptr_[s + 1]; ++ch) {
        Tiles::template load<4>(tiles_.data() + ch * amx::kTileBytes, 64);
        if (gathered(ch + 1)) gather_chunk<T>(xt, ldxt, row0, ch + 1, gather[(ch + 1) & 1]);
        if (chunk_first_[ch] != kNone) {
          chunk_product<Tiles, T>(xt + chunk_first_[ch] * ldxt + row0 * 4, ldxt);
        } else {
          chunk_product<Tiles, T>(gather[ch & 1], kGatherStride);
        }
      }
      store_acc<Tiles, T>(&acc[0][0]);
      const int64_t n0 = int64_t(s) * kStrip, count = std::min(kStrip, n() - n0);
      for (int t = 0; t < T; ++t) {
        const int64_t r0 = row0 + t * kTileRows;
        if (r0 >= m) break;
        avx512::epilogue_tile_transposed(epi, r0, std::min(kTileRows, m - r0), n0, count, acc[t],
                                         kTileRows);
      }
    }
    Tiles::release();
  }

  int64_t groups_;                     // K groups of 4 (the last zero-padded)
  std::vector<size_t> chunk_ptr_;      // [strips + 1] into the chunk arrays
  std::vector<uint32_t> chunk_first_;  // per chunk: first group if contiguous, else kNone
  std::vector<size_t> gather_ptr_;     // per gathered chunk: its 16 groups in gathered_
  std::vector<uint32_t> gathered_;     // groups of gathered chunks (kNone = padding)
  std::vector<size_t> task_strips_;    // strip ranges per task
  AlignedBuffer<int8_t> tiles_;        // per chunk: one A tile
};

}  // namespace

std::unique_ptr<LinearKernel> make_linear_amx(const PackedWeightView& view) {
  return std::make_unique<LinearAmx<amx::HwTiles>>(view);
}

std::unique_ptr<LinearKernel> make_linear_amx_emulated(const PackedWeightView& view) {
  return std::make_unique<LinearAmx<amx::EmuTiles>>(view);
}

}  // namespace fastonnx
