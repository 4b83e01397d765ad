// LM head + argmax + maximum probability for R = 1..16 rows, the probability vector never written.
//
//   logit[r, j] = x[r] . W[id_j]          j = 0..n-1; id_j = vocab_subset[j] (or j when vocab_subset == nullptr)
//   rest[r]     = x[r] . w_rest           (restricted heads only, w_rest != nullptr; docs/design.md#heads)
//   token[r]    = id of argmax_j logit[r, j]   (ties: the lowest j, i.e. the lowest id for a sorted subset)
//   lse[r]      = log( sum_j exp(logit[r, j]) + exp(rest[r]) )     (the rest term only when w_rest is given)
//   max_prob[r] = exp(max_j logit[r, j] - lse[r])
// With round_bf16, each logit (and rest) is rounded to bf16 first, as an HF bf16 lm_head's output is.
// A NaN anywhere in a row gives max_prob = lse = NaN and token = -1 (never a silent answer).
//
// Shapes: x [R, d] bf16 (already final-normed, and transformed by the head's T if any); W [vocab, d] bf16;
// vocab_subset [n] int32 device ids (sorted ascending), or nullptr with n = vocab; w_rest [d] bf16 or nullptr;
// token [R] int32; max_prob [R] fp32; lse [R] fp32 or nullptr; workspace: lm_head_workspace_floats(R, n) floats.
// Constraints: 1 <= R <= 16, d % 8 == 0, x / W / w_rest 16-byte aligned.
//
// Two stages: blocks of kLmHeadCols consecutive j compute their logits with the skinny GEMM core (fixed
// order per logit, see skinny_core.cuh) and fold them in increasing j into (max, argmax, sum exp(l - max));
// one block per row then merges the partials in a fixed tree order. Batch invariant bit for bit.
//
// lm_head_sample: the same, and then token[r] is drawn by the seeded sampling rule of adadecode/engines/sampling.py
// (temperature, top-k, top-p, Gumbel noise keyed by (seed, params->pos + r, id_j)) from the same logits, bit for bit
// what the Python reference draws from them; max_prob and lse stay those of the untempered logits. params is in
// device memory (graph friendly). The logits are kept in the workspace: lm_head_sample_workspace_floats(R, n).
#pragma once
#include "common.cuh"
#include "sampling.cuh"

namespace adadecode {

constexpr int kLmHeadCols = 64;

size_t lm_head_workspace_floats(int R, int n);

cudaError_t lm_head_argmax(const __nv_bfloat16* x, const __nv_bfloat16* w, const int32_t* vocab_subset, int n,
                           const __nv_bfloat16* w_rest, int32_t* token, float* max_prob, float* lse,
                           float* workspace, int R, int d, bool round_bf16, cudaStream_t stream);

size_t lm_head_sample_workspace_floats(int R, int n);

// The same with the rows read in place (XRows: e.g. the engine's ring slots) and the final RMSNorm folded into the
// partial kernel's prologue (RowNorm; not with w_rest), bit for bit add_rmsnorm into a buffer then the above;
// pdl: programmatic dependent launches (common.cuh).
cudaError_t lm_head_argmax(XRows x, RowNorm norm, const __nv_bfloat16* w, const int32_t* vocab_subset, int n,
                           const __nv_bfloat16* w_rest, int32_t* token, float* max_prob, float* lse,
                           float* workspace, int R, int d, bool round_bf16, cudaStream_t stream, bool pdl);
cudaError_t lm_head_sample(XRows x, RowNorm norm, const __nv_bfloat16* w, const int32_t* vocab_subset, int n,
                           const __nv_bfloat16* w_rest, const SampleParams* params, int32_t* token, float* max_prob,
                           float* lse, float* workspace, int R, int d, bool round_bf16, cudaStream_t stream, bool pdl);

cudaError_t lm_head_sample(const __nv_bfloat16* x, const __nv_bfloat16* w, const int32_t* vocab_subset, int n,
                           const __nv_bfloat16* w_rest, const SampleParams* params, int32_t* token, float* max_prob,
                           float* lse, float* workspace, int R, int d, bool round_bf16, cudaStream_t stream);

}  // namespace adadecode
