// AVX-512 fp32 path: Q K^T and P V with vfmadd231ps and the fp32 softmax of the bf16 paths
// (attention_bf16_common.h: kept keys, mask, 2^x). For CPUs whose vdpbf16ps runs at about half
// the fp32 FMA rate in multiply-adds (Intel cores without AMX: measured 0.82 ns per vdpbf16ps
// against 0.22 ns per vfmadd231ps), where bf16 saves nothing and costs its conversions.
//
// Per (batch, head) task: the kept keys are transposed to K^T [H][T] (16 keys per vector), so
// the scores of 8 query rows against 32 keys are 16 accumulators over H broadcast query values;
// P V reads V rows in place (16 head features per vector) against broadcast probabilities.
#include "attention_bf16_common.h"

namespace fastonnx::attention_detail {
namespace {

using namespace bf16;

constexpr int64_t kRows = 8;  // query rows per block

// Scores of kRows scaled queries (qs [kRows][h16]) against NB 16-key blocks from jb of K^T
// (kt [h][tcp]) into sc[r][16 * (jb + b)].
template <int NB>
FASTONNX_AVX512_BF16 inline void score_blocks(const float* qs, int64_t h16, const float* kt,
                                              int64_t tcp, int64_t h, int64_t jb, float* sc) {
  __m512 acc[kRows][NB];
  for (auto& row : acc)
    for (auto& x : row) x = _mm512_setzero_ps();
  for (int64_t i = 0; i < h; ++i) {
    __m512 kv[NB];
    for (int b = 0; b < NB; ++b) kv[b] = _mm512_load_ps(kt + i * tcp + (jb + b) * 16);
    for (int64_t r = 0; r < kRows; ++r) {
      const __m512 qv = _mm512_set1_ps(qs[r * h16 + i]);
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_fmadd_ps(qv, kv[b], acc[r][b]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r)
    for (int b = 0; b < NB; ++b) _mm512_store_ps(sc + r * tcp + (jb + b) * 16, acc[r][b]);
}

// y[r][h0 .. h0 + 16 HB) = inv[r] * sum over kept keys j of p[r][j] V[idx[j]], for R rows.
template <int R, int HB>
FASTONNX_AVX512_BF16 inline void pv_block(const float* p, int64_t tcp, const Task& t,
                                          int64_t stride, const Work& w, int64_t h0, int64_t h,
                                          const float* inv, const bool* skip, float* y,
                                          int64_t d) {
  __m512 acc[R][HB];
  for (auto& row : acc)
    for (auto& x : row) x = _mm512_setzero_ps();
  for (int64_t j = 0; j < w.tc; ++j) {
    const float* vrow = t.v + w.idx[j] * stride + h0;
    __m512 vv[HB];
    for (int b = 0; b < HB; ++b) vv[b] = _mm512_maskz_loadu_ps(lanes(h - h0 - b * 16), vrow + b * 16);
    for (int r = 0; r < R; ++r) {
      const __m512 pv = _mm512_set1_ps(p[r * tcp + j]);
      for (int b = 0; b < HB; ++b) acc[r][b] = _mm512_fmadd_ps(pv, vv[b], acc[r][b]);
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
FASTONNX_AVX512_BF16 void pv_rows(const float* p, int64_t tcp, const Task& t, int64_t stride,
                                  const Work& w, int64_t h, const float* inv, const bool* skip,
                                  float* y, int64_t d) {
  for (int64_t h0 = 0; h0 < h; h0 += 64) {
    switch ((std::min<int64_t>(64, h - h0) + 15) / 16) {
      case 1: pv_block<R, 1>(p, tcp, t, stride, w, h0, h, inv, skip, y, d); break;
      case 2: pv_block<R, 2>(p, tcp, t, stride, w, h0, h, inv, skip, y, d); break;
      case 3: pv_block<R, 3>(p, tcp, t, stride, w, h0, h, inv, skip, y, d); break;
      default: pv_block<R, 4>(p, tcp, t, stride, w, h0, h, inv, skip, y, d); break;
    }
  }
}

// Kept keys, K^T and buffers for one task; false when every key is skipped for every query
// (the output rows are then written: the mean of V).
FASTONNX_AVX512_BF16 bool prepare_f32(const AttentionArgs& a, const Task& t, Work& w, float*& kt,
                                      float*& qs) {
  const int64_t s_len = t.seq, h = a.head_size, stride = a.token_stride;
  w.h16 = round_up(h, 16);
  const int64_t sp = round_up(s_len, 16);
  Scratch& scratch = tls_scratch;
  scratch.reserve(Scratch::bytes_for(sp, 4) * 4 + Scratch::bytes_for(w.h16 * sp, 4) +
                  Scratch::bytes_for(kRows * w.h16, 4) + Scratch::bytes_for(kRows * sp, 4) * 2 +
                  Scratch::bytes_for(w.h16, 4) + Scratch::bytes_for(sp, 1) +
                  Scratch::bytes_for(256, 4));
  w.idx = scratch.take<int32_t>(sp);
  w.mrow = scratch.take<float>(sp);
  float* row_mask = scratch.take<float>(sp);
  kt = scratch.take<float>(w.h16 * sp);
  qs = scratch.take<float>(kRows * w.h16);
  w.sc = scratch.take<float>(kRows * sp);
  w.pf = scratch.take<float>(kRows * sp);
  w.vmean = scratch.take<float>(w.h16);
  int8_t* active = scratch.take<int8_t>(sp);
  w.ks = scratch.take<float>(sp);
  auto* kb = scratch.take<int32_t>(256);  // 16 keys x 16 features, before transposing
  if (t.key_scores) std::memset(w.ks, 0, size_t(sp) * 4);
  w.have_mean = false;

  if (!select_keys(a, t, sp, 16, active, w)) return false;
  const int64_t tc = w.tc;
  // K^T: each 16 keys x 16 features transposed in registers; zero past the kept keys and H.
  for (int64_t jb = 0; jb < w.tcp; jb += 16) {
    for (int64_t f0 = 0; f0 < w.h16; f0 += 16) {
      for (int64_t l = 0; l < 16; ++l) {
        const __m512 row = jb + l < tc ? _mm512_maskz_loadu_ps(lanes(h - f0),
                                                               t.k + w.idx[jb + l] * stride + f0)
                                       : _mm512_setzero_ps();
        _mm512_store_ps(reinterpret_cast<float*>(kb + l * 16), row);
      }
      avx512::transpose16x16(kb, 16, reinterpret_cast<int32_t*>(kt + f0 * w.tcp + jb), w.tcp);
    }
  }
  set_mask(t, row_mask, w);
  return true;
}

}  // namespace

FASTONNX_AVX512_BF16 void head_avx512_f32(const AttentionArgs& a, const Task& t) {
  const int64_t h = a.head_size, d = a.heads * a.head_size, stride = a.token_stride;
  Work w;
  float* kt = nullptr;
  float* qs = nullptr;
  if (!prepare_f32(a, t, w, kt, qs)) return;
  const int64_t nblk = w.tcp / 16;
  const __m512 qscale = _mm512_set1_ps(a.scale * kLog2e);  // scores in log2 units
  float inv[kRows];
  bool skip[kRows];
  for (int64_t s0 = 0; s0 < t.seq; s0 += kRows) {
    const int64_t rows = std::min(kRows, t.seq - s0);
    for (int64_t r = 0; r < kRows; ++r) {
      for (int64_t f0 = 0; f0 < w.h16; f0 += 16) {
        const __m512 q = r < rows ? _mm512_maskz_loadu_ps(lanes(h - f0),
                                                          t.q + (s0 + r) * stride + f0)
                                  : _mm512_setzero_ps();
        _mm512_store_ps(qs + r * w.h16 + f0, _mm512_mul_ps(q, qscale));
      }
    }
    int64_t jb = 0;
    for (; jb + 2 <= nblk; jb += 2) score_blocks<2>(qs, w.h16, kt, w.tcp, h, jb, w.sc);
    if (jb < nblk) score_blocks<1>(qs, w.h16, kt, w.tcp, h, jb, w.sc);
    softmax_rows<float>(a, t, s0, rows, kRows, w, inv, skip);
    if (t.key_scores) {
      for (int64_t r = 0; r < kRows; ++r) {
        if (skip[r]) continue;
        const __m512 sr = _mm512_set1_ps(inv[r]);
        for (int64_t j = 0; j < w.tcp; j += 16) {
          _mm512_store_ps(w.ks + j, _mm512_fmadd_ps(_mm512_load_ps(w.pf + r * w.tcp + j), sr,
                                                    _mm512_load_ps(w.ks + j)));
        }
      }
    }
    float* y = t.y + s0 * d;
    if (w.h16 <= 32) {
      pv_rows<8>(w.pf, w.tcp, t, stride, w, h, inv, skip, y, d);
    } else {
      pv_rows<4>(w.pf, w.tcp, t, stride, w, h, inv, skip, y, d);
      pv_rows<4>(w.pf + 4 * w.tcp, w.tcp, t, stride, w, h, inv + 4, skip + 4, y + 4 * d, d);
    }
  }
  if (t.key_scores) scatter_key_scores(w, t.key_scores);
}

}  // namespace fastonnx::attention_detail
