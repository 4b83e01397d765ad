// Seeded sampling, device side: the twin of adadecode/sampling.py (read its docstring for the rule and for why the
// two agree bit for bit). Everything here is integer arithmetic, exact bit manipulation, floorf, and IEEE fp32
// +, -, *, / spelled __fadd_rn/__fsub_rn/__fmul_rn/__fdiv_rn so that nvcc cannot contract them into FMAs: the
// Python reference runs the same operations one by one, in the same order, with the same constants (by bits).
//
//   philox_word0(c0, c1, k0, k1)   word 0 of Philox-4x32-10 with counter (c0, c1, 0, 0) and key (k0, k1)
//   gumbel_noise(seed, pos, id)    -log(-log(u)), u = (2 (word0 >> 9) + 1) 2^-24, counter (pos, id)
//   log_f32 / exp_f32              log of a positive normal float; exp on [-17, 0]
//   order_key(f)                   uint32 whose unsigned order is f's numeric order (-0 as +0; f not NaN)
#pragma once
#include <cstdint>

#include "common.cuh"

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

constexpr int kWeightBits = 24;     // top-p weights: floor(exp(z - max) * 2^24)
constexpr float kExpClamp = -17.f;  // below: weight 0

#ifdef __CUDACC__

// p * x + c in two roundings (never an FMA): one Horner step, as the reference computes it.
__device__ __forceinline__ float mul_add_rn(float p, float x, float c) { return __fadd_rn(__fmul_rn(p, x), c); }

__device__ __forceinline__ uint32_t philox_word0(uint32_t c0, uint32_t c1, uint32_t k0, uint32_t k1) {
  uint32_t c2 = 0, c3 = 0;
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    if (r) k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    const uint32_t hi0 = __umulhi(0xD2511F53u, c0), lo0 = 0xD2511F53u * c0;
    const uint32_t hi1 = __umulhi(0xCD9E8D57u, c2), lo1 = 0xCD9E8D57u * c2;
    const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
    c0 = n0, c1 = lo1, c2 = n2, c3 = lo0;
  }
  return c0;
}

__device__ __forceinline__ float log_f32(float x) {
  const int bits = __float_as_int(x);
  int e = (bits >> 23) - 127;
  float m = __int_as_float((bits & 0x7FFFFF) | 0x3F800000);  // x = m 2^e, m in [1, 2)
  if (m > __int_as_float(0x3FB504F3)) {                     // sqrt(2)
    m = __fmul_rn(m, 0.5f);
    e += 1;
  }
  const float f = __fsub_rn(m, 1.f);
  const float s = __fdiv_rn(f, __fadd_rn(f, 2.f));
  const float s2 = __fmul_rn(s, s);
  constexpr uint32_t c[] = {0x3E3A2E8C, 0x3E638E39, 0x3E924925, 0x3ECCCCCD, 0x3F2AAAAB};  // 2/11, 2/9, .. 2/3
  float p = __int_as_float(c[0]);
#pragma unroll
  for (int i = 1; i < 5; ++i) p = mul_add_rn(p, s2, __int_as_float(c[i]));
  p = mul_add_rn(p, s2, 2.f);
  return __fadd_rn(__fmul_rn(static_cast<float>(e), __int_as_float(0x3F317218)), __fmul_rn(s, p));  // e ln2 + ...
}

__device__ __forceinline__ float exp_f32(float d) {
  const float ln2 = __int_as_float(0x3F317218);
  const float t = __fmul_rn(d, __int_as_float(0x3FB8AA3B));  // log2(e)
  const float n = floorf(t);
  const float x = __fmul_rn(__fsub_rn(__fsub_rn(t, n), 0.5f), ln2);
  constexpr uint32_t c[] = {0x39500D01, 0x3AB60B61, 0x3C088889, 0x3D2AAAAB, 0x3E2AAAAB,  // 1/5040 .. 1/6
                            0x3F000000, 0x3F800000, 0x3F800000};                       // 1/2, 1, 1
  float p = __int_as_float(c[0]);
#pragma unroll
  for (int i = 1; i < 8; ++i) p = mul_add_rn(p, x, __int_as_float(c[i]));
  const float scale = __int_as_float((static_cast<int>(n) + 127) << 23);  // 2^n, n >= -25
  return __fmul_rn(__fmul_rn(p, __int_as_float(0x3FB504F3)), scale);
}

__device__ __forceinline__ float gumbel_noise(uint64_t seed, int32_t pos, int32_t id) {
  const uint32_t x = philox_word0(static_cast<uint32_t>(pos), static_cast<uint32_t>(id),
                                  static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
  const float u = __fmul_rn(static_cast<float>(((x >> 9) << 1) | 1u), __int_as_float(0x33800000));  // 2^-24
  return -log_f32(-log_f32(u));
}

// Top-p weight of a tempered logit z (d = z - max z <= 0).
__device__ __forceinline__ uint64_t top_p_weight(float z, float m) {
  const float d = __fsub_rn(z, m);
  if (!(d >= kExpClamp)) return 0;
  return static_cast<uint64_t>(floorf(__fmul_rn(exp_f32(d), 16777216.f)));  // 2^24
}

__device__ __forceinline__ uint32_t order_key(float f) {
  if (f == 0.f) f = 0.f;  // -0 sorts as +0, as the numeric comparison does
  const uint32_t b = __float_as_uint(f);
  return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

#endif  // __CUDACC__

}  // namespace adadecode
