// Argument checks shared by the torch bindings: every error names the argument and what is wrong.
#pragma once
#include <torch/extension.h>
#include <c10/cuda/CUDAStream.h>

#define ADA_CHECK_CUDA_TENSOR(t, dt)                                                                  \
  TORCH_CHECK((t).is_cuda(), #t " must be a CUDA tensor, got ", (t).device());                        \
  TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", c10::toString(dt), ", got ", (t).scalar_type()); \
  TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

#define ADA_CHECK_LAUNCH(expr)                                                              \
  do {                                                                                      \
    cudaError_t ada_err_ = (expr);                                                          \
    TORCH_CHECK(ada_err_ == cudaSuccess, #expr " failed: ", cudaGetErrorString(ada_err_)); \
  } while (0)

inline cudaStream_t ada_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

template <typename T>
inline T* ada_ptr(const at::Tensor& t) { return reinterpret_cast<T*>(t.data_ptr()); }

// The caller's fp32 workspace (checked to hold `need` floats), or a fresh one on `like`'s device.
inline at::Tensor ada_workspace(const c10::optional<at::Tensor>& workspace, int64_t need, const at::Tensor& like) {
  if (!workspace.has_value()) return at::empty({need}, like.options().dtype(at::kFloat));
  ADA_CHECK_CUDA_TENSOR(*workspace, at::kFloat);
  TORCH_CHECK(workspace->numel() >= need, "workspace must hold >= ", need, " floats, got ", workspace->numel());
  return *workspace;
}
