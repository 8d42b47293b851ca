// AVX2 fp32 path, for x86 CPUs without AVX-512 (Zen 2/3, client Intel cores): the avx512_f32
// scheme with 8-float vectors. Per (batch, head) task:
//   1. the keys some query attends to are gathered (skipped keys cost nothing and are never
//      read): K transposed to K^T [H][tcp] (tcp: kept keys rounded up to 16, zero padded) and
//      their V rows copied contiguously;
//   2. per block of 6 query rows, the scores against 16 keys at a time in 12 accumulators over
//      H broadcast query values (scale and log2(e) folded into Q, so the softmax uses 2^x);
//   3. an fp32 softmax per row (mask added in log2 units, max subtracted);
//   4. P V over the copied V rows, 6 rows x 16 features per step.
// A row whose kept keys are all skipped gets the mean of V over all S keys (attention.h).
#include <algorithm>
#include <cmath>
#include <cstring>

#include "aligned_buffer.h"
#include "attention.h"
#include "avx2_common.h"

namespace fastonnx::attention_detail {
namespace {

constexpr int64_t kRows = 6;      // query rows per block
constexpr int64_t kKeys = 16;     // keys per score step (two vectors)
constexpr int64_t kFeatures = 16; // head features per P V step (two vectors)
constexpr float kLog2e = 1.44269504088896341f;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// One growing buffer per thread (linear in S, never S x S).
struct Buffers {
  AlignedBuffer<float> f;
  AlignedBuffer<int32_t> idx;
};
thread_local Buffers tls;

// 2^z: exactly 0 for z < -126 (and -inf); NaN stays NaN. Degree-5 Taylor polynomial of 2^f on
// f in [-1/2, 1/2] (relative error <= 2.4e-6), scaled by 2^round(z) in the exponent bits.
// Callers pass z <= 0 (scores minus their row maximum).
FASTONNX_AVX2 inline __m256 exp2_nonpositive(__m256 z) {
  const __m256 live = _mm256_cmp_ps(z, _mm256_set1_ps(-126.f), _CMP_NLT_UQ);
  z = _mm256_max_ps(_mm256_set1_ps(-126.f), z);  // second operand wins on NaN: NaN kept
  const __m256 n = _mm256_round_ps(z, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(z, n);
  __m256 p = _mm256_set1_ps(1.3333558e-3f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
}

// Mean of V over all S keys (the output of a row whose keys are all skipped) into out[0..h).
void mean_v(const Task& t, int64_t h, int64_t stride, float* out) {
  std::fill(out, out + h, 0.f);
  for (int64_t j = 0; j < t.seq; ++j) {
    const float* v = t.v + j * stride;
    for (int64_t i = 0; i < h; ++i) out[i] += v[i];
  }
  for (int64_t i = 0; i < h; ++i) out[i] /= float(t.seq);
}

// Mask row m at the kept keys, in log2 units: -inf for skipped keys and for padding up to tcp.
void gather_mask(const float* m, const int32_t* idx, int64_t tc, int64_t tcp, float* out) {
  for (int64_t j = 0; j < tcp; ++j) {
    if (j >= tc) {
      out[j] = -INFINITY;
    } else if (m == nullptr) {
      out[j] = 0.f;
    } else {
      const float x = m[idx[j]];
      out[j] = x <= kSkipThreshold ? -INFINITY : x * kLog2e;
    }
  }
}

// Scores of kRows scaled query rows (qs [kRows][h]) against 16 keys of K^T from jb.
FASTONNX_AVX2 void score_block(const float* qs, int64_t h, const float* kt, int64_t tcp,
                               int64_t jb, float* sc) {
  __m256 acc[kRows][2];
  for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < h; ++i) {
    const __m256 k0 = _mm256_load_ps(kt + i * tcp + jb), k1 = _mm256_load_ps(kt + i * tcp + jb + 8);
    for (int64_t r = 0; r < kRows; ++r) {
      const __m256 q = _mm256_broadcast_ss(qs + r * h + i);
      acc[r][0] = _mm256_fmadd_ps(q, k0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(q, k1, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    _mm256_store_ps(sc + r * tcp + jb, acc[r][0]);
    _mm256_store_ps(sc + r * tcp + jb + 8, acc[r][1]);
  }
}

// y rows [kRows] x features [h0, h0 + 16) = inv[r] * sum_j p[r][j] V[j], rows not skipped;
// vc holds the kept keys' V rows contiguously, zero padded to h16 features.
FASTONNX_AVX2 void pv_block(const float* p, int64_t tcp, const float* vc, int64_t h16, int64_t tc,
                            int64_t h0, int64_t h, const float* inv, const bool* skip, float* y,
                            int64_t d) {
  const __m256i m0 = avx2::first_lanes(h - h0), m1 = avx2::first_lanes(h - h0 - 8);
  __m256 acc[kRows][2];
  for (auto& row : acc) row[0] = row[1] = _mm256_setzero_ps();
  for (int64_t j = 0; j < tc; ++j) {
    const float* v = vc + j * h16 + h0;
    const __m256 v0 = _mm256_load_ps(v), v1 = _mm256_load_ps(v + 8);
    for (int64_t r = 0; r < kRows; ++r) {
      const __m256 pr = _mm256_broadcast_ss(p + r * tcp + j);
      acc[r][0] = _mm256_fmadd_ps(pr, v0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(pr, v1, acc[r][1]);
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
    if (skip[r]) continue;
    const __m256 s = _mm256_set1_ps(inv[r]);
    float* out = y + r * d + h0;
    _mm256_maskstore_ps(out, m0, _mm256_mul_ps(acc[r][0], s));
    _mm256_maskstore_ps(out + 8, m1, _mm256_mul_ps(acc[r][1], s));
  }
}

}  // namespace

FASTONNX_AVX2 void head_avx2_f32(const AttentionArgs& a, const Task& t) {
  const int64_t s_len = t.seq, h = a.head_size, stride = a.token_stride;
  const int64_t d = a.heads * a.head_size;
  const int64_t sp = round_up(s_len, kKeys);

  // Buffers: idx [sp]; K^T [h][sp]; qs [kRows][h]; scores and probabilities [kRows][sp]; the
  // mask row [sp]; key scores [sp]; mean of V [h]; the kept V rows [sp][h16].
  const int64_t h16 = round_up(h, kFeatures);
  const size_t floats = size_t(h * sp + kRows * h + 2 * kRows * sp + 2 * sp + h + sp * h16 + 128);
  if (tls.f.size() < floats) tls.f = AlignedBuffer<float>(floats);
  if (tls.idx.size() < size_t(sp)) tls.idx = AlignedBuffer<int32_t>(size_t(sp));
  int32_t* idx = tls.idx.data();
  float* kt = tls.f.data();
  float* qs = kt + round_up(h * sp, 16);
  float* sc = qs + round_up(kRows * h, 16);
  float* pf = sc + kRows * sp;
  float* mrow = pf + kRows * sp;
  float* ks = mrow + sp;
  float* vmean = ks + sp;
  float* vc = vmean + round_up(h, 16);

  // 1. Kept keys: those whose mask is above the skip threshold for some query (NaN kept).
  int64_t tc = 0;
  const int64_t mask_rows = t.mask == nullptr ? 0 : (t.mask_row_stride == 0 ? 1 : s_len);
  for (int64_t j = 0; j < s_len; ++j) {
    bool keep = t.mask == nullptr;
    for (int64_t s = 0; s < mask_rows && !keep; ++s) {
      keep = !(t.mask[s * t.mask_row_stride + j] <= kSkipThreshold);
    }
    idx[tc] = int32_t(j);
    tc += keep;
  }
  bool have_mean = false;
  if (tc == 0) {
    mean_v(t, h, stride, vmean);
    for (int64_t s = 0; s < s_len; ++s) std::memcpy(t.y + s * d, vmean, size_t(h) * 4);
    return;
  }
  const int64_t tcp = round_up(tc, kKeys);
  // K^T and the V rows, each kept key's rows read once in order: Q, K and V rows lie a token
  // stride apart (3D floats when packed), so walking one feature over all keys, or reading V
  // in place for every query block, keeps hitting the same few L1 sets.
  for (int64_t j = 0; j < tc; ++j) {
    const float* kr = t.k + int64_t(idx[j]) * stride;
    const float* vr = t.v + int64_t(idx[j]) * stride;
    for (int64_t i = 0; i < h; ++i) kt[i * tcp + j] = kr[i];
    std::memcpy(vc + j * h16, vr, size_t(h) * 4);
    std::fill(vc + j * h16 + h, vc + (j + 1) * h16, 0.f);
  }
  for (int64_t i = 0; i < h; ++i) std::fill(kt + i * tcp + tc, kt + (i + 1) * tcp, 0.f);
  const bool per_row_mask = t.mask != nullptr && t.mask_row_stride != 0;
  if (!per_row_mask) gather_mask(t.mask, idx, tc, tcp, mrow);
  if (t.key_scores) std::fill(ks, ks + tcp, 0.f);

  const float qscale = a.scale * kLog2e;
  float inv[kRows];
  bool skip[kRows];
  for (int64_t s0 = 0; s0 < s_len; s0 += kRows) {
    const int64_t rows = std::min(kRows, s_len - s0);
    for (int64_t r = 0; r < kRows; ++r) {
      const float* q = t.q + (s0 + r) * stride;
      for (int64_t i = 0; i < h; ++i) qs[r * h + i] = r < rows ? q[i] * qscale : 0.f;
    }
    // 2. Scores.
    for (int64_t jb = 0; jb < tcp; jb += kKeys) score_block(qs, h, kt, tcp, jb, sc);
    // 3. Softmax per row.
    for (int64_t r = 0; r < kRows; ++r) {
      float* x = sc + r * tcp;
      float* p = pf + r * tcp;
      skip[r] = r >= rows;
      if (skip[r]) {
        std::fill(p, p + tcp, 0.f);
        continue;
      }
      if (per_row_mask) gather_mask(t.mask + (s0 + r) * t.mask_row_stride, idx, tc, tcp, mrow);
      __m256 vmax = _mm256_set1_ps(-INFINITY), vnan = _mm256_setzero_ps();
      for (int64_t j = 0; j < tcp; j += 8) {
        const __m256 v = _mm256_add_ps(_mm256_load_ps(x + j), _mm256_load_ps(mrow + j));
        _mm256_store_ps(x + j, v);
        vmax = _mm256_max_ps(v, vmax);  // NaN scores are left out of the max, kept in p
        vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
      }
      const float max = avx2::hmax(vmax);
      if (max == -INFINITY && _mm256_movemask_ps(vnan) != 0) {  // only NaN scores: a NaN row
        std::fill(t.y + (s0 + r) * d, t.y + (s0 + r) * d + h, NAN);
        std::fill(p, p + tcp, 0.f);
        skip[r] = true;
        continue;
      }
      if (max == -INFINITY) {  // every key of this row skipped
        if (!have_mean) mean_v(t, h, stride, vmean);
        have_mean = true;
        std::memcpy(t.y + (s0 + r) * d, vmean, size_t(h) * 4);
        std::fill(p, p + tcp, 0.f);
        skip[r] = true;
        continue;
      }
      const __m256 vm = _mm256_set1_ps(max);
      __m256 vsum = _mm256_setzero_ps();
      for (int64_t j = 0; j < tcp; j += 8) {
        const __m256 e = exp2_nonpositive(_mm256_sub_ps(_mm256_load_ps(x + j), vm));
        vsum = _mm256_add_ps(vsum, e);
        _mm256_store_ps(p + j, e);
      }
      inv[r] = 1.f / avx2::hsum(vsum);
      if (t.key_scores) {
        const __m256 s = _mm256_set1_ps(inv[r]);
        for (int64_t j = 0; j < tcp; j += 8) {
          _mm256_store_ps(ks + j, _mm256_fmadd_ps(_mm256_load_ps(p + j), s, _mm256_load_ps(ks + j)));
        }
      }
    }
    // 4. P V.
    float* y = t.y + s0 * d;
    for (int64_t h0 = 0; h0 < h; h0 += kFeatures) {
      pv_block(pf, tcp, vc, h16, tc, h0, h, inv, skip, y, d);
    }
  }
  if (t.key_scores) {
    for (int64_t j = 0; j < tc; ++j) t.key_scores[idx[j]] += ks[j];
  }
}

}  // namespace fastonnx::attention_detail
