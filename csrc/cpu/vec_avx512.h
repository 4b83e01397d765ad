// The lane vector of the CPU kernels on AVX-512 (F, BW, VL, DQ): 16 fp32 lanes = one zmm register. Each operation
// equals vec_portable.h's lane by lane, bit for bit (same IEEE operations; the fixed-math sequences of
// fixed_math.h repeated with vector instructions; the tree of vreduce16 in the same order).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>

// Included by kernels_avx512.cpp (namespace avx512) and kernels_avx512bf16.cpp (namespace avx512bf16, with
// ADA_BF16_DOT: the bf16 dot-product instruction too): each translation unit gets its own copy of every function,
// compiled for its own target, so no inline function of one path can stand in for the other's at link time.
#ifndef ADA_VEC_NS
#define ADA_VEC_NS avx512
#endif
namespace adadecode::cpu::ADA_VEC_NS {

// Lane vectors the register file holds (zmm), and the accumulators attention's P.V may keep.
constexpr int kVecRegs = 32;
// Accumulator lane vectors a pass may keep live (kernels.inl: attention's P.V; the other registers hold operands).
constexpr int kAccBudget = 16;
constexpr int kAttnQueries = 8;  // attention: queries scored together over one K load (8 independent score chains: two FMAs per cycle over the 4-cycle latency)
#if ADA_BF16_DOT
constexpr const char* kIsaName = "avx512bf16";
#else
constexpr const char* kIsaName = "avx512";
#endif

struct V {
  __m512 v;
};

inline V vzero() { return {_mm512_setzero_ps()}; }
inline V vset1(float a) { return {_mm512_set1_ps(a)}; }
inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a.v); }
inline __mmask16 first_n(int n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline V widen_bf16(__m256i h) { return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))}; }
inline V vload_bf16(const uint16_t* p) { return widen_bf16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline V vload_bf16_n(const uint16_t* p, int n) { return widen_bf16(_mm256_maskz_loadu_epi16(first_n(n), p)); }
inline V vload_n(const float* p, int n) { return {_mm512_maskz_loadu_ps(first_n(n), p)}; }
inline void vstore_n(float* p, V a, int n) { _mm512_mask_storeu_ps(p, first_n(n), a.v); }
// Two steps' 16 lanes from 16 words (the pair layout of lanes.h): a <- the high halves (element 2t), b <- the low
// halves (2t + 1) (a mask and a shift: no shuffle). _n: the first n words, the other lanes 0.
inline void split_pair(__m512i d, V& a, V& b) {
  a.v = _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
  b.v = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
}
inline void vload_bf16_pair(const uint16_t* p, V& a, V& b) { split_pair(_mm512_loadu_si512(p), a, b); }
inline void vload_bf16_pair_n(const uint16_t* p, int n, V& a, V& b) {
  split_pair(_mm512_maskz_loadu_epi32(first_n(n), p), a, b);
}
inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline V vadd(V a, V b) { return {_mm512_add_ps(a.v, b.v)}; }
inline V vsub(V a, V b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline V vmul(V a, V b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline V vdiv(V a, V b) { return {_mm512_div_ps(a.v, b.v)}; }
inline V vneg(V a) { return {_mm512_xor_ps(a.v, _mm512_set1_ps(-0.f))}; }
inline V vmax(V a, V b) { return {_mm512_max_ps(a.v, b.v)}; }
inline V vblend_first(V a, V b, int n) { return {_mm512_mask_blend_ps(first_n(n), a.v, b.v)}; }
// lanes j < n: fma(a, b, c); the others keep c (a chain that has ended)
inline V vfma_first(V a, V b, V c, int n) { return {_mm512_mask3_fmadd_ps(a.v, b.v, c.v, first_n(n))}; }
inline V vzero_where_neginf(V a, V b) {
  const __mmask16 m = _mm512_cmp_ps_mask(a.v, _mm512_set1_ps(-INFINITY), _CMP_EQ_OQ);
  return {_mm512_mask_blend_ps(m, b.v, _mm512_setzero_ps())};
}
inline V vmask_after(V a, int first_idx, int limit) {
  const __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(first_idx),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  const __mmask16 m = _mm512_cmpgt_epi32_mask(idx, _mm512_set1_epi32(limit));
  return {_mm512_mask_blend_ps(m, a.v, _mm512_set1_ps(-INFINITY))};
}
inline V vgather(const float* p, const int32_t* idx) {
  return {_mm512_i32gather_ps(_mm512_loadu_si512(idx), p, 4)};
}

inline float reduce8(__m256 s8) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));  // j + (j + 4)
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));                                 // j + (j + 2)
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));                         // 0 + 1
}
inline float vreduce16(V a) {
  const __m256 lo = _mm512_castps512_ps256(a.v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a.v), 1));
  return reduce8(_mm256_add_ps(lo, hi));  // j + (j + 8)
}
inline float vmax16(V a) { return _mm512_reduce_max_ps(a.v); }

