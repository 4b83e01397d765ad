// adadecode_cuda: thin torch bindings over the torch-free kernels in csrc/kernels.
// Each op checks its tensors (device, dtype, shape, contiguity), launches on the current stream and
// checks the launch.
#include "checks.h"
#include "../kernels/add_rmsnorm.cuh"

namespace {

// residual += delta (if given); out = rmsnorm(residual) * weight. residual/out [rows, d] bf16.
void add_rmsnorm(at::Tensor residual, c10::optional<at::Tensor> delta, at::Tensor weight, at::Tensor out, double eps) {
  ADA_CHECK_CUDA_TENSOR(residual, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(weight, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(out, at::kBFloat16);
  TORCH_CHECK(residual.dim() == 2, "residual must be [rows, d], got ", residual.sizes());
  const int rows = residual.size(0), d = residual.size(1);
  TORCH_CHECK(d % 8 == 0, "add_rmsnorm: d must be a multiple of 8, got ", d);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d, "weight must be [", d, "], got ", weight.sizes());
  TORCH_CHECK(out.sizes() == residual.sizes(), "out must be ", residual.sizes(), ", got ", out.sizes());
  const __nv_bfloat16* dptr = nullptr;
  if (delta.has_value()) {
    ADA_CHECK_CUDA_TENSOR(*delta, at::kBFloat16);
    TORCH_CHECK(delta->sizes() == residual.sizes(), "delta must be ", residual.sizes(), ", got ", delta->sizes());
    dptr = ada_ptr<const __nv_bfloat16>(*delta);
  }
  ADA_CHECK_LAUNCH(adadecode::add_rmsnorm(ada_ptr<__nv_bfloat16>(residual), dptr, ada_ptr<const __nv_bfloat16>(weight),
                                          ada_ptr<__nv_bfloat16>(out), rows, d, static_cast<float>(eps), ada_stream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adadecode CUDA kernels (torch bindings)";
  m.def("add_rmsnorm", &add_rmsnorm, "residual += delta; out = RMSNorm(residual) * weight (bf16, in place)",
        py::arg("residual"), py::arg("delta"), py::arg("weight"), py::arg("out"), py::arg("eps"));
}
