// Kernels that break the CUDA rules the emulated device checks, one scenario per run (argv[1]); prints
// "<scenario>: <cudaError name> <value>" lines and the emulator's message, which tests/test_emu_checks.py reads.
// Built by that test with csrc/emu (emu_pp.py + g++), not part of any extension.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

__global__ void fill(float* out, float v) { out[blockIdx.x * blockDim.x + threadIdx.x] = v; }

__global__ void big_dynamic_smem(float* out) {
  extern __shared__ float dyn[];
  dyn[threadIdx.x] = 1.f;
  __syncthreads();
  out[threadIdx.x] = dyn[(threadIdx.x + 1) % blockDim.x];
}

__global__ void read_unwritten_shared(float* out) {
  __shared__ float s[64];
  if (threadIdx.x < 32) s[threadIdx.x] = 1.f;  // the upper half is never written
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x];
}

__global__ void half_warp_shuffle(float* out) {
  float v = threadIdx.x;
  if (threadIdx.x < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void read_past_end(const float* in, float* out, int n) { out[threadIdx.x] = in[n + threadIdx.x]; }

// Thread 0 reads what the last thread wrote, with the barrier (ok) or without (a race).
__global__ void neighbour(float* out, bool barrier) {
  __shared__ float s[256];
  s[threadIdx.x] = threadIdx.x;
  if (barrier) __syncthreads();
  if (threadIdx.x == 0) out[0] = s[blockDim.x - 1];
}

// A programmatic dependent must wait for its predecessor before reading what it wrote.
__global__ void dependent(const float* in, float* out, bool wait) {
  if (wait) asm volatile("griddepcontrol.wait;" ::: "memory");
  out[threadIdx.x] = in[threadIdx.x] + 1.f;
}

static cudaError_t launch_dependent(cudaStream_t st, const float* in, float* out, bool wait) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(2);
  cfg.blockDim = dim3(32);
  cfg.stream = st;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, dependent, in, out, wait);
  return e != cudaSuccess ? e : cudaGetLastError();
}

static float at(const float* d, int i) {
  float v;
  cudaMemcpy(&v, d + i, sizeof v, cudaMemcpyDeviceToHost);
  return v;
}

static void report(const char* what, cudaError_t e) {
  std::printf("%s: %s\n", what, cudaGetErrorName(e));
  if (e != cudaSuccess) std::printf("  message: %s\n", cudaGetErrorString(e));
}

int main(int argc, char** argv) {
  const std::string s = argc > 1 ? argv[1] : "";
  float* d = nullptr;
  cudaMalloc(reinterpret_cast<void**>(&d), 1024 * sizeof(float));
  cudaStream_t st;
  cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
  if (s == "threads_per_block") {
    fill<<<1, 1025, 0, st>>>(d, 1.f);
    report("1025 threads", cudaGetLastError());
    fill<<<1, 1024, 0, st>>>(d, 1.f);
    report("1024 threads", cudaGetLastError());
  } else if (s == "dynamic_smem") {
    const size_t bytes = 48 * 1024 + 16;
    big_dynamic_smem<<<1, 256, bytes, st>>>(d);
    report("49168 bytes without the attribute", cudaGetLastError());
    cudaFuncSetAttribute(big_dynamic_smem, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    big_dynamic_smem<<<1, 256, bytes, st>>>(d);
    report("49168 bytes with the attribute", cudaGetLastError());
  } else if (s == "capture") {
    cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
    fill<<<1, 32, 0, st>>>(d, 1.f);
    report("cudaStreamSynchronize while capturing", cudaStreamSynchronize(st));
    cudaGraph_t g = nullptr;
    report("cudaStreamEndCapture after it", cudaStreamEndCapture(st, &g));
    void* p = nullptr;
    cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
    report("cudaMalloc while capturing", cudaMalloc(&p, 64));
    report("cudaStreamEndCapture after it", cudaStreamEndCapture(st, &g));
    cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
    fill<<<1, 32>>>(d, 1.f);  // the legacy default stream
    report("a launch on the legacy stream while capturing", cudaGetLastError());
    report("cudaStreamEndCapture after it", cudaStreamEndCapture(st, &g));
  } else if (s == "replay") {
    float v = 1.f, h[2];
    cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal);
    fill<<<1, 32, 0, st>>>(d, v);  // captured by value: later changes of v do not reach the graph
    cudaGraph_t g = nullptr;
    report("capture", cudaStreamEndCapture(st, &g));
    cudaGraphExec_t x = nullptr;
    cudaGraphInstantiate(&x, g, 0);
    h[0] = at(d, 0);  // nothing ran yet: never-written device memory reads as NaN
    v = 2.f;
    cudaGraphLaunch(x, st);
    cudaStreamSynchronize(st);
    h[1] = at(d, 0);
    std::printf("before replay: %s, after replay: %g\n", std::isnan(h[0]) ? "nan" : "written", h[1]);
  } else if (s == "unwritten_shared") {
    read_unwritten_shared<<<1, 64, 0, st>>>(d);
    report("launch", cudaGetLastError());
    std::printf("written half: %g, unwritten half: %s\n", at(d, 0), std::isnan(at(d, 40)) ? "nan" : "a number");
  } else if (s == "half_warp_shuffle") {
    half_warp_shuffle<<<1, 32, 0, st>>>(d);
    report("launch", cudaGetLastError());
  } else if (s == "read_past_end") {
    float* in = nullptr;
    cudaMalloc(reinterpret_cast<void**>(&in), 100 * sizeof(float));
    read_past_end<<<1, 4, 0, st>>>(in, d, 99);
    report("launch", cudaGetLastError());
    fill<<<1, 32, 0, st>>>(d, 3.f);  // the device is usable after the failed launch
    report("next launch", cudaGetLastError());
  } else if (s == "missing_barrier") {
    for (const char* order : {"asc", "desc"}) {
      emu::set_schedule(std::strcmp(order, "asc") ? 1 : 0, 1);
      for (int barrier = 1; barrier >= 0; --barrier) {
        neighbour<<<1, 256, 0, st>>>(d, barrier);
        cudaStreamSynchronize(st);
        std::printf("%s order, barrier %d: %s\n", order, barrier, std::isnan(at(d, 0)) ? "nan" : std::to_string(at(d, 0)).c_str());
      }
    }
  } else if (s == "pdl") {
    fill<<<1, 64, 0, st>>>(d, 1.f);
    report("a programmatic dependent that waits", launch_dependent(st, d, d + 512, true));
    std::printf("its result: %g\n", at(d, 512));
    report("a programmatic dependent that never waits", launch_dependent(st, d, d + 512, false));
    dependent<<<1, 32, 0, st>>>(d, d + 512, false);  // an ordinary launch needs no wait
    report("the same kernel, launched ordinarily", cudaGetLastError());
  } else {
    std::printf("unknown scenario '%s'\n", s.c_str());
    return 2;
  }
  return 0;
}
