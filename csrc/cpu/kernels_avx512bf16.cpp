// The CPU kernels for AVX-512 with the bf16 dot-product instruction (AVX512_BF16: Zen 4/5, Cooper Lake, Sapphire
// Rapids and later): kernels.inl over vec_avx512.h with ADA_BF16_DOT, in its own namespace. The dot products take
// vdpbf16ps where kernels.inl's exactness rule holds (the same bits as the FMA chains), the FMA chains elsewhere;
// everything else is the avx512 path's code. dispatch.cpp offers it only where the CPU has the instruction and it
// passes bf16_dot_selftest(), and ranks it by bf16_dot_gain().
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../common/fixed_math.h"
#include "kernels.h"

// Only what is defined below gets the target (see kernels_avx512.cpp).
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,bmi2")
#define ADA_BF16_DOT 1
#define ADA_VEC_NS avx512bf16
#include "vec_avx512.h"

namespace adadecode::cpu::avx512bf16 {
#include "kernels.inl"

namespace {
float f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint32_t bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
}  // namespace

// vdpbf16ps against two IEEE FMAs per lane (the high halves first) on 4096 lanes of normal values whose two orders
// differ on several percent of lanes: the instruction is what kernels.inl assumes, on this CPU.
bool selftest() {
  uint64_t st = 0x9E3779B97F4A7C15ull;
  auto next = [&] {
    st ^= st << 13, st ^= st >> 7, st ^= st << 17;
    return st;
  };
  auto bf = [&](int emin, int span) {  // a normal bf16 of exponent emin .. emin + span - 1, random sign and mantissa
    const uint64_t r = next();
    return static_cast<uint32_t>(((r & 1) << 15) | (static_cast<uint32_t>(emin + 127 + (r >> 8) % span) << 7) |
                                 ((r >> 20) & 0x7f));
  };
  for (int i = 0; i < 256; ++i) {
    alignas(64) uint32_t w[16], x[16];
    alignas(64) float acc[16], got[16];
    for (int l = 0; l < 16; ++l) {
      w[l] = bf(-6, 12) << 16 | bf(-6, 12), x[l] = bf(-6, 12) << 16 | bf(-6, 12);
      acc[l] = std::ldexp(1.f + static_cast<float>(next() % (1u << 23)) * 0x1p-23f, static_cast<int>(next() % 12) - 3);
      if (next() & 1) acc[l] = -acc[l];
    }
    vs_store(got, vs_dp(vs_load(acc), vp_load(w), vp_load(x)));
    for (int l = 0; l < 16; ++l) {
      const float want = std::fma(f32(w[l] << 16), f32(x[l] << 16),
                                  std::fma(f32(w[l] & 0xffff0000u), f32(x[l] & 0xffff0000u), acc[l]));
      if (bits(want) != bits(got[l])) return false;
    }
  }
  return true;
}

// How much faster the bf16 dot products run than the FMA chains on this core: multiply-adds per second of
// vdpbf16ps (32 per instruction) over those of vfmadd (16), 16 independent chains each, best of 7 short runs.
// Sapphire Rapids measured 0.5 (one vdpbf16ps every 2 cycles, two FMAs per cycle); Zen 4/5 run it at the FMA rate.
__attribute__((noinline)) static void dp_loop(float* out, long n) {
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(0.f);
  const __m512i w = _mm512_set1_epi32(0x3f803f80);
  __m512i x = _mm512_set1_epi32(0x3c003c00);
  for (long k = 0; k < n; ++k) {
    for (int i = 0; i < 16; ++i) a[i] = _mm512_dpbf16_ps(a[i], reinterpret_cast<const __m512bh&>(w), reinterpret_cast<const __m512bh&>(x));
    asm volatile("" : "+v"(x));
  }
  __m512 s = a[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, a[i]);
  _mm512_storeu_ps(out, s);
}
__attribute__((noinline)) static void fma_loop(float* out, long n) {
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_set1_ps(0.f);
  const __m512 w = _mm512_set1_ps(1.f);
  __m512 x = _mm512_set1_ps(0x1p-7f);
  for (long k = 0; k < n; ++k) {
    for (int i = 0; i < 16; ++i) a[i] = _mm512_fmadd_ps(w, x, a[i]);
    asm volatile("" : "+v"(x));
  }
  __m512 s = a[0];
  for (int i = 1; i < 16; ++i) s = _mm512_add_ps(s, a[i]);
  _mm512_storeu_ps(out, s);
}
double gain() {
  alignas(64) float sink[16];
  double dp = 1e30, fma = 1e30;
  constexpr long n = 2000;
  for (int rep = 0; rep < 7; ++rep) {
    auto t0 = std::chrono::steady_clock::now();
    dp_loop(sink, n);
    auto t1 = std::chrono::steady_clock::now();
    fma_loop(sink, n);
    auto t2 = std::chrono::steady_clock::now();
    dp = std::min(dp, std::chrono::duration<double>(t1 - t0).count());
    fma = std::min(fma, std::chrono::duration<double>(t2 - t1).count());
  }
  return 2.0 * fma / dp;
}

}  // namespace adadecode::cpu::avx512bf16

namespace adadecode::cpu {
const Kernels* kernels_avx512bf16() { return avx512bf16::make_kernels(); }
bool bf16_dot_selftest() { return avx512bf16::selftest(); }
double bf16_dot_gain() { return avx512bf16::gain(); }
long bf16_dot_fallbacks() { return avx512bf16::dp_fallbacks().load(); }
}  // namespace adadecode::cpu