inline V vbf16_round(V a) {
  const __m512i u = _mm512_castps_si512(a.v);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
  r = _mm512_and_si512(r, _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fff0000));
  return {_mm512_castsi512_ps(r)};
}
inline void vstore_bf16(uint16_t* p, V a) {
  const __m256i h = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(a.v), 16));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}

// ---- the dot products' register tiles (kernels.inl) -------------------------------------------------------------
// A tile's unit is a sub-vector VS of kSubLanes lanes; here the whole 16-lane vector (one zmm). kRegs: sub-vector
// registers. Each lane is its own FMA chain, so a tile may run the lanes in sub-vectors one after another.
constexpr int kSub = 1, kSubLanes = 16, kRegs = 32;
using VS = V;
inline VS vs_zero() { return vzero(); }
inline VS vs_load(const float* p) { return vload(p); }
inline void vs_store(float* p, VS a) { vstore(p, a); }
inline VS vs_add(VS a, VS b) { return vadd(a, b); }
inline VS vs_fma(VS a, VS b, VS c) { return vfma(a, b, c); }
inline void vs_load_pair(const uint16_t* p, VS& a, VS& b) { vload_bf16_pair(p, a, b); }
inline void vs_load_pair_n(const uint16_t* p, int n, VS& a, VS& b) { vload_bf16_pair_n(p, n, a, b); }
// Register tiles of the dot products (kernels.inl: dot_tile): at most kFmaMaxRows rows per tile; for RT rows, the
// columns per tile and whether the rows' activations stay in registers (else the columns' weights do and the
// activations are FMA memory operands). Registers: RT x CT accumulators + 2 CT weight vectors + 1 (mask), or + 2 RT
// activations + 3. Measured on Sapphire Rapids (K = 4096 chains, L1-resident): 5 x 4 165 GFLOP/s (73% of the FMA
// peak; the weight split takes 2 of every 2 RT + 2 vector operations), 4 x 4 156, 3 x 4 141, 2 x 4 129, 1 x 4 95,
// while tiles of 6-8 rows by 2-3 columns stay at ~125 (GCC's register allocation).
#ifdef ADA_EXP_FMA_COLS  // tuning on another machine: -DADA_EXP_FMA_COLS={...} -DADA_EXP_FMA_XK={...} -DADA_EXP_FMA_MAXROWS=n
constexpr int kFmaMaxRows = ADA_EXP_FMA_MAXROWS;
constexpr int kFmaCols[9] = ADA_EXP_FMA_COLS;
constexpr bool kFmaXKept[9] = ADA_EXP_FMA_XK;
#else
constexpr int kFmaMaxRows = 5;
constexpr int kFmaCols[9] = {0, 4, 4, 4, 4, 4, 0, 0, 0};
constexpr bool kFmaXKept[9] = {false, true, true, false, false, false, false, false, false};
#endif

