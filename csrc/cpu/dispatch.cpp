// Which kernel path runs: the fastest one this CPU supports, or the one the engine is given (its `isa`: Python's
// EngineOptions reads ADADECODE_CPU_ISA, the one place it is read). All paths compute the same bits (kernels.h); the
// choice is speed alone.
//   avx512bf16  AVX-512 F/BW/VL/DQ + AVX512_BF16, and vdpbf16ps passes bf16_dot_selftest() on this CPU (two IEEE
//               FMAs per lane, high halves first: what kernels.inl's exactness rule assumes)
//   avx512      AVX-512 F/BW/VL/DQ + FMA
//   avx2        AVX2 + FMA
//   neon        AArch64 Advanced SIMD (every AArch64 CPU)
//   portable    any CPU
// Order: as listed, except that avx512bf16 goes after avx512 where its dot products are not faster than the FMA
// chains on this core (bf16_dot_gain() < 1.25: Sapphire Rapids runs vdpbf16ps at half the FMA rate per multiply-add;
// Zen 4/5 at twice). That probe times a few microseconds of each instruction, once per process.
#include <cstring>
#include <string>
#include <utility>

#include "kernels.h"

namespace adadecode::cpu {

#if defined(__x86_64__) || defined(_M_X64)
const Kernels* kernels_avx512bf16();
const Kernels* kernels_avx512();
const Kernels* kernels_avx2();
bool bf16_dot_selftest();
double bf16_dot_gain();
long bf16_dot_fallbacks();
#endif
#if defined(__aarch64__)
const Kernels* kernels_neon();
#endif
const Kernels* kernels_portable();

namespace {

bool cpu_has(const char* isa) {
  if (std::strcmp(isa, "portable") == 0) return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();  // libgcc also checks that the OS saves the vector state (XGETBV)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("fma");
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(isa, "avx512") == 0) return avx512;
  if (std::strcmp(isa, "avx512bf16") == 0) {
    static const bool ok = avx512 && __builtin_cpu_supports("avx512bf16") && bf16_dot_selftest();
    return ok;
  }
#endif
#if defined(__aarch64__)
  if (std::strcmp(isa, "neon") == 0) return true;
#endif
  return false;
}

}  // namespace

const Kernels* kernels_for(const char* isa) {
  if (isa == nullptr || !cpu_has(isa)) return nullptr;
#if defined(__x86_64__) || defined(_M_X64)
  if (std::strcmp(isa, "avx512bf16") == 0) return kernels_avx512bf16();
  if (std::strcmp(isa, "avx512") == 0) return kernels_avx512();
  if (std::strcmp(isa, "avx2") == 0) return kernels_avx2();
#endif
#if defined(__aarch64__)
  if (std::strcmp(isa, "neon") == 0) return kernels_neon();
#endif
  if (std::strcmp(isa, "portable") == 0) return kernels_portable();
  return nullptr;
}

const char* const* known_isas() {
  static const char* const list[] = {"avx512bf16", "avx512", "avx2", "neon", "portable", nullptr};
  return list;
}

const char* const* supported_isas() {
  static const char* list[8] = {};
  static const bool filled = [] {
    int n = 0;
    for (const char* const* isa = known_isas(); *isa; ++isa)
      if (cpu_has(*isa)) list[n++] = *isa;
#if defined(__x86_64__) || defined(_M_X64)
    if (n >= 2 && std::strcmp(list[0], "avx512bf16") == 0 && bf16_dot_gain() < 1.25) std::swap(list[0], list[1]);
#endif
    return true;
  }();
  (void)filled;
  return list;
}

#if !defined(__x86_64__) && !defined(_M_X64)
long bf16_dot_fallbacks() { return 0; }
#endif

const Kernels* best_kernels() { return kernels_for(supported_isas()[0]); }

}  // namespace adadecode::cpu
