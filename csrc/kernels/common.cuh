// Shared helpers for the kernels: error checking and 16-byte bf16 vectors.
// Torch-free: kernels take raw pointers, sizes and a cudaStream_t, and report cudaError_t.
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

}  // namespace adadecode
