// The lane vector of the CPU kernels on AArch64 Advanced SIMD (NEON): 16 fp32 lanes = four q registers (lanes 0-3,
// 4-7, 8-11, 12-15). Each operation equals vec_portable.h's lane by lane, bit for bit: the same IEEE operations
// (vfmaq_f32 is one rounding, vdivq_f32 correctly rounded; FPCR at its Linux default: round to nearest, no flush to
// zero), the same fixed-math sequences as vec_avx2.h, vreduce16's tree in the same order, and x86's max/min
// semantics spelled out by compare and select. tests/test_cpu_neon.py cross-compiles a kernel check program for
// aarch64 and runs it under qemu-user against the x86 paths on fixed inputs.
#pragma once
#include <arm_neon.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace adadecode::cpu::neon {

// Lane vectors the register file holds (32 q = 8 vectors), and the accumulators attention's P.V may keep.
constexpr int kVecRegs = 8;
constexpr int kAccBudget = 4;
constexpr int kAttnQueries = 4;  // attention: queries scored together over one K load (4 four-register chains of the 32 q)
constexpr const char* kIsaName = "neon";

struct V {
  float32x4_t q[4];
};

#define ADA_Q4(expr)                        \
  V r;                                      \
  for (int i = 0; i < 4; ++i) r.q[i] = (expr); \
  return r

inline V vzero() { ADA_Q4(vdupq_n_f32(0.f)); }
inline V vset1(float a) { ADA_Q4(vdupq_n_f32(a)); }
inline V vload(const float* p) { ADA_Q4(vld1q_f32(p + 4 * i)); }
inline void vstore(float* p, V a) {
  for (int i = 0; i < 4; ++i) vst1q_f32(p + 4 * i, a.q[i]);
}
inline float32x4_t widen4(uint16x4_t h) { return vreinterpretq_f32_u32(vshll_n_u16(h, 16)); }
inline V vload_bf16(const uint16_t* p) { ADA_Q4(widen4(vld1_u16(p + 4 * i))); }
inline V vload_bf16_n(const uint16_t* p, int n) {
  alignas(16) uint16_t t[16] = {};
  std::memcpy(t, p, sizeof(uint16_t) * n);
  return vload_bf16(t);
}
inline V vload_n(const float* p, int n) {
  alignas(16) float t[16] = {};
  std::memcpy(t, p, sizeof(float) * n);
  return vload(t);
}
inline void vstore_n(float* p, V a, int n) {
  alignas(16) float t[16];
  vstore(t, a);
  std::memcpy(p, t, sizeof(float) * n);
}
// Two steps' lanes from words (the pair layout of lanes.h): a <- the high halves (element 2t), b <- the low halves
// (2t + 1).
inline void split4(uint32x4_t d, float32x4_t& a, float32x4_t& b) {
  a = vreinterpretq_f32_u32(vandq_u32(d, vdupq_n_u32(0xffff0000u)));
  b = vreinterpretq_f32_u32(vshlq_n_u32(d, 16));
}
inline void vload_bf16_pair(const uint16_t* p, V& a, V& b) {
  for (int i = 0; i < 4; ++i) split4(vld1q_u32(reinterpret_cast<const uint32_t*>(p) + 4 * i), a.q[i], b.q[i]);
}
inline void vload_bf16_pair_n(const uint16_t* p, int n, V& a, V& b) {
  alignas(16) uint32_t t[16] = {};
  std::memcpy(t, p, sizeof(uint32_t) * n);
  vload_bf16_pair(reinterpret_cast<const uint16_t*>(t), a, b);
}
inline V vfma(V a, V b, V c) { ADA_Q4(vfmaq_f32(c.q[i], a.q[i], b.q[i])); }  // a * b + c, one rounding
inline V vadd(V a, V b) { ADA_Q4(vaddq_f32(a.q[i], b.q[i])); }
inline V vsub(V a, V b) { ADA_Q4(vsubq_f32(a.q[i], b.q[i])); }
inline V vmul(V a, V b) { ADA_Q4(vmulq_f32(a.q[i], b.q[i])); }
inline V vdiv(V a, V b) { ADA_Q4(vdivq_f32(a.q[i], b.q[i])); }
inline V vneg(V a) { ADA_Q4(vnegq_f32(a.q[i])); }
// a > b ? a : b (x86's maxps and the portable form: b when either is NaN or both are zeros)
inline float32x4_t max4(float32x4_t a, float32x4_t b) { return vbslq_f32(vcgtq_f32(a, b), a, b); }
inline float32x4_t min4(float32x4_t a, float32x4_t b) { return vbslq_f32(vcltq_f32(a, b), a, b); }
inline V vmax(V a, V b) { ADA_Q4(max4(a.q[i], b.q[i])); }
inline uint32x4_t lanes_below(int n, int base) {  // all-ones where base + j < n
  const int32_t idx[4] = {base, base + 1, base + 2, base + 3};
  return vcltq_s32(vld1q_s32(idx), vdupq_n_s32(n));
}
inline V vblend_first(V a, V b, int n) { ADA_Q4(vbslq_f32(lanes_below(n, 4 * i), b.q[i], a.q[i])); }
// lanes j < n: fma(a, b, c); the others keep c (a chain that has ended)
inline V vfma_first(V a, V b, V c, int n) { return vblend_first(c, vfma(a, b, c), n); }
inline V vzero_where_neginf(V a, V b) {
  ADA_Q4(vbslq_f32(vceqq_f32(a.q[i], vdupq_n_f32(-INFINITY)), vdupq_n_f32(0.f), b.q[i]));
}
inline V vmask_after(V a, int first_idx, int limit) {  // lanes with first_idx + j > limit -> -inf
  const int keep = limit - first_idx + 1;
  const int k = keep < 0 ? 0 : keep > 16 ? 16 : keep;
  ADA_Q4(vbslq_f32(lanes_below(k, 4 * i), a.q[i], vdupq_n_f32(-INFINITY)));
}
inline V vgather(const float* p, const int32_t* idx) {
  alignas(16) float t[16];
  for (int j = 0; j < 16; ++j) t[j] = p[idx[j]];
  return vload(t);
}

