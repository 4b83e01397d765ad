#include "lm_head.cuh"
#include "sampling.cuh"
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
  o.s = __fadd_rn(a.s * exp_fixed(a.m - o.m), b.s * exp_fixed(b.m - o.m));
  if (isnan(a.s) || isnan(b.s) || isnan(a.m) || isnan(b.m)) o.s = NAN;
  return o;
}

// grid: ceil(n / kLmHeadCols) blocks; writes part[blk * R + r] = (m, s, idx) for r < R, and with kLogits the
// (rounded) logits themselves to logits[r * n + j] for the sampling kernel.
template <int RB, bool kLogits>
__global__ void __launch_bounds__(256) lm_head_partial_kernel(XRows x, RowNorm norm,
                                                              const __nv_bfloat16* __restrict__ w,
                                                              const int32_t* __restrict__ subset, int n, int R, int d,
                                                              bool round_bf16, float4* __restrict__ part,
                                                              float* __restrict__ logits) {
  __shared__ float red[kSkinnyMaxWarps * RB * kCols];
  __shared__ float res[RB * kCols];
  __shared__ float inv[RB];
  const int j_begin = blockIdx.x * kLmHeadCols;
  const int j_end = min(n, j_begin + kLmHeadCols);
  auto rows_of = [&](int j0, const __nv_bfloat16* (&wrow)[kCols]) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int j = j0 + c;
      wrow[c] = j < j_end ? w + static_cast<int64_t>(subset ? subset[j] : j) * d : nullptr;
    }
  };
  {
    const __nv_bfloat16* wrow[kCols];
    rows_of(j_begin, wrow);  // the subset ids are a head's own weights: never written by an earlier kernel
    skinny_prologue<RB>(wrow, x, R, d, norm, inv);
  }
  Stat st{-INFINITY, 0.f, -1};
  for (int j0 = j_begin; j0 < j_end; j0 += kCols) {
    const __nv_bfloat16* wrow[kCols];
    rows_of(j0, wrow);
    skinny_block_dot<RB, kCols>(x, R, d, wrow, red, res, norm, inv);
    if (threadIdx.x < R) {
      const int r = threadIdx.x;
      for (int c = 0; c < kCols && j0 + c < j_end; ++c) {
        float v = res[r * kCols + c];
        if (round_bf16) v = bf16_round(v);
        if constexpr (kLogits) logits[static_cast<int64_t>(r) * n + j0 + c] = v;
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
    const float4* __restrict__ part, int nblk, XRows x,
    const __nv_bfloat16* __restrict__ w_rest, const int32_t* __restrict__ subset, int R, int d, bool round_bf16,
    int32_t* __restrict__ token, float* __restrict__ max_prob, float* __restrict__ lse) {
  __shared__ float sm[kMergeThreads], ss[kMergeThreads], sr[kMergeThreads / 32];
  __shared__ int si[kMergeThreads];
  const int r = blockIdx.x, tid = threadIdx.x;
  pdl_wait();
  pdl_launch_dependents();
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
      unpack8(ld_ro16(x.row(r, d) + i * 8), xf);
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
      s = __fadd_rn(s * exp_fixed(m - M), exp_fixed(rest - M));
      if (isnan(rest)) s = NAN;
    }
    const float l = isnan(s) ? NAN : M + log_f32(s);  // log_f32 is defined on positive normal floats only
    const bool bad = isnan(l) || idx < 0;
    token[r] = bad ? -1 : (subset ? subset[idx] : idx);
    max_prob[r] = bad ? NAN : exp_fixed(m - l);
    if (lse) lse[r] = bad ? NAN : l;
  }
}

// ---- seeded sampling (the rule of adadecode/engines/sampling.py) --------------------------------------------------
// Three stages after the partial kernel kept the logits l [R, n]:
//   perturb: y[r, j] = fl(l * inv_t) + gumbel(seed, pos + r, id_j)   one thread per logit: the Philox and log work
//   select:  one block per row: top-k and top-p thresholds by radix select over order_key (8 bits per pass, integer
//            histograms: order-free, no sort, the same value a sort gives), then the argmax of y over the kept
//            tokens (ties: the lowest j). token[r] = its id, or -1 when a tempered logit is not finite.
constexpr int kPerturbThreads = 256;
constexpr int kSelectThreads = 512;

