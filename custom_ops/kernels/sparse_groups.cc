#include "sparse_groups.h"

namespace fastonnx {

RowGroups row_groups_1x4(const PackedWeightView& v) {
  RowGroups g;
  g.row_ptr.reserve(size_t{v.n} + 1);
  g.row_ptr.push_back(0);
  const BlockShape b = v.block;
  const uint32_t subgroups = b.cols / 4;  // every supported block width is a multiple of 4
  for (uint32_t row = 0; row < v.n; ++row) {
    const uint32_t br = row / b.rows, r = row % b.rows;
    for (uint32_t i = v.row_ptr[br]; i < v.row_ptr[br + 1]; ++i) {
      const int8_t* cells = v.values + (size_t{i} * b.rows + r) * b.cols;
      for (uint32_t s = 0; s < subgroups; ++s) {
        const std::array<int8_t, 4> w4 = {cells[4 * s], cells[4 * s + 1], cells[4 * s + 2],
                                          cells[4 * s + 3]};
        if (w4[0] == 0 && w4[1] == 0 && w4[2] == 0 && w4[3] == 0) continue;
        g.kg.push_back(v.col_idx[i] * subgroups + s);
        g.w.push_back(w4);
      }
    }
    g.row_ptr.push_back(static_cast<uint32_t>(g.kg.size()));
  }
  return g;
}

}  // namespace fastonnx
