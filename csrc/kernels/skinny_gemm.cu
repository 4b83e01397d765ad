#include "skinny_gemm.cuh"
#include "skinny_core.cuh"

namespace adadecode {
namespace {

constexpr int kCols = 4;  // weight rows per block (NMAT == 2: 2 of W_gate + the same 2 of W_up)

__device__ __forceinline__ float silu(float g) { return g / (1.f + expf(-g)); }

// NMAT = 1: plain / residual epilogue; NMAT = 2: silu(gate) * up.
template <int RB, int NMAT>
__global__ void __launch_bounds__(256) skinny_gemm_kernel(const __nv_bfloat16* __restrict__ x,
                                                          const __nv_bfloat16* __restrict__ w,
                                                          const __nv_bfloat16* __restrict__ w_up,
                                                          const __nv_bfloat16* residual, __nv_bfloat16* out, int R,
                                                          int N, int K) {
  constexpr int CPM = kCols / NMAT;  // output columns per block
  __shared__ float red[kSkinnyMaxWarps * RB * kCols];
  __shared__ float res[RB * kCols];
  const int n0 = blockIdx.x * CPM;
  const __nv_bfloat16* wrow[kCols];
#pragma unroll
  for (int s = 0; s < kCols; ++s) {
    const int n = n0 + s % CPM;
    const __nv_bfloat16* base = (NMAT == 2 && s >= CPM) ? w_up : w;
    wrow[s] = n < N ? base + static_cast<int64_t>(n) * K : nullptr;
  }
  skinny_block_dot<RB, kCols>(x, R, K, wrow, red, res);

  for (int j = threadIdx.x; j < R * CPM; j += blockDim.x) {
    const int r = j / CPM, c = j % CPM, n = n0 + c;
    if (n >= N) continue;
    const int64_t o = static_cast<int64_t>(r) * N + n;
    float y;
    if (NMAT == 2) {
      const float g = bf16_round(res[r * kCols + c]), u = bf16_round(res[r * kCols + CPM + c]);
      y = bf16_round(silu(g)) * u;
    } else {
      y = bf16_round(res[r * kCols + c]);
      if (residual) y = __bfloat162float(residual[o]) + y;
    }
    out[o] = __float2bfloat16_rn(y);
  }
}

template <int RB>
cudaError_t launch_rb(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                      const __nv_bfloat16* residual, __nv_bfloat16* out, int R, int N, int K, cudaStream_t stream) {
  const int threads = skinny_threads(K);
  if (w_up) {
    skinny_gemm_kernel<RB, 2><<<(N + kCols / 2 - 1) / (kCols / 2), threads, 0, stream>>>(x, w, w_up, nullptr, out, R, N, K);
  } else {
    skinny_gemm_kernel<RB, 1><<<(N + kCols - 1) / kCols, threads, 0, stream>>>(x, w, nullptr, residual, out, R, N, K);
  }
  return launch_status();
}

}  // namespace

cudaError_t skinny_gemm(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                        const __nv_bfloat16* residual, __nv_bfloat16* out, int R, int N, int K, cudaStream_t stream) {
  if (R < 1 || R > kSkinnyMaxRows || N < 1 || K < 8 || K % 8 != 0 || (w_up && residual)) return cudaErrorInvalidValue;
  if (!aligned16(x) || !aligned16(w) || (w_up && !aligned16(w_up))) return cudaErrorInvalidValue;
  switch (skinny_bucket(R)) {
    case 1: return launch_rb<1>(x, w, w_up, residual, out, R, N, K, stream);
    case 2: return launch_rb<2>(x, w, w_up, residual, out, R, N, K, stream);
    case 4: return launch_rb<4>(x, w, w_up, residual, out, R, N, K, stream);
    case 8: return launch_rb<8>(x, w, w_up, residual, out, R, N, K, stream);
    default: return launch_rb<16>(x, w, w_up, residual, out, R, N, K, stream);
  }
}

}  // namespace adadecode
