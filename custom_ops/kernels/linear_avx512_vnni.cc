// AVX-512 VNNI path: weight-stationary sparse GEMM on 1x4 groups, vectorized along M.
//
// For each output channel n and each of its non-zero 1x4 groups (4 weights at K = 4g..4g+3) one
// vpdpbusd multiplies the broadcast weights with the 4 activations of 16 rows. Activations are
// laid out so the 16 rows x 4 bytes of a group are one 64-byte vector:
//   blocks of up to 64 rows (T = 1..4 tiles of 16 rows); inside a block,
//   byte ((g * T + t) * 16 + r) * 4 + j  =  xq[row 16t + r][4g + j].
// Accumulators come out as [n][m]; a 16x16 transpose hands rows to the row-major epilogue.
//
// Channels are multiplied four at a time (a quad): its four channels step through their groups
// in lockstep, so a step issues 4 x T independent vpdpbusd and a quad has one loop exit instead
// of four (each a likely branch miss, as channels hold different numbers of groups). Two
// kernels share this code:
// * 1x4 (any sparsity pattern): each channel of a step has its own group; channels are sorted
//   by group count within a task and lists padded to the quad's longest with zero weights.
// * 4x4 (weights pruned in 4x4 blocks): a quad is 4 consecutive channels and a step is one
//   group they share, so its T activation vectors are loaded once for 4 x T products: less
//   than half the loads per vpdpbusd of the 1x4 kernel. A group only some of the 4 channels
//   use is multiplied with zeros for the others.
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
constexpr int64_t kQuad = 4;

// One step of a quad: channel q multiplies group kg[q] by its 4 weights w[q] (little-endian
// int8). The 4x4 kernel reads kg[0] only. Padding steps have zero weights and group 0.
struct Step {
  uint32_t kg[kQuad];
  int32_t w[kQuad];
};

struct Quad {
  uint32_t offset = 0;  // first step
  uint32_t steps = 0;
  uint8_t channel[kQuad] = {0, 0, 0, 0};  // within the task; >= its count: padding channels
};

// acc += dot(u8 activations, s8 weights w) over 4-byte groups. GCC 12 wraps some of these
// accumulator arrays in register copies (a move before and after each vpdpbusd, a much slower
// loop), with the intrinsic in some instantiations and with inline asm in others; each call
// site picks the form that compiles to a copy-free loop (checked in the disassembly). AT&T
// operand order: s8 source, u8 source, accumulator.
template <bool kIntrinsic>
FASTONNX_AVX512 static inline void dpbusd(__m512i& acc, __m512i w, __m512i x) {
  if constexpr (kIntrinsic) {
    acc = _mm512_dpbusd_epi32(acc, x, w);
  } else {
    asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
  }
}

// acc[channel[q]][16t + r] += the quad's dot products for rows 16t + r of the block.
template <bool kShared, int T>
FASTONNX_AVX512 static void dot_quad(const uint8_t* xb, const Step* step, const Quad& quad,
                                     int32_t (*acc)[kBlockRows]) {
  if (quad.steps == 0) return;
  __m512i a[kQuad][T];
#pragma GCC unroll 4
  for (int q = 0; q < kQuad; ++q) {
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) a[q][t] = _mm512_load_si512(acc[quad.channel[q]] + 16 * t);
  }
  for (const Step* end = step + quad.steps; step < end; ++step) {
    if constexpr (kShared) {
      const uint8_t* p = xb + size_t{step->kg[0]} * (T * 64);
      __m512i x[T];
#pragma GCC unroll 4
      for (int t = 0; t < T; ++t) x[t] = _mm512_load_si512(p + 64 * t);
#pragma GCC unroll 4
      for (int q = 0; q < kQuad; ++q) {
        const __m512i w = _mm512_set1_epi32(step->w[q]);
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) dpbusd<T == 3 || T == 4>(a[q][t], w, x[t]);
      }
    } else {
#pragma GCC unroll 4
      for (int q = 0; q < kQuad; ++q) {
        const __m512i w = _mm512_set1_epi32(step->w[q]);
        const uint8_t* p = xb + size_t{step->kg[q]} * (T * 64);
#pragma GCC unroll 4
        for (int t = 0; t < T; ++t) dpbusd<T == 3>(a[q][t], w, _mm512_load_si512(p + 64 * t));
      }
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < kQuad; ++q) {
#pragma GCC unroll 4
    for (int t = 0; t < T; ++t) _mm512_store_si512(acc[quad.channel[q]] + 16 * t, a[q][t]);
  }
}

