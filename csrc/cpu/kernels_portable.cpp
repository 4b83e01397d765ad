// The CPU kernels for no vector extension (the reference path; any CPU, e.g. an ARM build): kernels.inl over vec_portable.h.
// Built by setup.py with the others; only run where dispatch.cpp finds the CPU supports it.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../common/fixed_math.h"
#include "kernels.h"
#include "vec_portable.h"

namespace adadecode::cpu::portable {
#include "kernels.inl"
}  // namespace adadecode::cpu::portable

namespace adadecode::cpu {
const Kernels* kernels_portable() { return portable::make_kernels(); }
}  // namespace adadecode::cpu
