// Argument checks shared by the torch bindings: every error names the argument and what is wrong.
//
// The one seam between the GPU build (adadecode_cuda) and the emulated device (adadecode_emu, csrc/emu): which
// tensors live on the device (CUDA tensors; CPU tensors on the emulated device, whose memory is host memory),
// the stream the ops launch on, and how a fresh output tensor waits for torch's queued work.
#pragma once
#include <torch/extension.h>
#ifdef ADADECODE_EMU
#include <cuda_runtime.h>  // csrc/emu's
#define ADA_DEVICE_TENSOR "CPU tensor (the emulated device's memory)"
inline bool ada_on_device(const at::Tensor& t) { return t.is_cpu(); }
constexpr c10::DeviceType kAdaDeviceType = c10::DeviceType::CPU;
inline cudaStream_t ada_stream() { return nullptr; }  // the emulated device runs every stream in order, at once
inline void ada_wait_for_torch(const at::Device&) {}  // torch's CPU ops are done when they return
#else
#include <c10/cuda/CUDAStream.h>
#define ADA_DEVICE_TENSOR "CUDA tensor"
inline bool ada_on_device(const at::Tensor& t) { return t.is_cuda(); }
constexpr c10::DeviceType kAdaDeviceType = c10::DeviceType::CUDA;
inline cudaStream_t ada_stream() { return at::cuda::getCurrentCUDAStream().stream(); }
// A fresh torch tensor's memory may still be in use by work queued on torch's current stream (the caching
// allocator recycles a freed block at once, in that stream's order): finish that work before another stream
// writes into the tensor.
inline void ada_wait_for_torch(const at::Device& dev) {
  const cudaError_t e = cudaStreamSynchronize(at::cuda::getCurrentCUDAStream(dev.index()).stream());
  TORCH_CHECK(e == cudaSuccess, "cudaStreamSynchronize of torch's stream failed: ", cudaGetErrorString(e));
}
#endif

#define ADA_CHECK_CUDA_TENSOR(t, dt)                                                                  \
  TORCH_CHECK(ada_on_device(t), #t " must be a " ADA_DEVICE_TENSOR ", got ", (t).device());          \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", c10::toString(dt), ", got ", (t).scalar_type()); \
  TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

#define ADA_CHECK_LAUNCH(expr)                                                              \
  do {                                                                                      \
    cudaError_t ada_err_ = (expr);                                                          \
    TORCH_CHECK(ada_err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(ada_err_)); \
  } while (0)

template <typename T>
inline T* ada_ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// The caller's fp32 workspace (checked to hold `need` floats), or a fresh one on `like`'s device.
inline at::Tensor ada_workspace(const c10::optional<at::Tensor>& workspace, int64_t need, const at::Tensor& like) {
  if (!workspace.has_value()) return at::empty({need}, like.options().dtype(at::kFloat));
  ADA_CHECK_CUDA_TENSOR(*workspace, at::kFloat);
  TORCH_CHECK(workspace->numel() >= need, "workspace must hold >= ", need, " floats, got ", workspace->numel());
  return *workspace;
}
