// Tensor-core bf16 GEMM for prefill (M >= 17 rows), fp32 accumulation, and `linear`, the dispatcher the
// engine calls for every nn.Linear.
//
//   out = epilogue(x W^T) with the same three epilogues as skinny_gemm (skinny_gemm.cuh):
//   plain, residual add (residual may alias out), silu(x Wg^T) * (x Wu^T) fused (w_up != nullptr).
//   Rounding follows HF bf16: the GEMM result is rounded to bf16 before the residual add / silu / product.
//   bias (optional, [N] bf16, not with w_up): bf16(acc + b[n]) instead of bf16(acc) (skinny_gemm's rule).
//
// Shapes: x [M, K] bf16 row-major; W, W_up [N, K] bf16 row-major; residual, out [M, N] bf16 row-major.
// Constraints: K % 8 == 0; x, W, W_up 16-byte aligned. Any M >= 1, any N >= 1.
//
// gemm_tc: wmma 16x16x16 bf16 fragments, 128x128 block tiles (silu-mul: 128 rows x 64 columns of each of
// Wg and Wu in one tile), BK = 32, two-stage cp.async pipeline. The K loop runs in one fixed order
// (no split-K, no atomics): deterministic, but not bitwise equal to skinny_gemm (prefill rows are the same
// for every decoding method, so they need not be).
// linear: M <= 16 -> skinny_gemm (batch invariant), else gemm_tc.
#pragma once
#include "common.cuh"

namespace adadecode {

cudaError_t gemm_tc(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                    const __nv_bfloat16* residual, __nv_bfloat16* out, int M, int N, int K, cudaStream_t stream,
                    const __nv_bfloat16* bias = nullptr);

cudaError_t linear(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                   const __nv_bfloat16* residual, __nv_bfloat16* out, int M, int N, int K, cudaStream_t stream,
                   const __nv_bfloat16* bias = nullptr);

}  // namespace adadecode
