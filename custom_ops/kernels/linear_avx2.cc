// AVX2 path (no VNNI): the same weight-stationary 1x4-group scheme as the AVX-512 VNNI path,
// with 8-row tiles. Activations are widened to int16 and multiplied with vpmaddwd, which is
// exact (vpmaddubsw would saturate u8*s8 pair sums at int16).
//   blocks of up to 32 rows (T = 1..4 tiles of 8 rows); inside a block, int16 element
//   ((g * T + t) * 2 + h) * 16 + r * 2 + i  =  xq[row 8t + r][4g + 2h + i].
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "aligned_buffer.h"
#include "avx2_common.h"
#include "linear.h"
#include "sparse_groups.h"

namespace fastonnx {
namespace {

constexpr int64_t kTileRows = 8;
constexpr int64_t kMaxTiles = 4;
constexpr int64_t kBlockRows = kTileRows * kMaxTiles;
constexpr int64_t kChannelsPerTask = 16;
// Wide layers walk K in slices of this many groups (384 features: 32 rows x 384 int16 = 24 KiB,
// in L1), each slice for all of a task's channels, instead of each channel's whole K against a
// block read from L2. Measured side by side on an AMD EPYC Zen 3: 1.13-1.92x faster at K = 1536
// and 3072 with 70-85% zero groups, 0.9x at 90% (about 10 groups per channel and slice: the
// per-call cost wins) and no gain at K = 768; hence only for K > 768 and denser weights.
constexpr int64_t kSliceGroups = 96;
constexpr double kSliceMinDensity = 0.15;

struct Group {
  uint32_t kg;
  int32_t w01;  // weights 0 and 1 as two int16
  int32_t w23;
};

// GELU with erf from Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7), on N vectors step by
// step: one vector's chain (a division, an exp, about 25 dependent operations) is ~100 cycles
// of latency, which the out-of-order window only partly hides; interleaving 8 independent rows
// made a 128 x 1536 GELU epilogue 4x faster on an AMD EPYC Zen 3.
// exp(-az^2) = 2^n * exp(r), r = -az^2 - n*ln2; degree-6 Taylor on r; 2^n in the exponent bits.
template <int N>
FASTONNX_AVX2 static inline void gelu_ps(__m256* x) {
  const __m256 sign_bit = _mm256_set1_ps(-0.f), one = _mm256_set1_ps(1.f);
  __m256 z[N], t[N], p[N], r[N], n[N];
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) {
    z[j] = _mm256_mul_ps(x[j], _mm256_set1_ps(0.70710678118654752f));
    const __m256 az = _mm256_andnot_ps(sign_bit, z[j]);
    t[j] = _mm256_div_ps(one, _mm256_fmadd_ps(az, _mm256_set1_ps(0.3275911f), one));
    // -az^2 clamped to exp's range (the upper bound is 0 here).
    r[j] = _mm256_max_ps(_mm256_mul_ps(_mm256_xor_ps(az, sign_bit), az), _mm256_set1_ps(-87.f));
  }
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) {
    p[j] = _mm256_fmadd_ps(_mm256_set1_ps(1.061405429f), t[j], _mm256_set1_ps(-1.453152027f));
    p[j] = _mm256_fmadd_ps(p[j], t[j], _mm256_set1_ps(1.421413741f));
    p[j] = _mm256_fmadd_ps(p[j], t[j], _mm256_set1_ps(-0.284496736f));
    p[j] = _mm256_fmadd_ps(p[j], t[j], _mm256_set1_ps(0.254829592f));
    p[j] = _mm256_mul_ps(p[j], t[j]);
    n[j] = _mm256_round_ps(_mm256_mul_ps(r[j], _mm256_set1_ps(1.44269504088896341f)),
                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r[j] = _mm256_fnmadd_ps(n[j], _mm256_set1_ps(0.693359375f), r[j]);
    r[j] = _mm256_fnmadd_ps(n[j], _mm256_set1_ps(-2.12194440e-4f), r[j]);
  }
#pragma GCC unroll 8
  for (int j = 0; j < N; ++j) {
    __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 720), r[j], _mm256_set1_ps(1.f / 120));
    q = _mm256_fmadd_ps(q, r[j], _mm256_set1_ps(1.f / 24));
    q = _mm256_fmadd_ps(q, r[j], _mm256_set1_ps(1.f / 6));
    q = _mm256_fmadd_ps(q, r[j], _mm256_set1_ps(0.5f));
    q = _mm256_fmadd_ps(q, r[j], one);
    q = _mm256_fmadd_ps(q, r[j], one);
    const __m256i bits =
        _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n[j]), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(q, _mm256_castsi256_ps(bits));
    const __m256 erf_abs = _mm256_fnmadd_ps(p[j], e, one);
    const __m256 erf = _mm256_or_ps(erf_abs, _mm256_and_ps(sign_bit, z[j]));
    x[j] = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x[j]), _mm256_add_ps(one, erf));
  }
}

