#include "attention.cuh"

#include <algorithm>

namespace adadecode {
namespace {

constexpr int CH = kAttnChunk;
constexpr int kThreads = 128;  // == CH: thread t owns position t of the chunk when scoring
constexpr int kMaxQ = 128;     // queries (rows x heads of one KV group) per block
static_assert(kThreads == CH, "scoring maps one thread to one position");

// cp.async (sm_80+); older targets (a CMake default arch) fall back to a plain 16-byte copy.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
#if __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(s), "l"(gmem));
#else
  *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_k() {  // all but the most recent group (V)
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 1;\n" ::);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group 0;\n" ::);
#endif
}

inline int rows_per_block(int G) {
  int r = kMaxQ / G;
  return r < 1 ? 1 : r > 16 ? 16 : r;
}

template <int HD>
__host__ __device__ constexpr size_t kv_smem_bytes() { return 2 * size_t(CH) * (HD + 8) * sizeof(__nv_bfloat16); }

// Output dim d of up to NQ (row, head) pairs: pair i (i < n) is row r[i] at position pr[i], head h[i], merged
// over its chunks 0..pr[i]/128 in increasing order. The pairs are interleaved only so that their loads are in flight
// together; each pair's operations are those of the pair alone. The one merge of both paths (the fused tail and
// attn_merge_kernel): the bits cannot depend on the path.
template <int HD, int NQ>
__device__ __forceinline__ void merge_pairs(const float* part_o, const float* part_ml, const int (&pr)[NQ],
                                            const int (&r)[NQ], const int (&h)[NQ], int n, int n_heads, int n_chunks,
                                            int max_ctx, int window, int d, __nv_bfloat16* __restrict__ out) {
  const float2* ml = reinterpret_cast<const float2*>(part_ml);
  int64_t base[NQ];
  int nc[NQ], c0[NQ];  // chunks c0..nc-1 hold the pair's window
  float M[NQ], L[NQ], acc[NQ];
  int nc_max = 0;
#pragma unroll
  for (int i = 0; i < NQ; ++i) {
    base[i] = (static_cast<int64_t>(r[i]) * n_heads + h[i]) * n_chunks;
    nc[i] = pr[i] / CH + 1;
    if (i >= n || pr[i] < 0 || pr[i] >= max_ctx || nc[i] > n_chunks) nc[i] = 0;  // 0: NaN (past max_ctx)
    c0[i] = attn_window_lo(pr[i] < 0 ? 0 : pr[i], window) / CH;
    nc_max = max(nc_max, nc[i]);
    M[i] = -INFINITY;
    L[i] = 0.f;
    acc[i] = 0.f;
  }
  for (int c = 0; c < nc_max; ++c) {
#pragma unroll
    for (int i = 0; i < NQ; ++i)
      if (c >= c0[i] && c < nc[i]) M[i] = fmaxf(M[i], ml[base[i] + c].x);
  }
  for (int c = 0; c < nc_max; ++c) {
#pragma unroll
    for (int i = 0; i < NQ; ++i) {
      if (c >= c0[i] && c < nc[i]) {
        const float2 v = ml[base[i] + c];
        const float w = exp2_fixed(v.x - M[i]);
        L[i] = __fmaf_rn(v.y, w, L[i]);
        acc[i] = __fmaf_rn(part_o[(base[i] + c) * HD + d], w, acc[i]);
      }
    }
  }
#pragma unroll
  for (int i = 0; i < NQ; ++i)
    if (i < n)
      out[(static_cast<int64_t>(r[i]) * n_heads + h[i]) * HD + d] =
          __float2bfloat16_rn(nc[i] == 0 ? NAN : acc[i] / L[i]);
}

// grid: (S splits, Hkv, row groups); block (s, kh, z) computes the chunks c = s, s + S, ... below the group's live
// chunk count (read from *first_pos, so a captured graph stays right as the context grows) and writes, for every
// row r of the group with 128c <= p_r and every head h of the KV group: part_o[r, h, c, :] (unnormalised P.V),
// part_ml[r, h, c] = (max, sum) in log2 units. With counters (one launch): the last block of (z, kh) to finish
// then merges the group's rows into out and resets the counter to 0.
template <int HD>
__global__ void __launch_bounds__(kThreads) attn_split_kernel(
    const __nv_bfloat16* __restrict__ q, int q_stride, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, const int32_t* __restrict__ first_pos, int R, int n_heads,
    int n_kv_heads, int rpb, int n_chunks, int max_ctx, int window, float qscale, float* __restrict__ part_o,
    float* __restrict__ part_ml, int* __restrict__ counters, __nv_bfloat16* __restrict__ out) {
  constexpr int LDK = HD + 8;  // padded smem row: conflict-free 16-byte row reads
  constexpr int NV = HD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  __nv_bfloat16* Ks = reinterpret_cast<__nv_bfloat16*>(smem);
  __nv_bfloat16* Vs = Ks + CH * LDK;
  float* qs = reinterpret_cast<float*>(smem + kv_smem_bytes<HD>());

  pdl_wait();  // before first_pos, q, the caches and the counters: all written by earlier kernels
  pdl_launch_dependents();
  const int tid = threadIdx.x;
  const int kh = blockIdx.y;
  const int G = n_heads / n_kv_heads;
  const int p0 = *first_pos;
  const int r_begin = blockIdx.z * rpb;
  const int nr = min(R - r_begin, rpb);
  const int Q = nr * G;
  float* S = qs + Q * HD;
  // Positions >= max_ctx are never read (the cache may end there); rows past it get NaN from the merge.
  const int p_last = min(p0 + r_begin + nr - 1, max_ctx - 1);
  const int n_live = p_last >= 0 ? p_last / CH + 1 : 0;  // chunks 0..n_live-1 hold positions of the group
  // With a window, chunks before c_first hold no position any row of the group attends to (its first row's lo is
  // the smallest); block s takes the chunks c_first + s, c_first + s + S, ...
  const int c_first = attn_window_lo(max(p0 + r_begin, 0), window) / CH;
  // Blocks of the group that take part: those with a chunk, and at least one (it writes the NaN rows).
  const int n_part = min(static_cast<int>(gridDim.x), max(n_live - c_first, 1));
  if (static_cast<int>(blockIdx.x) >= n_part) return;  // uniform per block
  const int64_t kv_row = static_cast<int64_t>(n_kv_heads) * HD;

  for (int idx = tid; idx < Q * NV; idx += kThreads) {
    const int qi = idx / NV, j = idx % NV;
    const int r = r_begin + qi / G, h = kh * G + qi % G;
    float f[8];
    unpack8(*reinterpret_cast<const uint4*>(q + static_cast<int64_t>(r) * q_stride + h * HD + j * 8), f);
    float4* dst = reinterpret_cast<float4*>(qs + qi * HD + j * 8);
    dst[0] = make_float4(f[0] * qscale, f[1] * qscale, f[2] * qscale, f[3] * qscale);
    dst[1] = make_float4(f[4] * qscale, f[5] * qscale, f[6] * qscale, f[7] * qscale);
  }

  for (int c = c_first + blockIdx.x; c < n_live; c += gridDim.x) {
    const int t0 = c * CH;
    const int nvalid = min(CH, p_last - t0 + 1);

    // Two copy groups: K (needed first), then V (in flight while the scores are computed).
    for (int idx = tid; idx < nvalid * NV; idx += kThreads) {
      const int t = idx / NV, j = idx % NV;
      cp_async16(Ks + t * LDK + j * 8, k_cache + (t0 + t) * kv_row + kh * HD + j * 8);
    }
    cp_async_commit();
    for (int idx = tid; idx < nvalid * NV; idx += kThreads) {
      const int t = idx / NV, j = idx % NV;
      cp_async16(Vs + t * LDK + j * 8, v_cache + (t0 + t) * kv_row + kh * HD + j * 8);
    }
    cp_async_commit();
    cp_async_wait_k();
    __syncthreads();

    // Scores: thread tid <-> position t0 + tid; S[qi][t] = q.k (log2 units), -inf where t > p_r or t is before the
    // window: kept iff 0 <= p_r - t < wlim, one unsigned compare (a second compare here made the hd-128 kernel spill).
    {
      const unsigned wlim = window > 0 ? static_cast<unsigned>(window) : 0x80000000u;
      const int t = tid;
      if (t < nvalid) {
        uint4 kr[NV];
#pragma unroll
        for (int j = 0; j < NV; ++j) kr[j] = *reinterpret_cast<const uint4*>(Ks + t * LDK + j * 8);
        int qi = 0;
        for (; qi + 4 <= Q; qi += 4) {
          float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
          for (int j = 0; j < NV; ++j) {
            float kf[8];
            unpack8(kr[j], kf);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
              const float4 a = *reinterpret_cast<const float4*>(qs + (qi + u) * HD + j * 8);
              const float4 b = *reinterpret_cast<const float4*>(qs + (qi + u) * HD + j * 8 + 4);
              s[u] = __fmaf_rn(kf[0], a.x, s[u]); s[u] = __fmaf_rn(kf[1], a.y, s[u]);
              s[u] = __fmaf_rn(kf[2], a.z, s[u]); s[u] = __fmaf_rn(kf[3], a.w, s[u]);
              s[u] = __fmaf_rn(kf[4], b.x, s[u]); s[u] = __fmaf_rn(kf[5], b.y, s[u]);
              s[u] = __fmaf_rn(kf[6], b.z, s[u]); s[u] = __fmaf_rn(kf[7], b.w, s[u]);
            }
          }
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int pr = p0 + r_begin + (qi + u) / G;
            S[(qi + u) * CH + t] = static_cast<unsigned>(pr - t0 - t) < wlim ? s[u] : -INFINITY;
          }
        }
        for (; qi < Q; ++qi) {
          float s = 0.f;
#pragma unroll
          for (int j = 0; j < NV; ++j) {
            float kf[8];
            unpack8(kr[j], kf);
            const float4 a = *reinterpret_cast<const float4*>(qs + qi * HD + j * 8);
            const float4 b = *reinterpret_cast<const float4*>(qs + qi * HD + j * 8 + 4);
            s = __fmaf_rn(kf[0], a.x, s); s = __fmaf_rn(kf[1], a.y, s);
            s = __fmaf_rn(kf[2], a.z, s); s = __fmaf_rn(kf[3], a.w, s);
            s = __fmaf_rn(kf[4], b.x, s); s = __fmaf_rn(kf[5], b.y, s);
            s = __fmaf_rn(kf[6], b.z, s); s = __fmaf_rn(kf[7], b.w, s);
          }
          const int pr = p0 + r_begin + qi / G;
          S[qi * CH + t] = static_cast<unsigned>(pr - t0 - t) < wlim ? s : -INFINITY;
        }
      } else {
        for (int qi = 0; qi < Q; ++qi) S[qi * CH + t] = -INFINITY;
      }
    }
    __syncthreads();

