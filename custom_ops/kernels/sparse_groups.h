// The weight as 1x4 groups per output channel: the unit the VNNI and AVX2 paths multiply.
// Any block shape decomposes into 1x4 groups; all-zero groups inside stored blocks are dropped
// too, so unstructured sparsity still saves work.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "packed_weight.h"

namespace fastonnx {

struct RowGroups {
  std::vector<uint32_t> row_ptr;           // [n + 1] into kg / w
  std::vector<uint32_t> kg;                // group index along K (feature 4*kg .. 4*kg+3)
  std::vector<std::array<int8_t, 4>> w;    // the 4 weights, zero past K
};

RowGroups row_groups_1x4(const PackedWeightView& view);

}  // namespace fastonnx
