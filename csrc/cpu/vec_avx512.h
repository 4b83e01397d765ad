// The lane vector of the CPU kernels on AVX-512 (F, BW, VL, DQ): 16 fp32 lanes = one zmm register. Each operation
// equals vec_portable.h's lane by lane, bit for bit (same IEEE operations; the fixed-math sequences of
// fixed_math.h repeated with vector instructions; the tree of vreduce16 in the same order).
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>

namespace adadecode::cpu::avx512 {

// Lane vectors the register file holds (AVX-512: 32 zmm, one lane vector each): the register tiles' bound
// (kernels.inl: tile_regs, cols_for).
constexpr int kVecRegs = 32;
// Accumulator lane vectors a pass may keep live (kernels.inl: attention's P.V; the other registers hold operands).
constexpr int kAccBudget = 16;
constexpr const char* kIsaName = "avx512";

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
// Two steps' 16 lanes from 16 words (the pair layout of lanes.h): a <- the low halves, b <- the high halves (a
// shift and a mask: no shuffle). _n: the first n words, the other lanes 0.
inline void split_pair(__m512i d, V& a, V& b) {
  a.v = _mm512_castsi512_ps(_mm512_slli_epi32(d, 16));
  b.v = _mm512_castsi512_ps(_mm512_and_si512(d, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
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

inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_NTA); }

}  // namespace adadecode::cpu::avx512
