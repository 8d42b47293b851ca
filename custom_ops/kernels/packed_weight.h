// The portable packed-weight format stored in ONNX files (an uint8 initializer).
//
// A weight W has shape [N, K] (PyTorch's [out, in] layout) with int8 values and one float scale
// per output channel: W_float[n, k] = scale[n] * W[n, k]. It is cut into blocks of
// block_rows x block_cols (output channels x input features); only blocks holding a non-zero
// value are stored, in block-compressed-sparse-row order.
//
// Layout (little-endian), version 2 (version 1 is still read):
//   BlobHeader (48 bytes)
//   float    scale[N]
//   uint32   row_ptr[ceil(N / block_rows) + 1]   block-row r owns blocks row_ptr[r]..row_ptr[r+1]
//   uint32   col_idx[nnz_blocks]                 block column, strictly increasing within a row
//   int8     values[nnz_blocks * block_rows * block_cols]   each block row-major; cells past the
//                                                 edge of W (ragged N or K) are zero
// payload_crc32 is the CRC-32 of the header (with payload_crc32 itself set to 0) followed by the
// payload, so a corrupted blob, header included, is caught at load. Version 1 blobs (written by
// fastonnx before the header was covered) carry the CRC-32 of the payload only; they are still
// read, with every structural check below, so a flipped header field still fails validation.
//
// Limits (checked before anything is allocated, at pack time and at load):
//   1 <= N <= kMaxN, 1 <= K <= kMaxK, N * K <= kMaxElements.
// kMaxK keeps the int32 accumulators exact: |acc| <= K * 255 * 128 < 2^31 for every K <= 65536
// (K = 65794 would overflow). kMaxElements bounds the dense copies some kernel paths make (256 MiB
// of int8) while covering real encoder layers (BERT-large's 4096 x 1024 FFN, a 30522 x 1024
// vocabulary projection). flags and reserved must be 0; scales must be finite and >= 0.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace fastonnx {

inline constexpr char kBlobMagic[4] = {'F', 'X', 'S', 'W'};
inline constexpr uint16_t kBlobVersion = 2;
inline constexpr uint32_t kMaxN = 65536;
inline constexpr uint32_t kMaxK = 65536;
inline constexpr uint64_t kMaxElements = uint64_t{1} << 28;

struct BlockShape {
  uint32_t rows = 1;  // output channels per block
  uint32_t cols = 4;  // input features per block
  bool operator==(const BlockShape& o) const { return rows == o.rows && cols == o.cols; }
};

// Block shapes the packer accepts. 1x4 is one VNNI group of one output channel (the finest the
// VNNI/AVX2 kernels exploit); 16x64 is one AMX B tile, which the AMX kernel skips whole.
const std::vector<BlockShape>& supported_block_shapes();
bool is_supported_block_shape(BlockShape shape);

#pragma pack(push, 1)
struct BlobHeader {
  char magic[4];
  uint16_t version;
  uint16_t header_bytes;
  uint32_t n;
  uint32_t k;
  uint32_t block_rows;
  uint32_t block_cols;
  uint32_t nnz_blocks;
  uint32_t flags;  // must be 0
  uint32_t payload_crc32;
  uint32_t reserved;  // must be 0
  uint64_t payload_bytes;
};
#pragma pack(pop)
static_assert(sizeof(BlobHeader) == 48, "BlobHeader layout is part of the file format");

// A validated, read-only view into a blob (which must outlive the view).
struct PackedWeightView {
  uint32_t n = 0;
  uint32_t k = 0;
  BlockShape block;
  uint32_t nnz_blocks = 0;
  const float* scale = nullptr;
  const uint32_t* row_ptr = nullptr;
  const uint32_t* col_idx = nullptr;
  const int8_t* values = nullptr;

  uint32_t block_row_count() const {
    return static_cast<uint32_t>((uint64_t{n} + block.rows - 1) / block.rows);
  }
  uint32_t block_col_count() const {
    return static_cast<uint32_t>((uint64_t{k} + block.cols - 1) / block.cols);
  }
  // Fraction of blocks that are all zero (not stored).
  double block_sparsity() const;
};

// Packs a dense int8 weight [n, k] (row-major) and per-channel scales into a blob.
// Throws std::invalid_argument for an unsupported block shape, a shape outside the limits above,
// or bad scales.
std::vector<uint8_t> pack_weight(const int8_t* w, uint32_t n, uint32_t k, const float* scale,
                                 BlockShape block);

// Validates a blob and returns a view into it. Throws std::invalid_argument with a message
// naming what is wrong (magic, version, limits, sizes, checksum, indices, padding, scales).
PackedWeightView parse_packed_weight(const uint8_t* data, size_t size);

// Dense int8 [n, k] from a view.
std::vector<int8_t> unpack_weight(const PackedWeightView& view);

// CRC-32 (the zlib polynomial); `crc` continues a previous result, as zlib.crc32(data, crc).
uint32_t crc32(const uint8_t* data, size_t size, uint32_t crc = 0);

// Why a weight of this shape cannot be packed or loaded (empty when it fits the limits above).
std::string shape_limit_error(uint64_t n, uint64_t k);

}  // namespace fastonnx
