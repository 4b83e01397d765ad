// Shared helpers for the kernels: error checking, 16-byte bf16 vectors, streaming loads and fixed-order
// reductions. Torch-free: kernels take raw pointers, sizes and a cudaStream_t, and report cudaError_t.
//
// Reductions here have a fixed order (a butterfly over the 32 lanes) so that a value's bits depend only on
// the inputs and the shapes, never on how many rows share a launch (DESIGN.md §4). Floating-point
// accumulation uses explicit __fmaf_rn / __fadd_rn so the compiler cannot contract or reorder differently
// in different template instantiations.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>

namespace adadecode {

// Eight bf16 values in one 16-byte load/store.
struct alignas(16) bf16x8 {
  __nv_bfloat162 v[4];
};

// Returns the first error among the launch itself and what it left behind (checked after every launch).
inline cudaError_t launch_status() { return cudaGetLastError(); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

#ifdef __CUDACC__  // device helpers: the launcher headers are also included by host-only C++ (the bindings)

// 16-byte load of data that is read exactly once (weights): read-only path, not kept in L1, so the small
// activation vectors that every block re-reads stay there.
__device__ __forceinline__ uint4 ld_stream16(const void* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
               : "l"(p));
  return r;
}

// 16-byte read-only load that may stay in L1 (activations re-read by many blocks).
__device__ __forceinline__ uint4 ld_ro16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }

// The 8 floats of 8 packed bf16 (exact conversion).
__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = __uint_as_float(w[j] << 16);
    f[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
  }
}

__device__ __forceinline__ float bf16_round(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

#endif  // __CUDACC__

}  // namespace adadecode
