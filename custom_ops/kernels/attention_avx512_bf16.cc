// AVX-512 BF16 path: Q K^T and P V in bf16 with `vdpbf16ps` (fp32 accumulation), softmax in
// fp32. Per (batch, head) task:
//
// 1. the keys not skipped by the mask (mask > kSkipThreshold for some query) are gathered, so
//    padded keys cost nothing further;
// 2. K is packed as 16-key blocks of bf16 pairs [block][H/2][16 keys] (one `vdpbf16ps` gives 16
//    scores of one query), V as key pairs [T/2][H][2] (one gives 16 head features);
// 3. queries run 8 rows at a time: scores, fp32 softmax (probabilities rounded to bf16), P V.
//
// Scratch is per thread and grows with S (never S x S).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "aligned_buffer.h"
#include "attention.h"
#include "avx512_common.h"

#define FASTONNX_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16,fma")))

namespace fastonnx::attention_detail {
namespace {

constexpr int64_t kRows = 8;  // query rows per block

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One growing buffer per thread, carved into the task's arrays.
class Scratch {
 public:
  void reserve(size_t bytes) {
    if (buf_.size() < bytes) buf_ = AlignedBuffer<uint8_t>(bytes);
    used_ = 0;
  }
  template <class T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(buf_.data() + used_);
    used_ += size_t(round_up(int64_t(sizeof(T)) * count, 64));
    return p;
  }
  static size_t bytes_for(int64_t count, size_t size) {
    return size_t(round_up(int64_t(size) * count, 64));
  }

 private:
  AlignedBuffer<uint8_t> buf_;
  size_t used_ = 0;
};

thread_local Scratch tls_scratch;

FASTONNX_AVX512_BF16 inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

FASTONNX_AVX512_BF16 inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Row x[0..h) * scale -> bf16 pairs out[0..hp/2) (hp = H rounded up to 32, zero-padded).
FASTONNX_AVX512_BF16 inline void row_to_bf16(const float* x, int64_t h, int64_t hp, float scale,
                                             uint32_t* out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < hp; i += 32) {
    const __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(h - i), x + i), s);
    const __m512 hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(h - i - 16), x + i + 16), s);
    _mm512_store_si512(out + i / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// Scores of kRows queries against NB 16-key blocks: sc[r][16 * (jb + b)].
template <int NB>
FASTONNX_AVX512_BF16 inline void score_blocks(const uint32_t* qb, int64_t qw, const uint32_t* kp,
                                              int64_t pairs, int64_t jb, float* sc, int64_t scw) {
  __m512 acc[kRows][NB];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  const uint32_t* k0 = kp + jb * pairs * 16;
  for (int64_t p = 0; p < pairs; ++p) {
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

// y[r][h0 .. h0 + 16 HB) = inv[r] * sum_t p[r][t] V[t]; R rows starting at pb.
template <int R, int HB>
FASTONNX_AVX512_BF16 inline void pv_block(const uint16_t* pb, int64_t pbw, const uint32_t* vp,
                                          int64_t vw, int64_t npairs, int64_t h0, int64_t h,
                                          const float* inv, const bool* skip, float* y,
                                          int64_t d) {
  __m512 acc[R][HB];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
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

// Mean of V over all S keys into vmean (16-aligned, H rounded up to 16).
FASTONNX_AVX512_BF16 const float* mean_v(const float* v, int64_t s_len, int64_t h, int64_t stride,
                                         float* vmean) {
  for (int64_t h0 = 0; h0 < h; h0 += 16) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < s_len; ++j) {
      sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(lanes(h - h0), v + j * stride + h0));
    }
    _mm512_store_ps(vmean + h0, _mm512_div_ps(sum, _mm512_set1_ps(float(s_len))));
  }
  return vmean;
}

// The mask row m at the gathered keys idx[0..tc): -inf for skipped keys and padding lanes up to
// tc16; m null: 0 (no mask).
FASTONNX_AVX512_BF16 void gather_mask(const float* m, const int32_t* idx, int64_t tc, int64_t tc16,
                                      float* out) {
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < tc16; j += 16) {
    __m512 x = _mm512_setzero_ps();
    if (m) {
      x = _mm512_i32gather_ps(_mm512_loadu_si512(idx + j), m, 4);
      x = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(kSkipThreshold), _CMP_LE_OQ),
                               x, neg_inf);
    }
    _mm512_store_ps(out + j, _mm512_mask_blend_ps(lanes(tc - j), neg_inf, x));
  }
}

}  // namespace