#if ADA_BF16_DOT
// The bf16 dot-product path: VP holds 16 words of bf16 pairs (lanes.h: element 2t in the high half).
using VP = __m512i;
inline VP vp_load(const void* p) { return _mm512_loadu_si512(p); }
inline VP vp_load_n(const void* p, int n) { return _mm512_maskz_loadu_epi32(first_n(n), p); }
// acc + w.hi * x.hi + w.lo * x.lo per lane: two FMAs, the high halves first, each rounded to nearest even, subnormal
// inputs and results flushed to zero (kernels.inl: when that is the FMA chain bit for bit)
inline VS vs_dp(VS acc, VP w, VP x) {
  return {_mm512_dpbf16_ps(acc.v, reinterpret_cast<__m512bh&>(w), reinterpret_cast<__m512bh&>(x))};
}
// Registers: RT x CT accumulators + CT weight pairs (+ 1) or + RT activation pairs + 1.
// Not measured where the instruction is fast (Zen 4/5): sized by registers and loads (the rows kept up to 4 rows:
// RT + CT loads per RT x CT instructions; vdpbf16ps takes no split). Tuning: -DADA_EXP_DP_COLS etc.
#ifdef ADA_EXP_DP_COLS
constexpr int kDpMaxRows = ADA_EXP_DP_MAXROWS;
constexpr int kDpCols[9] = ADA_EXP_DP_COLS;
constexpr bool kDpXKept[9] = ADA_EXP_DP_XK;
#else
constexpr int kDpMaxRows = 6;
constexpr int kDpCols[9] = {0, 4, 4, 6, 6, 5, 4, 0, 0};
constexpr bool kDpXKept[9] = {false, true, true, true, true, false, false, false, false};
#endif
// The activation form of this path (kernels.inl: permute_x): word l of pair t = bf16(x[2t]) << 16 | bf16(x[2t + 1]).
inline VP vp_pack(V even, V odd) {
  return _mm512_or_si512(_mm512_and_si512(_mm512_castps_si512(even.v), _mm512_set1_epi32(static_cast<int>(0xffff0000u))),
                         _mm512_srli_epi32(_mm512_castps_si512(odd.v), 16));
}
inline void vp_store(void* p, VP a) { _mm512_storeu_si512(p, a); }
// lanes.h's ExpRange of fp32 values, 16 lanes at a time; the word lo | hi << 8
struct ExpAcc {
  __m512i lo, hi;
};
inline ExpAcc exp_acc_init() { return {_mm512_set1_epi32(255), _mm512_setzero_si512()}; }
inline void exp_acc_add(ExpAcc& a, V v) {
  const __m512i u = _mm512_castps_si512(v.v);
  const __m512i e = _mm512_and_si512(_mm512_srli_epi32(u, 23), _mm512_set1_epi32(0xff));
  a.lo = _mm512_mask_min_epu32(a.lo, _mm512_test_epi32_mask(u, _mm512_set1_epi32(0x7fffffff)), a.lo, e);
  a.hi = _mm512_max_epu32(a.hi, e);
}
inline uint32_t exp_acc_word(const ExpAcc& a) {
  return _mm512_reduce_min_epu32(a.lo) | _mm512_reduce_max_epu32(a.hi) << 8;
}
#endif

