// The one list of linear kernels. Dispatch (make_linear_kernel), the tests (`_native.kernels()`),
// `fastonnx info` and `fastonnx bench kernels` all read it, so a kernel added here is chosen,
// tested and benchmarked without further wiring.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "cpu_features.h"
#include "linear.h"
#include "packed_weight.h"

namespace fastonnx {

// What the kernels' costs depend on, computed once per weight from its stored blocks (never
// from a dense copy).
struct WeightStats {
  int64_t n = 0, k = 0;
  int64_t groups_1x4 = 0;    // non-zero 1x4 groups (4 inputs of one output channel)
  int64_t blocks_4x4 = 0;    // non-zero 4x4 blocks (4 consecutive channels x one K group)
  int64_t blocks_16x4 = 0;   // non-zero 16x4 blocks (16-channel strip x one K group)
  int64_t chunks_16x4 = 0;   // sum over strips of ceil(blocks / 16): AMX tiles of gathered groups
  int64_t gathered_chunks = 0;  // those chunks whose 16 groups are not consecutive
};
WeightStats weight_stats(const PackedWeightView& view);

struct KernelEntry {
  const char* name;         // data types, operation, block or tile, ISA (XNNPACK style)
  Isa isa;                  // the path: FASTONNX_ISA=<isa> chooses among that path's entries
  Isa requires_isa;         // what the CPU needs to run it (differs from isa when emulated)
  bool emulated;            // AMX code on emulated tiles: for tests, never chosen automatically
  bool sparse;              // skips zero blocks (else computes every weight)
  BlockShape block;         // the finest block shape whose zeros it skips entirely
  const char* scheme;       // one line for docs, `fastonnx info` and the benchmark
  // Estimated microseconds for M = 128 rows on one core (only the ranking of the entries one CPU
  // runs matters); see kernel_manifest.cc for how they were fitted.
  double (*cost_us)(const WeightStats&);
  std::unique_ptr<LinearKernel> (*make)(const PackedWeightView&);
};

const std::vector<KernelEntry>& kernel_manifest();
// nullptr for an unknown name.
const KernelEntry* find_kernel(const std::string& name);
// Why the entry cannot run here (empty when it can).
std::string kernel_unavailable_reason(const KernelEntry& entry);

// The entry make_linear_kernel would use: FASTONNX_KERNEL=<name> if set; else among the entries
// of `isa` (or of FASTONNX_ISA; unset: every path this CPU runs) the cheapest for this weight.
// Throws std::invalid_argument when the request cannot run here.
const KernelEntry& choose_kernel(const WeightStats& stats, std::optional<Isa> isa = std::nullopt);

}  // namespace fastonnx
