// Seeded sampling math: the twin of adadecode/engines/sampling.py (read its docstring for the rule and for why the two
// agree bit for bit). Integer arithmetic, exact bit manipulation, floor, and IEEE fp32 +, -, *, / through the rn::
// operations of fixed_math.h (log_f32 and exp_f32 live there too). The Python reference runs the same operations
// one by one, in the same order, with the same constants (given by their bits). Host and device code:
// tests/test_sampling.py compiles this header for the CPU and compares it with the reference.
//
//   philox_word0(c0, c1, k0, k1)   word 0 of Philox-4x32-10 with counter (c0, c1, 0, 0) and key (k0, k1)
//   gumbel_noise(seed, pos, id)    -log(-log(u)), u = (2 (word0 >> 9) + 1) 2^-24, counter (pos, id)
//   top_p_weight(z, m)             floor(exp_f32(z - m) 2^24), 0 below z - m = -17
//   order_key(f)                   uint32 whose unsigned order is f's numeric order (-0 as +0; f not NaN)
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/fixed_math.h"  // csrc/common: shared with the CPU engine

namespace adadecode {

// What lm_head_sample reads from device memory (written by the host before the launch or graph replay).
struct SampleParams {
  uint64_t seed;
  double top_p;           // (0, 1]; 1: no nucleus
  float inv_temperature;  // fp32(1 / temperature), > 0
  int32_t top_k;          // 0 (or >= n): no top-k
  int32_t pos;            // the position of the token row 0 draws; row r draws pos + r
  int32_t pad_;
};

constexpr float kExpClamp = -17.f;  // top-p weights below exp(-17) are 0

ADA_HD uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
  for (int r = 0; r < 10; ++r) {
    if (r) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    const uint32_t hi0 = rn::mulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = rn::mulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
  }
  return c0;
}

ADA_HD float gumbel_noise(uint64_t seed, int32_t pos, int32_t id) {
  const uint32_t x = philox_word0(static_cast<uint32_t>(pos), static_cast<uint32_t>(id),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u = rn::mul(static_cast<float>(((x >> 9) << 1) | 1u), rn::as_float(0x33800000u));  // exact: 2^-24
  return -log_f32(-log_f32(u));
}

ADA_HD uint64_t top_p_weight(float z, float m) {
  const float d = rn::sub(z, m);
  if (!(d >= kExpClamp)) return 0;
  return static_cast<uint64_t>(floorf(rn::mul(exp_f32(d), 16777216.f)));  // 2^24
}

ADA_HD uint32_t order_key(float f) {
  if (f == 0.f) f = 0.f;  // -0 sorts as +0, as the numeric comparison does
  const uint32_t b = rn::as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

}  // namespace adadecode
