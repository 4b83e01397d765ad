#include "rope_core.cuh"
#include "skinny_core.cuh"
#include "skinny_gemm.cuh"

namespace adadecode {
namespace {

constexpr int kCols = 4;  // weight rows per block (NMAT == 2: 2 of W_gate + the same 2 of W_up)

__device__ __forceinline__ float silu(float g) { return g / (1.f + exp_fixed(-g)); }

// NMAT = 1: plain / residual epilogue; NMAT = 2: silu(gate) * up.
template <int RB, int NMAT>
__global__ void __launch_bounds__(256) skinny_gemm_kernel(XRows x, RowNorm norm, const __nv_bfloat16* __restrict__ w,
                                                          const __nv_bfloat16* __restrict__ w_up,
                                                          const __nv_bfloat16* residual, __nv_bfloat16* out, int R,
                                                          int N, int K, const __nv_bfloat16* __restrict__ bias) {
  constexpr int CPM = kCols / NMAT;  // output columns per block
  __shared__ float red[kSkinnyMaxWarps * RB * kCols];
  __shared__ float res[RB * kCols];
  __shared__ float inv[RB];
  const int n0 = blockIdx.x * CPM;
  const __nv_bfloat16* wrow[kCols];
#pragma unroll
  for (int s = 0; s < kCols; ++s) {
    const int n = n0 + s % CPM;
    const __nv_bfloat16* base = (NMAT == 2 && s >= CPM) ? w_up : w;
    wrow[s] = n < N ? base + static_cast<int64_t>(n) * K : nullptr;
  }
  skinny_prologue<RB>(wrow, x, R, K, norm, inv);
  skinny_block_dot<RB, kCols>(x, R, K, wrow, red, res, norm, inv);

  for (int j = threadIdx.x; j < R * CPM; j += blockDim.x) {
    const int r = j / CPM, c = j % CPM, n = n0 + c;
    if (n >= N) continue;
    const int64_t o = static_cast<int64_t>(r) * N + n;
    float y;
    if (NMAT == 2) {
      const float g = bf16_round(res[r * kCols + c]), u = bf16_round(res[r * kCols + CPM + c]);
      y = bf16_round(silu(g)) * u;
    } else {
      const float acc = res[r * kCols + c];
      y = bf16_round(bias ? __fadd_rn(acc, __bfloat162float(bias[n])) : acc);
      if (residual) y = __bfloat162float(residual[o]) + y;
    }
    out[o] = __float2bfloat16_rn(y);
  }
}

// QKV with RoPE and the K/V append in the epilogue. Blocks [0, n_rot) own two rotation pairs of one q or k head,
// columns {i, i + 1, i + hd/2, i + hd/2 + 1}; the rest own 4 consecutive v columns. Each column's dot product is
// skinny_block_dot's, whichever block computes it, so the values are those of skinny_gemm's plain epilogue.
template <int RB>
__global__ void __launch_bounds__(256) skinny_qkv_rope_kernel(
    XRows x, RowNorm norm, const __nv_bfloat16* __restrict__ w, __nv_bfloat16* __restrict__ qkv_out,
    __nv_bfloat16* __restrict__ k_cache, __nv_bfloat16* __restrict__ v_cache, const float* __restrict__ cos_tab,
    const float* __restrict__ sin_tab, const int32_t* __restrict__ first_pos, int R, int K, int n_heads,
    int n_kv_heads, int hd, int max_seq, const __nv_bfloat16* __restrict__ bias) {
  __shared__ float red[kSkinnyMaxWarps * RB * kCols];
  __shared__ float res[RB * kCols];
  __shared__ float inv[RB];
  const int half = hd / 2, qkv_n = (n_heads + 2 * n_kv_heads) * hd;
  const int n_rot = (n_heads + n_kv_heads) * half / 2;
  const bool rot = static_cast<int>(blockIdx.x) < n_rot;
  const int head = rot ? 2 * blockIdx.x / half : 0, i = rot ? 2 * blockIdx.x % half : 0;
  const int v0 = rot ? 0 : (blockIdx.x - n_rot) * kCols;  // column inside the v part
  int col[kCols];
  if (rot) {
    col[0] = head * hd + i, col[1] = col[0] + 1, col[2] = col[0] + half, col[3] = col[0] + half + 1;
  } else {
#pragma unroll
    for (int s = 0; s < kCols; ++s) col[s] = (n_heads + n_kv_heads) * hd + v0 + s;
  }
  const __nv_bfloat16* wrow[kCols];
#pragma unroll
  for (int s = 0; s < kCols; ++s) wrow[s] = w + static_cast<int64_t>(col[s]) * K;
  skinny_prologue<RB>(wrow, x, R, K, norm, inv);
  skinny_block_dot<RB, kCols>(x, R, K, wrow, red, res, norm, inv);

  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const int pos = *first_pos + r;
    const bool ok = pos >= 0 && pos < max_seq;
    float y[kCols];
#pragma unroll
    for (int s = 0; s < kCols; ++s)  // the GEMM's bf16 output (skinny_gemm_kernel's plain epilogue, bias and all)
      y[s] = bf16_round(bias ? __fadd_rn(res[r * kCols + s], __bfloat162float(bias[col[s]])) : res[r * kCols + s]);
    if (!rot) {
      if (ok)
        for (int s = 0; s < kCols; ++s)
          v_cache[static_cast<int64_t>(pos) * n_kv_heads * hd + v0 + s] = __float2bfloat16_rn(y[s]);
      continue;
    }
    if (!ok) {  // visible, never out of bounds: q is NaN (rope_append_kv's bits), the caches untouched
      if (head < n_heads) {
        uint16_t* q = reinterpret_cast<uint16_t*>(qkv_out + static_cast<int64_t>(r) * qkv_n + head * hd);
        q[i] = q[i + 1] = q[i + half] = q[i + half + 1] = 0x7fc0;
      }
      continue;
    }
    float lo[2], hi[2];
    for (int e = 0; e < 2; ++e)
      rope_pair(y[e], y[2 + e], cos_tab[static_cast<int64_t>(pos) * half + i + e],
                sin_tab[static_cast<int64_t>(pos) * half + i + e], lo[e], hi[e]);
    __nv_bfloat16* dst = head < n_heads ? qkv_out + static_cast<int64_t>(r) * qkv_n + head * hd
                                        : k_cache + (static_cast<int64_t>(pos) * n_kv_heads + (head - n_heads)) * hd;
    dst[i] = __float2bfloat16_rn(lo[0]), dst[i + 1] = __float2bfloat16_rn(lo[1]);
    dst[i + half] = __float2bfloat16_rn(hi[0]), dst[i + half + 1] = __float2bfloat16_rn(hi[1]);
  }
}

template <int RB>
cudaError_t launch_rb(XRows x, RowNorm norm, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                      const __nv_bfloat16* residual, __nv_bfloat16* out, int R, int N, int K, cudaStream_t stream,
                      bool pdl, const __nv_bfloat16* bias) {
  const int threads = skinny_threads(K);
  const __nv_bfloat16* no_bias = nullptr;
  if (w_up) {
    auto* k = &skinny_gemm_kernel<RB, 2>;
    return ADADECODE_LAUNCH(pdl, k, dim3((N + kCols / 2 - 1) / (kCols / 2)), dim3(threads), 0, stream, x, norm, w, w_up,
                            nullptr, out, R, N, K, no_bias);
  }
  auto* k = &skinny_gemm_kernel<RB, 1>;
  return ADADECODE_LAUNCH(pdl, k, dim3((N + kCols - 1) / kCols), dim3(threads), 0, stream, x, norm, w, nullptr,
                          residual, out, R, N, K, bias);
}

}  // namespace

