// Shared helpers for the kernels: error checking, 16-byte bf16 vectors, streaming loads and fixed-order
// reductions. Torch-free: kernels take raw pointers, sizes and a cudaStream_t, and report cudaError_t.
//
// Reductions here have a fixed order (a butterfly over the 32 lanes) so that a value's bits depend only on
// the inputs and the shapes, never on how many rows share a launch (docs/design.md#invariance). Floating-point
// accumulation uses explicit __fmaf_rn / __fadd_rn so the compiler cannot contract or reorder differently
// in different template instantiations.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <cstdlib>

#include "common/fixed_math.h"  // csrc/common: shared with the CPU engine

#ifdef __CUDACC__
#define ADADECODE_HOST_DEVICE __host__ __device__
#else
#define ADADECODE_HOST_DEVICE
#endif

namespace adadecode {

// Eight bf16 values in one 16-byte load/store.
struct alignas(16) bf16x8 {
  __nv_bfloat162 v[4];
};

// Returns the first error among the launch itself and what it left behind (checked after every launch).
inline cudaError_t launch_status() { return cudaGetLastError(); }

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Where the R input rows of a skinny kernel are: row r at base + ((first + r) % wrap) * K, or base + r * K with
// wrap == 0. (The engine's ring of in-flight rows is read in place this way, without a gather launch.)
struct XRows {
  const __nv_bfloat16* base = nullptr;
  int first = 0, wrap = 0;
  ADADECODE_HOST_DEVICE const __nv_bfloat16* row(int r, int K) const {
    return base + static_cast<int64_t>(wrap ? (first + r) % wrap : r) * K;
  }
  bool holds(int R) const { return wrap == 0 || (first >= 0 && R <= wrap); }  // R distinct rows, none before base
};

// An RMSNorm folded into the kernel that consumes its output (weight == nullptr: none). See rmsnorm_core.cuh.
struct RowNorm {
  const __nv_bfloat16* weight = nullptr;
  float eps = 0.f;
};


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

// Programmatic dependent launch (sm_90+). A kernel launched with the programmatic-serialization attribute may
// start while its predecessor drains: before pdl_wait() it may only touch memory no earlier kernel writes
// (weights: prefetch_l2); pdl_wait() returns once the predecessor has completed and its writes are visible.
// Without the attribute (or before sm_90) both are no-ops.
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

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

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent launch when `pdl` is true (the
// kernel must call pdl_wait() before it touches what earlier kernels write). Evaluates to the launch's cudaError_t.
#define ADADECODE_LAUNCH(pdl, kernel, grid, block, smem, stream, ...)                                      \
  ((pdl) ? ::adadecode::launch_programmatic(kernel, grid, block, smem, stream, __VA_ARGS__)                 \
         : (kernel<<<grid, block, smem, stream>>>(__VA_ARGS__), ::adadecode::launch_status()))

template <typename... P, typename... A>
cudaError_t launch_programmatic(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                A... args) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, static_cast<P>(args)...);
  return e != cudaSuccess ? e : launch_status();
}

// Whether `device` runs programmatic dependent launches (sm_90+), unless ADADECODE_PDL=0 turns them off.
inline bool pdl_supported(int device) {
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const char* env = std::getenv("ADADECODE_PDL");
  return major >= 9 && !(env != nullptr && env[0] == '0');
}

}  // namespace adadecode
