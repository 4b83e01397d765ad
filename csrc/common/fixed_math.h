// Fixed-order fp32 math: functions whose every bit is defined by a sequence of correctly rounded IEEE operations
// (rn:: below: +, -, *, /, sqrt, fma, each rounded once and never fused with another), integer bit manipulation and
// floor. The same sequence gives the same bits on a GPU (the __f*_rn intrinsics), on the emulated device, and on
// any host compiler and instruction set (a volatile store after every operation: no contraction, no extended
// precision; fma is one rounding wherever it runs). The libm / CUDA functions (expf, exp2f, logf, rsqrtf) are
// approximations that differ in the last bits between glibc, SLEEF and the GPU, so no kernel whose result must be
// reproduced elsewhere calls them. The CPU engine's vector kernels (csrc/cpu) repeat these sequences lane by lane;
// tests/test_cpu_kernels.py checks them against the scalar ones bit for bit on every instruction set.
//
//   log_f32(x)     natural log of a positive normal float (top-p sampling, the LM head's log-sum-exp)
//   exp_f32(d)     exp(d) on [-17, 0] without fma (sampling's top-p weights: the Python reference's sequence)
//   exp2_fixed(x)  2^x for any x: attention's softmax (scores are in log2 units); < 2^-126 flushes to 0
//   exp_fixed(x)   e^x for any x: SiLU and the LM head's softmax statistics; < e^-103 flushes to 0
//   inv_sqrt(x)    1 / sqrt(x), two roundings (RMSNorm)
// Accuracy of exp2_fixed / exp_fixed: within 2 ulp of the exact value in the normal range (tested).
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

namespace rn {  // one correctly rounded fp32 operation each, never fused with another
#if defined(__CUDA_ARCH__)
ADA_HD float add(float a, float b) { return __fadd_rn(a, b); }
ADA_HD float sub(float a, float b) { return __fsub_rn(a, b); }
ADA_HD float mul(float a, float b) { return __fmul_rn(a, b); }
ADA_HD float div(float a, float b) { return __fdiv_rn(a, b); }
ADA_HD float as_float(uint32_t u) { return __uint_as_float(u); }
ADA_HD uint32_t as_uint(float f) { return __float_as_uint(f); }
ADA_HD uint32_t mulhi(uint32_t a, uint32_t b) { return __umulhi(a, b); }
ADA_HD float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
ADA_HD float sqrt(float a) { return __fsqrt_rn(a); }
#else
ADA_HD float add(float a, float b) { volatile float r = a + b; return r; }
ADA_HD float sub(float a, float b) { volatile float r = a - b; return r; }
ADA_HD float mul(float a, float b) { volatile float r = a * b; return r; }
ADA_HD float div(float a, float b) { volatile float r = a / b; return r; }
ADA_HD float as_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
ADA_HD uint32_t as_uint(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
ADA_HD uint32_t mulhi(uint32_t a, uint32_t b) { return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32); }
ADA_HD float fma(float a, float b, float c) { return std::fmaf(a, b, c); }  // one rounding, any libm
ADA_HD float sqrt(float a) { volatile float r = std::sqrt(a); return r; }
#endif
ADA_HD float mul_add(float p, float x, float c) { return add(mul(p, x), c); }  // one Horner step, two roundings
}  // namespace rn

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

// 2^x = 2^n * 2^f, n = x rounded to nearest (even on ties), f = x - n in [-1/2, 1/2] exactly; 2^f by its Taylor
// series to degree 7 in Horner form with fma (truncation error 5e-9 relative), then two exact power-of-two scalings
// (2^(n >> 1) then 2^(n - (n >> 1)): each factor is a normal float even where 2^n is not, so the product rounds
// once, into the subnormal range where it must).
// (the coefficients by index: a function, since a namespace-scope array is host memory to nvcc)
ADA_HD uint32_t exp2_taylor(int i) {
  constexpr uint32_t c[8] = {0x377FE5FEu, 0x39218489u, 0x3AAEC3FFu, 0x3C1D955Bu,   // ln2^7/7! .. ln2^4/4!
                             0x3D635847u, 0x3E75FDF0u, 0x3F317218u, 0x3F800000u};  // ln2^3/3! .. 1
  return c[i];
}
constexpr float kRoundMagic = 12582912.f;  // 1.5 * 2^23: (x + M) - M rounds |x| < 2^22 to an integer (ties even)

ADA_HD float pow2i_scale(float p, int n) {  // p * 2^n for n in [-252, 254], one rounding
  const int n1 = n >> 1, n2 = n - n1;
  return rn::mul(rn::mul(p, rn::as_float(static_cast<uint32_t>(n1 + 127) << 23)),
                 rn::as_float(static_cast<uint32_t>(n2 + 127) << 23));
}

ADA_HD float exp2_fixed(float x) {
  if (x != x) return x;
  if (x < -126.f) return 0.f;
  if (x >= 128.f) return INFINITY;
  const float n = rn::sub(rn::add(x, kRoundMagic), kRoundMagic);
  const float f = rn::sub(x, n);
  float p = rn::as_float(exp2_taylor(0));
  for (int i = 1; i < 8; ++i) p = rn::fma(p, f, rn::as_float(exp2_taylor(i)));
  return pow2i_scale(p, static_cast<int>(n));
}

// e^x = 2^n e^r, n = round(x log2 e), r = x - n ln2 in two fma steps (Cody and Waite: ln2 = hi + lo, hi with 9
// significant bits), |r| <= 0.3466 + 2^-12; e^r by its Taylor series to degree 7 (truncation 5e-9 relative).
ADA_HD uint32_t exp_taylor(int i) {
  constexpr uint32_t c[8] = {0x39500D01u, 0x3AB60B61u, 0x3C088889u, 0x3D2AAAABu,  // 1/7! .. 1/4!
                             0x3E2AAAABu, 0x3F000000u, 0x3F800000u, 0x3F800000u};  // 1/3! .. 1
  return c[i];
}
constexpr uint32_t kLog2e = 0x3FB8AA3Bu, kLn2Hi = 0x3F318000u, kLn2Lo = 0xB95E8083u;

ADA_HD float exp_fixed(float x) {
  if (x != x) return x;
  if (x < -103.f) return 0.f;
  if (x > 88.8f) return INFINITY;
  const float n = rn::sub(rn::add(rn::mul(x, rn::as_float(kLog2e)), kRoundMagic), kRoundMagic);
  float r = rn::fma(-n, rn::as_float(kLn2Hi), x);
  r = rn::fma(-n, rn::as_float(kLn2Lo), r);
  float p = rn::as_float(exp_taylor(0));
  for (int i = 1; i < 8; ++i) p = rn::fma(p, r, rn::as_float(exp_taylor(i)));
  return pow2i_scale(p, static_cast<int>(n));
}

ADA_HD float inv_sqrt(float x) { return rn::div(1.f, rn::sqrt(x)); }

}  // namespace adadecode
