// CPU feature detection and the instruction-set paths fastonnx's kernels can take.
#pragma once

#include <optional>
#include <string>
#include <vector>

namespace fastonnx {

// What the CPU has *and* the OS lets a process use (XCR0, and AMX tile permission).
struct CpuFeatures {
  bool avx2 = false;
  bool fma = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512dq = false;
  bool avx512vl = false;
  bool avx512_vnni = false;
  bool avx512_bf16 = false;  // vdpbf16ps, vcvtne2ps2bf16 (the attention kernel)
  bool amx_tile = false;
  bool amx_int8 = false;
  bool amx_bf16 = false;
  bool amx_os_permitted = false;  // arch_prctl(ARCH_REQ_XCOMP_PERM) succeeded
  std::string vendor;
};

// Detected once; AMX permission is requested from the OS on first call when the CPU has AMX.
const CpuFeatures& cpu_features();

// Kernel paths, from the portable baseline upward.
enum class Isa { kRef = 0, kAvx2 = 1, kAvx512Vnni = 2, kAmx = 3 };

const char* isa_name(Isa isa);
std::optional<Isa> parse_isa(const std::string& name);
bool isa_available(Isa isa);
// Why an ISA is unavailable here (empty when it is available).
std::string isa_unavailable_reason(Isa isa);
std::vector<Isa> available_isas();
Isa best_isa();

// The ISA forced by FASTONNX_ISA, or nullopt for automatic choice ("" or "auto").
// Throws std::invalid_argument for an unknown name or an ISA this machine cannot run.
std::optional<Isa> forced_isa_from_env();

}  // namespace fastonnx