FASTONNX_AVX512_BF16 void head_avx512_bf16(const AttentionArgs& a, const Task& t) {
  const int64_t s_len = a.seq, h = a.head_size, stride = a.token_stride;
  const int64_t d = a.heads * a.head_size;
  const int64_t hp = round_up(h, 32), qw = hp / 2, pairs = (h + 1) / 2, h16 = round_up(h, 16);
  const int64_t s16 = round_up(s_len, 16);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  const __m512 threshold = _mm512_set1_ps(kSkipThreshold);

  Scratch& scratch = tls_scratch;
  const size_t bytes = Scratch::bytes_for(s16, 4) * 4          // idx, mask rows, active
                       + Scratch::bytes_for(s16 * pairs, 4)    // kp
                       + Scratch::bytes_for(16 * qw, 4)        // kb
                       + Scratch::bytes_for(s16 / 2 * h16, 4)  // vp
                       + Scratch::bytes_for(kRows * qw, 4)     // qb
                       + Scratch::bytes_for(kRows * s16, 4)    // sc
                       + Scratch::bytes_for(kRows * s16, 2)    // pb
                       + Scratch::bytes_for(h16, 4) + 4 * 64;  // vmean, slack
  scratch.reserve(bytes);
  int32_t* idx = scratch.take<int32_t>(s16);
  float* mrow = scratch.take<float>(s16);
  uint32_t* kp = scratch.take<uint32_t>(s16 * pairs);
  uint32_t* kb = scratch.take<uint32_t>(16 * qw);
  uint32_t* vp = scratch.take<uint32_t>(s16 / 2 * h16);
  uint32_t* qb = scratch.take<uint32_t>(kRows * qw);
  float* sc = scratch.take<float>(kRows * s16);
  uint16_t* pb = scratch.take<uint16_t>(kRows * s16);
  float* vmean = scratch.take<float>(h16);
  int8_t* active = reinterpret_cast<int8_t*>(scratch.take<int32_t>(s16));

  // 1. Keys some query attends to.
  int64_t tc = 0;
  if (!t.mask) {
    for (int64_t j = 0; j < s_len; ++j) idx[j] = int32_t(j);
    tc = s_len;
  } else {
    const int64_t rows = t.mask_row_stride == 0 ? 1 : s_len;
    std::memset(active, 0, size_t(s16));
    for (int64_t s = 0; s < rows; ++s) {
      const float* m = t.mask + s * t.mask_row_stride;
      for (int64_t j = 0; j < s_len; j += 16) {
        // Not (m <= threshold): NaN masks stay in and propagate as in the reference.
        const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(lanes(s_len - j), m + j),
                                                  threshold, _CMP_NLE_UQ) & lanes(s_len - j);
        const __m128i cur = _mm_loadu_si128(reinterpret_cast<const __m128i*>(active + j));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(active + j),
                         _mm_or_si128(cur, _mm_maskz_set1_epi8(keep, 1)));
      }
    }
    for (int64_t j = 0; j < s_len; ++j) {
      idx[tc] = int32_t(j);
      tc += active[j];
    }
  }

  // Mean of V over all keys: the result of rows whose keys are all skipped (see attention.h).
  bool have_mean = false;
  if (tc == 0) {
    const float* mean = mean_v(t.v, s_len, h, stride, vmean);
    for (int64_t s = 0; s < s_len; ++s) std::memcpy(t.y + s * d, mean, size_t(h) * 4);
    return;
  }
  const int64_t tc16 = round_up(tc, 16), nblk = tc16 / 16, npairs = (tc + 1) / 2;
  for (int64_t j = tc; j < tc16; ++j) idx[j] = idx[0];  // in-bounds gathers; masked below

  // 2. Pack K (16-key blocks of bf16 pairs) and V (key pairs).
  const __m512i lane_rows = _mm512_mullo_epi32(
      _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), _mm512_set1_epi32(int(qw)));
  for (int64_t jb = 0; jb < nblk; ++jb) {
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t j = jb * 16 + l;
      if (j < tc) {
        row_to_bf16(t.k + idx[j] * stride, h, hp, 1.f, kb + l * qw);
      } else {
        std::memset(kb + l * qw, 0, size_t(qw) * 4);
      }
    }
    for (int64_t p = 0; p < pairs; ++p) {
      const __m512i col = _mm512_i32gather_epi32(
          _mm512_add_epi32(lane_rows, _mm512_set1_epi32(int(p))), kb, 4);
      _mm512_store_si512(kp + (jb * pairs + p) * 16, col);
    }
  }
  // Interleave two bf16 rows a, b into pairs (a[i], b[i]).
  const __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                              24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
                                              1, 16, 0);
  for (int64_t pp = 0; pp < npairs; ++pp) {
    const float* va = t.v + idx[2 * pp] * stride;
    const bool has_b = 2 * pp + 1 < tc;
    const float* vb = t.v + idx[has_b ? 2 * pp + 1 : 0] * stride;
    for (int64_t h0 = 0; h0 < h16; h0 += 16) {
      const __m512 xa = _mm512_maskz_loadu_ps(lanes(h - h0), va + h0);
      const __m512 xb = has_b ? _mm512_maskz_loadu_ps(lanes(h - h0), vb + h0) : _mm512_setzero_ps();
      const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(xb, xa);
      _mm512_store_si512(vp + pp * h16 + h0, _mm512_permutexvar_epi16(interleave, ab));
    }
  }

  const bool per_row_mask = t.mask && t.mask_row_stride != 0;
  if (!per_row_mask) gather_mask(t.mask, idx, tc, tc16, mrow);
  float* row_mask = per_row_mask ? scratch.take<float>(s16) : mrow;

  // 3. Query blocks.
  float inv[kRows];
  bool skip[kRows];
  for (int64_t s0 = 0; s0 < s_len; s0 += kRows) {
    const int64_t rows = std::min(kRows, s_len - s0);
    for (int64_t r = 0; r < kRows; ++r) {
      if (r < rows) {
        row_to_bf16(t.q + (s0 + r) * stride, h, hp, a.scale, qb + r * qw);
      } else {
        std::memset(qb + r * qw, 0, size_t(qw) * 4);
      }
    }
    int64_t jb = 0;
    for (; jb + 2 <= nblk; jb += 2) score_blocks<2>(qb, qw, kp, pairs, jb, sc, tc16);
    if (jb < nblk) score_blocks<1>(qb, qw, kp, pairs, jb, sc, tc16);

    for (int64_t r = 0; r < kRows; ++r) {
      uint16_t* prow = pb + r * tc16;
      skip[r] = r >= rows;
      if (skip[r]) {
        std::memset(prow, 0, size_t(tc16) * 2);
        continue;
      }
      if (per_row_mask) gather_mask(t.mask + (s0 + r) * t.mask_row_stride, idx, tc, tc16, row_mask);
      float* x = sc + r * tc16;
      __m512 vmax = neg_inf;
      for (int64_t j = 0; j < tc16; j += 16) {
        const __m512 v = _mm512_add_ps(_mm512_load_ps(x + j), _mm512_load_ps(row_mask + j));
        _mm512_store_ps(x + j, v);
        vmax = _mm512_max_ps(vmax, v);
      }
      const float max = _mm512_reduce_max_ps(vmax);
      if (max == -INFINITY) {  // every key of this row skipped
        if (!have_mean) mean_v(t.v, s_len, h, stride, vmean);
        have_mean = true;
        std::memcpy(t.y + (s0 + r) * d, vmean, size_t(h) * 4);
        std::memset(prow, 0, size_t(tc16) * 2);
        skip[r] = true;
        continue;
      }
      const __m512 vm = _mm512_set1_ps(max);
      const __m512 cutoff = _mm512_set1_ps(-87.f);
      __m512 vsum = _mm512_setzero_ps();
      for (int64_t j = 0; j < tc16; j += 16) {
        const __m512 z = _mm512_sub_ps(_mm512_load_ps(x + j), vm);
        // exp_ps clamps at -87; below that (and for skipped keys, -inf) the weight is exactly 0.
        const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, cutoff, _CMP_GE_OQ),
                                             avx512::exp_ps(z));
        vsum = _mm512_add_ps(vsum, e);
        _mm256_store_si256(reinterpret_cast<__m256i*>(prow + j), (__m256i)_mm512_cvtneps_pbh(e));
      }
      inv[r] = 1.f / _mm512_reduce_add_ps(vsum);
    }
    float* y = t.y + s0 * d;
    if (h16 <= 32) {
      pv_rows<8>(pb, tc16, vp, h16, npairs, h, inv, skip, y, d);
    } else {
      pv_rows<4>(pb, tc16, vp, h16, npairs, h, inv, skip, y, d);
      pv_rows<4>(pb + 4 * tc16, tc16, vp, h16, npairs, h, inv + 4, skip + 4, y + 4 * d, d);
    }
  }
}

}  // namespace fastonnx::attention_detail
