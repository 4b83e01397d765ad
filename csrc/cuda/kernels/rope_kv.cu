#include "rope_kv.cuh"
#include "rope_core.cuh"
#include "rmsnorm_core.cuh"

namespace adadecode {
namespace {

constexpr int kThreads = 128;

// One block per row. Work item = (head among q/k heads, 8-wide slice of the first half), or a 16-byte chunk of v.
__global__ void __launch_bounds__(kThreads) rope_append_kv_kernel(__nv_bfloat16* __restrict__ qkv,
                                                                  __nv_bfloat16* __restrict__ k_cache,
                                                                  __nv_bfloat16* __restrict__ v_cache,
                                                                  const float* __restrict__ cos_tab,
                                                                  const float* __restrict__ sin_tab,
                                                                  const int32_t* __restrict__ first_pos, int n_heads,
                                                                  int n_kv_heads, int hd, int max_seq,
                                                                  const __nv_bfloat16* __restrict__ q_norm,
                                                                  const __nv_bfloat16* __restrict__ k_norm, float eps) {
  __shared__ float inv[kRopeMaxNormHeads];  // per q / k head, when normed
  const int r = blockIdx.x;
  const int pos = *first_pos + r;
  const int half = hd / 2, slices = half / 8;
  const int width = (n_heads + 2 * n_kv_heads) * hd;
  __nv_bfloat16* row = qkv + static_cast<int64_t>(r) * width;
  const bool ok = pos >= 0 && pos < max_seq;
  const int n_rot = (n_heads + n_kv_heads) * slices;
  const int n_v = n_kv_heads * hd / 8;
  if (q_norm != nullptr) {  // block-uniform: every thread reaches the barrier
    for (int head = threadIdx.x / 32; head < n_heads + n_kv_heads; head += kThreads / 32) {
      const float v = warp_row_inv_rms(row + head * hd, hd, eps);
      if (threadIdx.x % 32 == 0) inv[head] = v;
    }
    __syncthreads();  // every head's sum is read before any slice of it is rotated in place
  }

  for (int item = threadIdx.x; item < n_rot + n_v; item += kThreads) {
    if (item >= n_rot) {  // v: plain copy into the cache
      const int j = item - n_rot;
      if (ok) {
        const uint4 v = *reinterpret_cast<const uint4*>(row + (n_heads + n_kv_heads) * hd + j * 8);
        *reinterpret_cast<uint4*>(v_cache + static_cast<int64_t>(pos) * n_kv_heads * hd + j * 8) = v;
      }
      continue;
    }
    const int head = item / slices, i0 = (item % slices) * 8;
    __nv_bfloat16* src = row + head * hd;
    if (!ok) {
      if (head < n_heads) {
        const uint4 nan = make_uint4(0x7fc07fc0u, 0x7fc07fc0u, 0x7fc07fc0u, 0x7fc07fc0u);
        *reinterpret_cast<uint4*>(src + i0) = nan;
        *reinterpret_cast<uint4*>(src + half + i0) = nan;
      }
      continue;
    }
    float a[8], b[8];
    unpack8(*reinterpret_cast<const uint4*>(src + i0), a);
    unpack8(*reinterpret_cast<const uint4*>(src + half + i0), b);
    if (q_norm != nullptr) {
      const __nv_bfloat16* g = head < n_heads ? q_norm : k_norm;
      const float iv = inv[head];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        a[e] = norm_elem(a[e], iv, __bfloat162float(g[i0 + e]));
        b[e] = norm_elem(b[e], iv, __bfloat162float(g[half + i0 + e]));
      }
    }
    const float* ct = cos_tab + static_cast<int64_t>(pos) * half + i0;
    const float* st = sin_tab + static_cast<int64_t>(pos) * half + i0;
    float lo_f[8], hi_f[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) rope_pair(a[e], b[e], __ldg(ct + e), __ldg(st + e), lo_f[e], hi_f[e]);
    bf16x8 lo, hi;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      lo.v[e] = __floats2bfloat162_rn(lo_f[2 * e], lo_f[2 * e + 1]);
      hi.v[e] = __floats2bfloat162_rn(hi_f[2 * e], hi_f[2 * e + 1]);
    }
    __nv_bfloat16* dst = src;
    if (head >= n_heads)
      dst = k_cache + (static_cast<int64_t>(pos) * n_kv_heads + (head - n_heads)) * hd;
    *reinterpret_cast<bf16x8*>(dst + i0) = lo;
    *reinterpret_cast<bf16x8*>(dst + half + i0) = hi;
  }
}

}  // namespace

cudaError_t rope_append_kv(__nv_bfloat16* qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const float* cos_tab,
                           const float* sin_tab, const int32_t* first_pos, int R, int n_heads, int n_kv_heads,
                           int head_dim, int max_seq, cudaStream_t stream, const __nv_bfloat16* q_norm,
                           const __nv_bfloat16* k_norm, float eps) {
  if (R < 1 || n_heads < 1 || n_kv_heads < 1 || head_dim < 16 || head_dim % 16 != 0 || max_seq < 1)
    return cudaErrorInvalidValue;
  if ((q_norm == nullptr) != (k_norm == nullptr) || (q_norm && n_heads + n_kv_heads > kRopeMaxNormHeads))
    return cudaErrorInvalidValue;
  if (!aligned16(qkv) || !aligned16(k_cache) || !aligned16(v_cache) || !aligned16(cos_tab) || !aligned16(sin_tab))
    return cudaErrorInvalidValue;
  rope_append_kv_kernel<<<R, kThreads, 0, stream>>>(qkv, k_cache, v_cache, cos_tab, sin_tab, first_pos, n_heads,
                                                    n_kv_heads, head_dim, max_seq, q_norm, k_norm, eps);
  return launch_status();
}

}  // namespace adadecode