// sums[i] = vreduce16(f0 row i + f1 row i) for n rows of 16 floats: the two blocks of a warp added lane by lane (the
// butterfly's first step, lane j + (j + 16)), then vreduce16's tree: j + (j + 8), + 4, + 2, + 1. Sixteen rows at a
// time through a transposed network (each level adds the same two partial sums of a row that vreduce16 adds, for
// 2, 4, 8 and 16 rows in one instruction); rows past n count as 0 and their sums are not stored.
inline void vreduce16_pairs(const float* f0, const float* f1, int n, float* sums) {
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  for (int i0 = 0; i0 < n; i0 += 16) {
    const int m = n - i0 < 16 ? n - i0 : 16;
    auto row = [&](int i) {
      return i < m ? _mm512_add_ps(_mm512_loadu_ps(f0 + (i0 + i) * 16), _mm512_loadu_ps(f1 + (i0 + i) * 16))
                   : _mm512_setzero_ps();
    };
    const int pairs = (m + 1) / 2;
    __m512 c[8], e[4], h[2];
    for (int k = 0; k < 8; ++k) {  // j + (j + 8): rows 2k, 2k + 1 -> halves
      if (k >= pairs) {
        c[k] = _mm512_setzero_ps();
        continue;
      }
      const __m512 a = row(2 * k), b = row(2 * k + 1);
      c[k] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    }
    for (int q = 0; q < 4; ++q)  // j + (j + 4): rows 4q .. 4q + 3 -> quarters
      e[q] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0x88),
                           _mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0xDD));
    for (int k = 0; k < 2; ++k) {  // j + (j + 2): quarter q: rows 8k + q, 8k + 4 + q
      const __m512d a = _mm512_castps_pd(e[2 * k]), b = _mm512_castps_pd(e[2 * k + 1]);
      h[k] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    // 0 + 1: lane 4q + i holds row 4i + q
    const __m512 j = _mm512_add_ps(_mm512_shuffle_ps(h[0], h[1], 0x88), _mm512_shuffle_ps(h[0], h[1], 0xDD));
    _mm512_mask_storeu_ps(sums + i0, first_n(m), _mm512_permutexvar_ps(order, j));
  }
}

// p * 2^n (n: integral floats in [-252, 254]) as pow2i_scale: two exact power-of-two factors, one rounding.
inline __m512 pow2i_scale(__m512 p, __m512 n) {
  const __m512i ni = _mm512_cvtps_epi32(n);
  const __m512i n1 = _mm512_srai_epi32(ni, 1), n2 = _mm512_sub_epi32(ni, n1);
  const __m512i e1 = _mm512_slli_epi32(_mm512_add_epi32(n1, _mm512_set1_epi32(127)), 23);
  const __m512i e2 = _mm512_slli_epi32(_mm512_add_epi32(n2, _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(_mm512_mul_ps(p, _mm512_castsi512_ps(e1)), _mm512_castsi512_ps(e2));
}
inline __m512 bits(uint32_t u) { return _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(u))); }

inline V vexp2(V a) {  // exp2_fixed lane by lane
  const __m512 x = a.v;
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-126.f)), _mm512_set1_ps(127.99999237060547f));
  const __m512 M = _mm512_set1_ps(kRoundMagic);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(xc, M), M);
  const __m512 f = _mm512_sub_ps(xc, n);
  __m512 p = bits(exp2_taylor(0));
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, f, bits(exp2_taylor(i)));
  __m512 r = pow2i_scale(p, n);
  r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-126.f), _CMP_LT_OQ), r, _mm512_setzero_ps());
  r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(128.f), _CMP_GE_OQ), r, _mm512_set1_ps(INFINITY));
  r = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, x);
  return {r};
}
inline V vexp(V a) {  // exp_fixed lane by lane
  const __m512 x = a.v;
  const __m512 xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-103.f)), _mm512_set1_ps(88.8f));
  const __m512 M = _mm512_set1_ps(kRoundMagic);
  const __m512 n = _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(xc, bits(kLog2e)), M), M);
  const __m512 nn = _mm512_xor_ps(n, _mm512_set1_ps(-0.f));  // -n: the sign flipped, as the scalar negation
  __m512 r = _mm512_fmadd_ps(nn, bits(kLn2Hi), xc);
  r = _mm512_fmadd_ps(nn, bits(kLn2Lo), r);
  __m512 p = bits(exp_taylor(0));
  for (int i = 1; i < 8; ++i) p = _mm512_fmadd_ps(p, r, bits(exp_taylor(i)));
  __m512 y = pow2i_scale(p, n);
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(-103.f), _CMP_LT_OQ), y, _mm512_setzero_ps());
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_set1_ps(88.8f), _CMP_GT_OQ), y, _mm512_set1_ps(INFINITY));
  y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), y, x);
  return {y};
}

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

}  // namespace adadecode::cpu::ADA_VEC_NS