// A channel's groups in one K chunk: indices [begin, end) into RowGroups.
struct Span {
  uint32_t begin = 0, end = 0;
  uint32_t size() const { return end - begin; }
};

// 1x4: channels sorted by group count, quads in that order, each channel its own groups.
void add_lockstep_quads(const RowGroups& rg, const Span* spans, std::vector<Quad>& quads,
                        std::vector<Step>& steps) {
  int order[kChannelsPerTask];
  for (int j = 0; j < kChannelsPerTask; ++j) order[j] = j;
  std::stable_sort(order, order + kChannelsPerTask,
                   [&](int x, int y) { return spans[x].size() > spans[y].size(); });
  for (int64_t q0 = 0; q0 < kChannelsPerTask; q0 += kQuad) {
    Quad quad;
    quad.offset = uint32_t(steps.size());
    for (int64_t q = 0; q < kQuad; ++q) {
      quad.channel[q] = uint8_t(order[q0 + q]);
      quad.steps = std::max(quad.steps, spans[order[q0 + q]].size());
    }
    steps.resize(steps.size() + quad.steps, Step{});
    for (int64_t q = 0; q < kQuad; ++q) {
      const Span span = spans[quad.channel[q]];
      for (uint32_t i = span.begin; i < span.end; ++i) {
        Step& st = steps[quad.offset + (i - span.begin)];
        st.kg[q] = rg.kg[i];
        std::memcpy(&st.w[q], rg.w[i].data(), 4);
      }
    }
    quads.push_back(quad);
  }
}

// 4x4: quads of consecutive channels, a step per group any of them uses.
void add_shared_quads(const RowGroups& rg, const Span* spans, std::vector<Quad>& quads,
                      std::vector<Step>& steps) {
  for (int64_t q0 = 0; q0 < kChannelsPerTask; q0 += kQuad) {
    Quad quad;
    quad.offset = uint32_t(steps.size());
    uint32_t next[kQuad];
    for (int64_t q = 0; q < kQuad; ++q) {
      quad.channel[q] = uint8_t(q0 + q);
      next[q] = spans[q0 + q].begin;
    }
    while (true) {  // merge the 4 sorted group lists
      uint32_t g = UINT32_MAX;
      for (int64_t q = 0; q < kQuad; ++q) {
        if (next[q] < spans[q0 + q].end) g = std::min(g, rg.kg[next[q]]);
      }
      if (g == UINT32_MAX) break;
      Step st{};
      for (int64_t q = 0; q < kQuad; ++q) {
        st.kg[q] = g;
        if (next[q] < spans[q0 + q].end && rg.kg[next[q]] == g) {
          std::memcpy(&st.w[q], rg.w[next[q]].data(), 4);
          ++next[q];
        }
      }
      steps.push_back(st);
      ++quad.steps;
    }
    quads.push_back(quad);
  }
}