// vreduce16's tree: s[j] = a[j] + a[j + 8], then + 4, + 2, + 1
inline float vreduce16(V a) {
  const float32x4_t s2 = vaddq_f32(vaddq_f32(a.q[0], a.q[2]), vaddq_f32(a.q[1], a.q[3]));
  const float32x2_t s3 = vadd_f32(vget_low_f32(s2), vget_high_f32(s2));
  return vget_lane_f32(s3, 0) + vget_lane_f32(s3, 1);
}
inline float vmax16(V a) {  // maximum of 16 non-NaN lanes (order-free)
  const float32x4_t m = max4(max4(a.q[0], a.q[1]), max4(a.q[2], a.q[3]));
  alignas(16) float t[4];
  vst1q_f32(t, m);
  float r = t[0];
  for (int j = 1; j < 4; ++j) r = t[j] > r ? t[j] : r;
  return r;
}

inline float32x4_t round4(float32x4_t a) {
  const uint32x4_t u = vreinterpretq_u32_f32(a);
  const uint32x4_t nan = vcgtq_u32(vandq_u32(u, vdupq_n_u32(0x7fffffffu)), vdupq_n_u32(0x7f800000u));
  const uint32x4_t lsb = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
  const uint32x4_t r = vandq_u32(vaddq_u32(vaddq_u32(u, vdupq_n_u32(0x7fffu)), lsb), vdupq_n_u32(0xffff0000u));
  return vreinterpretq_f32_u32(vbslq_u32(nan, vdupq_n_u32(0x7fff0000u), r));
}
inline V vbf16_round(V a) { ADA_Q4(round4(a.q[i])); }
inline void vstore_bf16(uint16_t* p, V a) {
  for (int i = 0; i < 4; ++i) vst1_u16(p + 4 * i, vshrn_n_u32(vreinterpretq_u32_f32(a.q[i]), 16));
}

inline float32x4_t bits(uint32_t u) { return vreinterpretq_f32_u32(vdupq_n_u32(u)); }
// p * 2^n (n: integral floats in [-252, 254]) as two exact power-of-two factors, one rounding (fixed_math.h)
inline float32x4_t pow2i_scale(float32x4_t p, float32x4_t n) {
  const int32x4_t ni = vcvtnq_s32_f32(n);
  const int32x4_t n1 = vshrq_n_s32(ni, 1), n2 = vsubq_s32(ni, n1);
  const int32x4_t e1 = vshlq_n_s32(vaddq_s32(n1, vdupq_n_s32(127)), 23);
  const int32x4_t e2 = vshlq_n_s32(vaddq_s32(n2, vdupq_n_s32(127)), 23);
  return vmulq_f32(vmulq_f32(p, vreinterpretq_f32_s32(e1)), vreinterpretq_f32_s32(e2));
}
inline uint32x4_t is_nan(float32x4_t x) { return vmvnq_u32(vceqq_f32(x, x)); }
inline float32x4_t exp2_4(float32x4_t x) {  // exp2_fixed lane by lane (vec_avx2.h: exp2_8)
  const float32x4_t xc = min4(max4(x, vdupq_n_f32(-126.f)), vdupq_n_f32(127.99999237060547f));
  const float32x4_t M = vdupq_n_f32(kRoundMagic);
  const float32x4_t n = vsubq_f32(vaddq_f32(xc, M), M);
  const float32x4_t f = vsubq_f32(xc, n);
  float32x4_t p = bits(exp2_taylor(0));
  for (int i = 1; i < 8; ++i) p = vfmaq_f32(bits(exp2_taylor(i)), p, f);
  float32x4_t r = pow2i_scale(p, n);
  r = vbslq_f32(vcltq_f32(x, vdupq_n_f32(-126.f)), vdupq_n_f32(0.f), r);
  r = vbslq_f32(vcgeq_f32(x, vdupq_n_f32(128.f)), vdupq_n_f32(INFINITY), r);
  return vbslq_f32(is_nan(x), x, r);
}
inline float32x4_t exp_4(float32x4_t x) {  // exp_fixed lane by lane (vec_avx2.h: exp_8)
  const float32x4_t xc = min4(max4(x, vdupq_n_f32(-103.f)), vdupq_n_f32(88.8f));
  const float32x4_t M = vdupq_n_f32(kRoundMagic);
  const float32x4_t n = vsubq_f32(vaddq_f32(vmulq_f32(xc, bits(kLog2e)), M), M);
  const float32x4_t nn = vnegq_f32(n);
  float32x4_t r = vfmaq_f32(xc, nn, bits(kLn2Hi));
  r = vfmaq_f32(r, nn, bits(kLn2Lo));
  float32x4_t p = bits(exp_taylor(0));
  for (int i = 1; i < 8; ++i) p = vfmaq_f32(bits(exp_taylor(i)), p, r);
  float32x4_t y = pow2i_scale(p, n);
  y = vbslq_f32(vcltq_f32(x, vdupq_n_f32(-103.f)), vdupq_n_f32(0.f), y);
  y = vbslq_f32(vcgtq_f32(x, vdupq_n_f32(88.8f)), vdupq_n_f32(INFINITY), y);
  return vbslq_f32(is_nan(x), x, y);
}
inline V vexp2(V a) { ADA_Q4(exp2_4(a.q[i])); }
inline V vexp(V a) { ADA_Q4(exp_4(a.q[i])); }

