// The CPU kernels for AVX-512 (F, BW, VL, DQ) with FMA: kernels.inl over vec_avx512.h.
// Built by setup.py with the others; only run where dispatch.cpp finds the CPU supports it.
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../common/fixed_math.h"
#include "kernels.h"

// Only what is defined below gets the target: the headers above (the standard library's inline functions, the
// scalar fixed math) stay baseline code, so no weak symbol the linker may pick for another path holds these
// instructions.
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")
#include "vec_avx512.h"

namespace adadecode::cpu::avx512 {
#include "kernels.inl"
}  // namespace adadecode::cpu::avx512

namespace adadecode::cpu {
const Kernels* kernels_avx512() { return avx512::make_kernels(); }
}  // namespace adadecode::cpu