cudaError_t skinny_gemm(XRows x, RowNorm norm, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                        const __nv_bfloat16* residual, __nv_bfloat16* out, int R, int N, int K, cudaStream_t stream,
                        bool pdl, const __nv_bfloat16* bias) {
  if (R < 1 || R > kSkinnyMaxRows || N < 1 || K < 8 || K % 8 != 0 || (w_up && residual) || (w_up && bias) ||
      !x.holds(R))
    return cudaErrorInvalidValue;
  if (!aligned16(x.base) || !aligned16(w) || (w_up && !aligned16(w_up)) || (norm.weight && !aligned16(norm.weight)))
    return cudaErrorInvalidValue;
  switch (skinny_bucket(R)) {
    case 1: return launch_rb<1>(x, norm, w, w_up, residual, out, R, N, K, stream, pdl, bias);
    case 2: return launch_rb<2>(x, norm, w, w_up, residual, out, R, N, K, stream, pdl, bias);
    case 4: return launch_rb<4>(x, norm, w, w_up, residual, out, R, N, K, stream, pdl, bias);
    case 8: return launch_rb<8>(x, norm, w, w_up, residual, out, R, N, K, stream, pdl, bias);
    default: return launch_rb<16>(x, norm, w, w_up, residual, out, R, N, K, stream, pdl, bias);
  }
}

cudaError_t skinny_gemm(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                        const __nv_bfloat16* residual, __nv_bfloat16* out, int R, int N, int K, cudaStream_t stream) {
  return skinny_gemm(XRows{x}, RowNorm{}, w, w_up, residual, out, R, N, K, stream, false);
}

cudaError_t skinny_qkv_rope(XRows x, RowNorm norm, const __nv_bfloat16* wqkv, __nv_bfloat16* qkv_out,
                            __nv_bfloat16* k_cache, __nv_bfloat16* v_cache, const float* cos_tab,
                            const float* sin_tab, const int32_t* first_pos, int R, int d, int n_heads,
                            int n_kv_heads, int head_dim, int max_seq, cudaStream_t stream, bool pdl,
                            const __nv_bfloat16* bias) {
  if (R < 1 || R > kSkinnyMaxRows || d < 8 || d % 8 != 0 || n_heads < 1 || n_kv_heads < 1 || head_dim < 16 ||
      head_dim % 16 != 0 || max_seq < 1 || !x.holds(R))
    return cudaErrorInvalidValue;
  if (!aligned16(x.base) || !aligned16(wqkv) || (norm.weight && !aligned16(norm.weight)))
    return cudaErrorInvalidValue;
  const dim3 grid((n_heads + n_kv_heads) * head_dim / 2 / 2 + n_kv_heads * head_dim / kCols);
  const dim3 block(skinny_threads(d));
  const int rb = skinny_bucket(R);
  auto* k = rb == 1 ? &skinny_qkv_rope_kernel<1> : rb == 2 ? &skinny_qkv_rope_kernel<2> : rb == 4 ? &skinny_qkv_rope_kernel<4>
          : rb == 8 ? &skinny_qkv_rope_kernel<8> : &skinny_qkv_rope_kernel<16>;
  return ADADECODE_LAUNCH(pdl, k, grid, block, 0, stream, x, norm, wqkv, qkv_out, k_cache, v_cache, cos_tab, sin_tab,
                          first_pos, R, d, n_heads, n_kv_heads, head_dim, max_seq, bias);
}

}  // namespace adadecode