#undef ADA_Q4

// The software prefetch of a weight stream, 16 KB ahead of the address being read (kernels.inl: Bf16Weights::prefetch).
inline void prefetch_stream(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + 16384, 0, 0); }

// ---- the dot products' register tiles (kernels.inl) -------------------------------------------------------------
// A tile's unit is one q register (kSubLanes = 4 lanes, a quarter of V); 32 of them. NEON has no memory operands:
// RT x CT accumulators + 2 CT weight vectors + 2 activation vectors + 1 (mask) when the weights stay, + 2 RT
// activations + 3 when the rows' do.
constexpr int kSub = 4, kSubLanes = 4, kRegs = 32;
struct VS {
  float32x4_t v;
};
inline VS vs_zero() { return {vdupq_n_f32(0.f)}; }
inline VS vs_load(const float* p) { return {vld1q_f32(p)}; }
inline void vs_store(float* p, VS a) { vst1q_f32(p, a.v); }
inline VS vs_add(VS a, VS b) { return {vaddq_f32(a.v, b.v)}; }
inline VS vs_fma(VS a, VS b, VS c) { return {vfmaq_f32(c.v, a.v, b.v)}; }
inline void vs_load_pair(const uint16_t* p, VS& a, VS& b) { split4(vld1q_u32(reinterpret_cast<const uint32_t*>(p)), a.v, b.v); }
inline void vs_load_pair_n(const uint16_t* p, int n, VS& a, VS& b) {
  alignas(16) uint32_t t[4] = {};
  std::memcpy(t, p, sizeof(uint32_t) * n);
  split4(vld1q_u32(t), a.v, b.v);
}
// Not measured on ARM hardware (none here): sized for the 32 registers, the weight split amortised over 5 rows.
constexpr int kFmaMaxRows = 5;
constexpr int kFmaCols[9] = {0, 4, 4, 4, 4, 4, 0, 0, 0};
constexpr bool kFmaXKept[9] = {false, true, true, false, false, false, false, false, false};

// sums[i] = vreduce16(f0 row i + f1 row i) (the butterfly's first step, then vreduce16's tree), four rows at a time:
// j + (j + 8) and + 4 by rows, then + 2 (64-bit zips) and + 1 (pairwise adds) across four rows at once.
inline void vreduce16_pairs(const float* f0, const float* f1, int n, float* sums) {
  for (int i0 = 0; i0 < n; i0 += 4) {
    const int m = n - i0 < 4 ? n - i0 : 4;
    float32x4_t s2[4];
    for (int k = 0; k < 4; ++k) {
      if (k >= m) {
        s2[k] = vdupq_n_f32(0.f);
        continue;
      }
      const float* a = f0 + (i0 + k) * 16;
      const float* b = f1 + (i0 + k) * 16;
      float32x4_t q[4];
      for (int i = 0; i < 4; ++i) q[i] = vaddq_f32(vld1q_f32(a + 4 * i), vld1q_f32(b + 4 * i));
      s2[k] = vaddq_f32(vaddq_f32(q[0], q[2]), vaddq_f32(q[1], q[3]));
    }
    auto z = [](float32x4_t x, float32x4_t y) {  // [x0 + x2, x1 + x3, y0 + y2, y1 + y3]
      const float64x2_t a = vreinterpretq_f64_f32(x), b = vreinterpretq_f64_f32(y);
      return vaddq_f32(vreinterpretq_f32_f64(vzip1q_f64(a, b)), vreinterpretq_f32_f64(vzip2q_f64(a, b)));
    };
    alignas(16) float t[4];
    vst1q_f32(t, vpaddq_f32(z(s2[0], s2[1]), z(s2[2], s2[3])));
    for (int i = 0; i < m; ++i) sums[i0 + i] = t[i];
  }
}

}  // namespace adadecode::cpu::neon
