// Decode attention: R new rows at contiguous positions p_r = *first_pos + r (r = 0..R-1) against the layer's
// KV cache, causal (row r sees cache positions 0..p_r, which includes the rows before it in this launch:
// rope_append_kv has written their K/V), GQA (query head h reads KV head h / (H / Hkv), as HF's
// repeat_interleave), split over the sequence with a log-sum-exp merge.
//
//   out[r, h, :] = sum_{t <= p_r} softmax_t(q[r,h] . k[t, h/G] / sqrt(hd)) v[t, h/G]
//
// Arithmetic: fp32 throughout (scores, softmax, P.V), the result rounded to bf16 once. (HF eager rounds the
// scores and the probabilities to bf16 along the way; SDPA kernels do not: we follow the fp32 path.)
//
// Shapes: q rows of a [R, q_stride] bf16 buffer, head h at q + r*q_stride + h*hd (the rotated q part of the
// fused qkv buffer: q_stride = (H + 2 Hkv) hd; or a plain [R, H*hd] buffer: q_stride = H*hd);
// k_cache, v_cache [max_seq, Hkv, hd] bf16; out [R, H*hd] bf16; first_pos: device int32.
// max_ctx: host-side upper bound on *first_pos + R (the cache capacity when the launch is captured in a graph):
// it sizes the workspace, and bounds the grid. A row with p_r >= max_ctx gets NaN.
// Constraints: hd in {64, 128}; H % Hkv == 0; q_stride % 8 == 0; pointers 16-byte aligned.
//
// Split: positions are cut into fixed chunks of kAttnChunk = 128 (chunk c = [128c, 128c + 128)); a row's
// partial for chunk c is computed from positions <= p_r only, in a fixed order, and the merge walks the
// chunks 0..p_r/128 in order. Nothing depends on R, on the row's index, on the grid or on which block merges:
// batch invariant bit for bit, and single_launch = true and false give the same bits.
//
// Launches: blocks (s, kv head, row group of up to 16 rows), s < S = min(chunks of max_ctx, max(1,
// kAttnTargetBlocks / (Hkv * row groups))); block s computes chunks s, s + S, ... up to the live ones (read from
// *first_pos on the device: a captured graph stays right as the context grows). single_launch: the last block of
// each (row group, kv head) to finish merges it (a counter in the workspace); else a merge kernel follows, and
// also when Hkv * row groups > kAttnCounters (same bits). pdl: programmatic dependent launches (common.cuh).
//
// Workspace: fp32, attention_workspace_floats(R, H, hd, max_ctx) floats, 16-byte aligned: kAttnCounters int32
// counters first (at the same place for every R and max_ctx, so launches of any shape may share one buffer),
// then the partials. Contract: the counters are zero before the first launch (allocate the workspace zeroed)
// and every launch leaves them zero; nothing else may write there. The partials need no initialisation.
//
// Sliding window (window > 0; Mistral, Qwen2): row r attends to lo_r = max(0, p_r - window + 1)..p_r only. The
// positions before lo_r are masked to -inf like those past p_r (and have no P.V term), a chunk wholly before lo_r
// has no partial, and the merge walks the chunks lo_r/128..p_r/128; the blocks of a row group start at the chunk of
// its first row's lo (computed on the device from *first_pos: graphs stay reusable as the window slides).
#pragma once
#include "common.cuh"

namespace adadecode {

constexpr int kAttnChunk = 128;
constexpr int kAttnTargetBlocks = 256;  // about two per SM of an H100 (132 SMs); the bits never depend on it
constexpr int kAttnCounters = 4096;     // int32 slots at the start of the workspace

size_t attention_workspace_floats(int R, int n_heads, int head_dim, int max_ctx);

cudaError_t attention(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k_cache,
                      const __nv_bfloat16* v_cache, const int32_t* first_pos, __nv_bfloat16* out, float* workspace,
                      int R, int n_heads, int n_kv_heads, int head_dim, int max_ctx, cudaStream_t stream,
                      bool single_launch = true, bool pdl = false, int window = 0);

// The first position a row at position p attends to (window 0: full attention).
ADA_HD int attn_window_lo(int p, int window) {  // ADA_HD: fixed_math.h (host and device; plain inline for g++)
  return window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
}

}  // namespace adadecode
