// Seeded sampling math: the twin of adadecode/engines/sampling.py (read its docstring for the rule and for why the two
// agree bit for bit). Integer arithmetic, exact bit manipulation, floor, and IEEE fp32 +, -, *, / through add_rn,
// sub_rn, mul_rn, div_rn: on the GPU the __f*_rn intrinsics (nvcc never contracts those into FMAs), on a host
// compiler a volatile store after every operation (no contraction either). The Python reference runs the same
// operations one by one, in the same order, with the same constants (given by their bits). Host and device code:
// tests/test_sampling.py compiles this header for the CPU and compares it with the reference.
//
//   philox_word0(c0, c1, k0, k1)   word 0 of Philox-4x32-10 with counter (c0, c1, 0, 0) and key (k0, k1)
//   gumbel_noise(seed, pos, id)    -log(-log(u)), u = (2 (word0 >> 9) + 1) 2^-24, counter (pos, id)
//   log_f32 / exp_f32              log of a positive normal float; exp on [-17, 0]
//   top_p_weight(z, m)             floor(exp_f32(z - m) 2^24), 0 below z - m = -17
//   order_key(f)                   uint32 whose unsigned order is f's numeric order (-0 as +0; f not NaN)
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define ADA_HD __host__ __device__ __forceinline__
#else
#define ADA_HD inline
#endif

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

namespace rn {  // one correctly rounded fp32 operation each, never fused with another
#if defined(__CUDA_ARCH__)
ADA_HD float add(float a, float b) { return __fadd_rn(a, b); }
ADA_HD float sub(float a, float b) { return __fsub_rn(a, b); }
ADA_HD float mul(float a, float b) { return __fmul_rn(a, b); }
ADA_HD float div(float a, float b) { return __fdiv_rn(a, b); }
ADA_HD float as_float(uint32_t u) { return __uint_as_float(u); }
ADA_HD uint32_t as_uint(float f) { return __float_as_uint(f); }
ADA_HD uint32_t mulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
#else
ADA_HD float add(float a, float b) { volatile float r = a + b; return r; }
ADA_HD float sub(float a, float b) { volatile float r = a - b; return r; }
ADA_HD float mul(float a, float b) { volatile float r = a * b; return r; }
ADA_HD float div(float a, float b) { volatile float r = a / b; return r; }
ADA_HD float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
ADA_HD uint32_t as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
ADA_HD uint32_t mulhi(uint32_t a, uint32_t b) { return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32); }
#endif
ADA_HD float mul_add(float p, float x, float c) { return add(mul(p, x), c); }  // one Horner step, two roundings
}  // namespace rn

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

ADA_HD float log_f32(float x) {
  const uint32_t bits = rn::as_uint(x);
  int e = static_cast<int>(bits >> 23) - 127;                // x > 0: no sign bit
  float m = rn::as_float((bits & 0x7FFFFFu) | 0x3F800000u);  // x = m 2^e, m in [1, 2)
  if (m > rn::as_float(0x3FB504F3u)) {                       // sqrt(2)
    m = rn::mul(m, 0.5f);
    e += 1;
  }
  const float f = rn::sub(m, 1.f);
  const float s = rn::div(f, rn::add(f, 2.f));  // log(m) = 2 atanh(s) = s (2 + 2/3 s^2 + 2/5 s^4 + ...)
  const float s2 = rn::mul(s, s);
  constexpr uint32_t c[] = {0x3E3A2E8Cu, 0x3E638E39u, 0x3E924925u, 0x3ECCCCCDu, 0x3F2AAAABu};  // 2/11, 2/9, .. 2/3
  float p = rn::as_float(c[0]);
  for (int i = 1; i < 5; ++i) p = rn::mul_add(p, s2, rn::as_float(c[i]));
  p = rn::mul_add(p, s2, 2.f);
  return rn::add(rn::mul(static_cast<float>(e), rn::as_float(0x3F317218u)), rn::mul(s, p));  // e ln2 + log(m)
}

ADA_HD float exp_f32(float d) {
  const float t = rn::mul(d, rn::as_float(0x3FB8AA3Bu));  // log2(e)
  const float n = floorf(t);
  const float x = rn::mul(rn::sub(rn::sub(t, n), 0.5f), rn::as_float(0x3F317218u));  // exp(d) = 2^n sqrt2 e^x
  constexpr uint32_t c[] = {0x39500D01u, 0x3AB60B61u, 0x3C088889u, 0x3D2AAAABu, 0x3E2AAAABu,  // 1/5040 .. 1/6
                            0x3F000000u, 0x3F800000u, 0x3F800000u};                           // 1/2, 1, 1
  float p = rn::as_float(c[0]);
  for (int i = 1; i < 8; ++i) p = rn::mul_add(p, x, rn::as_float(c[i]));
  const float scale = rn::as_float(static_cast<uint32_t>(static_cast<int>(n) + 127) << 23);  // 2^n, n >= -25
  return rn::mul(rn::mul(p, rn::as_float(0x3FB504F3u)), scale);
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
