// The CPU kernels for AArch64 Advanced SIMD: kernels.inl over vec_neon.h. Built by setup.py on aarch64 only (NEON
// is part of every AArch64 CPU); tests/test_cpu_neon.py builds it with Debian's aarch64 cross compiler and checks its
// bits under qemu-user against the x86 paths.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../common/fixed_math.h"
#include "kernels.h"
#include "vec_neon.h"

namespace adadecode::cpu::neon {
#include "kernels.inl"
}  // namespace adadecode::cpu::neon

namespace adadecode::cpu {
const Kernels* kernels_neon() { return neon::make_kernels(); }
}  // namespace adadecode::cpu
