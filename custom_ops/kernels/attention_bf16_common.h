// What the bf16 attention paths (AVX-512 BF16, AMX-BF16) share, per (batch, head) task:
//
// 1. the keys not skipped by the mask (mask > kSkipThreshold for some query) are gathered, so
//    padded keys cost nothing further;
// 2. K is packed as 16-key blocks of bf16 pairs [block][pairs][16 keys] (the B operand of both
//    `vdpbf16ps`, 16 scores of one query, and `tdpbf16ps`, a 16x16 score tile), V as key pairs
//    [T/2][H16][2] (16 head features per vector or tile row);
// 3. the fp32 softmax of a block of query rows, probabilities rounded to bf16 for P V.
//
// Everything is static with a target attribute, so no AVX-512 code leaks into baseline code.
// Scratch is one growing buffer per thread (grows with S, never S x S).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>

#include "aligned_buffer.h"
#include "attention.h"
#include "avx512_common.h"

#define FASTONNX_AVX512_BF16 \
  __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512bf16,fma")))

namespace fastonnx::attention_detail::bf16 {

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

class Scratch {
 public:
  void reserve(size_t bytes) {
    if (buf_.size() < bytes) buf_ = AlignedBuffer<uint8_t>(bytes);
    used_ = 0;
  }
  template <class T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(buf_.data() + used_);
    used_ += bytes_for(count, sizeof(T));
    return p;
  }
  static size_t bytes_for(int64_t count, size_t size) {
    return size_t(round_up(int64_t(size) * count, 64));
  }

 private:
  AlignedBuffer<uint8_t> buf_;
  size_t used_ = 0;
};

inline thread_local Scratch tls_scratch;

FASTONNX_AVX512_BF16 static inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }

FASTONNX_AVX512_BF16 static inline __mmask16 lanes(int64_t n) {
  return n >= 16 ? __mmask16(0xffff) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1);
}

// Row x[0..h) * scale -> bf16 pairs out[0..hp/2) (hp = H rounded up to 32, zero-padded).
FASTONNX_AVX512_BF16 static inline void row_to_bf16(const float* x, int64_t h, int64_t hp,
                                                    float scale, uint32_t* out) {
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t i = 0; i < hp; i += 32) {
    const __m512 lo = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(h - i), x + i), s);
    const __m512 hi = _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes(h - i - 16), x + i + 16), s);
    _mm512_store_si512(out + i / 2, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
  }
}

// Mean of V over all S keys into vmean (64-byte aligned, H rounded up to 16).
FASTONNX_AVX512_BF16 static inline void mean_v(const float* v, int64_t s_len, int64_t h,
                                               int64_t stride, float* vmean) {
  for (int64_t h0 = 0; h0 < h; h0 += 16) {
    __m512 sum = _mm512_setzero_ps();
    for (int64_t j = 0; j < s_len; ++j) {
      sum = _mm512_add_ps(sum, _mm512_maskz_loadu_ps(lanes(h - h0), v + j * stride + h0));
    }
    _mm512_store_ps(vmean + h0, _mm512_div_ps(sum, _mm512_set1_ps(float(s_len))));
  }
}

// log2(e): scores and masks are kept in log2 units, so the softmax's exponential is 2^x.
constexpr float kLog2e = 1.44269504088896341f;

// The mask row m at the gathered keys idx[0..tc), times log2(e): -inf for skipped keys and
// padding lanes up to tcp; m null: 0 (no mask). Returns whether every kept key's value is 0
// (key padding only), when the softmax need not add the mask at all.
FASTONNX_AVX512_BF16 static inline bool gather_mask(const float* m, const int32_t* idx, int64_t tc,
                                                    int64_t tcp, float* out) {
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  __mmask16 nonzero = 0;
  for (int64_t j = 0; j < tcp; j += 16) {
    __m512 x = _mm512_setzero_ps();
    const __mmask16 valid = lanes(tc - j);
    if (m) {
      x = _mm512_i32gather_ps(_mm512_loadu_si512(idx + j), m, 4);
      const __mmask16 skip =
          _mm512_cmp_ps_mask(x, _mm512_set1_ps(kSkipThreshold), _CMP_LE_OQ);
      x = _mm512_mask_blend_ps(skip, _mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), neg_inf);
      nonzero |= _mm512_mask_cmp_ps_mask(valid, x, _mm512_setzero_ps(), _CMP_NEQ_UQ);
    }
    _mm512_store_ps(out + j, _mm512_mask_blend_ps(valid, neg_inf, x));
  }
  return nonzero == 0;
}

