// The lane vector of the CPU kernels, portable form: 16 fp32 lanes as a plain array, every operation lane by lane.
// It is the reference the vector forms (vec_avx2.h, vec_avx512.h) must equal bit for bit, and the path an ARM or
// any other build takes. Every arithmetic operation is one correctly rounded IEEE operation per lane (fma is one
// rounding: std::fmaf); the translation unit is compiled with -ffp-contract=off, so the compiler fuses nothing.
// See kernels.inl for the operations' contract (the same for every form).
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#include "../common/fixed_math.h"

namespace adadecode::cpu::portable {

// Lane vectors a register tile may count on (no register file here: the compiler's choice), and the accumulators
// attention's P.V may keep.
constexpr int kVecRegs = 64;
// Accumulator lane vectors a pass may keep live (kernels.inl: attention's P.V).
constexpr int kAccBudget = 16;
constexpr int kAttnQueries = 4;  // attention: queries scored together over one K load (as the reference)
constexpr const char* kIsaName = "portable";

struct V {
  float f[16];
};
struct VI {  // 16 int32 lanes
  int32_t i[16];
};

#define ADA_LANES(expr) \
  V r;                  \
  for (int j = 0; j < 16; ++j) r.f[j] = (expr); \
  return r

inline V vzero() { ADA_LANES(0.f); }
inline V vset1(float a) { ADA_LANES(a); }
inline V vload(const float* p) { ADA_LANES(p[j]); }
inline void vstore(float* p, V a) { std::memcpy(p, a.f, sizeof a.f); }
inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline V vload_bf16(const uint16_t* p) { ADA_LANES(bf16_to_f32(p[j])); }
// The first n lanes from p, the rest 0 (1 <= n <= 16).
inline V vload_bf16_n(const uint16_t* p, int n) { ADA_LANES(j < n ? bf16_to_f32(p[j]) : 0.f); }
inline V vload_n(const float* p, int n) { ADA_LANES(j < n ? p[j] : 0.f); }
inline void vstore_n(float* p, V a, int n) { for (int j = 0; j < n; ++j) p[j] = a.f[j]; }
// Two steps' 16 lanes from 16 words (the pair layout of lanes.h): a <- the high halves (element 2t, the word's second
// uint16), b <- the low halves (2t + 1). _n: the first n words, the other lanes 0.
inline void vload_bf16_pair(const uint16_t* p, V& a, V& b) {
  for (int j = 0; j < 16; ++j) a.f[j] = bf16_to_f32(p[2 * j + 1]), b.f[j] = bf16_to_f32(p[2 * j]);
}
inline void vload_bf16_pair_n(const uint16_t* p, int n, V& a, V& b) {
  for (int j = 0; j < 16; ++j) {
    a.f[j] = j < n ? bf16_to_f32(p[2 * j + 1]) : 0.f;
    b.f[j] = j < n ? bf16_to_f32(p[2 * j]) : 0.f;
  }
}
inline V vfma(V a, V b, V c) { ADA_LANES(std::fmaf(a.f[j], b.f[j], c.f[j])); }  // a * b + c, one rounding
inline V vadd(V a, V b) { ADA_LANES(a.f[j] + b.f[j]); }
inline V vsub(V a, V b) { ADA_LANES(a.f[j] - b.f[j]); }
inline V vmul(V a, V b) { ADA_LANES(a.f[j] * b.f[j]); }
inline V vdiv(V a, V b) { ADA_LANES(a.f[j] / b.f[j]); }
// max of non-NaN values (-0 and +0 may come out either way: callers never depend on the sign of a zero maximum)
inline V vneg(V a) { ADA_LANES(-a.f[j]); }
inline V vmax(V a, V b) { ADA_LANES(a.f[j] > b.f[j] ? a.f[j] : b.f[j]); }
// lanes j < n from b, the others from a
inline V vblend_first(V a, V b, int n) { ADA_LANES(j < n ? b.f[j] : a.f[j]); }
// lanes where a == -inf -> 0, else b
// lanes j < n: fma(a, b, c); the others keep c (a chain that has ended)
inline V vfma_first(V a, V b, V c, int n) { ADA_LANES(j < n ? std::fmaf(a.f[j], b.f[j], c.f[j]) : c.f[j]); }
inline V vzero_where_neginf(V a, V b) { ADA_LANES(a.f[j] == -INFINITY ? 0.f : b.f[j]); }
// lanes where idx[j] > limit -> -inf, else a (the causal mask)
inline V vmask_after(V a, int first_idx, int limit) { ADA_LANES(first_idx + j > limit ? -INFINITY : a.f[j]); }
// A gather: p[idx[j]].
inline V vgather(const float* p, const int32_t* idx) { ADA_LANES(p[idx[j]]); }

// The fixed tree over 16 lanes: s[j] = a[j] + a[j + 8] (j < 8), then + 4, + 2, + 1: a warp's butterfly after
// its first step (which adds lane j + 16: the second vector of the pair), lane 0's value.
inline float vreduce16(V a) {
  float s[8];
  for (int j = 0; j < 8; ++j) s[j] = a.f[j] + a.f[j + 8];
  for (int j = 0; j < 4; ++j) s[j] = s[j] + s[j + 4];
  for (int j = 0; j < 2; ++j) s[j] = s[j] + s[j + 2];
  return s[0] + s[1];
}
inline float vmax16(V a) {  // maximum of 16 non-NaN lanes (order-free)
  float m = a.f[0];
  for (int j = 1; j < 16; ++j) m = a.f[j] > m ? a.f[j] : m;
  return m;
}

// bf16 rounding (round to nearest even; NaN -> the canonical 0x7fff NaN), kept as fp32 values.
inline float bf16_round1(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    u = 0x7fff0000u;
  } else {
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline V vbf16_round(V a) { ADA_LANES(bf16_round1(a.f[j])); }
// 16 already-rounded values (vbf16_round's) to bf16 storage.
inline void vstore_bf16(uint16_t* p, V a) {
  for (int j = 0; j < 16; ++j) {
    uint32_t u;
    std::memcpy(&u, &a.f[j], 4);
    p[j] = static_cast<uint16_t>(u >> 16);
  }
}
// ---- the dot products' register tiles (kernels.inl) -------------------------------------------------------------
constexpr int kSub = 1, kSubLanes = 16, kRegs = 64;
using VS = V;
inline VS vs_zero() { return vzero(); }
inline VS vs_load(const float* p) { return vload(p); }
inline void vs_store(float* p, VS a) { vstore(p, a); }
inline VS vs_add(VS a, VS b) { return vadd(a, b); }
inline VS vs_fma(VS a, VS b, VS c) { return vfma(a, b, c); }
inline void vs_load_pair(const uint16_t* p, VS& a, VS& b) { vload_bf16_pair(p, a, b); }
inline void vs_load_pair_n(const uint16_t* p, int n, VS& a, VS& b) { vload_bf16_pair_n(p, n, a, b); }
constexpr int kFmaMaxRows = 8;
constexpr int kFmaCols[9] = {0, 1, 1, 2, 2, 2, 2, 2, 2};
constexpr bool kFmaXKept[9] = {false, false, false, false, false, false, false, false, false};
// sums[i] = vreduce16(f0 row i + f1 row i), n rows of 16 floats (the butterfly's first step, then its tree)
inline void vreduce16_pairs(const float* f0, const float* f1, int n, float* sums) {
  for (int i = 0; i < n; ++i) sums[i] = vreduce16(vadd(vload(f0 + 16 * i), vload(f1 + 16 * i)));
}

inline V vexp2(V a) { ADA_LANES(exp2_fixed(a.f[j])); }
inline V vexp(V a) { ADA_LANES(exp_fixed(a.f[j])); }

#undef ADA_LANES

// The software prefetch of a weight stream, 16 KB ahead of the address being read (kernels.inl: Bf16Weights::prefetch).
inline void prefetch_stream(const void* p) { __builtin_prefetch(static_cast<const char*>(p) + 16384, 0, 0); }

}  // namespace adadecode::cpu::portable
