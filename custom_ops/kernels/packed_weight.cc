#include "packed_weight.h"

#include <array>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

namespace fastonnx {
namespace {

static_assert(sizeof(size_t) == 8, "blob offsets are computed in 64 bits");

uint64_t align4(uint64_t x) { return (x + 3) & ~uint64_t{3}; }

struct PayloadLayout {
  uint64_t scale_off, row_ptr_off, col_idx_off, values_off, total;
};

// The version-2 checksum: the header with its checksum field zeroed, then the payload.
uint32_t blob_checksum(const BlobHeader& h, const uint8_t* payload, size_t payload_size) {
  BlobHeader zeroed = h;
  zeroed.payload_crc32 = 0;
  uint8_t bytes[sizeof(BlobHeader)];
  std::memcpy(bytes, &zeroed, sizeof(bytes));
  return crc32(payload, payload_size, crc32(bytes, sizeof(bytes)));
}

// Every offset in 64 bits: callers bound n, k and nnz first, but the arithmetic must not wrap
// even for the raw header values it is asked about.
PayloadLayout payload_layout(uint64_t n, BlockShape b, uint64_t nnz) {
  const uint64_t block_rows = (n + b.rows - 1) / b.rows;
  PayloadLayout l{};
  l.scale_off = 0;
  l.row_ptr_off = l.scale_off + n * sizeof(float);
  l.col_idx_off = l.row_ptr_off + (block_rows + 1) * sizeof(uint32_t);
  l.values_off = l.col_idx_off + nnz * sizeof(uint32_t);
  l.total = align4(l.values_off + nnz * b.rows * b.cols);
  return l;
}

std::string shape_str(BlockShape b) {
  return std::to_string(b.rows) + "x" + std::to_string(b.cols);
}

[[noreturn]] void fail(const std::string& what) {
  throw std::invalid_argument("invalid packed weight: " + what);
}

}  // namespace

const std::vector<BlockShape>& supported_block_shapes() {
  static const std::vector<BlockShape> shapes = {{1, 4}, {4, 4}, {16, 4}, {16, 64}};
  return shapes;
}

bool is_supported_block_shape(BlockShape shape) {
  for (const BlockShape& s : supported_block_shapes()) {
    if (s == shape) return true;
  }
  return false;
}

double PackedWeightView::block_sparsity() const {
  const double total = double(block_row_count()) * block_col_count();
  return total > 0 ? 1.0 - nnz_blocks / total : 0.0;
}

std::string shape_limit_error(uint64_t n, uint64_t k) {
  if (n == 0 || k == 0) return "weight shape must be non-empty (N and K >= 1)";
  if (n > kMaxN) {
    return "N=" + std::to_string(n) + " output channels exceeds the limit of " +
           std::to_string(kMaxN);
  }
  if (k > kMaxK) {
    return "K=" + std::to_string(k) + " input features exceeds the limit of " +
           std::to_string(kMaxK) + " (int32 accumulation is exact only up to there)";
  }
  if (n * k > kMaxElements) {
    return "N*K=" + std::to_string(n * k) + " weights exceeds the limit of " +
           std::to_string(kMaxElements);
  }
  return {};
}

uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc_in) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int j = 0; j < 8; ++j) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  uint32_t crc = crc_in ^ 0xFFFFFFFFu;
  for (size_t i = 0; i < size; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
  return crc ^ 0xFFFFFFFFu;
}

