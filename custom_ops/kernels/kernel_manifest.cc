#include "kernel_manifest.h"

#include <algorithm>
#include <cstdlib>
#include <stdexcept>

#include "sparse_groups.h"

namespace fastonnx {
namespace {

// Cost models: microseconds at M = 128 on one core, least-squares fits to direct kernel timings
// (`_native.Linear.time_calls`) over the MiniLM and DistilBERT layer shapes, sparsities 0-95%
// and 1x4 / 16x4 blocks, on the Sapphire Rapids class Xeon (AMX) of the development machines
// (10th-percentile times; the ranking is what the choice uses). Each has
// a per-output term (epilogue), a per-input term (quantization and activation re-layout) and its
// work term. The VNNI dense/sparse pair keeps the crossover measured on an AMD EPYC (dense from
// about 50% non-zero 1x4 groups). With those fits the choice picked the fastest of the three
// AVX-512 / AMX kernels in 56 of 60 cases and cost 0.6% on average against always picking the
// fastest.
double outputs_k(const WeightStats& s) { return 128.0 * double(s.n) * 1e-3; }
double inputs_k(const WeightStats& s) { return 128.0 * double(s.k) * 1e-3; }
double dense_groups_k(const WeightStats& s) { return double(s.n * ((s.k + 3) / 4)) * 1e-3; }

double cost_ref(const WeightStats& s) { return 128.0 * double(s.n * s.k) * 1e-3; }
double cost_avx2(const WeightStats& s) {
  return 0.55 * outputs_k(s) + 0.95 * inputs_k(s) + 24.0 * double(s.groups_1x4) * 1e-3;
}
double cost_vnni_sparse(const WeightStats& s) {
  return 0.55 * outputs_k(s) + 0.95 * inputs_k(s) + 4.78 * double(s.groups_1x4) * 1e-3;
}
// Per 4x4 block: 4 groups' products with one activation load for the 4. Not fitted like the
// others: set so that on 4x4-pruned weights it is chosen (it ran 0.71-0.93x the 1x4 kernel's
// time on the MiniLM / DistilBERT shapes at 80-95%, Intel Xeon without AMX), and on 1x4-pruned
// ones, where a 4x4 block holds about 1.2 non-zero groups at 90%, it is not.
double cost_vnni_4x4(const WeightStats& s) {
  return 0.55 * outputs_k(s) + 0.95 * inputs_k(s) + 12.0 * double(s.blocks_4x4) * 1e-3;
}
double cost_vnni_dense(const WeightStats& s) {
  return 0.55 * outputs_k(s) + 0.95 * inputs_k(s) + 2.39 * dense_groups_k(s);
}
// One tdpbsud per chunk and row tile; on this CPU a gathered chunk costs about as much as a
// contiguous one (its row copies overlap the tile products).
double cost_amx(const WeightStats& s) {
  const double contiguous = double(s.chunks_16x4 - s.gathered_chunks);
  return 0.77 * outputs_k(s) + 0.70 * inputs_k(s) + 0.26 * contiguous +
         0.25 * double(s.gathered_chunks);
}

const std::vector<KernelEntry>& entries() {
  static const std::vector<KernelEntry> list = {
      {"s8u8_dense__ref", Isa::kRef, Isa::kRef, false, false, {1, 4},
       "dense int8 loops; the portable fallback and yardstick", cost_ref, make_linear_ref},
      {"s8u8_spmm_1x4_m32__avx2", Isa::kAvx2, Isa::kAvx2, false, true, {1, 4},
       "1x4 groups, 8-row tiles, int16 vpmaddwd (exact)", cost_avx2, make_linear_avx2},
      {"s8u8_spmm_1x4_m64__avx512_vnni", Isa::kAvx512Vnni, Isa::kAvx512Vnni, false, true, {1, 4},
       "1x4 groups broadcast against 64 rows, vpdpbusd", cost_vnni_sparse,
       make_linear_avx512_vnni},
      {"s8u8_spmm_4x4_m64__avx512_vnni", Isa::kAvx512Vnni, Isa::kAvx512Vnni, false, true, {4, 4},
       "4x4 blocks: one K group's 64 rows against 4 channels' broadcast weights, vpdpbusd",
       cost_vnni_4x4, make_linear_avx512_vnni_4x4},
      {"s8u8_gemm_6x64__avx512_vnni", Isa::kAvx512Vnni, Isa::kAvx512Vnni, false, false, {1, 4},
       "register-blocked dense GEMM, 6 rows x 64 channels", cost_vnni_dense,
       make_linear_avx512_dense},
      {"s8u8_spmm_16x4__amx", Isa::kAmx, Isa::kAmx, false, true, {16, 4},
       "tdpbsud over non-zero 16x4 blocks gathered 16 at a time into tiles", cost_amx,
       make_linear_amx},
      {"s8u8_spmm_16x4__amx_emulated", Isa::kAmx, Isa::kAvx512Vnni, true, true, {16, 4},
       "the AMX kernel on emulated tiles (tests on CPUs without AMX)", cost_amx,
       make_linear_amx_emulated},
  };
  return list;
}

}  // namespace

WeightStats weight_stats(const PackedWeightView& view) {
  WeightStats s;
  s.n = view.n;
  s.k = view.k;
  const RowGroups rg = row_groups_1x4(view);
  s.groups_1x4 = int64_t(rg.kg.size());
  const int64_t groups = (s.k + 3) / 4, strips = (s.n + 15) / 16;
  std::vector<uint32_t> seen(size_t(groups), 0);
  for (int64_t quad = 0; quad < (s.n + 3) / 4; ++quad) {  // seen[g] = quad + 1 once counted
    const size_t r1 = size_t(std::min(s.n, (quad + 1) * 4));
    for (size_t row = size_t(quad * 4); row < r1; ++row) {
      for (uint32_t i = rg.row_ptr[row]; i < rg.row_ptr[row + 1]; ++i) {
        s.blocks_4x4 += seen[rg.kg[i]] != uint32_t(quad + 1);
        seen[rg.kg[i]] = uint32_t(quad + 1);
      }
    }
  }
  std::fill(seen.begin(), seen.end(), 0u);
  std::vector<uint32_t> used;
  for (int64_t st = 0; st < strips; ++st) {
    used.clear();
    const size_t r1 = size_t(std::min(s.n, (st + 1) * 16));
    for (size_t row = size_t(st * 16); row < r1; ++row) {
      for (uint32_t i = rg.row_ptr[row]; i < rg.row_ptr[row + 1]; ++i) {
        if (seen[rg.kg[i]] != uint32_t(st + 1)) {
          seen[rg.kg[i]] = uint32_t(st + 1);
          used.push_back(rg.kg[i]);
        }
      }
    }
    std::sort(used.begin(), used.end());
    s.blocks_16x4 += int64_t(used.size());
    for (size_t q0 = 0; q0 < used.size(); q0 += 16) {
      const size_t count = std::min<size_t>(16, used.size() - q0);
      ++s.chunks_16x4;
      s.gathered_chunks += !(count == 16 && used[q0 + 15] - used[q0] == 15);
    }
  }
  return s;
}

const std::vector<KernelEntry>& kernel_manifest() { return entries(); }

const KernelEntry* find_kernel(const std::string& name) {
  for (const KernelEntry& e : entries()) {
    if (name == e.name) return &e;
  }
  return nullptr;
}

std::string kernel_unavailable_reason(const KernelEntry& entry) {
  return isa_unavailable_reason(entry.requires_isa);
}

const KernelEntry& choose_kernel(const WeightStats& stats, std::optional<Isa> isa) {
  const char* forced = std::getenv("FASTONNX_KERNEL");
  if (forced != nullptr && *forced != '\0' && std::string(forced) != "auto") {
    const KernelEntry* e = find_kernel(forced);
    if (e == nullptr) {
      std::string names;
      for (const KernelEntry& k : entries()) names += std::string(names.empty() ? "" : ", ") + k.name;
      throw std::invalid_argument(std::string("FASTONNX_KERNEL=") + forced +
                                  " is not a fastonnx kernel (one of: " + names + ")");
    }
    const std::string why = kernel_unavailable_reason(*e);
    if (!why.empty()) {
      throw std::invalid_argument(std::string("FASTONNX_KERNEL=") + forced + " cannot run here: " + why);
    }
    return *e;
  }
  if (!isa) isa = forced_isa_from_env();
  if (isa) {
    const std::string why = isa_unavailable_reason(*isa);
    if (!why.empty()) {
      throw std::invalid_argument(std::string("kernel path '") + isa_name(*isa) +
                                  "' cannot run here: " + why);
    }
  }
  const KernelEntry* best = nullptr;
  double best_cost = 0;
  for (const KernelEntry& e : entries()) {
    if (e.emulated || !kernel_unavailable_reason(e).empty()) continue;
    if (isa && e.isa != *isa) continue;
    const double cost = e.cost_us(stats);
    if (best == nullptr || cost < best_cost) {
      best = &e;
      best_cost = cost;
    }
  }
  if (best == nullptr) throw std::invalid_argument("no fastonnx kernel can run here");
  return *best;
}

}  // namespace fastonnx
