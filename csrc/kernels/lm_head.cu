#include "lm_head.cuh"
#include "skinny_core.cuh"

namespace adadecode {
namespace {

constexpr int kCols = 4;
constexpr int kMergeThreads = 256;

struct Stat {  // running (max, argmax, sum of exp(l - max)) over logits in a fixed order
  float m, s;
  int idx;
};

// Fold b into a; a holds the lower indices when the order matters (ties keep a's index unless b's is lower).
__device__ __forceinline__ Stat combine(const Stat& a, const Stat& b) {
  if (a.idx < 0) return b;
  if (b.idx < 0) return a;
  Stat o;
  o.m = fmaxf(a.m, b.m);
  o.idx = (b.m > a.m || (b.m == a.m && b.idx < a.idx)) ? b.idx : a.idx;
  o.s = __fadd_rn(a.s * expf(a.m - o.m), b.s * expf(b.m - o.m));
  if (isnan(a.s) || isnan(b.s) || isnan(a.m) || isnan(b.m)) o.s = NAN;
  return o;
}

// grid: ceil(n / kLmHeadCols) blocks; writes part[blk * R + r] = (m, s, idx) for r < R.
template <int RB>
__global__ void __launch_bounds__(256) lm_head_partial_kernel(const __nv_bfloat16* __restrict__ x,
                                                              const __nv_bfloat16* __restrict__ w,
                                                              const int32_t* __restrict__ subset, int n, int R, int d,
                                                              bool round_bf16, float4* __restrict__ part) {
  __shared__ float red[kSkinnyMaxWarps * RB * kCols];
  __shared__ float res[RB * kCols];
  const int j_begin = blockIdx.x * kLmHeadCols;
  const int j_end = min(n, j_begin + kLmHeadCols);
  Stat st{-INFINITY, 0.f, -1};
  for (int j0 = j_begin; j0 < j_end; j0 += kCols) {
    const __nv_bfloat16* wrow[kCols];
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int j = j0 + c;
      wrow[c] = j < j_end ? w + static_cast<int64_t>(subset ? subset[j] : j) * d : nullptr;
    }
    skinny_block_dot<RB, kCols>(x, R, d, wrow, red, res);
    if (threadIdx.x < R) {
      const int r = threadIdx.x;
      for (int c = 0; c < kCols && j0 + c < j_end; ++c) {
        float v = res[r * kCols + c];
        if (round_bf16) v = bf16_round(v);
        const Stat one{v, 1.f, j0 + c};
        st = combine(st, one);
      }
    }
    // skinny_block_dot ends with a barrier after writing res; the next call rewrites res only after its own
    // first barrier, which every thread (including the folding ones) must reach first.
  }
  if (threadIdx.x < R)
    part[static_cast<int64_t>(blockIdx.x) * R + threadIdx.x] =
        make_float4(st.m, st.s, __int_as_float(st.idx), 0.f);
}

// grid: R blocks. Merges the row's partials (strided per thread, then a fixed tree), adds the rest logit.
__global__ void __launch_bounds__(kMergeThreads) lm_head_merge_kernel(
    const float4* __restrict__ part, int nblk, const __nv_bfloat16* __restrict__ x,
    const __nv_bfloat16* __restrict__ w_rest, const int32_t* __restrict__ subset, int R, int d, bool round_bf16,
    int32_t* __restrict__ token, float* __restrict__ max_prob, float* __restrict__ lse) {
  __shared__ float sm[kMergeThreads], ss[kMergeThreads], sr[kMergeThreads / 32];
  __shared__ int si[kMergeThreads];
  const int r = blockIdx.x, tid = threadIdx.x;
  Stat st{-INFINITY, 0.f, -1};
  for (int b = tid; b < nblk; b += kMergeThreads) {
    const float4 p = part[static_cast<int64_t>(b) * R + r];
    st = combine(st, Stat{p.x, p.y, __float_as_int(p.z)});
  }
  sm[tid] = st.m, ss[tid] = st.s, si[tid] = st.idx;
  __syncthreads();
  for (int off = kMergeThreads / 2; off > 0; off >>= 1) {
    if (tid < off) {
      const Stat o = combine(Stat{sm[tid], ss[tid], si[tid]}, Stat{sm[tid + off], ss[tid + off], si[tid + off]});
      sm[tid] = o.m, ss[tid] = o.s, si[tid] = o.idx;
    }
    __syncthreads();
  }
  // The rest logit: x[r] . w_rest, fixed order (strided chunks, butterfly, warps in order).
  float rest = -INFINITY;
  if (w_rest) {
    float a = 0.f;
    for (int i = tid; i < d / 8; i += kMergeThreads) {
      float xf[8], wf[8];
      unpack8(ld_ro16(x + static_cast<int64_t>(r) * d + i * 8), xf);
      unpack8(ld_ro16(w_rest + i * 8), wf);
#pragma unroll
      for (int e = 0; e < 8; ++e) a = __fmaf_rn(wf[e], xf[e], a);
    }
    a = warp_sum(a);
    if (tid % 32 == 0) sr[tid / 32] = a;
    __syncthreads();
    rest = sr[0];
    for (int wi = 1; wi < kMergeThreads / 32; ++wi) rest = __fadd_rn(rest, sr[wi]);
    if (round_bf16) rest = bf16_round(rest);
  }
  if (tid == 0) {
    const float m = sm[0];
    float s = ss[0];
    const int idx = si[0];
    float M = m;
    if (w_rest) {
      M = fmaxf(m, rest);
      s = __fadd_rn(s * expf(m - M), expf(rest - M));
      if (isnan(rest)) s = NAN;
    }
    const float l = M + logf(s);
    const bool bad = isnan(l) || idx < 0;
    token[r] = bad ? -1 : (subset ? subset[idx] : idx);
    max_prob[r] = bad ? NAN : expf(m - l);
    if (lse) lse[r] = bad ? NAN : l;
  }
}

template <int RB>
cudaError_t launch(const __nv_bfloat16* x, const __nv_bfloat16* w, const int32_t* subset, int n,
                   const __nv_bfloat16* w_rest, int32_t* token, float* max_prob, float* lse, float* workspace, int R,
                   int d, bool round_bf16, cudaStream_t stream) {
  const int nblk = (n + kLmHeadCols - 1) / kLmHeadCols;
  float4* part = reinterpret_cast<float4*>(workspace);
  lm_head_partial_kernel<RB><<<nblk, skinny_threads(d), 0, stream>>>(x, w, subset, n, R, d, round_bf16, part);
  cudaError_t e = launch_status();
  if (e != cudaSuccess) return e;
  lm_head_merge_kernel<<<R, kMergeThreads, 0, stream>>>(part, nblk, x, w_rest, subset, R, d, round_bf16, token,
                                                        max_prob, lse);
  return launch_status();
}

}  // namespace

size_t lm_head_workspace_floats(int R, int n) {
  return static_cast<size_t>((n + kLmHeadCols - 1) / kLmHeadCols) * R * 4;
}

cudaError_t lm_head_argmax(const __nv_bfloat16* x, const __nv_bfloat16* w, const int32_t* vocab_subset, int n,
                           const __nv_bfloat16* w_rest, int32_t* token, float* max_prob, float* lse,
                           float* workspace, int R, int d, bool round_bf16, cudaStream_t stream) {
  if (R < 1 || R > kSkinnyMaxRows || n < 1 || d < 8 || d % 8 != 0) return cudaErrorInvalidValue;
  if (!aligned16(x) || !aligned16(w) || (w_rest && !aligned16(w_rest)) || !aligned16(workspace))
    return cudaErrorInvalidValue;
  switch (skinny_bucket(R)) {
    case 1: return launch<1>(x, w, vocab_subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, stream);
    case 2: return launch<2>(x, w, vocab_subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, stream);
    case 4: return launch<4>(x, w, vocab_subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, stream);
    case 8: return launch<8>(x, w, vocab_subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, stream);
    default: return launch<16>(x, w, vocab_subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, stream);
  }
}

}  // namespace adadecode
