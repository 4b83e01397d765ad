// A kernel that spills (for the parser's test sample): 64 live accumulators under a 32-register cap, and a
// run-time-indexed local array (a stack frame).
__device__ __noinline__ float helper(const float* p, int i) { float t[16]; for (int k = 0; k < 16; ++k) t[k] = p[k * i]; return t[i & 15]; }
__global__ void spill_kernel(const float* x, float* y, int n) {
  float acc[64];
#pragma unroll
  for (int k = 0; k < 64; ++k) acc[k] = x[threadIdx.x + k * n];
  for (int it = 0; it < n; ++it) {
#pragma unroll
    for (int k = 0; k < 64; ++k) acc[k] = acc[k] * acc[(k + 1) & 63] + x[it];
  }
  float s = helper(x, n);
#pragma unroll
  for (int k = 0; k < 64; ++k) s += acc[k];
  y[threadIdx.x] = s;
}
