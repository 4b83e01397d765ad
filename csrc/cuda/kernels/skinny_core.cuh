// Device-side core of the skinny GEMM (R <= 16 rows), shared by skinny_gemm.cu and lm_head.cu.
// Not a launcher header: include it only from .cu files.
//
// One thread block computes dot(x[r], W_c) for all rows r < R and C weight rows W_c (C columns of the
// output), reading each weight row once for all rows. K is split into 16-byte chunks of 8 bf16; chunk i
// belongs to thread i % NT (NT = the block's thread count, a function of K only), which walks its chunks in
// increasing order with an fp32 FMA chain (8 elements in order per chunk); the 32 lanes of a warp are then
// combined by a fixed butterfly and the warps by a sequential sum in warp order. Every step of that order
// depends on K alone: a row's dot products are bitwise the same for any R and any row index (docs/design.md#invariance).
//
// Two options fold neighbouring work into the same pass without changing a bit:
//   rows (XRows): row r may live at base + ((first + r) % wrap) * K: the engine's ring slots, read in place;
//   norm (RowNorm): the rows are RMS-normalised on the fly (rmsnorm_core.cuh: the stand-alone kernel's order and
//   rounding), inv per row computed once per block by skinny_row_norms; the dot products then see exactly the
//   bf16 values the stand-alone norm would have written.
#pragma once
#include "common.cuh"
#include "rmsnorm_core.cuh"

namespace adadecode {

constexpr int kSkinnyMaxRows = 16;
constexpr int kSkinnyMaxWarps = 8;

// Threads per block for a reduction of length K (a function of K only: 4 chunks per thread where possible).
inline int skinny_threads(int K) {
  const int chunks = K / 8;
  int warps = (chunks + 127) / 128;
  if (warps < 1) warps = 1;
  if (warps > kSkinnyMaxWarps) warps = kSkinnyMaxWarps;
  return warps * 32;
}

// Row-count bucket: the kernel instantiated for RB >= R rows (rows >= R are masked off).
inline int skinny_bucket(int R) { return R <= 1 ? 1 : R <= 2 ? 2 : R <= 4 ? 4 : R <= 8 ? 8 : 16; }

// inv[r] (shared, r < R) of the rows for a folded RMSNorm: one warp per row; ends with a barrier. No-op without norm.
template <int RB>
__device__ __forceinline__ void skinny_row_norms(const XRows& x, int R, int K, const RowNorm& norm, float* inv) {
  if (norm.weight == nullptr) return;
  const int warp = threadIdx.x / 32, nwarps = blockDim.x / 32;
  for (int r = warp; r < R; r += nwarps) {
    const float v = warp_row_inv_rms(x.row(r, K), K, norm.eps);
    if (threadIdx.x % 32 == 0) inv[r] = v;
  }
  __syncthreads();
}

// The start of every skinny kernel: the first weight chunks this thread will stream are requested into L2 while a
// programmatic predecessor drains, then the wait (nothing read before it is written by an earlier kernel), then the
// dependents may launch, then the folded norm's inv per row.
template <int RB, int C>
__device__ __forceinline__ void skinny_prologue(const __nv_bfloat16* const (&wrow)[C], const XRows& x, int R, int K,
                                                const RowNorm& norm, float* inv) {
#pragma unroll
  for (int c = 0; c < C; ++c)
    if (wrow[c] && static_cast<int>(threadIdx.x) < K / 8) prefetch_l2(wrow[c] + threadIdx.x * 8);
  pdl_wait();
  pdl_launch_dependents();
  skinny_row_norms<RB>(x, R, K, norm, inv);
}

// dot products of the rows x.row(r) (r < R; RMS-normalised first when norm.weight is set, with inv from
// skinny_row_norms) with the C weight rows wrow[c] (nullptr: column out of range, result 0). Writes the sums to
// res[r * C + c] in shared memory (all threads may read them after return).
// red: shared scratch of kSkinnyMaxWarps * RB * C floats. Must be called by all threads of the block.
template <int RB, int C>
__device__ __forceinline__ void skinny_block_dot(const XRows& x, int R, int K, const __nv_bfloat16* const (&wrow)[C],
                                                 float* red, float* res, const RowNorm& norm = RowNorm{},
                                                 const float* inv = nullptr) {
  const int tid = threadIdx.x, nt = blockDim.x;
  const int nchunk = K / 8;
  const __nv_bfloat16* xrow[RB];
#pragma unroll
  for (int r = 0; r < RB; ++r) xrow[r] = r < R ? x.row(r, K) : nullptr;
  float acc[RB][C];
#pragma unroll
  for (int r = 0; r < RB; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = 0.f;

  auto fma_chunk = [&](const uint4 (&wv)[C], int i) {
    float wf[C][8], gf[8];
#pragma unroll
    for (int c = 0; c < C; ++c) unpack8(wv[c], wf[c]);
    if (norm.weight) unpack8(ld_ro16(norm.weight + static_cast<int64_t>(i) * 8), gf);
#pragma unroll
    for (int r = 0; r < RB; ++r) {
      if (r < R) {
        float xf[8];
        unpack8(ld_ro16(xrow[r] + static_cast<int64_t>(i) * 8), xf);
        if (norm.weight) {
#pragma unroll
          for (int e = 0; e < 8; ++e) xf[e] = norm_elem(xf[e], inv[r], gf[e]);
        }
#pragma unroll
        for (int c = 0; c < C; ++c)
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[r][c] = __fmaf_rn(wf[c][e], xf[e], acc[r][c]);
      }
    }
  };
  auto load_w = [&](uint4 (&wv)[C], int i) {
#pragma unroll
    for (int c = 0; c < C; ++c)
      wv[c] = wrow[c] ? ld_stream16(wrow[c] + static_cast<int64_t>(i) * 8) : make_uint4(0, 0, 0, 0);
  };

  int i = tid;
  // Two chunks per step: all weight loads of the step are issued before the FMAs (order of FMAs unchanged).
  for (; i + nt < nchunk; i += 2 * nt) {
    uint4 w0[C], w1[C];
    load_w(w0, i);
    load_w(w1, i + nt);
    fma_chunk(w0, i);
    fma_chunk(w1, i + nt);
  }
  if (i < nchunk) {
    uint4 w0[C];
    load_w(w0, i);
    fma_chunk(w0, i);
  }

  const int warp = tid / 32, lane = tid % 32, nwarps = nt / 32;
#pragma unroll
  for (int r = 0; r < RB; ++r) {
    if (r < R) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const float s = warp_sum(acc[r][c]);
        if (lane == 0) red[warp * RB * C + r * C + c] = s;
      }
    }
  }
  __syncthreads();
  for (int j = tid; j < R * C; j += nt) {
    float s = red[j];
    for (int w = 1; w < nwarps; ++w) s = __fadd_rn(s, red[w * RB * C + j]);
    res[j] = s;
  }
  __syncthreads();
}

}  // namespace adadecode
