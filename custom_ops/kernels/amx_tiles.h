// AMX tile operations behind one small interface with two backends:
//   HwTiles   the hardware instructions (inline asm, so tile numbers can be template arguments:
//             GCC's _tile_* macros stringize their tile argument and cannot take one);
//   EmuTiles  a portable emulation with the same semantics, kept per thread like real tile state.
// The AMX kernels are templates over the backend, so their packing, gathering and loop logic
// runs through the same tests on CPUs without AMX (the emulated twin in the kernel manifest).
//
// Only what the kernels use is here: every tile configured as 16 rows x 64 bytes, and
// tdpbsud (signed bytes in A, unsigned in B, int32 accumulators in C).
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

namespace fastonnx {
namespace amx {

constexpr int kTiles = 8;
constexpr int kRows = 16;      // rows of every tile
constexpr int kRowBytes = 64;  // bytes per tile row
constexpr size_t kTileBytes = size_t{kRows} * kRowBytes;

// The 64-byte operand of ldtilecfg (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads exactly 64 bytes");

inline TileConfig full_tiles() {
  TileConfig cfg;
  for (int t = 0; t < kTiles; ++t) {
    cfg.colsb[t] = kRowBytes;
    cfg.rows[t] = kRows;
  }
  return cfg;
}

struct HwTiles {
  static constexpr bool kEmulated = false;
  static void configure(const TileConfig& cfg) {
    asm volatile("ldtilecfg %0" ::"m"(cfg));
  }
  static void release() { asm volatile("tilerelease" ::); }
  template <int T>
  static void zero() {
    asm volatile("tilezero %%tmm%c0" ::"i"(T));
  }
  template <int T>
  static void load(const void* base, int64_t stride) {
    asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "i"(T) : "memory");
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "i"(T) : "memory");
  }
  // C[m][n] += sum_k sum_j int8(A[m][4k + j]) * uint8(B[k][4n + j])
  template <int C, int A, int B>
  static void dpbsud() {
    asm volatile("tdpbsud %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"i"(C), "i"(A), "i"(B));
  }
};

struct EmuTiles {
  static constexpr bool kEmulated = true;
  struct State {
    bool configured = false;
    alignas(64) uint8_t data[kTiles][kTileBytes];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  // Hardware faults on a tile instruction without a configuration; the emulation throws, so a
  // kernel that forgets one fails its tests instead of passing on emulated state.
  static uint8_t* tile(int t) {
    State& s = state();
    if (!s.configured) throw std::logic_error("AMX emulation: tile used without ldtilecfg");
    return s.data[t];
  }
  static void configure(const TileConfig& cfg) {
    for (int t = 0; t < kTiles; ++t) {
      if (cfg.palette_id != 1 || cfg.rows[t] != kRows || cfg.colsb[t] != kRowBytes) {
        throw std::logic_error("AMX emulation supports only full 16x64-byte tiles");
      }
    }
    State& s = state();
    s.configured = true;
    std::memset(s.data, 0, sizeof(s.data));  // ldtilecfg zeroes every tile
  }
  static void release() { state().configured = false; }
  template <int T>
  static void zero() {
    std::memset(tile(T), 0, kTileBytes);
  }
  template <int T>
  static void load(const void* base, int64_t stride) {
    uint8_t* t = tile(T);
    for (int r = 0; r < kRows; ++r) {
      std::memcpy(t + r * kRowBytes, static_cast<const uint8_t*>(base) + r * stride, kRowBytes);
    }
  }
  template <int T>
  static void store(void* base, int64_t stride) {
    const uint8_t* t = tile(T);
    for (int r = 0; r < kRows; ++r) {
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, t + r * kRowBytes, kRowBytes);
    }
  }
  template <int C, int A, int B>
  static void dpbsud() {
    static_assert(C != A && C != B && A != B, "tdpbsud needs three distinct tiles");
    const auto* a = reinterpret_cast<const int8_t*>(tile(A));
    const uint8_t* b = tile(B);
    auto* c = reinterpret_cast<int32_t*>(tile(C));
    for (int m = 0; m < kRows; ++m) {
      for (int n = 0; n < kRowBytes / 4; ++n) {
        int32_t acc = 0;
        for (int k = 0; k < kRowBytes / 4; ++k) {
          for (int j = 0; j < 4; ++j) {
            acc += int32_t{a[m * kRowBytes + 4 * k + j]} * int32_t{b[k * kRowBytes + 4 * n + j]};
          }
        }
        int32_t cur;
        std::memcpy(&cur, c + m * 16 + n, 4);
        cur = int32_t(uint32_t(cur) + uint32_t(acc));  // wraps like the hardware
        std::memcpy(c + m * 16 + n, &cur, 4);
      }
    }
  }
};

}  // namespace amx
}  // namespace fastonnx