    // Softmax statistics of the chunk: one warp per query; S becomes exp2(s - m) (exactly 0 where masked).
    const int warp = tid / 32, lane = tid % 32;
    for (int qi = warp; qi < Q; qi += kThreads / 32) {
      const int r = r_begin + qi / G, h = kh * G + qi % G;
      // this chunk is past the row, or wholly before its window: no partial
      if (t0 > p0 + r || t0 + CH <= attn_window_lo(p0 + r, window)) continue;
      float v[CH / 32];
      float m = -INFINITY;
#pragma unroll
      for (int i = 0; i < CH / 32; ++i) {
        v[i] = S[qi * CH + lane + 32 * i];
        m = fmaxf(m, v[i]);
      }
      m = warp_max(m);
      float l = 0.f;
#pragma unroll
      for (int i = 0; i < CH / 32; ++i) {
        const float p = v[i] == -INFINITY ? 0.f : exp2_fixed(v[i] - m);
        S[qi * CH + lane + 32 * i] = p;
        l = __fadd_rn(l, p);
      }
      l = warp_sum(l);
      if (lane == 0) {
        const int64_t o = (static_cast<int64_t>(r) * n_heads + h) * n_chunks + c;
        reinterpret_cast<float2*>(part_ml)[o] = make_float2(m, l);
      }
    }
    cp_async_wait_all();
    __syncthreads();

