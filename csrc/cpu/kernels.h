// The CPU kernels: torch-free functions over raw pointers and sizes, compiled once per instruction set from one
// source (kernels.inl over the lane vector of vec_<isa>.h) and chosen at run time (dispatch.cpp). Every path
// computes the same bits: each output element's reduction order is a function of the shapes alone (lanes.h: the
// CUDA skinny GEMM's order; attention: the CUDA kernel's chunks of 128 positions), never of the row count R, a
// row's index, the thread count or the instruction set. Threads split output columns and (kv head, chunk) items,
// never a reduction.
//
// Activations are fp32 arrays holding bf16 values (each rounded exactly where the CUDA kernels round), rows of the
// residual stream and the caches are bf16 (uint16_t bit patterns).
#pragma once
#include <cstdint>

#include "lanes.h"

namespace adadecode::cpu {

// Attention over the cache of one layer for R rows at positions first + r (all rows of one run_layers call).
//   q        [R, n_heads * head_dim] fp32 (bf16 values: rotated q)
//   k_blocks [n_kv_heads, ceil(max_seq / 16), head_dim, 16] bf16: K of 16 positions per block, lane = position
//   v        [n_kv_heads, max_seq, head_dim] bf16
//   part_o   [R, n_heads, n_chunks, head_dim] fp32, part_ml [R, n_heads, n_chunks, 2]: the per-chunk partials
//   out      [R, n_heads * head_dim] fp32 (bf16 values)
struct AttnArgs {
  const float* q = nullptr;
  const uint16_t* k_blocks = nullptr;
  const uint16_t* v = nullptr;
  float* part_o = nullptr;
  float* part_ml = nullptr;
  float* out = nullptr;
  int R = 0, first = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, max_seq = 0, n_chunks = 0;
  int window = 0;      // > 0: row p attends to max(0, p - window + 1)..p only (attention.cuh: the same rule)
  float qscale = 0.f;  // log2(e) / sqrt(head_dim), as the CUDA launcher computes it
};
// The first position row p attends to.
inline int attn_lo(int p, int window) { return window > 0 && p - window + 1 > 0 ? p - window + 1 : 0; }
constexpr int kAttnChunk = 128;  // positions per partial (csrc/cuda/kernels/attention.cuh: kAttnChunk)
constexpr int kKBlock = 16;      // positions per K block (one lane vector)

struct Kernels {
  const char* name;
  // xp <- x permuted into layout L (x holds L.K values and x[L.K] == 0: the padding source): fp32, L.xlen floats
  void (*permute)(const LaneLayout& L, const float* x, float* xp);
  // An activation row of dot_tile: x (L.K bf16 values, x[L.K] == 0) into this path's form at xp, at most L.xlen
  // floats: the permuted fp32 row (= permute) on the FMA paths; on avx512bf16 the bf16 pairs of lanes.h and the
  // row's ExpRange (kernels.inl: the bf16 dot product's exactness rule).
  void (*permute_x)(const LaneLayout& L, const float* x, float* xp);
  // out[r * C + c] = dot(x row r, packed weight row c) for r < R, c < C; xp rows from permute_x at stride xstride
  // floats; wexp: the ExpRange of the matrix's weights (lanes.h: bf16_exp_range, once at load; a superset of the
  // rows' ranges will do). The order is lanes.h's on every path, whatever R, C and wexp.
  void (*dot_tile)(const LaneLayout& L, const uint16_t* const* w, int C, const float* xp, int xstride, int R,
                   float* out, ExpRange wexp);
  // dot of two permuted fp32 rows in layout L (RMSNorm's sum of squares, the rest logit)
  float (*dot_f32)(const LaneLayout& L, const float* a, const float* b);
  void (*bf16_to_f32)(const uint16_t* src, float* dst, int n);
  void (*f32_to_bf16)(const float* src, uint16_t* dst, int n);  // src already bf16 values
  void (*round_bf16)(const float* src, float* dst, int n);
  // out[k] = bf16(g[k] * bf16(x[k] * inv)): RMSNorm's output (rmsnorm_core.cuh: norm_elem)
  void (*norm_apply)(const float* x, float inv, const uint16_t* g, float* out, int n);
  // h[k] = bf16(h[k] + bf16(y[k])): the residual epilogue (skinny_gemm.cu)
  void (*residual_add)(const float* y, uint16_t* h, int n);
  // act[k] = bf16(bf16(silu(bf16(g[k]))) * bf16(u[k])), silu(g) = g / (1 + exp_fixed(-g))
  void (*silu_mul)(const float* g, const float* u, float* act, int n);
  // RoPE of one head: y [head_dim] (bf16 values) -> out [head_dim] (rope_core.cuh: rope_pair), cos/sin [hd/2]
  void (*rope)(const float* y, const float* cos, const float* sin, int head_dim, float* out);
  // partials of chunk c for kv head kh and rows [r0, r1): see AttnArgs
  void (*attn_chunk)(const AttnArgs& a, int kh, int c, int r0, int r1);
  // out row r, head h from its partials
  void (*attn_merge)(const AttnArgs& a, int r, int h);
  // running greedy argmax over logits[0..n) (bf16 values) with global index base: updates (best, best_idx) to the
  // greatest value, the lowest index among equal ones, whatever the order of the calls (items may come in any
  // order); returns false when a value is NaN (the caller marks the row bad)
  bool (*argmax)(const float* logits, int n, int base, float* best, int* best_idx);
  // exp_fixed / exp2_fixed over an array (tests and the LM-head statistics)
  void (*exp)(const float* x, float* y, int n);
  void (*exp2)(const float* x, float* y, int n);
  // sum of n floats (n % 64 == 0): the read-bandwidth probe of the benchmarks
  float (*read_sum)(const float* p, int64_t n);
  // n steps of 12 independent FMA chains on this path's registers, returns the flops done (2 per lane per FMA):
  // the FMA-peak probe of the benchmarks (the ceiling of the compute-bound steps, beside read_sum's)
  double (*fma_probe)(int64_t n, float* sink);
};

// The kernels of one path: "avx512bf16" (AVX-512 with the bf16 dot-product instruction), "avx512", "avx2", "neon"
// or "portable". nullptr when this build or CPU lacks it.
const Kernels* kernels_for(const char* isa);
// The best path this CPU runs.
const Kernels* best_kernels();
// Which paths this CPU supports, fastest first (all compute the same bits; dispatch.cpp: how the order is found).
const char* const* supported_isas();
// Every path's name, best first (null-terminated): a name outside it is unknown, not merely unsupported here.
const char* const* known_isas();
// Calls of the avx512bf16 path's dot_tile that ran the FMA chains because the bf16 dot-product instruction would
// have flushed a value (kernels.inl: the exactness rule); 0 where that path is not built. For the tests.
long bf16_dot_fallbacks();

}  // namespace adadecode::cpu
