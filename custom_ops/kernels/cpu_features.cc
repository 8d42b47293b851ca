#include "cpu_features.h"

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>

namespace fastonnx {
namespace {

constexpr int kArchGetXcompPerm = 0x1022;
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtileData = 18;

uint64_t read_xcr0() {
  uint32_t eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

// Linux gates AMX tile data behind a per-process permission; without it the first tile
// instruction raises SIGILL.
bool request_amx_permission() {
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtileData) != 0) return false;
  unsigned long bitmask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) != 0) return false;
  return (bitmask & (1UL << kXfeatureXtileData)) != 0;
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return f;
  const unsigned max_leaf = eax;
  char vendor[13] = {};
  std::memcpy(vendor, &ebx, 4);
  std::memcpy(vendor + 4, &edx, 4);
  std::memcpy(vendor + 8, &ecx, 4);
  f.vendor = vendor;

  __get_cpuid(1, &eax, &ebx, &ecx, &edx);
  const bool osxsave = (ecx >> 27) & 1;
  const bool fma = (ecx >> 12) & 1;
  if (!osxsave || max_leaf < 7) return f;
  const uint64_t xcr0 = read_xcr0();
  const bool os_avx = (xcr0 & 0x6) == 0x6;              // XMM and YMM state
  const bool os_avx512 = os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask, ZMM_Hi256, Hi16_ZMM
  const bool os_amx = (xcr0 & (3ULL << 17)) == (3ULL << 17);  // XTILECFG, XTILEDATA

  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  f.fma = os_avx && fma;
  f.avx2 = os_avx && ((ebx >> 5) & 1);
  f.avx512f = os_avx512 && ((ebx >> 16) & 1);
  f.avx512dq = f.avx512f && ((ebx >> 17) & 1);
  f.avx512bw = f.avx512f && ((ebx >> 30) & 1);
  f.avx512vl = f.avx512f && ((ebx >> 31) & 1);
  f.avx512_vnni = f.avx512f && ((ecx >> 11) & 1);
  f.amx_tile = os_amx && ((edx >> 24) & 1);
  f.amx_int8 = os_amx && ((edx >> 25) & 1);
  f.amx_bf16 = os_amx && ((edx >> 22) & 1);
  __cpuid_count(7, 1, eax, ebx, ecx, edx);
  f.avx512_bf16 = f.avx512f && ((eax >> 5) & 1);
  if (f.amx_tile && f.amx_int8) f.amx_os_permitted = request_amx_permission();
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kRef: return "ref";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvx512Vnni: return "avx512_vnni";
    case Isa::kAmx: return "amx";
  }
  return "?";
}

std::optional<Isa> parse_isa(const std::string& name) {
  for (Isa isa : {Isa::kRef, Isa::kAvx2, Isa::kAvx512Vnni, Isa::kAmx}) {
    if (name == isa_name(isa)) return isa;
  }
  return std::nullopt;
}

std::string isa_unavailable_reason(Isa isa) {
  const CpuFeatures& f = cpu_features();
  switch (isa) {
    case Isa::kRef:
      return "";
    case Isa::kAvx2:
      return f.avx2 && f.fma ? "" : "this CPU (or OS) lacks AVX2/FMA";
    case Isa::kAvx512Vnni:
      return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512_vnni
                 ? ""
                 : "this CPU (or OS) lacks AVX-512 BW/VL/DQ with VNNI";
    case Isa::kAmx:
      if (!(f.amx_tile && f.amx_int8)) return "this CPU (or OS) lacks AMX-INT8";
      if (!f.amx_os_permitted) return "the OS refused AMX tile-data permission (arch_prctl)";
      if (!isa_available(Isa::kAvx512Vnni)) return "AMX path also needs AVX-512 VNNI";
      return "";
  }
  return "unknown ISA";
}

bool isa_available(Isa isa) { return isa_unavailable_reason(isa).empty(); }

std::vector<Isa> available_isas() {
  std::vector<Isa> out;
  for (Isa isa : {Isa::kRef, Isa::kAvx2, Isa::kAvx512Vnni, Isa::kAmx}) {
    if (isa_available(isa)) out.push_back(isa);
  }
  return out;
}

Isa best_isa() { return available_isas().back(); }

std::optional<Isa> forced_isa_from_env() {
  const char* env = std::getenv("FASTONNX_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return std::nullopt;
  const std::optional<Isa> isa = parse_isa(env);
  if (!isa) {
    throw std::invalid_argument(std::string("FASTONNX_ISA=") + env +
                                " is not one of: auto, amx, avx512_vnni, avx2, ref");
  }
  const std::string why = isa_unavailable_reason(*isa);
  if (!why.empty()) {
    throw std::invalid_argument(std::string("FASTONNX_ISA=") + env + " cannot run here: " + why);
  }
  return isa;
}

}  // namespace fastonnx