std::vector<uint8_t> pack_weight(const int8_t* w, uint32_t n, uint32_t k, const float* scale,
                                 BlockShape block) {
  if (!is_supported_block_shape(block)) {
    std::string accepted;
    for (const BlockShape& s : supported_block_shapes()) {
      accepted += (accepted.empty() ? "" : ", ") + shape_str(s);
    }
    throw std::invalid_argument("unsupported block shape " + shape_str(block) +
                                " (accepted: " + accepted + ")");
  }
  if (const std::string why = shape_limit_error(n, k); !why.empty()) {
    throw std::invalid_argument(why);
  }
  for (uint32_t i = 0; i < n; ++i) {
    if (!std::isfinite(scale[i]) || scale[i] < 0.f) {
      throw std::invalid_argument("weight scale[" + std::to_string(i) +
                                  "] must be finite and >= 0, got " + std::to_string(scale[i]));
    }
  }
  const uint32_t brows = (n + block.rows - 1) / block.rows;
  const uint32_t bcols = (k + block.cols - 1) / block.cols;
  const size_t bsize = size_t{block.rows} * block.cols;

  std::vector<uint32_t> row_ptr{0};
  std::vector<uint32_t> col_idx;
  std::vector<int8_t> values;
  std::vector<int8_t> cell(bsize);
  for (uint32_t br = 0; br < brows; ++br) {
    for (uint32_t bc = 0; bc < bcols; ++bc) {
      bool any = false;
      for (uint32_t r = 0; r < block.rows; ++r) {
        for (uint32_t c = 0; c < block.cols; ++c) {
          const uint64_t row = uint64_t{br} * block.rows + r, col = uint64_t{bc} * block.cols + c;
          const int8_t v = (row < n && col < k) ? w[row * k + col] : int8_t{0};
          cell[size_t{r} * block.cols + c] = v;
          any |= v != 0;
        }
      }
      if (any) {
        col_idx.push_back(bc);
        values.insert(values.end(), cell.begin(), cell.end());
      }
    }
    row_ptr.push_back(static_cast<uint32_t>(col_idx.size()));
  }

  const uint32_t nnz = static_cast<uint32_t>(col_idx.size());
  const PayloadLayout l = payload_layout(n, block, nnz);
  std::vector<uint8_t> blob(sizeof(BlobHeader) + l.total, 0);
  uint8_t* payload = blob.data() + sizeof(BlobHeader);
  std::memcpy(payload + l.scale_off, scale, size_t{n} * sizeof(float));
  std::memcpy(payload + l.row_ptr_off, row_ptr.data(), row_ptr.size() * sizeof(uint32_t));
  std::memcpy(payload + l.col_idx_off, col_idx.data(), col_idx.size() * sizeof(uint32_t));
  std::memcpy(payload + l.values_off, values.data(), values.size());

  BlobHeader h{};
  std::memcpy(h.magic, kBlobMagic, 4);
  h.version = kBlobVersion;
  h.header_bytes = sizeof(BlobHeader);
  h.n = n;
  h.k = k;
  h.block_rows = block.rows;
  h.block_cols = block.cols;
  h.nnz_blocks = nnz;
  h.payload_bytes = l.total;
  h.payload_crc32 = blob_checksum(h, payload, l.total);
  std::memcpy(blob.data(), &h, sizeof(h));
  return blob;
}