__global__ void __launch_bounds__(kPerturbThreads) lm_head_perturb_kernel(const float* __restrict__ logits, int n,
                                                                          const int32_t* __restrict__ subset,
                                                                          const SampleParams* __restrict__ params,
                                                                          float* __restrict__ y) {
  const int r = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
  pdl_wait();
  pdl_launch_dependents();
  if (j >= n) return;
  const int64_t at = static_cast<int64_t>(r) * n + j;
  const float z = __fmul_rn(logits[at], params->inv_temperature);
  y[at] = __fadd_rn(z, gumbel_noise(params->seed, params->pos + r, subset ? subset[j] : j));
}

struct Best {  // the running argmax of the perturbed scores: larger y wins, ties keep the lower index
  float y;
  int j;
};
__device__ __forceinline__ Best better(const Best& a, const Best& b) {
  if (b.j < 0) return a;
  if (a.j < 0) return b;
  return (b.y > a.y || (b.y == a.y && b.j < a.j)) ? b : a;
}

// The largest key t with sum over {j : key_j >= t} of weight(j) >= need (need >= 1 and reached by the total).
// weight(j, key) -> uint64. Every thread of the block calls it; the result is the same in all of them.
template <typename Weight>
__device__ uint32_t radix_select(const float* __restrict__ l, int n, float inv_t, uint64_t need, Weight weight,
                                 unsigned long long* hist, uint32_t* shared_prefix) {
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
      const uint32_t key = order_key(__fmul_rn(l[j], inv_t));
      if ((key & mask) != prefix) continue;
      const uint64_t wj = weight(j, key);
      if (wj) atomicAdd(&hist[(key >> shift) & 255u], static_cast<unsigned long long>(wj));
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // only thread 0 scans, so only its `need` is kept up to date
      uint64_t above = 0;
      int b = 255;
      for (; b > 0 && above + hist[b] < need; --b) above += hist[b];
      need -= above;
      *shared_prefix = prefix | (static_cast<uint32_t>(b) << shift);
    }
    __syncthreads();
    prefix = *shared_prefix;
    mask |= 255u << shift;
    __syncthreads();
  }
  return prefix;
}

