// AVX-512 BF16 path: Q K^T and P V with `vdpbf16ps` (fp32 accumulation), fp32 softmax. Keys are
// gathered and packed by attention_bf16_common.h; queries run 8 rows at a time.
#include "attention_bf16_common.h"

namespace fastonnx::attention_detail {
namespace {

using namespace bf16;

constexpr int64_t kRows = 8;  // query rows per block

// Scores of kRows queries against NB 16-key blocks: sc[r][16 * (jb + b)].
template <int NB>
FASTONNX_AVX512_BF16 inline void score_blocks(const uint32_t* qb, int64_t qw, const uint32_t* kp,
                                              int64_t pairs, int64_t used_pairs, int64_t jb,
                                              float* sc, int64_t scw) {
  __m512 acc[kRows][NB];
  for (auto& row : acc)
    for (auto& x : row) x = _mm512_setzero_ps();
  const uint32_t* k0 = kp + jb * pairs * 16;
  for (int64_t p = 0; p < used_pairs; ++p) {
    __m512i kv[NB];
    for (int b = 0; b < NB; ++b) kv[b] = _mm512_load_si512(k0 + (b * pairs + p) * 16);
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512i qv = _mm512_set1_epi32(int(qb[r * qw + p]));
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], as_bh(qv), as_bh(kv[b]));
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int b = 0; b < NB; ++b) _mm512_store_ps(sc + r * scw + (jb + b) * 16, acc[r][b]);
}

// y[r][h0 .. h0 + 16 HB) = inv[r] * sum_t p[r][t] V[t] for R rows.
template <int R, int HB>
FASTONNX_AVX512_BF16 inline void pv_block(const uint16_t* pb, int64_t pbw, const uint32_t* vp,
                                          int64_t vw, int64_t npairs, int64_t h0, int64_t h,
                                          const float* inv, const bool* skip, float* y,
                                          int64_t d) {
  __m512 acc[R][HB];
  for (auto& row : acc)
    for (auto& x : row) x = _mm512_setzero_ps();
  for (int64_t pp = 0; pp < npairs; ++pp) {
    __m512i vv[HB];
    for (int b = 0; b < HB; ++b) vv[b] = _mm512_load_si512(vp + pp * vw + h0 + b * 16);
    for (int r = 0; r < R; ++r) {
      uint32_t pair;
      std::memcpy(&pair, pb + r * pbw + 2 * pp, 4);
      const __m512i pv = _mm512_set1_epi32(int(pair));
      for (int b = 0; b < HB; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], as_bh(pv), as_bh(vv[b]));
    }
  }
  for (int r = 0; r < R; ++r) {
    if (skip[r]) continue;
    const __m512 s = _mm512_set1_ps(inv[r]);
    for (int b = 0; b < HB; ++b) {
      const int64_t hh = h0 + b * 16;
      _mm512_mask_storeu_ps(y + r * d + hh, lanes(h - hh), _mm512_mul_ps(acc[r][b], s));
    }
  }
}

template <int R>
FASTONNX_AVX512_BF16 void pv_rows(const uint16_t* pb, int64_t pbw, const uint32_t* vp, int64_t vw,
                                  int64_t npairs, int64_t h, const float* inv, const bool* skip,
                                  float* y, int64_t d) {
  for (int64_t h0 = 0; h0 < h; h0 += 64) {
    switch ((std::min<int64_t>(64, h - h0) + 15) / 16) {
      case 1: pv_block<R, 1>(pb, pbw, vp, vw, npairs, h0, h, inv, skip, y, d); break;
      case 2: pv_block<R, 2>(pb, pbw, vp, vw, npairs, h0, h, inv, skip, y, d); break;
      case 3: pv_block<R, 3>(pb, pbw, vp, vw, npairs, h0, h, inv, skip, y, d); break;
      default: pv_block<R, 4>(pb, pbw, vp, vw, npairs, h0, h, inv, skip, y, d); break;
    }
  }
}

}  // namespace

FASTONNX_AVX512_BF16 void head_avx512_bf16(const AttentionArgs& a, const Task& t) {
  const int64_t h = a.head_size, d = a.heads * a.head_size;
  Work w;
  if (!prepare(a, t, kRows, 16, w)) return;
  const int64_t nblk = w.tcp / 16, npairs = (w.tc + 1) / 2, used_pairs = (h + 1) / 2;
  float inv[kRows];
  bool skip[kRows];
  for (int64_t s0 = 0; s0 < t.seq; s0 += kRows) {
    const int64_t rows = std::min(kRows, t.seq - s0);
    load_queries(a, t, s0, rows, kRows, w);
    int64_t jb = 0;
    for (; jb + 2 <= nblk; jb += 2) score_blocks<2>(w.qb, w.qw, w.kp, w.kpairs, used_pairs, jb, w.sc, w.tcp);
    if (jb < nblk) score_blocks<1>(w.qb, w.qw, w.kp, w.kpairs, used_pairs, jb, w.sc, w.tcp);
    softmax_rows<uint16_t>(a, t, s0, rows, kRows, w, inv, skip);
    if (t.key_scores) add_key_scores(w, kRows, inv, skip);
    float* y = t.y + s0 * d;
    if (w.h16 <= 32) {
      pv_rows<8>(w.pb, w.tcp, w.vp, w.h16, npairs, h, inv, skip, y, d);
    } else {
      pv_rows<4>(w.pb, w.tcp, w.vp, w.h16, npairs, h, inv, skip, y, d);
      pv_rows<4>(w.pb + 4 * w.tcp, w.tcp, w.vp, w.h16, npairs, h, inv + 4, skip + 4, y + 4 * d, d);
    }
  }
  if (t.key_scores) scatter_key_scores(w, t.key_scores);
}

}  // namespace fastonnx::attention_detail