    // P.V: NV threads per query, 8 dims each; positions in increasing order, only those <= p_r.
    constexpr int QPAR = kThreads / NV;
    const int d0 = (tid % NV) * 8;
    for (int qi = tid / NV; qi < Q; qi += QPAR) {
      const int r = r_begin + qi / G, h = kh * G + qi % G;
      const int n_r = min(nvalid, p0 + r - t0 + 1);
      const int t_lo = max(0, attn_window_lo(p0 + r, window) - t0);  // positions before the window: no term
      if (n_r <= 0 || t_lo >= n_r) continue;
      float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      for (int t = t_lo; t < n_r; ++t) {
        const float p = S[qi * CH + t];
        float vf[8];
        unpack8(*reinterpret_cast<const uint4*>(Vs + t * LDK + d0), vf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = __fmaf_rn(p, vf[e], acc[e]);
      }
      const int64_t o = ((static_cast<int64_t>(r) * n_heads + h) * n_chunks + c) * HD + d0;
      float4* dst = reinterpret_cast<float4*>(part_o + o);
      dst[0] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      dst[1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
    }
    __syncthreads();  // the next chunk refills Ks, Vs and S: its copies may land as soon as they are issued
  }
  if (counters == nullptr) return;  // two launches: attn_merge_kernel merges

  // One launch: the classic last-block pattern. Each thread's partials are made visible device-wide before the
  // block counts itself; the block that brings the count to n_part sees every block's partials after its fence.
  __shared__ int is_last;
  __threadfence();
  __syncthreads();
  if (tid == 0) {
    int* counter = counters + blockIdx.z * gridDim.y + kh;
    is_last = atomicAdd(counter, 1) == n_part - 1;
    if (is_last) *counter = 0;  // every block of the group has counted: ready for the next launch or replay
  }
  __syncthreads();
  if (!is_last) return;
  __threadfence();
  // Thread tid: output dim tid % HD of the group's queries tid / HD, tid / HD + QS, ..., kMergeQ at a time.
  constexpr int QS = kThreads / HD, kMergeQ = 4;
  for (int qi0 = tid / HD; qi0 < Q; qi0 += QS * kMergeQ) {
    int pr[kMergeQ], r[kMergeQ], h[kMergeQ];
#pragma unroll
    for (int i = 0; i < kMergeQ; ++i) {
      const int qi = min(qi0 + i * QS, Q - 1);  // clamped: pairs from n on are not written
      r[i] = r_begin + qi / G;
      h[i] = kh * G + qi % G;
      pr[i] = p0 + r[i];
    }
    const int n = min(kMergeQ, (Q - qi0 + QS - 1) / QS);
    merge_pairs<HD, kMergeQ>(part_o, part_ml, pr, r, h, n, n_heads, n_chunks, max_ctx, window, tid % HD, out);
  }
}

// grid: (H, R), block: HD threads (one output dim each).
template <int HD>
__global__ void __launch_bounds__(HD) attn_merge_kernel(const float* __restrict__ part_o,
                                                         const float* __restrict__ part_ml,
                                                         const int32_t* __restrict__ first_pos,
                                                         __nv_bfloat16* __restrict__ out, int n_heads, int n_chunks,
                                                         int max_ctx, int window) {
  pdl_wait();
  pdl_launch_dependents();
  const int h[1] = {static_cast<int>(blockIdx.x)}, r[1] = {static_cast<int>(blockIdx.y)};
  const int pr[1] = {*first_pos + r[0]};
  merge_pairs<HD, 1>(part_o, part_ml, pr, r, h, 1, n_heads, n_chunks, max_ctx, window, threadIdx.x, out);
}

template <int HD>
cudaError_t launch(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k_cache,
                   const __nv_bfloat16* v_cache, const int32_t* first_pos, __nv_bfloat16* out, float* workspace,
                   int R, int n_heads, int n_kv_heads, int max_ctx, bool single_launch, cudaStream_t stream,
                   bool pdl, int window) {
  const int G = n_heads / n_kv_heads;
  const int rpb = rows_per_block(G);
  const int nr = R < rpb ? R : rpb;
  const int n_chunks = (max_ctx + CH - 1) / CH;
  const int row_groups = (R + rpb - 1) / rpb;
  const size_t smem = kv_smem_bytes<HD>() + size_t(nr) * G * (HD + CH) * sizeof(float);
  static const cudaError_t attr = cudaFuncSetAttribute(
      attn_split_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
      static_cast<int>(kv_smem_bytes<HD>() + size_t(kMaxQ) * (HD + CH) * sizeof(float)));
  if (attr != cudaSuccess) return attr;
  int* counters = reinterpret_cast<int*>(workspace);
  float* part_o = workspace + kAttnCounters;
  float* part_ml = part_o + static_cast<size_t>(R) * n_heads * n_chunks * HD;
  const float qscale = 1.4426950408889634f / sqrtf(static_cast<float>(HD));  // log2(e) / sqrt(hd)
  const int groups = n_kv_heads * row_groups;
  const int splits = std::min(n_chunks, std::max(1, kAttnTargetBlocks / groups));
  const bool fused = single_launch && groups <= kAttnCounters;
  const dim3 grid(splits, n_kv_heads, row_groups);
  auto* split = &attn_split_kernel<HD>;
  const cudaError_t e = ADADECODE_LAUNCH(pdl, split, grid, dim3(kThreads), smem, stream, q, q_stride, k_cache, v_cache,
                                         first_pos, R, n_heads, n_kv_heads, rpb, n_chunks, max_ctx, window, qscale, part_o,
                                         part_ml, fused ? counters : nullptr, out);
  if (e != cudaSuccess || fused) return e;
  auto* merge = &attn_merge_kernel<HD>;
  return ADADECODE_LAUNCH(pdl, merge, dim3(n_heads, R), dim3(HD), 0, stream, part_o, part_ml, first_pos, out, n_heads,
                          n_chunks, max_ctx, window);
}

}  // namespace