PackedWeightView parse_packed_weight(const uint8_t* data, size_t size) {
  if (data == nullptr || size < sizeof(BlobHeader)) {
    fail("blob of " + std::to_string(size) + " bytes is shorter than its " +
         std::to_string(sizeof(BlobHeader)) + "-byte header (truncated?)");
  }
  BlobHeader h;
  std::memcpy(&h, data, sizeof(h));
  if (std::memcmp(h.magic, kBlobMagic, 4) != 0) fail("bad magic (not a fastonnx packed weight)");
  if (h.version > kBlobVersion) {
    fail("format version " + std::to_string(h.version) + " is newer than this fastonnx reads (" +
         std::to_string(kBlobVersion) + "); upgrade fastonnx or re-run `fastonnx optimize`");
  }
  if (h.version == 0) fail("format version 0 is not valid");
  if (h.header_bytes != sizeof(BlobHeader)) {
    fail("header_bytes is " + std::to_string(h.header_bytes) + ", expected " +
         std::to_string(sizeof(BlobHeader)));
  }
  if (h.flags != 0) fail("unknown flags " + std::to_string(h.flags) + " (must be 0)");
  if (h.reserved != 0) fail("reserved field is " + std::to_string(h.reserved) + " (must be 0)");
  const BlockShape block{h.block_rows, h.block_cols};
  if (!is_supported_block_shape(block)) fail("unsupported block shape " + shape_str(block));
  // Limits before any size arithmetic or allocation (see packed_weight.h).
  if (const std::string why = shape_limit_error(h.n, h.k); !why.empty()) fail(why);
  const uint64_t max_blocks =
      ((uint64_t{h.n} + block.rows - 1) / block.rows) * ((uint64_t{h.k} + block.cols - 1) / block.cols);
  if (h.nnz_blocks > max_blocks) {
    fail(std::to_string(h.nnz_blocks) + " stored blocks, more than the " +
         std::to_string(max_blocks) + " an N=" + std::to_string(h.n) + ", K=" +
         std::to_string(h.k) + " weight holds");
  }
  const PayloadLayout l = payload_layout(h.n, block, h.nnz_blocks);
  const std::string what = "N=" + std::to_string(h.n) + ", K=" + std::to_string(h.k) + ", " +
                           std::to_string(h.nnz_blocks) + " blocks of " + shape_str(block);
  if (h.payload_bytes != l.total) {
    fail("header says payload_bytes=" + std::to_string(h.payload_bytes) + " but " + what +
         " need " + std::to_string(l.total) + " (corrupted header?)");
  }
  if (size != sizeof(BlobHeader) + l.total) {
    fail("blob is " + std::to_string(size) + " bytes, expected " +
         std::to_string(sizeof(BlobHeader) + l.total) + " (48-byte header + " +
         std::to_string(l.total) + "-byte payload for " + what + "; truncated or corrupted?)");
  }
  const uint8_t* payload = data + sizeof(BlobHeader);
  const uint32_t crc =
      h.version == 1 ? crc32(payload, l.total) : blob_checksum(h, payload, l.total);
  if (crc != h.payload_crc32) fail("checksum mismatch (corrupted data)");
  // Fields are 4-byte aligned in the blob; ORT initializers are at least that aligned.
  if (reinterpret_cast<uintptr_t>(data) % 4 != 0) fail("blob is not 4-byte aligned in memory");

  PackedWeightView v;
  v.n = h.n;
  v.k = h.k;
  v.block = block;
  v.nnz_blocks = h.nnz_blocks;
  v.scale = reinterpret_cast<const float*>(payload + l.scale_off);
  v.row_ptr = reinterpret_cast<const uint32_t*>(payload + l.row_ptr_off);
  v.col_idx = reinterpret_cast<const uint32_t*>(payload + l.col_idx_off);
  v.values = reinterpret_cast<const int8_t*>(payload + l.values_off);

  // The checksum only proves the bytes are what the packer wrote; check the structure too, so
  // a hand-made blob cannot make a kernel read out of bounds.
  for (uint32_t i = 0; i < v.n; ++i) {
    if (!std::isfinite(v.scale[i]) || v.scale[i] < 0.f) {
      fail("scale[" + std::to_string(i) + "] is " + std::to_string(v.scale[i]) +
           " (must be finite and >= 0)");
    }
  }
  const uint32_t brows = v.block_row_count(), bcols = v.block_col_count();
  if (v.row_ptr[0] != 0 || v.row_ptr[brows] != v.nnz_blocks) fail("row pointers out of range");
  for (uint32_t r = 0; r < brows; ++r) {
    if (v.row_ptr[r + 1] < v.row_ptr[r]) fail("row pointers decrease at block row " +
                                              std::to_string(r));
    for (uint32_t b = v.row_ptr[r]; b < v.row_ptr[r + 1]; ++b) {
      if (v.col_idx[b] >= bcols) fail("block column index out of range");
      if (b > v.row_ptr[r] && v.col_idx[b] <= v.col_idx[b - 1]) {
        fail("block column indices not increasing in block row " + std::to_string(r));
      }
      const int8_t* cell = v.values + size_t{b} * block.rows * block.cols;
      for (uint32_t i = 0; i < block.rows; ++i) {
        for (uint32_t j = 0; j < block.cols; ++j) {
          const bool outside = uint64_t{r} * block.rows + i >= v.n ||
                               uint64_t{v.col_idx[b]} * block.cols + j >= v.k;
          if (outside && cell[size_t{i} * block.cols + j] != 0) fail("non-zero padding");
        }
      }
    }
  }
  return v;
}

std::vector<int8_t> unpack_weight(const PackedWeightView& v) {
  std::vector<int8_t> w(size_t{v.n} * v.k, 0);
  const BlockShape b = v.block;
  for (uint32_t r = 0; r < v.block_row_count(); ++r) {
    for (uint32_t i = v.row_ptr[r]; i < v.row_ptr[r + 1]; ++i) {
      const int8_t* cell = v.values + size_t{i} * b.rows * b.cols;
      for (uint32_t y = 0; y < b.rows; ++y) {
        for (uint32_t x = 0; x < b.cols; ++x) {
          const uint64_t row = uint64_t{r} * b.rows + y, col = uint64_t{v.col_idx[i]} * b.cols + x;
          if (row < v.n && col < v.k) w[row * v.k + col] = cell[size_t{y} * b.cols + x];
        }
      }
    }
  }
  return w;
}

}  // namespace fastonnx
