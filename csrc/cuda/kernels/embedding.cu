#include "embedding.cuh"

namespace adadecode {
namespace {

constexpr int kThreads = 128;

__global__ void __launch_bounds__(kThreads) embedding_kernel(const int32_t* __restrict__ tokens,
                                                             const __nv_bfloat16* __restrict__ table,
                                                             __nv_bfloat16* __restrict__ out, int d, int vocab) {
  const int row = blockIdx.x;
  const int tok = tokens[row];
  const int nvec = d / 8;
  uint4* dst = reinterpret_cast<uint4*>(out + static_cast<int64_t>(row) * d);
  if (tok < 0 || tok >= vocab) {
    const uint4 nan = make_uint4(0x7fc07fc0u, 0x7fc07fc0u, 0x7fc07fc0u, 0x7fc07fc0u);
    for (int i = threadIdx.x; i < nvec; i += kThreads) dst[i] = nan;
    return;
  }
  const uint4* src = reinterpret_cast<const uint4*>(table + static_cast<int64_t>(tok) * d);
  for (int i = threadIdx.x; i < nvec; i += kThreads) dst[i] = __ldg(src + i);
}

}  // namespace

cudaError_t embedding(const int32_t* tokens, const __nv_bfloat16* table, __nv_bfloat16* out, int rows, int d,
                      int vocab, cudaStream_t stream) {
  if (rows <= 0 || d <= 0 || d % 8 != 0 || vocab <= 0 || !aligned16(table) || !aligned16(out))
    return cudaErrorInvalidValue;
  embedding_kernel<<<rows, kThreads, 0, stream>>>(tokens, table, out, d, vocab);
  return launch_status();
}

}  // namespace adadecode
