// libFuzzer target: the packed-weight reader and kernel creation on arbitrary bytes.
//
// Every input either fails validation with std::invalid_argument, or is a weight every kernel
// path of this CPU can be built from; then all paths must give the ref path's exact int32
// accumulators on a few rows (any difference, crash, hang or sanitizer report is a finding).
// Built and run by scripts/fuzz.sh; see fuzz/README.md.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "cpu_features.h"
#include "linear.h"
#include "packed_weight.h"

namespace {

// Kernel creation and runs cost O(N*K); above this the parser is still fuzzed in full, but no
// kernel is built (libFuzzer's speed matters more than huge all-zero weights).
constexpr uint64_t kMaxKernelElements = uint64_t{1} << 20;
constexpr int64_t kRows = 3;

[[noreturn]] void finding(const char* what, const char* isa) {
  std::fprintf(stderr, "fuzz_packed_weight: %s (path %s)\n", what, isa);
  std::abort();
}


// Writes the checksum the header's version asks for, so mutations reach the structural checks
// and the kernels behind it (a random mutation almost never keeps the CRC right).
void reseal(uint8_t* blob, size_t size) {
  if (size < sizeof(fastonnx::BlobHeader)) return;
  fastonnx::BlobHeader h;
  std::memcpy(&h, blob, sizeof(h));
  const uint8_t* payload = blob + sizeof(h);
  const size_t payload_size = size - sizeof(h);
  if (h.version == 1) {
    h.payload_crc32 = fastonnx::crc32(payload, payload_size);
  } else {
    h.payload_crc32 = 0;
    uint8_t head[sizeof(h)];
    std::memcpy(head, &h, sizeof(h));
    h.payload_crc32 = fastonnx::crc32(payload, payload_size, fastonnx::crc32(head, sizeof(head)));
  }
  std::memcpy(blob, &h, sizeof(h));
}

void check_blob(const uint8_t* blob, size_t size);

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // ORT hands the op a 4-byte-aligned initializer; give the parser the same.
  std::vector<uint32_t> words((size + 3) / 4);
  if (size) std::memcpy(words.data(), data, size);
  auto* blob = reinterpret_cast<uint8_t*>(words.data());
  check_blob(blob, size);  // as given: the checksum must catch (almost) every mutation
  reseal(blob, size);
  check_blob(blob, size);  // resealed: the structural checks must catch the rest
  return 0;
}

namespace {

void check_blob(const uint8_t* blob, size_t size) {
  fastonnx::PackedWeightView view;
  try {
    view = fastonnx::parse_packed_weight(blob, size);
  } catch (const std::invalid_argument&) {
    return;  // refused with a message: the expected outcome for almost every input
  }
  if (uint64_t{view.n} * view.k > kMaxKernelElements) return;

  std::vector<uint8_t> xq(size_t(kRows) * view.k);
  for (size_t i = 0; i < xq.size(); ++i) xq[i] = uint8_t(i * 37 + (i >> 7));
  const fastonnx::SerialRunner runner;
  std::vector<int32_t> ref, acc;
  for (fastonnx::Isa isa : fastonnx::available_isas()) {
    const char* name = fastonnx::isa_name(isa);
    std::unique_ptr<fastonnx::LinearKernel> kernel;
    try {
      kernel = fastonnx::make_linear_kernel(view, isa);
    } catch (const std::exception&) {
      finding("a weight the parser accepted could not be built", name);
    }
    std::vector<int32_t>& out = ref.empty() ? ref : acc;
    out.assign(size_t(kRows) * view.n, 0);
    kernel->accumulate(xq.data(), kRows, out.data(), runner);
    if (&out == &acc && acc != ref) finding("accumulators differ from the first path's", name);
  }
}

}  // namespace