// 2^z for finite z < 127 where bf16 accuracy suffices (relative error <= 7.8e-5 against bf16's
// 3.9e-3): a cubic on the fraction in [-1/2, 1/2], scaled by 2^round(z) (which underflows to 0
// far below). -inf needs exp2_nonpositive_masked.
FASTONNX_AVX512_BF16 static inline __m512 exp2_approx(__m512 z) {
  const __m512 n = _mm512_roundscale_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(z, n);
  // Least-squares fit (relative error) on Chebyshev nodes of [-1/2, 1/2].
  __m512 p = _mm512_set1_ps(5.508877e-2f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4260466e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9327628e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.999289e-1f));
  return _mm512_scalef_ps(p, n);
}

// The same where z may be -inf (a skipped key): exactly 0 there and below -126.
FASTONNX_AVX512_BF16 static inline __m512 exp2_nonpositive_masked(__m512 z) {
  const __mmask16 live = _mm512_cmp_ps_mask(z, _mm512_set1_ps(-126.f), _CMP_GE_OQ);
  return _mm512_maskz_mov_ps(live, exp2_approx(_mm512_maskz_mov_ps(live, z)));
}

// One task's packed keys and per-block buffers.
struct Work {
  int64_t tc = 0;   // keys kept
  int64_t tcp = 0;  // tc rounded up to the path's key multiple (16 or 32)
  int64_t kpairs = 0;  // bf16 pairs per key in kp: H rounded up to 32, halved
  int64_t hp = 0, qw = 0, h16 = 0;  // H rounded to 32, words per Q row (hp/2), H rounded to 16
  int32_t* idx = nullptr;
  float* mrow = nullptr;  // gathered mask (broadcast over queries), or the current row's
  bool per_row_mask = false;
  bool mask_zero = false;  // every kept key's mask is 0: scores need no mask added
  uint32_t* kp = nullptr;
  uint32_t* vp = nullptr;
  uint32_t* qb = nullptr;  // [rows][qw] bf16 pairs of the block's scaled queries
  float* sc = nullptr;     // [rows][tcp] scores
  uint16_t* pb = nullptr;  // [rows][tcp] bf16 probabilities (unnormalized)
  float* pf = nullptr;     // the same in fp32 (the fp32 path)
  float* vmean = nullptr;
  bool have_mean = false;
  float* ks = nullptr;  // [tcp] received attention of the kept keys (when key scores are asked)
};