// grid: R blocks. wbuf: [R, n] uint32 scratch for the top-p weights (computed once, read by four passes).
__global__ void __launch_bounds__(kSelectThreads) lm_head_select_kernel(const float* __restrict__ logits,
                                                                        const float* __restrict__ y, int n,
                                                                        const int32_t* __restrict__ subset,
                                                                        const SampleParams* __restrict__ params,
                                                                        uint32_t* __restrict__ wbuf,
                                                                        int32_t* __restrict__ token) {
  __shared__ unsigned long long hist[256];
  __shared__ uint32_t s_prefix;
  __shared__ float s_m[kSelectThreads];
  __shared__ int s_j[kSelectThreads];
  __shared__ int s_bad;
  const int r = blockIdx.x, tid = threadIdx.x;
  pdl_wait();
  pdl_launch_dependents();
  const int64_t row = static_cast<int64_t>(r) * n;
  const float* l = logits + row;
  const SampleParams p = *params;
  const float inv_t = p.inv_temperature;

  float m = -INFINITY;  // max z, and whether every z is finite
  int bad = 0;
  for (int j = tid; j < n; j += blockDim.x) {
    const float z = __fmul_rn(l[j], inv_t);
    bad |= !isfinite(z);
    m = fmaxf(m, z);
  }
  if (tid == 0) s_bad = 0;
  s_m[tid] = m;
  __syncthreads();
  if (bad) s_bad = 1;
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (tid < off) s_m[tid] = fmaxf(s_m[tid], s_m[tid + off]);
    __syncthreads();
  }
  m = s_m[0];
  if (s_bad) {
    if (tid == 0) token[r] = -1;
    return;
  }
  __syncthreads();

  uint32_t thr = 0;  // every finite z has a key above 0
  if (p.top_k > 0 && p.top_k < n)
    thr = radix_select(l, n, inv_t, static_cast<uint64_t>(p.top_k), [](int, uint32_t) { return uint64_t{1}; }, hist,
                       &s_prefix);
  if (p.top_p < 1.0) {
    uint32_t* w = wbuf + row;
    if (tid == 0) hist[0] = 0;
    __syncthreads();
    unsigned long long mine = 0;  // the top-k survivors' weights, summed in integers: exact in any order
    for (int j = tid; j < n; j += blockDim.x) {
      const float z = __fmul_rn(l[j], inv_t);
      const uint32_t wj = order_key(z) >= thr ? static_cast<uint32_t>(top_p_weight(z, m)) : 0u;
      w[j] = wj;
      mine += wj;
    }
    atomicAdd(&hist[0], mine);
    __syncthreads();
    const uint64_t total = hist[0];
    __syncthreads();
    const uint64_t target = static_cast<uint64_t>(ceil(__dmul_rn(static_cast<double>(total), p.top_p)));
    const uint32_t thr_p = radix_select(l, n, inv_t, target, [w](int j, uint32_t) { return uint64_t{w[j]}; }, hist,
                                        &s_prefix);
    thr = thr_p > thr ? thr_p : thr;
  }

  Best best{-INFINITY, -1};
  const float* yr = y + row;
  for (int j = tid; j < n; j += blockDim.x)
    if (order_key(__fmul_rn(l[j], inv_t)) >= thr) best = better(best, Best{yr[j], j});
  s_m[tid] = best.y, s_j[tid] = best.j;
  __syncthreads();
  for (int off = blockDim.x / 2; off > 0; off >>= 1) {
    if (tid < off) {
      const Best o = better(Best{s_m[tid], s_j[tid]}, Best{s_m[tid + off], s_j[tid + off]});
      s_m[tid] = o.y, s_j[tid] = o.j;
    }
    __syncthreads();
  }
  if (tid == 0) token[r] = s_j[0] < 0 ? -1 : (subset ? subset[s_j[0]] : s_j[0]);
}

size_t partial_floats(int R, int n) { return static_cast<size_t>((n + kLmHeadCols - 1) / kLmHeadCols) * R * 4; }

template <int RB>
cudaError_t launch(XRows x, RowNorm norm, const __nv_bfloat16* w, const int32_t* subset, int n,
                   const __nv_bfloat16* w_rest, int32_t* token, float* max_prob, float* lse, float* workspace, int R,
                   int d, bool round_bf16, const SampleParams* params, cudaStream_t stream, bool pdl) {
  const int nblk = (n + kLmHeadCols - 1) / kLmHeadCols;
  float4* part = reinterpret_cast<float4*>(workspace);
  const size_t rn = static_cast<size_t>(R) * n;
  float* logits = workspace + partial_floats(R, n);  // sampling only: logits, perturbed scores, top-p weights
  float* y = logits + rn;
  uint32_t* wbuf = reinterpret_cast<uint32_t*>(y + rn);
  auto* partial = params ? &lm_head_partial_kernel<RB, true> : &lm_head_partial_kernel<RB, false>;
  cudaError_t e = ADADECODE_LAUNCH(pdl, partial, dim3(nblk), dim3(skinny_threads(d)), 0, stream, x, norm, w, subset, n,
                                   R, d, round_bf16, part, params ? logits : nullptr);
  if (e != cudaSuccess) return e;
  auto* merge = &lm_head_merge_kernel;
  e = ADADECODE_LAUNCH(pdl, merge, dim3(R), dim3(kMergeThreads), 0, stream, part, nblk, x, w_rest, subset, R, d,
                       round_bf16, token, max_prob, lse);
  if (e != cudaSuccess || !params) return e;
  auto* perturb = &lm_head_perturb_kernel;
  e = ADADECODE_LAUNCH(pdl, perturb, dim3((n + kPerturbThreads - 1) / kPerturbThreads, R), dim3(kPerturbThreads), 0,
                       stream, logits, n, subset, params, y);
  if (e != cudaSuccess) return e;
  auto* select = &lm_head_select_kernel;
  return ADADECODE_LAUNCH(pdl, select, dim3(R), dim3(kSelectThreads), 0, stream, logits, y, n, subset, params, wbuf,
                          token);
}