// Vector epilogue of up to 8 rows row0.. (v[r] holds row row0 + r's channels n0..n0+count,
// count <= 8). Mirrors scalar::epilogue operation for operation; raw accumulators, uint8 outputs
// and short channel runs go through it.
FASTONNX_AVX2 static void epilogue_rows8(const LinearKernel::Epilogue& e, int64_t row0,
                                         int64_t rows, int64_t n0, int64_t count,
                                         const __m256i* v) {
  if (e.args == nullptr || e.args->yq != nullptr || count < 8) {
    for (int64_t r = 0; r < rows; ++r) {
      alignas(32) int32_t acc[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(acc), v[r]);
      if (e.args == nullptr) {
        std::memcpy(e.raw + (row0 + r) * e.n + n0, acc, size_t(count) * sizeof(int32_t));
      } else {
        scalar::epilogue(e, row0 + r, n0, count, acc);
      }
    }
    return;
  }
  const LinearArgs& a = *e.args;
  const __m256i wsum = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e.wsum + n0));
  const __m256 wscale = _mm256_loadu_ps(e.wscale + n0);
  const __m256 bias = a.bias ? _mm256_loadu_ps(a.bias + n0) : _mm256_setzero_ps();
  __m256 y[8];
  for (int64_t r = 0; r < 8; ++r) {
    if (r >= rows) {  // rows past the tile's: computed (no branch in GELU), never stored
      y[r] = _mm256_setzero_ps();
      continue;
    }
    const __m256i d = _mm256_sub_epi32(v[r], _mm256_mullo_epi32(_mm256_set1_epi32(e.row_zp[row0 + r]), wsum));
    const __m256 sx = _mm256_set1_ps(e.row_scale[row0 + r]);
    y[r] = _mm256_mul_ps(_mm256_cvtepi32_ps(d), _mm256_mul_ps(sx, wscale));
    if (a.bias) y[r] = _mm256_add_ps(y[r], bias);
  }
  if (a.activation == Activation::kGelu) gelu_ps<8>(y);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t off = (row0 + r) * e.n + n0;
    if (a.residual) y[r] = _mm256_add_ps(y[r], _mm256_loadu_ps(a.residual + off));
    _mm256_storeu_ps(a.y + off, y[r]);
  }
}

int32_t pair(int8_t lo, int8_t hi) {
  return static_cast<int32_t>(static_cast<uint16_t>(int16_t{lo}) |
                              (static_cast<uint32_t>(static_cast<uint16_t>(int16_t{hi})) << 16));
}

template <int T>
FASTONNX_AVX2 static void dot_channel(const int16_t* xb, const Group* g, const Group* end,
                                      int32_t* out) {
  __m256i acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_load_si256(reinterpret_cast<const __m256i*>(out + t * 8));
  for (; g < end; ++g) {
    const __m256i w01 = _mm256_set1_epi32(g->w01), w23 = _mm256_set1_epi32(g->w23);
    const int16_t* p = xb + size_t{g->kg} * (T * 32);
    for (int t = 0; t < T; ++t) {
      const __m256i lo = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + t * 32));
      const __m256i hi = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + t * 32 + 16));
      acc[t] = _mm256_add_epi32(acc[t], _mm256_add_epi32(_mm256_madd_epi16(lo, w01),
                                                         _mm256_madd_epi16(hi, w23)));
    }
  }
  for (int t = 0; t < T; ++t) _mm256_store_si256(reinterpret_cast<__m256i*>(out + t * 8), acc[t]);
}

using DotFn = void (*)(const int16_t*, const Group*, const Group*, int32_t*);
constexpr DotFn kDot[kMaxTiles + 1] = {nullptr, dot_channel<1>, dot_channel<2>, dot_channel<3>,
                                       dot_channel<4>};