// Step 1: the keys some query attends to (mask > kSkipThreshold), their indices into idx
// (sp entries of scratch, as `active`); returns how many.
FASTONNX_AVX512_BF16 static inline int64_t keep_keys(const Task& t, int64_t sp, int8_t* active,
                                                     int32_t* idx) {
  const int64_t s_len = t.seq;
  int64_t tc = 0;
  if (!t.mask) {
    for (int64_t j = 0; j < s_len; ++j) idx[j] = int32_t(j);
    tc = s_len;
  } else {
    const __m512 threshold = _mm512_set1_ps(kSkipThreshold);
    const int64_t mask_rows = t.mask_row_stride == 0 ? 1 : s_len;
    std::memset(active, 0, size_t(sp));
    for (int64_t s = 0; s < mask_rows; ++s) {
      const float* m = t.mask + s * t.mask_row_stride;
      for (int64_t j = 0; j < s_len; j += 16) {
        // Not (m <= threshold): NaN masks stay in and propagate as in the reference.
        const __mmask16 keep = _mm512_cmp_ps_mask(_mm512_maskz_loadu_ps(lanes(s_len - j), m + j),
                                                  threshold, _CMP_NLE_UQ) &
                               lanes(s_len - j);
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
  return tc;
}

// Step 1 into w: the kept keys (w.idx, w.tc) and their count rounded up to `key_multiple`
// (w.tcp; the padding entries repeat idx[0], so gathers stay in bounds and are masked off).
// False when every key is skipped for every query: the output rows are then written here (the
// mean of V).
FASTONNX_AVX512_BF16 static inline bool select_keys(const AttentionArgs& a, const Task& t,
                                                    int64_t sp, int64_t key_multiple,
                                                    int8_t* active, Work& w) {
  const int64_t tc = keep_keys(t, sp, active, w.idx);
  if (tc == 0) {
    const int64_t d = a.heads * a.head_size;
    mean_v(t.v, t.seq, a.head_size, a.token_stride, w.vmean);
    for (int64_t s = 0; s < t.seq; ++s) std::memcpy(t.y + s * d, w.vmean, size_t(a.head_size) * 4);
    return false;
  }
  w.tc = tc;
  w.tcp = round_up(tc, key_multiple);
  for (int64_t j = tc; j < w.tcp; ++j) w.idx[j] = w.idx[0];
  return true;
}

// The mask the softmax adds: a per-query mask is gathered row by row into row_mask later; a
// broadcast one once, here.
FASTONNX_AVX512_BF16 static inline void set_mask(const Task& t, float* row_mask, Work& w) {
  w.per_row_mask = t.mask && t.mask_row_stride != 0;
  if (w.per_row_mask) {
    w.mrow = row_mask;
  } else {
    w.mask_zero = gather_mask(t.mask, w.idx, w.tc, w.tcp, w.mrow);
  }
}

// Steps 1 and 2 for one task. `key_multiple` (16 or 32) pads the kept keys (padding keys are
// zero with mask -inf); each key's bf16 pairs are padded to 16 (H to 32). Returns false when
// every key is skipped for every query (the output rows are then written: the mean of V).
FASTONNX_AVX512_BF16 static inline bool prepare(const AttentionArgs& a, const Task& t,
                                                int64_t rows, int64_t key_multiple, Work& w) {
  const int64_t s_len = t.seq, h = a.head_size, stride = a.token_stride;
  w.hp = round_up(h, 32);
  w.qw = w.hp / 2;
  w.h16 = round_up(h, 16);
  w.kpairs = w.qw;
  const int64_t sp = round_up(s_len, key_multiple);
  Scratch& scratch = tls_scratch;
  scratch.reserve(Scratch::bytes_for(sp, 4) * 3 + Scratch::bytes_for(sp * w.kpairs, 4) +
                  Scratch::bytes_for(16 * w.qw, 4) + Scratch::bytes_for(sp / 2 * w.h16, 4) +
                  Scratch::bytes_for(rows * w.qw, 4) + Scratch::bytes_for(rows * sp, 4) +
                  Scratch::bytes_for(rows * sp, 2) + Scratch::bytes_for(w.h16, 4) +
                  Scratch::bytes_for(sp, 1) + Scratch::bytes_for(sp, 4));
  w.idx = scratch.take<int32_t>(sp);
  w.mrow = scratch.take<float>(sp);
  float* row_mask = scratch.take<float>(sp);
  w.kp = scratch.take<uint32_t>(sp * w.kpairs);
  uint32_t* kb = scratch.take<uint32_t>(16 * w.qw);
  w.vp = scratch.take<uint32_t>(sp / 2 * w.h16);
  w.qb = scratch.take<uint32_t>(rows * w.qw);
  w.sc = scratch.take<float>(rows * sp);
  w.pb = scratch.take<uint16_t>(rows * sp);
  w.vmean = scratch.take<float>(w.h16);
  int8_t* active = scratch.take<int8_t>(sp);
  w.ks = scratch.take<float>(sp);
  if (t.key_scores) std::memset(w.ks, 0, size_t(sp) * 4);
  w.have_mean = false;

  // 1. Keys some query attends to.
  if (!select_keys(a, t, sp, key_multiple, active, w)) return false;
  const int64_t tc = w.tc;

  // 2. K: 16-key blocks of bf16 pairs, each 16 keys x 16 pairs transposed in registers.
  for (int64_t jb = 0; jb < w.tcp / 16; ++jb) {
    for (int64_t l = 0; l < 16; ++l) {
      const int64_t j = jb * 16 + l;
      if (j < tc) {
        row_to_bf16(t.k + w.idx[j] * stride, h, w.hp, 1.f, kb + l * w.qw);
      } else {
        std::memset(kb + l * w.qw, 0, size_t(w.qw) * 4);
      }
    }
    for (int64_t p = 0; p < w.kpairs; p += 16) {
      avx512::transpose16x16(reinterpret_cast<const int32_t*>(kb + p), w.qw,
                             reinterpret_cast<int32_t*>(w.kp + (jb * w.kpairs + p) * 16));
    }
  }
  // V: key pairs, two bf16 rows interleaved into (a[i], b[i]); zero beyond the kept keys.
  const __m512i interleave =
      _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                       21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t pp = 0; pp < w.tcp / 2; ++pp) {
    const bool has_a = 2 * pp < tc, has_b = 2 * pp + 1 < tc;
    const float* va = t.v + w.idx[has_a ? 2 * pp : 0] * stride;
    const float* vb = t.v + w.idx[has_b ? 2 * pp + 1 : 0] * stride;
    for (int64_t h0 = 0; h0 < w.h16; h0 += 16) {
      const __mmask16 m = lanes(h - h0);
      const __m512 xa = has_a ? _mm512_maskz_loadu_ps(m, va + h0) : _mm512_setzero_ps();
      const __m512 xb = has_b ? _mm512_maskz_loadu_ps(m, vb + h0) : _mm512_setzero_ps();
      const __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(xb, xa);
      _mm512_store_si512(w.vp + pp * w.h16 + h0, _mm512_permutexvar_epi16(interleave, ab));
    }
  }
  set_mask(t, row_mask, w);
  return true;
}

// The block's queries s0 .. s0 + rows, times scale * log2(e), (of `block` rows; the rest zero) into w.qb.
FASTONNX_AVX512_BF16 static inline void load_queries(const AttentionArgs& a, const Task& t,
                                                     int64_t s0, int64_t rows, int64_t block,
                                                     Work& w) {
  for (int64_t r = 0; r < block; ++r) {
    if (r < rows) {
      row_to_bf16(t.q + (s0 + r) * a.token_stride, a.head_size, w.hp, a.scale * kLog2e,
                  w.qb + r * w.qw);
    } else {
      std::memset(w.qb + r * w.qw, 0, size_t(w.qw) * 4);
    }
  }
}

template <class P>
static inline P* probabilities(Work& w) {
  if constexpr (sizeof(P) == 2) {
    return w.pb;
  } else {
    return w.pf;
  }
}
FASTONNX_AVX512_BF16 static inline void store_probabilities(uint16_t* p, __m512 e) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh(e));
}
FASTONNX_AVX512_BF16 static inline void store_probabilities(float* p, __m512 e) {
  _mm512_store_ps(p, e);
}

