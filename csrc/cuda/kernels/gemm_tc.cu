#include "gemm_tc.cuh"

#include <mma.h>

#include "skinny_gemm.cuh"

namespace adadecode {
namespace {

using namespace nvcuda;

constexpr int BM = 128, BN = 128, BK = 32, LDS = BK + 8;  // smem row stride 80 B: wmma needs 32 B-aligned fragments
constexpr int kThreads = 256;                               // 8 warps: 2 (M) x 4 (N), 64 x 32 per warp

// bf16 wmma and cp.async need sm_80+. Compiled for an older target (a CMake default arch), the kernel traps.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define ADA_TC_OK 1
#else
#define ADA_TC_OK 0
#endif

#if ADA_TC_OK
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // src-size 0: zero fill
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all_but_one() { asm volatile("cp.async.wait_group 1;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::); }
#endif

__device__ __forceinline__ float silu(float g) { return g / (1.f + exp_fixed(-g)); }

// GATEUP: tile columns 0..63 are rows n0..n0+63 of W (gate), 64..127 the same rows of W_up; output 64 columns.
template <bool GATEUP>
__global__ void __launch_bounds__(kThreads) gemm_tc_kernel(const __nv_bfloat16* __restrict__ x,
                                                           const __nv_bfloat16* __restrict__ w,
                                                           const __nv_bfloat16* __restrict__ w_up,
                                                           const __nv_bfloat16* residual, __nv_bfloat16* out, int M,
                                                           int N, int K, const __nv_bfloat16* __restrict__ bias) {
#if !ADA_TC_OK
  __trap();
#else
  constexpr int OUT_N = GATEUP ? BN / 2 : BN;
  __shared__ __align__(128) __nv_bfloat16 As[2][BM * LDS];
  __shared__ __align__(128) __nv_bfloat16 Bs[2][BN * LDS];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wm = warp / 4, wn = warp % 4;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * OUT_N;

  // Each thread copies 2 chunks of A and 2 of B per stage (128 rows x 4 chunks of 16 B each).
  auto load_stage = [&](int stage, int k0) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int c = tid + j * kThreads, row = c / 4, kc = (c % 4) * 8;
      const int gk = k0 + kc;
      const int gm = m0 + row;
      const bool va = gm < M && gk < K;
      cp_async16(&As[stage][row * LDS + kc], va ? x + static_cast<int64_t>(gm) * K + gk : x, va);
      int gn;
      const __nv_bfloat16* base;
      if (GATEUP) {
        gn = n0 + (row % 64);
        base = row < 64 ? w : w_up;
      } else {
        gn = n0 + row;
        base = w;
      }
      const bool vb = gn < N && gk < K;
      cp_async16(&Bs[stage][row * LDS + kc], vb ? base + static_cast<int64_t>(gn) * K + gk : w, vb);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[4][2];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);

  // Tile-local column of this warp's j-th 16-wide fragment.
  auto bcol = [&](int j) { return GATEUP ? (j == 0 ? wn * 16 : 64 + wn * 16) : wn * 32 + j * 16; };

  const int nk = (K + BK - 1) / BK;
  load_stage(0, 0);
  cp_async_commit();
  for (int kt = 0; kt < nk; ++kt) {
    const int st = kt & 1;
    if (kt + 1 < nk) {
      load_stage(st ^ 1, (kt + 1) * BK);
      cp_async_commit();
      cp_async_wait_all_but_one();
    } else {
      cp_async_wait_all();
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[4];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 4; ++i) wmma::load_matrix_sync(a[i], &As[st][(wm * 64 + i * 16) * LDS + kk], LDS);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], &Bs[st][bcol(j) * LDS + kk], LDS);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    __syncthreads();  // the next iteration's copy overwrites this stage
  }

  // Epilogue: one 16x16 fragment at a time through a per-warp fp32 scratch; lane -> row lane/2, 8 columns.
  // The A stages are free after the loop's last barrier: 8 warps x 2 x 1 KB of scratch fit in their 20 KB.
  static_assert(sizeof(As) >= kThreads / 32 * 2 * 256 * sizeof(float), "epilogue scratch does not fit");
  float* sc0 = reinterpret_cast<float*>(&As[0][0]) + warp * 512;
  float* sc1 = sc0 + 256;
  const int er = lane / 2, ec = (lane % 2) * 8;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int gm = m0 + wm * 64 + i * 16 + er;
#pragma unroll
    for (int j = 0; j < (GATEUP ? 1 : 2); ++j) {
      wmma::store_matrix_sync(sc0, acc[i][j], 16, wmma::mem_row_major);
      if (GATEUP) wmma::store_matrix_sync(sc1, acc[i][1], 16, wmma::mem_row_major);
      __syncwarp();
      const int gn0 = n0 + (GATEUP ? wn * 16 : wn * 32 + j * 16) + ec;
      if (gm < M) {
        for (int e = 0; e < 8; ++e) {
          const int gn = gn0 + e;
          if (gn >= N) break;
          const int64_t o = static_cast<int64_t>(gm) * N + gn;
          float y;
          if (GATEUP) {
            const float g = bf16_round(sc0[er * 16 + ec + e]), u = bf16_round(sc1[er * 16 + ec + e]);
            y = bf16_round(silu(g)) * u;
          } else {
            const float acc = sc0[er * 16 + ec + e];
            y = bf16_round(bias ? __fadd_rn(acc, __bfloat162float(bias[gn])) : acc);
            if (residual) y = __bfloat162float(residual[o]) + y;
          }
          out[o] = __float2bfloat16_rn(y);
        }
      }
      __syncwarp();
    }
  }
#endif  // ADA_TC_OK
}

}  // namespace

cudaError_t gemm_tc(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                    const __nv_bfloat16* residual, __nv_bfloat16* out, int M, int N, int K, cudaStream_t stream,
                    const __nv_bfloat16* bias) {
  if (M < 1 || N < 1 || K < 8 || K % 8 != 0 || (w_up && residual) || (w_up && bias)) return cudaErrorInvalidValue;
  if (!aligned16(x) || !aligned16(w) || (w_up && !aligned16(w_up))) return cudaErrorInvalidValue;
  if (M > 65535 * BM) return cudaErrorInvalidValue;
  if (w_up) {
    const dim3 grid((N + BN / 2 - 1) / (BN / 2), (M + BM - 1) / BM);
    gemm_tc_kernel<true><<<grid, kThreads, 0, stream>>>(x, w, w_up, nullptr, out, M, N, K, nullptr);
  } else {
    const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);
    gemm_tc_kernel<false><<<grid, kThreads, 0, stream>>>(x, w, nullptr, residual, out, M, N, K, bias);
  }
  return launch_status();
}

cudaError_t linear(const __nv_bfloat16* x, const __nv_bfloat16* w, const __nv_bfloat16* w_up,
                   const __nv_bfloat16* residual, __nv_bfloat16* out, int M, int N, int K, cudaStream_t stream,
                   const __nv_bfloat16* bias) {
  if (M <= 16) return skinny_gemm(XRows{x}, RowNorm{}, w, w_up, residual, out, M, N, K, stream, false, bias);
  return gemm_tc(x, w, w_up, residual, out, M, N, K, stream, bias);
}

}  // namespace adadecode