size_t attention_workspace_floats(int R, int n_heads, int head_dim, int max_ctx) {
  const size_t n_chunks = (static_cast<size_t>(max_ctx) + CH - 1) / CH;
  return kAttnCounters + static_cast<size_t>(R) * n_heads * n_chunks * (head_dim + 2);
}

cudaError_t attention(const __nv_bfloat16* q, int q_stride, const __nv_bfloat16* k_cache,
                      const __nv_bfloat16* v_cache, const int32_t* first_pos, __nv_bfloat16* out, float* workspace,
                      int R, int n_heads, int n_kv_heads, int head_dim, int max_ctx, cudaStream_t stream,
                      bool single_launch, bool pdl, int window) {
  if (R < 1 || R > 65535 || window < 0 || n_kv_heads < 1 || n_heads < n_kv_heads || n_heads % n_kv_heads != 0 || max_ctx < 1 ||
      q_stride % 8 != 0 || q_stride < n_heads * head_dim)
    return cudaErrorInvalidValue;
  if (n_heads / n_kv_heads > kMaxQ) return cudaErrorInvalidValue;
  if (!aligned16(q) || !aligned16(k_cache) || !aligned16(v_cache) || !aligned16(workspace))
    return cudaErrorInvalidValue;
  switch (head_dim) {
    case 64: return launch<64>(q, q_stride, k_cache, v_cache, first_pos, out, workspace, R, n_heads, n_kv_heads, max_ctx, single_launch, stream, pdl, window);
    case 128: return launch<128>(q, q_stride, k_cache, v_cache, first_pos, out, workspace, R, n_heads, n_kv_heads, max_ctx, single_launch, stream, pdl, window);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace adadecode
