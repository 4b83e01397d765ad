// Device-side core of RoPE (rotate-half, HF Llama), shared by rope_append_kv (rope_kv.cu) and the QKV GEMM
// epilogue that rotates and appends K/V in the same kernel (skinny_gemm.cu). Include it only from .cu files.
//
//   lo = bf16( bf16(a * c) - bf16(b * s) ),   hi = bf16( bf16(b * c) + bf16(a * s) )
// for the pair (a, b) = (x[i], x[i + hd/2]) and c = bf16(cos[pos, i]), s = bf16(sin[pos, i]) (tables fp32): HF
// casts cos/sin to the activation dtype and every bf16 op rounds. Both callers round in these same places.
#pragma once
#include "common.cuh"

namespace adadecode {

__device__ __forceinline__ void rope_pair(float a, float b, float cos_f32, float sin_f32, float& lo, float& hi) {
  const float c = bf16_round(cos_f32), s = bf16_round(sin_f32);
  lo = bf16_round(__fsub_rn(bf16_round(__fmul_rn(a, c)), bf16_round(__fmul_rn(b, s))));
  hi = bf16_round(__fadd_rn(bf16_round(__fmul_rn(b, c)), bf16_round(__fmul_rn(a, s))));
}

}  // namespace adadecode
