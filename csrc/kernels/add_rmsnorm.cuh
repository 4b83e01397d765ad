// Fused residual add + RMSNorm, in place on the residual stream.
//
//   residual[r] += delta[r]            (bf16, skipped when delta == nullptr)
//   out[r]       = weight * (residual[r] * rsqrt(mean(residual[r]^2) + eps))
//
// Shapes: residual, delta, out [rows, d] bf16 row-major; weight [d] bf16. d % 8 == 0, pointers 16-byte aligned.
// Invariants: one thread block per row, a fixed reduction order per row (fp32 statistics, block
// tree reduction over a fixed thread count), so a row's bits never depend on `rows` or its index.
// The normalised value is rounded to bf16 before the weight multiply, as HF Llama does.
#pragma once
#include "common.cuh"

namespace adadecode {

cudaError_t add_rmsnorm(__nv_bfloat16* residual, const __nv_bfloat16* delta, const __nv_bfloat16* weight,
                        __nv_bfloat16* out, int rows, int d, float eps, cudaStream_t stream);

}  // namespace adadecode
