// Fused residual add + RMSNorm, in place on the residual stream.
//
//   residual[r] += delta[r]            (bf16, skipped when delta == nullptr)
//   out[r]       = weight * (residual[r] * rsqrt(mean(residual[r]^2) + eps))
//
// Shapes: residual, delta, out [rows, d] bf16 row-major; weight [d] bf16. d % 8 == 0, pointers 16-byte aligned.
// Invariants: one warp per row, the reduction order of rmsnorm_core.cuh (a function of d alone), so a row's bits
// never depend on `rows`, its index, or on which kernel computes the norm (the fused GEMM prologues use the same
// core). The normalised value is rounded to bf16 before the weight multiply, as HF Llama does.
#pragma once
#include "common.cuh"

namespace adadecode {

cudaError_t add_rmsnorm(__nv_bfloat16* residual, const __nv_bfloat16* delta, const __nv_bfloat16* weight,
                        __nv_bfloat16* out, int rows, int d, float eps, cudaStream_t stream);

}  // namespace adadecode
