// RoPE (rotate-half, HF Llama; Llama-3 scaling lives in the host's inv_freq / table) fused with the append
// of K and V to the layer's cache.
//
// Input: the fused QKV projection of R rows at positions p_r = *first_pos + r:
//   qkv [R, (H + 2*Hkv) * hd] bf16 row-major, each row = [q heads (H*hd) | k heads (Hkv*hd) | v heads (Hkv*hd)].
// Effect:
//   q part of qkv rotated in place:  q'[i]      = bf16( bf16(q[i]*c[i]) - bf16(q[i+h]*s[i]) )
//                                    q'[i+h]    = bf16( bf16(q[i+h]*c[i]) + bf16(q[i]*s[i]) )   i < h = hd/2
//   k_cache[p_r, kvh, :] = rotated k (same formula);  v_cache[p_r, kvh, :] = v (copied).
// with c[i] = bf16(cos_tab[p_r, i]), s[i] = bf16(sin_tab[p_r, i]): HF computes cos/sin in fp32 then casts them
// to the activation dtype, and every product and the sum are rounded to bf16 as torch's bf16 ops do.
// (-bf16(q[i+h]*s[i]) is exactly bf16(-q[i+h]*s[i]), so this is bit-for-bit q*cos + rotate_half(q)*sin.)
//
// Tables: cos_tab, sin_tab [max_seq, hd/2] fp32 row-major, cos/sin(p * inv_freq[i]) (host-built from
// adadecode.engines.torch.rope_inv_freq, which applies the Llama-3 scaling).
// Caches: k_cache, v_cache [max_seq, Hkv, hd] bf16 row-major (separate buffers).
// first_pos: device int32 (so a captured CUDA graph replays at new positions).
// Constraints: hd % 16 == 0, all pointers 16-byte aligned. A row with p_r outside 0..max_seq-1 writes nothing
// to the caches and sets its q to NaN (visible, never out of bounds).
// q_norm, k_norm (optional, both or neither, [hd] bf16; Qwen3): each q and k head is RMS-normalised over its hd
// values before the rotation, x <- norm_elem(x, inv, g) with inv = warp_row_inv_rms(head, hd, eps)
// (rmsnorm_core.cuh: the one order of every RMSNorm here; the CPU engine's too). One warp per head computes inv
// first, then the rotation reads the normed values: n_heads + n_kv_heads <= kRopeMaxNormHeads.
// Per row and per head: trivially batch invariant.
#pragma once
#include "common.cuh"

namespace adadecode {

cudaError_t rope_append_kv(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const float* cos_tab,
                           const float* sin_tab, const int32_t* first_pos, int R, int n_heads, int n_kv_heads,
                           int head_dim, int max_seq, cudaStream_t stream, const __nv_bfloat16* q_norm = nullptr,
                           const __nv_bfloat16* k_norm = nullptr, float eps = 0.f);

constexpr int kRopeMaxNormHeads = 512;

}  // namespace adadecode
