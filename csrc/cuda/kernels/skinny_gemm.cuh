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
// bias (optional, [N] bf16; not with w_up): added to the fp32 sum before its bf16 rounding, bf16(sum + b[n]), as
// torch's addmm adds a bias to its accumulator (Qwen2's q/k/v projections).
//
// Batch invariance: the reduction order of every output element is a function of K alone (see
// skinny_core.cuh); R picks only which instantiation runs, never the order. No atomics, no split-K.
//
// Fused forms (decode: a layer in 5 launches), each bit for bit the unfused sequence it replaces:
//   skinny_gemm(XRows, RowNorm, ...): the rows may be ring slots (XRows) and RMS-normalised on the fly (RowNorm,
//     rmsnorm_core.cuh) = add_rmsnorm(delta = nullptr) into a buffer, then skinny_gemm on it;
//   skinny_qkv_rope: norm -> x Wqkv^T -> RoPE + K/V append = add_rmsnorm, skinny_gemm(wqkv), rope_append_kv
//     (rope_kv.cuh): the rotated q goes to the q part of qkv_out [R, (H + 2 Hkv) hd] (its k and v parts are not
//     written), rotated k and v to the caches [max_seq, Hkv, hd] at p_r = *first_pos + r; a row with p_r outside
//     0..max_seq-1 gets NaN q and writes no cache. Constraints of rope_append_kv: hd % 16 == 0. bias: as above,
//     [(H + 2 Hkv) hd]. (No q/k head norm here: a block owns 2 rotation pairs of a head, a head norm needs the whole
//     head's sum of squares first; models with one run skinny_gemm + rope_append_kv with the norm, one more launch.)
// pdl: launched as a programmatic dependent (common.cuh); the kernels wait before reading anything but weights.
#pragma once
#include "common.cuh"

namespace adadecode {

cudaError_t skinny_gemm(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                        const __nv_bfloat16* residual, __nv_bfloat16* out, int R, int N, int K, cudaStream_t stream);

cudaError_t skinny_gemm(XRows x, RowNorm norm, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                        const __nv_bfloat16* residual, __nv_bfloat16* out, int R, int N, int K, cudaStream_t stream,
                        bool pdl, const __nv_bfloat16* bias = nullptr);

cudaError_t skinny_qkv_rope(XRows x, RowNorm norm, const __nv_bfloat16* wqkv, __nv_bfloat16* qkv_out,
                            __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const float* cos_tab,
                            const float* sin_tab, const int32_t* first_pos, int R, int d, int n_heads,
                            int n_kv_heads, int head_dim, int max_seq, cudaStream_t stream, bool pdl,
                            const __nv_bfloat16* bias = nullptr);

}  // namespace adadecode