// Softmax of the block's score rows (w.sc, stride tcp, log2 units) into w.pb (bf16) or w.pf, with
// inv[r] = 1 / sum. skip[r]: row r is padding of the block, or had every key skipped (its
// output, the mean of V, is written here).
template <class P>  // uint16_t: bf16 into w.pb; float: fp32 into w.pf
FASTONNX_AVX512_BF16 static inline void softmax_rows(const AttentionArgs& a, const Task& t,
                                                     int64_t s0, int64_t rows, int64_t block,
                                                     Work& w, float* inv, bool* skip) {
  const int64_t d = a.heads * a.head_size, tcp = w.tcp;
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  // With a zero (or no) mask only the kept keys are visited; the padding lanes are masked off.
  // A per-query mask row that is 0 at every kept key (a key-padding mask spelt [B, 1, S, S])
  // takes the same no-mask arithmetic, so it gives what the packed layout gives, bit for bit.
  const bool block_add_mask = !w.mask_zero && (t.mask != nullptr);
  for (int64_t r = 0; r < block; ++r) {
    P* prow = probabilities<P>(w) + r * tcp;
    skip[r] = r >= rows;
    if (skip[r]) {
      std::memset(prow, 0, size_t(tcp) * sizeof(P));
      continue;
    }
    bool add_mask = block_add_mask;
    if (w.per_row_mask) {
      add_mask = !gather_mask(t.mask + (s0 + r) * t.mask_row_stride, w.idx, w.tc, tcp, w.mrow);
    }
    const int64_t used = add_mask ? tcp : round_up(w.tc, 16);
    float* x = w.sc + r * tcp;
    if (!add_mask) {
      // The kept keys' scores are finite: 2^x directly, without a max pass, unless that
      // overflows or underflows, which the sum tells (then the row is redone with the max).
      __m512 vsum = _mm512_setzero_ps();
      const int64_t full = w.tc / 16 * 16;
      for (int64_t j = 0; j < full; j += 16) {
        const __m512 e = exp2_approx(_mm512_load_ps(x + j));
        vsum = _mm512_add_ps(vsum, e);
        store_probabilities(prow + j, e);
      }
      if (full < used) {
        const __mmask16 valid = lanes(w.tc - full);
        const __m512 e = _mm512_maskz_mov_ps(valid, exp2_approx(_mm512_load_ps(x + full)));
        vsum = _mm512_add_ps(vsum, e);
        store_probabilities(prow + full, e);
      }
      const float sum = _mm512_reduce_add_ps(vsum);
      if (sum >= 0x1p-64f && sum <= 0x1p64f) {  // false for NaN too
        if (used < tcp) std::memset(prow + used, 0, size_t(tcp - used) * sizeof(P));
        inv[r] = 1.f / sum;
        continue;
      }
    }
    __m512 vmax = neg_inf;
    if (add_mask) {
      for (int64_t j = 0; j < tcp; j += 16) {
        const __m512 v = _mm512_add_ps(_mm512_load_ps(x + j), _mm512_load_ps(w.mrow + j));
        _mm512_store_ps(x + j, v);
        vmax = _mm512_max_ps(vmax, v);
      }
    } else {
      for (int64_t j = 0; j < used; j += 16) {
        vmax = _mm512_mask_max_ps(vmax, lanes(w.tc - j), vmax, _mm512_load_ps(x + j));
      }
    }
    const float max = _mm512_reduce_max_ps(vmax);
    if (max == -INFINITY) {  // every key of this row skipped
      if (!w.have_mean) mean_v(t.v, t.seq, a.head_size, a.token_stride, w.vmean);
      w.have_mean = true;
      std::memcpy(t.y + (s0 + r) * d, w.vmean, size_t(a.head_size) * 4);
      std::memset(prow, 0, size_t(tcp) * sizeof(P));
      skip[r] = true;
      continue;
    }
    const __m512 vm = _mm512_set1_ps(max);
    __m512 vsum = _mm512_setzero_ps();
    auto emit = [&](int64_t j, __m512 e) FASTONNX_AVX512_BF16 {
      vsum = _mm512_add_ps(vsum, e);
      store_probabilities(prow + j, e);
    };
    if (add_mask) {
      for (int64_t j = 0; j < tcp; j += 16) {
        emit(j, exp2_nonpositive_masked(_mm512_sub_ps(_mm512_load_ps(x + j), vm)));
      }
    } else {  // finite scores; only the last vector has padding lanes
      const int64_t full = w.tc / 16 * 16;
      for (int64_t j = 0; j < full; j += 16) {
        emit(j, exp2_approx(_mm512_sub_ps(_mm512_load_ps(x + j), vm)));
      }
      if (full < used) {
        const __mmask16 valid = lanes(w.tc - full);
        const __m512 z = _mm512_maskz_sub_ps(valid, _mm512_load_ps(x + full), vm);
        emit(full, _mm512_maskz_mov_ps(valid, exp2_approx(z)));
      }
    }
    if (used < tcp) std::memset(prow + used, 0, size_t(tcp - used) * sizeof(P));
    inv[r] = 1.f / _mm512_reduce_add_ps(vsum);
  }
}

// Key scores: adds the block's probabilities (bf16 P times 1/sum, as P V uses them) of each
// kept key to w.ks; skipped rows add nothing (padding lanes of P are 0).
FASTONNX_AVX512_BF16 static inline void add_key_scores(Work& w, int64_t block, const float* inv,
                                                       const bool* skip) {
  for (int64_t r = 0; r < block; ++r) {
    if (skip[r]) continue;
    const __m512 s = _mm512_set1_ps(inv[r]);
    const uint16_t* prow = w.pb + r * w.tcp;
    for (int64_t j = 0; j < w.tcp; j += 16) {
      const __m256i p16 = _mm256_load_si256(reinterpret_cast<const __m256i*>(prow + j));
      const __m512 p = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(p16), 16));
      _mm512_store_ps(w.ks + j, _mm512_fmadd_ps(p, s, _mm512_load_ps(w.ks + j)));
    }
  }
}

// The kept keys' scores into the task's row (keys not kept received nothing).
static inline void scatter_key_scores(const Work& w, float* out) {
  for (int64_t j = 0; j < w.tc; ++j) out[w.idx[j]] += w.ks[j];
}

}  // namespace fastonnx::attention_detail::bf16
