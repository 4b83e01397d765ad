// Skinny bf16 GEMM for decode: R = 1..16 rows, fp32 accumulation, each weight element read once for all rows.
//
//   plain:      out[r, n] = bf16( sum_k x[r, k] * W[n, k] )                                   (y = x W^T)
//   residual:   out[r, n] = bf16( residual[r, n] + bf16(sum_k x[r, k] * W[n, k]) )            (HF: h + o_proj(a))
//   silu-mul:   out[r, n] = bf16( bf16(silu(bf16(g))) * bf16(u) ),  g = x.Wg[n], u = x.Wu[n]  (HF: silu(gate(x))*up(x))
//               both weight matrices in one pass (a block reads rows n of Wg and Wu together).
//
// Shapes: x [R, K] bf16 row-major; W (and W_up) [N, K] bf16 row-major (HF nn.Linear layout);
// residual, out [R, N] bf16 row-major; residual may alias out (in-place residual add).
// Constraints: 1 <= R <= 16, K % 8 == 0, x / W / W_up 16-byte aligned. Returns cudaErrorInvalidValue otherwise.
// Epilogue: w_up != nullptr selects silu-mul; else residual != nullptr selects residual; both set is an error.
//
// Batch invariance: the reduction order of every output element is a function of K alone (see
// skinny_core.cuh); R picks only which instantiation runs, never the order. No atomics, no split-K.
#pragma once
#include "common.cuh"

namespace adadecode {

cudaError_t skinny_gemm(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                        const __nv_bfloat16* residual, __nv_bfloat16* out, int R, int N, int K, cudaStream_t stream);

}  // namespace adadecode
