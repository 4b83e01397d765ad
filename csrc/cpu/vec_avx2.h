// The lane vector of the CPU kernels on AVX2 + FMA: 16 fp32 lanes = two ymm registers (lanes 0-7, 8-15). Each
// operation equals vec_portable.h's lane by lane, bit for bit (same IEEE operations, same fixed-math sequences,
// the tree of vreduce16 in the same order).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace adadecode::cpu::avx2 {

// Lane vectors the register file holds (16 ymm = 8 vectors), and the accumulators attention's P.V may keep.
constexpr int kVecRegs = 8;
// Accumulator lane vectors a pass may keep live (kernels.inl: attention's P.V; the other registers hold operands).
constexpr int kAccBudget = 4;
constexpr int kAttnQueries = 4;  // attention: queries scored together over one K load (4 two-register chains of the 16 ymm)
constexpr const char* kIsaName = "avx2";

struct V {
  __m256 lo, hi;
};

#define ADA_BOTH(op) return {op(a.lo), op(a.hi)}

inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V vset1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void vstore(float* p, V a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline __m256 widen8(__m128i h) { return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)); }
inline V vload_bf16(const uint16_t* p) {
  return {widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
inline V vload_bf16_n(const uint16_t* p, int n) {
  alignas(32) uint16_t t[16] = {};
  std::memcpy(t, p, sizeof(uint16_t) * n);
  return vload_bf16(t);
}
inline V vload_n(const float* p, int n) {
  alignas(32) float t[16] = {};
  std::memcpy(t, p, sizeof(float) * n);
  return vload(t);
}
inline void vstore_n(float* p, V a, int n) {
  alignas(32) float t[16];
  vstore(t, a);
  std::memcpy(p, t, sizeof(float) * n);
}
// Two steps' 16 lanes from 16 words (the pair layout of lanes.h): a <- the high halves (element 2t), b <- the low
// halves (2t + 1) (a mask and a shift: no shuffle). _n: the first n words, the other lanes 0.
inline void split8(__m256i d, __m256& a, __m256& b) {
  a = _mm256_castsi256_ps(_mm256_and_si256(d, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
  b = _mm256_castsi256_ps(_mm256_slli_epi32(d, 16));
}
inline void vload_bf16_pair(const uint16_t* p, V& a, V& b) {
  split8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), a.lo, b.lo);
  split8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)), a.hi, b.hi);
}
inline __m256i words_below(int n, int base) {  // all-ones 32-bit words where base + j < n
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_add_epi32(_mm256_set1_epi32(base),
                                                                   _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}
// A masked load: a copy through the stack would stall on store forwarding, once per tail step of every column.
inline void vload_bf16_pair_n(const uint16_t* p, int n, V& a, V& b) {
  const int* q = reinterpret_cast<const int*>(p);
  split8(_mm256_maskload_epi32(q, words_below(n, 0)), a.lo, b.lo);
  split8(_mm256_maskload_epi32(q + 8, words_below(n, 8)), a.hi, b.hi);
}
inline V vfma(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
inline V vadd(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V vsub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V vmul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V vdiv(V a, V b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V vneg(V a) { const __m256 s = _mm256_set1_ps(-0.f); return {_mm256_xor_ps(a.lo, s), _mm256_xor_ps(a.hi, s)}; }
inline V vmax(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline __m256 lanes_below(int n, int base) {  // all-ones where base + j < n
  const __m256i j = _mm256_add_epi32(_mm256_set1_epi32(base), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), j));
}
inline V vblend_first(V a, V b, int n) {
  return {_mm256_blendv_ps(a.lo, b.lo, lanes_below(n, 0)), _mm256_blendv_ps(a.hi, b.hi, lanes_below(n, 8))};
}
// lanes j < n: fma(a, b, c); the others keep c (a chain that has ended)
inline V vfma_first(V a, V b, V c, int n) { return vblend_first(c, vfma(a, b, c), n); }
inline V vzero_where_neginf(V a, V b) {
  const __m256 ninf = _mm256_set1_ps(-INFINITY), z = _mm256_setzero_ps();
  return {_mm256_blendv_ps(b.lo, z, _mm256_cmp_ps(a.lo, ninf, _CMP_EQ_OQ)),
          _mm256_blendv_ps(b.hi, z, _mm256_cmp_ps(a.hi, ninf, _CMP_EQ_OQ))};
}
inline V vmask_after(V a, int first_idx, int limit) {
  // lane j is masked when first_idx + j > limit, i.e. j >= limit - first_idx + 1
  const int keep = limit - first_idx + 1;
  const __m256 ninf = _mm256_set1_ps(-INFINITY);
  const int k = keep < 0 ? 0 : keep > 16 ? 16 : keep;
  return {_mm256_blendv_ps(ninf, a.lo, lanes_below(k, 0)), _mm256_blendv_ps(ninf, a.hi, lanes_below(k, 8))};
}
inline V vgather(const float* p, const int32_t* idx) {
  return {_mm256_i32gather_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx)), 4),
          _mm256_i32gather_ps(p, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(idx + 8)), 4)};
}

