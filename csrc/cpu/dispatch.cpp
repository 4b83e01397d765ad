// Which kernel path runs: the best one this CPU supports, or the one the engine is given (its `isa`: Python's
// EngineOptions reads ADADECODE_CPU_ISA, the one place it is read). All paths compute the same bits (kernels.h); the
// choice is speed alone.
#include <cstring>
#include <string>

#include "kernels.h"

namespace adadecode::cpu {

#if defined(__x86_64__) || defined(_M_X64)
const Kernels* kernels_avx512();
const Kernels* kernels_avx2();
#endif
const Kernels* kernels_portable();

namespace {

bool cpu_has(const char* isa) {
  if (std::strcmp(isa, "portable") == 0) return true;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();  // libgcc also checks that the OS saves the vector state (XGETBV)
  if (std::strcmp(isa, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(isa, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
#endif
  return false;
}

}  // namespace

const Kernels* kernels_for(const char* isa) {
  if (isa == nullptr || !cpu_has(isa)) return nullptr;
#if defined(__x86_64__) || defined(_M_X64)
  if (std::strcmp(isa, "avx512") == 0) return kernels_avx512();
  if (std::strcmp(isa, "avx2") == 0) return kernels_avx2();
#endif
  if (std::strcmp(isa, "portable") == 0) return kernels_portable();
  return nullptr;
}

const char* const* known_isas() {
  static const char* const list[] = {"avx512", "avx2", "portable", nullptr};
  return list;
}

const char* const* supported_isas() {
  static const char* list[4] = {};
  static const bool filled = [] {
    int n = 0;
    for (const char* const* isa = known_isas(); *isa; ++isa)
      if (cpu_has(*isa)) list[n++] = *isa;
    return true;
  }();
  (void)filled;
  return list;
}

const Kernels* best_kernels() { return kernels_for(supported_isas()[0]); }

}  // namespace adadecode::cpu