class LinearAvx2 final : public LinearKernel {
 public:
  explicit LinearAvx2(const PackedWeightView& view)
      : LinearKernel(view.n, view.k), groups_along_k_((int64_t{view.k} + 3) / 4) {
    set_channel_data(view);
    const RowGroups rg = row_groups_1x4(view);
    row_ptr_ = rg.row_ptr;
    groups_ = AlignedBuffer<Group>(rg.kg.size());
    for (size_t i = 0; i < rg.kg.size(); ++i) {
      const auto& w = rg.w[i];
      groups_[i] = Group{rg.kg[i], pair(w[0], w[1]), pair(w[2], w[3])};
    }
    // Where each K slice starts in each channel's groups, which row_groups_1x4 yields in K order
    // (the blob's block columns are validated strictly ascending).
    const double density = double(rg.kg.size()) / double(std::max<int64_t>(1, n() * groups_along_k_));
    const bool sliced = groups_along_k_ > 2 * kSliceGroups && density >= kSliceMinDensity;
    const int64_t slice_groups = sliced ? kSliceGroups : std::max<int64_t>(1, groups_along_k_);
    slices_ = (groups_along_k_ + slice_groups - 1) / slice_groups;
    slice_ptr_.resize(size_t(n() * (slices_ + 1)));
    for (int64_t c = 0; c < n(); ++c) {
      const Group* first = groups_.data() + row_ptr_[size_t(c)];
      const Group* last = groups_.data() + row_ptr_[size_t(c + 1)];
      for (int64_t q = 0; q <= slices_; ++q) {
        const Group* at = std::lower_bound(first, last, uint32_t(q * slice_groups),
                                           [](const Group& x, uint32_t kg) { return x.kg < kg; });
        slice_ptr_[size_t(c * (slices_ + 1) + q)] = uint32_t(at - groups_.data());
      }
    }
  }
  Isa isa() const override { return Isa::kAvx2; }
  std::string name() const override { return "s8u8_spmm_1x4_m32__avx2"; }

 protected:
  Plan plan(int64_t m) const override {
    return Plan{kBlockRows, (n() + kChannelsPerTask - 1) / kChannelsPerTask,
                size_t(padded_rows(m) * groups_along_k_ * 4) * sizeof(int16_t)};
  }
  void prepare(const uint8_t* xq, int64_t m, int64_t block, uint8_t* layout) const override {
    pack_block(xq, m, padded_rows(m), block, reinterpret_cast<int16_t*>(layout));
  }
  void compute(const uint8_t*, const uint8_t* layout, int64_t m, int64_t block, int64_t column,
               const Epilogue& epi) const override {
    gemm_block(reinterpret_cast<const int16_t*>(layout), m, padded_rows(m), block, column, epi);
  }
  void quantize_rows(const float* x, int64_t rows, bool per_tensor, float x_scale, uint8_t x_zp,
                     float* row_scale, int32_t* row_zp, uint8_t* out) const override {
    avx2::quantize_rows(x, rows, k(), per_tensor, x_scale, x_zp, row_scale, row_zp, out);
  }

 private:
  static int64_t padded_rows(int64_t m) { return (m + kTileRows - 1) / kTileRows * kTileRows; }
  static int64_t tiles_in_block(int64_t mp, int64_t b) {
    return std::min(kMaxTiles, (mp - b * kBlockRows) / kTileRows);
  }