inline float reduce8(__m256 s8) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));  // j + (j + 4)
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                 // j + (j + 2)
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));                         // 0 + 1
}
inline float vreduce16(V a) { return reduce8(_mm256_add_ps(a.lo, a.hi)); }  // j + (j + 8)
inline float vmax16(V a) {
  const __m256 m8 = _mm256_max_ps(a.lo, a.hi);
  const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m2, _mm_shuffle_ps(m2, m2, 1)));
}

inline __m256 round8(__m256 a) {
  const __m256i u = _mm256_castps_si256(a);
  const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                         _mm256_set1_epi32(0x7f800000));
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb);
  r = _mm256_and_si256(r, _mm256_set1_epi32(static_cast<int>(0xffff0000u)));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fff0000), nan);
  return _mm256_castsi256_ps(r);
}
inline V vbf16_round(V a) { ADA_BOTH(round8); }
inline void vstore_bf16(uint16_t* p, V a) {
  const __m256i lo = _mm256_srli_epi32(_mm256_castps_si256(a.lo), 16);
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(a.hi), 16);
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), packed);
}

// ---- the dot products' register tiles (kernels.inl) -------------------------------------------------------------
// A tile's unit is a sub-vector VS of kSubLanes lanes: one ymm, half of V. The lanes are independent FMA chains, so
// a tile runs lanes 0-7 and then 8-15 with 16 ymm registers for itself (kRegs) instead of 8 two-register vectors.
constexpr int kSub = 2, kSubLanes = 8, kRegs = 16;
struct VS {
  __m256 v;
};
inline VS vs_zero() { return {_mm256_setzero_ps()}; }
inline VS vs_load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vs_store(float* p, VS a) { _mm256_storeu_ps(p, a.v); }
inline VS vs_add(VS a, VS b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VS vs_fma(VS a, VS b, VS c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline void vs_load_pair(const uint16_t* p, VS& a, VS& b) {
  split8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), a.v, b.v);
}
inline void vs_load_pair_n(const uint16_t* p, int n, VS& a, VS& b) {
  split8(_mm256_maskload_epi32(reinterpret_cast<const int*>(p), words_below(n, 0)), a.v, b.v);
}
// Register tiles of the dot products (kernels.inl: dot_tile), in ymm: RT x CT accumulators + 2 CT weight vectors
// + 1, or + 2 RT activations + 3 when the rows' activations stay in registers. Two rows x four columns with the
// rows kept: one ymm load per two FMAs (Zen 1 loads one ymm per cycle and runs one ymm FMA), 76% of the FMA peak
// measured on Sapphire Rapids' AVX2 (8 x 1 with the weights kept: 75%, 4 x 1: 69%); one row: one weight stream.
#ifdef ADA_EXP_FMA_COLS  // tuning on another machine: -DADA_EXP_FMA_COLS={...} -DADA_EXP_FMA_XK={...} -DADA_EXP_FMA_MAXROWS=n
constexpr int kFmaMaxRows = ADA_EXP_FMA_MAXROWS;
constexpr int kFmaCols[9] = ADA_EXP_FMA_COLS;
constexpr bool kFmaXKept[9] = ADA_EXP_FMA_XK;
#else
constexpr int kFmaMaxRows = 2;
constexpr int kFmaCols[9] = {0, 1, 4, 0, 0, 0, 0, 0, 0};
constexpr bool kFmaXKept[9] = {false, false, true, false, false, false, false, false, false};
#endif