cudaError_t dispatch(XRows x, RowNorm norm, const __nv_bfloat16* w, const int32_t* subset, int n,
                     const __nv_bfloat16* w_rest, int32_t* token, float* max_prob, float* lse, float* workspace, int R,
                     int d, bool round_bf16, const SampleParams* params, cudaStream_t stream, bool pdl) {
  if (R < 1 || R > kSkinnyMaxRows || n < 1 || d < 8 || d % 8 != 0) return cudaErrorInvalidValue;
  if (!x.holds(R)) return cudaErrorInvalidValue;
  if (norm.weight && w_rest) return cudaErrorInvalidValue;  // the rest logit reads the rows un-normed
  if (!aligned16(x.base) || !aligned16(w) || (w_rest && !aligned16(w_rest)) || !aligned16(workspace) ||
      (norm.weight && !aligned16(norm.weight)))
    return cudaErrorInvalidValue;
  switch (skinny_bucket(R)) {
    case 1: return launch<1>(x, norm, w, subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, params, stream, pdl);
    case 2: return launch<2>(x, norm, w, subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, params, stream, pdl);
    case 4: return launch<4>(x, norm, w, subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, params, stream, pdl);
    case 8: return launch<8>(x, norm, w, subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, params, stream, pdl);
    default: return launch<16>(x, norm, w, subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, params, stream, pdl);
  }
}

}  // namespace

size_t lm_head_workspace_floats(int R, int n) { return partial_floats(R, n); }

size_t lm_head_sample_workspace_floats(int R, int n) {
  return partial_floats(R, n) + 3 * static_cast<size_t>(R) * n;
}

cudaError_t lm_head_argmax(XRows x, RowNorm norm, const __nv_bfloat16* w, const int32_t* vocab_subset, int n,
                           const __nv_bfloat16* w_rest, int32_t* token, float* max_prob, float* lse,
                           float* workspace, int R, int d, bool round_bf16, cudaStream_t stream, bool pdl) {
  return dispatch(x, norm, w, vocab_subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, nullptr,
                  stream, pdl);
}

cudaError_t lm_head_sample(XRows x, RowNorm norm, const __nv_bfloat16* w, const int32_t* vocab_subset, int n,
                           const __nv_bfloat16* w_rest, const SampleParams* params, int32_t* token, float* max_prob,
                           float* lse, float* workspace, int R, int d, bool round_bf16, cudaStream_t stream, bool pdl) {
  if (params == nullptr) return cudaErrorInvalidValue;
  return dispatch(x, norm, w, vocab_subset, n, w_rest, token, max_prob, lse, workspace, R, d, round_bf16, params,
                  stream, pdl);
}

cudaError_t lm_head_argmax(const __nv_bfloat16* x, const __nv_bfloat16* w, const int32_t* vocab_subset, int n,
                           const __nv_bfloat16* w_rest, int32_t* token, float* max_prob, float* lse,
                           float* workspace, int R, int d, bool round_bf16, cudaStream_t stream) {
  return lm_head_argmax(XRows{x}, RowNorm{}, w, vocab_subset, n, w_rest, token, max_prob, lse, workspace, R, d,
                        round_bf16, stream, false);
}

cudaError_t lm_head_sample(const __nv_bfloat16* x, const __nv_bfloat16* w, const int32_t* vocab_subset, int n,
                           const __nv_bfloat16* w_rest, const SampleParams* params, int32_t* token, float* max_prob,
                           float* lse, float* workspace, int R, int d, bool round_bf16, cudaStream_t stream) {
  return lm_head_sample(XRows{x}, RowNorm{}, w, vocab_subset, n, w_rest, params, token, max_prob, lse, workspace, R, d,
                        round_bf16, stream, false);
}

}  // namespace adadecode
