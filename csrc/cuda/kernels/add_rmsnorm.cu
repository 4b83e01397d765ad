#include "add_rmsnorm.cuh"
#include "rmsnorm_core.cuh"

namespace adadecode {
namespace {

constexpr int kWarps = 4;  // rows per block: one warp per row (the order of rmsnorm_core.cuh)

__global__ void __launch_bounds__(kWarps * 32) add_rmsnorm_kernel(__nv_bfloat16* __restrict__ residual,
                                                                  const __nv_bfloat16* __restrict__ delta,
                                                                  const __nv_bfloat16* __restrict__ weight,
                                                                  __nv_bfloat16* __restrict__ out, int rows, int d,
                                                                  float eps) {
  const int row = blockIdx.x * kWarps + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;  // a whole warp: no block-wide barrier below
  __nv_bfloat16* res = residual + static_cast<int64_t>(row) * d;
  if (delta) {
    const bf16x8* dlt = reinterpret_cast<const bf16x8*>(delta + static_cast<int64_t>(row) * d);
    for (int i = lane; i < d / 8; i += 32) {
      bf16x8 x = reinterpret_cast<bf16x8*>(res)[i];
      const bf16x8 y = dlt[i];
#pragma unroll
      for (int j = 0; j < 4; ++j) x.v[j] = __hadd2(x.v[j], y.v[j]);  // bf16 add, as the torch residual add rounds
      reinterpret_cast<bf16x8*>(res)[i] = x;  // read back below by this same lane only (chunk i = lane + 32j)
    }
  }
  const float inv = warp_row_inv_rms(res, d, eps);
  bf16x8* o = reinterpret_cast<bf16x8*>(out + static_cast<int64_t>(row) * d);
  for (int i = lane; i < d / 8; i += 32) {
    float x[8], g[8];
    unpack8(*reinterpret_cast<const uint4*>(res + static_cast<int64_t>(i) * 8), x);
    unpack8(ld_ro16(weight + static_cast<int64_t>(i) * 8), g);
    bf16x8 r;
#pragma unroll
    for (int j = 0; j < 4; ++j)
      r.v[j] = __floats2bfloat162_rn(norm_elem(x[2 * j], inv, g[2 * j]), norm_elem(x[2 * j + 1], inv, g[2 * j + 1]));
    o[i] = r;
  }
}

}  // namespace

cudaError_t add_rmsnorm(__nv_bfloat16* residual, const __nv_bfloat16* delta, const __nv_bfloat16* weight,
                        __nv_bfloat16* out, int rows, int d, float eps, cudaStream_t stream) {
  if (rows <= 0 || d <= 0 || d % 8 != 0) return cudaErrorInvalidValue;
  if (!aligned16(residual) || (delta && !aligned16(delta)) || !aligned16(weight) || !aligned16(out))
    return cudaErrorInvalidValue;  // 16-byte bf16x8 loads/stores
  add_rmsnorm_kernel<<<(rows + kWarps - 1) / kWarps, kWarps * 32, 0, stream>>>(residual, delta, weight, out, rows, d,
                                                                             eps);
  return launch_status();
}

}  // namespace adadecode
