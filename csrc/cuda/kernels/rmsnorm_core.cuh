// Device-side core of RMSNorm, shared by the stand-alone kernel (add_rmsnorm.cu) and the GEMM prologues that fold
// the norm into the kernel consuming it (skinny_core.cuh). Not a launcher header: include it only from .cu files.
//
//   inv(x)         = rsqrt(sum_k x[k]^2 / d + eps)                       (fp32)
//   norm(x, g)[k]  = bf16( g[k] * bf16(x[k] * inv(x)) )                  (HF Llama: normalise, round, scale)
//
// The sum has one order, a function of d alone: lane l of one warp takes the 8-element chunks l, l + 32, ... in
// increasing order with an fp32 FMA chain, then the 32 lanes meet in a fixed butterfly. Any kernel, any block
// size, any row count computes the same bits for a row, so a norm folded into a GEMM equals the stand-alone one.
#pragma once
#include "common.cuh"

namespace adadecode {

// inv(x) of one row of d bf16 (d % 8 == 0, 16-byte aligned). Called by all 32 lanes of a warp; all get the value.
// Plain (coherent) loads: add_rmsnorm reads back the chunks each lane has just written (lane l: chunks l + 32j,
// the same chunks it reads here).
__device__ __forceinline__ float warp_row_inv_rms(const __nv_bfloat16* x, int d, float eps) {
  const int lane = threadIdx.x % 32;
  float ss = 0.f;
  for (int i = lane; i < d / 8; i += 32) {
    float f[8];
    unpack8(*reinterpret_cast<const uint4*>(x + static_cast<int64_t>(i) * 8), f);
#pragma unroll
    for (int e = 0; e < 8; ++e) ss = __fmaf_rn(f[e], f[e], ss);
  }
  return inv_sqrt(__fadd_rn(__fdiv_rn(warp_sum(ss), static_cast<float>(d)), eps));
}

// One normalised element: x, g exact bf16 values as floats. (g * n is exact in fp32: the rounding is bf16's alone,
// as a bf16 multiply rounds.)
__device__ __forceinline__ float norm_elem(float x, float inv, float g) {
  return bf16_round(__fmul_rn(g, bf16_round(__fmul_rn(x, inv))));
}

}  // namespace adadecode