template <bool kShared>
class LinearAvx512Vnni final : public avx512::Kernel {
 public:
  explicit LinearAvx512Vnni(const PackedWeightView& view)
      : avx512::Kernel(view.n, view.k), groups_along_k_((int64_t{view.k} + 3) / 4) {
    set_channel_data(view);
    const RowGroups rg = row_groups_1x4(view);
    chunks_ = (groups_along_k_ + kChunkGroups - 1) / kChunkGroups;
    const int64_t tasks = (int64_t{view.n} + kChannelsPerTask - 1) / kChannelsPerTask;
    std::vector<Step> steps;
    Span spans[kChannelsPerTask];
    for (int64_t task = 0; task < tasks; ++task) {
      const int64_t n0 = task * kChannelsPerTask;
      const int64_t count = std::min<int64_t>(kChannelsPerTask, view.n - n0);
      for (int64_t c = 0; c < chunks_; ++c) {
        for (int64_t j = 0; j < kChannelsPerTask; ++j) {  // padding channels have no groups
          Span span;
          if (j < count) {
            span = {rg.row_ptr[size_t(n0 + j)], rg.row_ptr[size_t(n0 + j + 1)]};
            while (span.begin < span.end && rg.kg[span.begin] < c * kChunkGroups) ++span.begin;
            uint32_t e = span.begin;
            while (e < span.end && rg.kg[e] < (c + 1) * kChunkGroups) ++e;
            span.end = e;
          }
          spans[j] = span;
        }
        if constexpr (kShared) {
          add_shared_quads(rg, spans, quads_, steps);
        } else {
          add_lockstep_quads(rg, spans, quads_, steps);
        }
      }
    }
    steps_ = AlignedBuffer<Step>(std::max<size_t>(1, steps.size()));
    std::copy(steps.begin(), steps.end(), steps_.data());
  }
  Isa isa() const override { return Isa::kAvx512Vnni; }
  std::string name() const override {
    return kShared ? "s8u8_spmm_4x4_m64__avx512_vnni" : "s8u8_spmm_1x4_m64__avx512_vnni";
  }

 protected:
  Plan plan(int64_t m) const override {
    return Plan{kBlockRows, (n() + kChannelsPerTask - 1) / kChannelsPerTask,
                size_t(padded_rows(m) * groups_along_k_ * 4)};
  }
  void prepare(const uint8_t* xq, int64_t m, int64_t block, uint8_t* layout) const override {
    pack_block(xq, m, padded_rows(m), block, layout);
  }
  void compute(const uint8_t*, const uint8_t* layout, int64_t m, int64_t block, int64_t column,
               const Epilogue& epi) const override {
    gemm_block(layout, m, padded_rows(m), block, column, epi);
  }

 private:
  static int64_t padded_rows(int64_t m) { return (m + kTileRows - 1) / kTileRows * kTileRows; }
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

  FASTONNX_AVX512 void gemm_block(const uint8_t* packed, int64_t m, int64_t mp, int64_t b,
                                  int64_t task, const Epilogue& epi) const {
    switch (tiles_in_block(mp, b)) {
      case 1: return gemm_tiles<1>(packed, m, b, task, epi);
      case 2: return gemm_tiles<2>(packed, m, b, task, epi);
      case 3: return gemm_tiles<3>(packed, m, b, task, epi);
      default: return gemm_tiles<4>(packed, m, b, task, epi);
    }
  }

  template <int T>
  FASTONNX_AVX512 void gemm_tiles(const uint8_t* packed, int64_t m, int64_t b, int64_t task,
                                  const Epilogue& epi) const {
    const int64_t kp = groups_along_k_ * 4;
    const uint8_t* xb = packed + b * kBlockRows * kp;
    const int64_t n0 = task * kChannelsPerTask;
    const int64_t count = std::min(kChannelsPerTask, n() - n0);
    alignas(64) int32_t acc[kChannelsPerTask][kBlockRows];  // [n][m]
    std::memset(acc, 0, sizeof(acc));
    const Quad* quad = quads_.data() + size_t(task * chunks_) * (kChannelsPerTask / kQuad);
    for (int64_t i = 0; i < chunks_ * (kChannelsPerTask / kQuad); ++i, ++quad) {
      dot_quad<kShared, T>(xb, steps_.data() + quad->offset, *quad, acc);
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
  std::vector<Quad> quads_;  // [task][chunk][4]
  AlignedBuffer<Step> steps_;
};

}  // namespace

std::unique_ptr<LinearKernel> make_linear_avx512_vnni(const PackedWeightView& view) {
  return std::make_unique<LinearAvx512Vnni<false>>(view);
}

std::unique_ptr<LinearKernel> make_linear_avx512_vnni_4x4(const PackedWeightView& view) {
  return std::make_unique<LinearAvx512Vnni<true>>(view);
}

}  // namespace fastonnx
