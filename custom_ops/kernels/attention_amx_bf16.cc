// AMX-BF16 path: Q K^T and P V as `tdpbf16ps` tiles (16 queries x 16 keys x 32 features, and
// 16 queries x 16 features x 32 keys), fp32 softmax between them. Keys are gathered and packed
// by attention_bf16_common.h: its K blocks and V pairs are exactly the B-tile layouts.
#include "amx_tiles.h"
#include "attention_bf16_common.h"

#define FASTONNX_AMX_BF16                                                                   \
  __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512dq,avx512vl,avx512vnni," \
                        "avx512bf16,fma")))

namespace fastonnx::attention_detail {
namespace {

using namespace bf16;

constexpr int64_t kRows = 16;  // query rows per block: one tile

// Every tile 16 rows x 64 bytes (amx::full_tiles). 0-3: fp32 accumulators, 4: A (queries or
// probabilities), 5-6: B (key blocks or value pairs).

// sc[16][tcp] = Q K^T for the block's 16 queries, two 16-key blocks per step.
FASTONNX_AMX_BF16 void scores(const Work& w) {
  const int64_t chunks = w.hp / 32, nblk = w.tcp / 16;
  for (int64_t jb = 0; jb < nblk; jb += 2) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t c = 0; c < chunks; ++c) {
      _tile_loadd(4, w.qb + c * 16, w.qw * 4);
      _tile_loadd(5, w.kp + (jb * w.kpairs + c * 16) * 16, 64);
      _tile_loadd(6, w.kp + ((jb + 1) * w.kpairs + c * 16) * 16, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
    }
    _tile_stored(0, w.sc + jb * 16, w.tcp * 4);
    _tile_stored(1, w.sc + (jb + 1) * 16, w.tcp * 4);
  }
}

// out[16][64] (stride 64 floats) = P V for features h0 .. h0 + 16 NH.
template <int NH>
FASTONNX_AMX_BF16 void pv_tiles(const Work& w, int64_t h0, float* out) {
  _tile_zero(0);
  if constexpr (NH > 1) _tile_zero(1);
  if constexpr (NH > 2) _tile_zero(2);
  if constexpr (NH > 3) _tile_zero(3);
  const int64_t vstride = w.h16 * 4;
  for (int64_t c = 0; c < w.tcp / 32; ++c) {
    const uint32_t* v = w.vp + c * 16 * w.h16 + h0;
    _tile_loadd(4, w.pb + c * 32, w.tcp * 2);
    _tile_loadd(5, v, vstride);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (NH > 1) {
      _tile_loadd(6, v + 16, vstride);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (NH > 2) {
      _tile_loadd(5, v + 32, vstride);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (NH > 3) {
      _tile_loadd(6, v + 48, vstride);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  _tile_stored(0, out, 256);
  if constexpr (NH > 1) _tile_stored(1, out + 16, 256);
  if constexpr (NH > 2) _tile_stored(2, out + 32, 256);
  if constexpr (NH > 3) _tile_stored(3, out + 48, 256);
}

}  // namespace

FASTONNX_AMX_BF16 void head_amx_bf16(const AttentionArgs& a, const Task& t) {
  const int64_t h = a.head_size, d = a.heads * a.head_size;
  Work w;
  if (!prepare(a, t, kRows, 32, w)) return;
  static const amx::TileConfig config = amx::full_tiles();
  _tile_loadconfig(&config);
  alignas(64) float out[kRows * 64];
  float inv[kRows];
  bool skip[kRows];
  for (int64_t s0 = 0; s0 < t.seq; s0 += kRows) {
    const int64_t rows = std::min(kRows, t.seq - s0);
    load_queries(a, t, s0, rows, kRows, w);
    scores(w);
    softmax_rows<uint16_t>(a, t, s0, rows, kRows, w, inv, skip);
    if (t.key_scores) add_key_scores(w, kRows, inv, skip);
    for (int64_t h0 = 0; h0 < h; h0 += 64) {
      switch ((std::min<int64_t>(64, h - h0) + 15) / 16) {
        case 1: pv_tiles<1>(w, h0, out); break;
        case 2: pv_tiles<2>(w, h0, out); break;
        case 3: pv_tiles<3>(w, h0, out); break;
        default: pv_tiles<4>(w, h0, out); break;
      }
      for (int64_t r = 0; r < rows; ++r) {
        if (skip[r]) continue;
        const __m512 s = _mm512_set1_ps(inv[r]);
        float* y = t.y + (s0 + r) * d + h0;
        for (int64_t hh = 0; hh < std::min<int64_t>(64, h - h0); hh += 16) {
          _mm512_mask_storeu_ps(y + hh, lanes(h - h0 - hh),
                                _mm512_mul_ps(_mm512_load_ps(out + r * 64 + hh), s));
        }
      }
    }
  }
  _tile_release();
  if (t.key_scores) scatter_key_scores(w, t.key_scores);
}

}  // namespace fastonnx::attention_detail
