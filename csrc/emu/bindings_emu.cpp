// adadecode_emu's own functions, beside the ops and the Engine it shares with adadecode_cuda:
// device tensors in the emulator's guarded memory, the thread order between synchronisation points, counters.
#include <string>

#include "../cuda/bindings/checks.h"

namespace py = pybind11;

namespace {

// A CPU tensor in device memory of the emulated device: between guard pages (a kernel that reads or writes
// past it fails with a message naming the allocation), filled with 0xFF (NaN) until written.
at::Tensor device_empty(std::vector<int64_t> shape, py::object dtype) {
  const at::ScalarType dt = torch::python::detail::py_object_to_dtype(dtype);
  int64_t n = 1;
  for (int64_t s : shape) {
    TORCH_CHECK(s >= 0, "empty: negative size in ", shape);
    n *= s;
  }
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, static_cast<size_t>(n) * c10::elementSize(dt));
  TORCH_CHECK(e == cudaSuccess, "empty: ", cudaGetErrorString(e));
  return at::from_blob(p, shape, [](void* q) { cudaFree(q); }, at::TensorOptions().dtype(dt));
}

void set_schedule(const std::string& order, uint64_t seed) {
  const int o = order == "asc" ? 0 : order == "desc" ? 1 : order == "random" ? 2 : -1;
  TORCH_CHECK(o >= 0, "schedule order must be 'asc', 'desc' or 'random', got '", order, "'");
  emu::set_schedule(o, seed);
}

}  // namespace

void register_emu(py::module_& m) {
  m.def("empty", &device_empty, "a tensor in the emulated device's memory (guarded, NaN-filled)", py::arg("shape"),
        py::arg("dtype"));
  m.def("set_schedule", &set_schedule,
        "order of the threads of a block between synchronisation points and of a launch's blocks: 'asc', 'desc' or "
        "'random' (seeded)",
        py::arg("order"), py::arg("seed") = 1);
  m.def("schedule", [] {
    const int o = emu::schedule_order();
    return std::string(o == 0 ? "asc" : o == 1 ? "desc" : "random");
  });
  m.def("stats", [] {
    const emu::Stats s = emu::stats();
    py::dict d;
    d["launches"] = s.launches;
    d["pdl_launches"] = s.pdl_launches;
    d["graph_kernels"] = s.graph_kernels;
    d["graph_copies"] = s.graph_copies;
    d["blocks"] = s.blocks;
    d["switches"] = s.switches;
    d["graph_launches"] = s.graph_launches;
    d["capture_violations"] = s.violations;
    return d;
  }, "counters of the emulated device since the module loaded");
  m.def("set_launch_log", &emu::set_launch_log,
        "start (True, cleared) or stop logging the geometry of every launch", py::arg("on"));
  m.def("launch_log", [] {
    py::list out;
    for (const emu::LaunchRec& r : emu::launch_log()) {
      py::dict d;
      d["kernel_offset"] = r.kernel;
      d["grid"] = py::make_tuple(r.grid[0], r.grid[1], r.grid[2]);
      d["block"] = py::make_tuple(r.block[0], r.block[1], r.block[2]);
      d["dynamic_smem"] = r.smem;
      d["pdl"] = r.pdl;
      d["count"] = r.count;
      out.append(d);
    }
    return out;
  }, "the launches logged since set_launch_log(True): kernel (offset into this module, as nm prints it), grid, "
     "block, dynamic shared memory bytes, programmatic, count");
  m.def("set_execute", &emu::set_execute,
        "False: launches are checked and logged, their blocks do not run (launch geometry at any shape)",
        py::arg("on"));
  m.def("executes", &emu::executes);
}