  // In int32 units (pairs of int16), pair p = 2g + h of row 8t + r goes to ((g*T + t)*2 + h)*8
  // + r: for 8 rows and 8 pairs (16 features) that is an 8x8 transpose of the rows' widened
  // bytes, each output vector one pair of all 8 rows.
  FASTONNX_AVX2 void pack_block(const uint8_t* xq, int64_t m, int64_t mp, int64_t b,
                                int16_t* packed) const {
    const int64_t k = this->k(), kp = groups_along_k_ * 4, T = tiles_in_block(mp, b);
    int16_t* dst = packed + b * kBlockRows * kp;
    int32_t* dst32 = reinterpret_cast<int32_t*>(dst);
    const int64_t k16 = k / 16 * 16;
    alignas(32) uint8_t row_bytes[kTileRows][16];
    for (int64_t t = 0; t < T; ++t) {
      const int64_t row0 = b * kBlockRows + t * kTileRows;
      const int64_t live = std::clamp<int64_t>(m - row0, 0, kTileRows);  // rows past M: zero
      for (int64_t i0 = 0; i0 < kp; i0 += 16) {
        __m256i v[kTileRows];
        for (int64_t r = 0; r < kTileRows; ++r) {
          const uint8_t* src = xq + (row0 + r) * k + i0;
          __m128i bytes;
          if (r >= live) {
            bytes = _mm_setzero_si128();
          } else if (i0 < k16) {
            bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
          } else {  // the K tail, zero padded to the group
            std::memset(row_bytes[r], 0, 16);
            std::memcpy(row_bytes[r], src, size_t(k - i0));
            bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(row_bytes[r]));
          }
          v[r] = _mm256_cvtepu8_epi16(bytes);  // 8 int32 pairs of row r
        }
        transpose8x8(v);  // v[p] = pair i0/2 + p of the 8 rows
        const int64_t pairs = std::min<int64_t>(8, (kp - i0) / 2);
        for (int64_t p = 0; p < pairs; ++p) {
          const int64_t pair = i0 / 2 + p, g = pair / 2, h = pair % 2;
          _mm256_store_si256(reinterpret_cast<__m256i*>(dst32 + ((g * T + t) * 2 + h) * 8), v[p]);
        }
      }
    }
  }

  FASTONNX_AVX2 static void transpose8x8(__m256i* v) {
    __m256 r[8], u[8];
    for (int i = 0; i < 8; ++i) r[i] = _mm256_castsi256_ps(v[i]);
    for (int i = 0; i < 8; i += 2) {
      u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
      u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
      r[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
      r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
      r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
      r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; ++i) {
      v[i] = _mm256_castps_si256(_mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
      v[i + 4] = _mm256_castps_si256(_mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
  }

  FASTONNX_AVX2 void gemm_block(const int16_t* packed, int64_t m, int64_t mp, int64_t b, int64_t chunk,
                  const Epilogue& epi) const {
    const int64_t kp = groups_along_k_ * 4, T = tiles_in_block(mp, b);
    const int16_t* xb = packed + b * kBlockRows * kp;
    const int64_t n0 = chunk * kChannelsPerTask;
    const int64_t count = std::min(kChannelsPerTask, n() - n0);
    alignas(32) int32_t acc[kChannelsPerTask][kBlockRows];  // [n][m]
    for (int64_t j = 0; j < count; ++j) std::memset(acc[j], 0, size_t(T * kTileRows) * 4);
    for (int64_t q = 0; q < slices_; ++q) {
      for (int64_t j = 0; j < count; ++j) {
        const uint32_t* at = slice_ptr_.data() + (n0 + j) * (slices_ + 1) + q;
        if (at[0] < at[1]) kDot[T](xb, groups_.data() + at[0], groups_.data() + at[1], acc[j]);
      }
    }
    // acc is [channel][row]: each 8 rows x 8 channels transposed to rows of 8 channels.
    const int64_t rows = std::min(T * kTileRows, m - b * kBlockRows);
    for (int64_t c0 = 0; c0 < count; c0 += 8) {
      const int64_t lanes = std::min<int64_t>(8, count - c0);
      for (int64_t t = 0; t * kTileRows < rows; ++t) {
        __m256i v[8];
        for (int64_t j = 0; j < 8; ++j) {
          v[j] = j < lanes ? _mm256_load_si256(reinterpret_cast<const __m256i*>(acc[c0 + j] + t * 8))
                           : _mm256_setzero_si256();
        }
        transpose8x8(v);
        const int64_t tile_rows = std::min(kTileRows, rows - t * kTileRows);
        epilogue_rows8(epi, b * kBlockRows + t * kTileRows, tile_rows, n0 + c0, lanes, v);
      }
    }
  }

  int64_t groups_along_k_;
  std::vector<uint32_t> row_ptr_;
  int64_t slices_ = 1;
  std::vector<uint32_t> slice_ptr_;  // [n][slices_ + 1]: channel c's groups of slice q start here
  AlignedBuffer<Group> groups_;
};

}  // namespace

std::unique_ptr<LinearKernel> make_linear_avx2(const PackedWeightView& view) {
  return std::make_unique<LinearAvx2>(view);
}

}  // namespace fastonnx