// sums[i] = vreduce16(f0 row i + f1 row i) for n rows of 16 floats (the butterfly's first step, then vreduce16's
// tree: j + (j + 8), + 4, + 2, + 1); eight rows at a time through a transposed network, rows past n as 0.
inline void vreduce16_pairs(const float* f0, const float* f1, int n, float* sums) {
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int i0 = 0; i0 < n; i0 += 8) {
    const int m = n - i0 < 8 ? n - i0 : 8;
    __m256 s1[8], c[4], h[2];
    for (int k = 0; k < 8; ++k) {
      if (k >= m) {
        s1[k] = _mm256_setzero_ps();
        continue;
      }
      const float* a = f0 + (i0 + k) * 16;
      const float* b = f1 + (i0 + k) * 16;
      s1[k] = _mm256_add_ps(_mm256_add_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b)),
                            _mm256_add_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(b + 8)));
    }
    for (int q = 0; q < 4; ++q)  // j + (j + 4): rows 2q, 2q + 1 -> 128-bit halves
      c[q] = _mm256_add_ps(_mm256_permute2f128_ps(s1[2 * q], s1[2 * q + 1], 0x20),
                           _mm256_permute2f128_ps(s1[2 * q], s1[2 * q + 1], 0x31));
    for (int k = 0; k < 2; ++k) {  // j + (j + 2): half q: rows 4k + q, 4k + 2 + q
      const __m256d a = _mm256_castps_pd(c[2 * k]), b = _mm256_castps_pd(c[2 * k + 1]);
      h[k] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    }
    // 0 + 1: lane 4q + i holds row 2i + q
    const __m256 j = _mm256_add_ps(_mm256_shuffle_ps(h[0], h[1], 0x88), _mm256_shuffle_ps(h[0], h[1], 0xDD));
    alignas(32) float t[8];
    _mm256_store_ps(t, _mm256_permutevar8x32_ps(j, order));
    for (int i = 0; i < m; ++i) sums[i0 + i] = t[i];
  }
}

inline __m256 bits(uint32_t u) { return _mm256_castsi256_ps(_mm256_set1_epi32(static_cast<int>(u))); }
inline __m256 pow2i_scale(__m256 p, __m256 n) {
  const __m256i ni = _mm256_cvtps_epi32(n);
  const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
  const __m256i e1 = _mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23);
  const __m256i e2 = _mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e1)), _mm256_castsi256_ps(e2));
}
inline __m256 exp2_8(__m256 x) {  // exp2_fixed lane by lane
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-126.f)), _mm256_set1_ps(127.99999237060547f));
  const __m256 M = _mm256_set1_ps(kRoundMagic);
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(xc, M), M);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = bits(exp2_taylor(0));
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, f, bits(exp2_taylor(i)));
  __m256 r = pow2i_scale(p, n);
  r = _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-126.f), _CMP_LT_OQ));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(128.f), _CMP_GE_OQ));
  return _mm256_blendv_ps(r, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline __m256 exp_8(__m256 x) {  // exp_fixed lane by lane
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-103.f)), _mm256_set1_ps(88.8f));
  const __m256 M = _mm256_set1_ps(kRoundMagic);
  const __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(xc, bits(kLog2e)), M), M);
  const __m256 nn = _mm256_xor_ps(n, _mm256_set1_ps(-0.f));
  __m256 r = _mm256_fmadd_ps(nn, bits(kLn2Hi), xc);
  r = _mm256_fmadd_ps(nn, bits(kLn2Lo), r);
  __m256 p = bits(exp_taylor(0));
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, bits(exp_taylor(i)));
  __m256 y = pow2i_scale(p, n);
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-103.f), _CMP_LT_OQ));
  y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(88.8f), _CMP_GT_OQ));
  return _mm256_blendv_ps(y, x, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
}
inline V vexp2(V a) { ADA_BOTH(exp2_8); }
inline V vexp(V a) { ADA_BOTH(exp_8); }

#undef ADA_BOTH

// The software prefetch of a weight stream, ahead of the address being read (kernels.inl: Bf16Weights::prefetch): the
// hardware prefetchers alone leave a decode step far from the read bandwidth. AMD (Zen 1, Zen 5): prefetchnta 16 KB
// ahead (2 KB was too close: bench/results/cpu-*.md). Intel (Sapphire Rapids): prefetcht2 8 KB ahead; its nta fills
// only L1, where the line is gone before it is read: one stream of dot products ran 3x slower with it (5.7 against
// 17.5 GB/s, one thread, interleaved runs; t0/t1 and 4 or 16 KB in between).
inline bool intel_cpu() {
  static const bool intel = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") != 0;
  }();
  return intel;
}
inline void prefetch_stream(const void* p) {
  const char* c = static_cast<const char*>(p);
  if (intel_cpu())
    _mm_prefetch(c + 8192, _MM_HINT_T2);
  else
    _mm_prefetch(c + 16384, _MM_HINT_NTA);
}

}  // namespace adadecode::cpu::avx2
