#include "add_rmsnorm.cuh"

namespace adadecode {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < kThreads / 32 ? scratch[lane] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x == 0) scratch[0] = v;
  __syncthreads();
  return scratch[0];
}

__global__ void __launch_bounds__(kThreads) add_rmsnorm_kernel(__nv_bfloat16* __restrict__ residual,
                                                               const __nv_bfloat16* __restrict__ delta,
                                                               const __nv_bfloat16* __restrict__ weight,
                                                               __nv_bfloat16* __restrict__ out, int d, float eps) {
  __shared__ float scratch[kThreads / 32];
  const int row = blockIdx.x;
  bf16x8* res = reinterpret_cast<bf16x8*>(residual + static_cast<int64_t>(row) * d);
  const bf16x8* dlt = delta ? reinterpret_cast<const bf16x8*>(delta + static_cast<int64_t>(row) * d) : nullptr;
  const int nvec = d / 8;

  float ss = 0.f;
  for (int i = threadIdx.x; i < nvec; i += kThreads) {
    bf16x8 x = res[i];
    if (dlt) {
      const bf16x8 y = dlt[i];
#pragma unroll
      for (int j = 0; j < 4; ++j) x.v[j] = __hadd2(x.v[j], y.v[j]);  // bf16 add, as the torch residual add rounds
      res[i] = x;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(x.v[j]);
      ss += f.x * f.x + f.y * f.y;
    }
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / d + eps);

  const bf16x8* w = reinterpret_cast<const bf16x8*>(weight);
  bf16x8* o = reinterpret_cast<bf16x8*>(out + static_cast<int64_t>(row) * d);
  for (int i = threadIdx.x; i < nvec; i += kThreads) {
    const bf16x8 x = res[i], g = w[i];
    bf16x8 r;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 f = __bfloat1622float2(x.v[j]);
      const __nv_bfloat162 n = __floats2bfloat162_rn(f.x * inv, f.y * inv);
      r.v[j] = __hmul2(g.v[j], n);
    }
    o[i] = r;
  }
}

}  // namespace

cudaError_t add_rmsnorm(__nv_bfloat16* residual, const __nv_bfloat16* delta, const __nv_bfloat16* weight,
                        __nv_bfloat16* out, int rows, int d, float eps, cudaStream_t stream) {
  if (rows <= 0 || d <= 0 || d % 8 != 0) return cudaErrorInvalidValue;
  if (!aligned16(residual) || (delta && !aligned16(delta)) || !aligned16(weight) || !aligned16(out))
    return cudaErrorInvalidValue;  // 16-byte bf16x8 loads/stores
  add_rmsnorm_kernel<<<rows, kThreads, 0, stream>>>(residual, delta, weight, out, d, eps);
  return launch_status();
}

}  // namespace adadecode
