// adadecode_cuda.Engine: the torch binding of the CUDA engine runtime (csrc/cuda/runtime/engine.h).
// It owns the bf16 CUDA weight tensors (the runtime holds raw pointers into them), checks every tensor it is
// given (device, dtype, shape, contiguity, alignment), and turns runtime errors into Python exceptions:
// rt::OutOfMemory -> MemoryError (adadecode_cuda.DeviceOutOfMemory), std::invalid_argument -> ValueError,
// std::out_of_range -> IndexError, anything else -> RuntimeError.
#include <cmath>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "checks.h"
#include "../runtime/engine.h"

namespace py = pybind11;

namespace {

using adadecode::rt::bf16;

void check_weight(const at::Tensor& t, const std::string& name, at::IntArrayRef shape, at::ScalarType dt,
                  const at::Device& dev) {
  TORCH_CHECK(ada_on_device(t), name, " must be a " ADA_DEVICE_TENSOR ", got ", t.device());
  TORCH_CHECK(t.device() == dev, name, " is on ", t.device(), ", the other weights on ", dev);
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", c10::toString(dt), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK((reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0, name, " must be 16-byte aligned");
}

// (seed, inv_temperature, top_k, top_p), as adadecode.engines.cuda passes an adadecode.engines.sampling.Sampling.
using SamplingArg = std::tuple<uint64_t, double, int64_t, double>;

c10::optional<adadecode::SampleParams> sample_params(const c10::optional<SamplingArg>& s) {
  if (!s.has_value()) return c10::nullopt;
  const auto& [seed, inv_t, top_k, top_p] = *s;
  TORCH_CHECK(inv_t > 0 && std::isfinite(inv_t), "sampling: inv_temperature must be > 0 and finite, got ", inv_t);
  TORCH_CHECK(top_k >= 0, "sampling: top_k must be >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "sampling: top_p must be in (0, 1], got ", top_p);
  adadecode::SampleParams p{};
  p.seed = seed;
  p.top_p = top_p;
  p.inv_temperature = static_cast<float>(inv_t);
  p.top_k = static_cast<int32_t>(top_k < INT32_MAX ? top_k : INT32_MAX);
  return p;
}

class PyEngine {
 public:
  PyEngine(int64_t n_layers, int64_t d, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, int64_t ffn,
           int64_t vocab, double eps, at::Tensor embed, at::Tensor norm, at::Tensor lm_head,
           std::vector<std::vector<at::Tensor>> layers, at::Tensor cos, at::Tensor sin, int64_t max_seq,
           int64_t max_rows, int64_t prefill_chunk, bool qkv_bias, bool qk_norm, int64_t sliding_window,
           std::vector<std::vector<at::Tensor>> extras, int64_t max_seqs) {
    adadecode::rt::ModelDims m;
    m.n_layers = static_cast<int>(n_layers);
    m.d = static_cast<int>(d);
    m.n_heads = static_cast<int>(n_heads);
    m.n_kv_heads = static_cast<int>(n_kv_heads);
    m.head_dim = static_cast<int>(head_dim);
    m.ffn = static_cast<int>(ffn);
    m.vocab = static_cast<int>(vocab);
    m.eps = static_cast<float>(eps);
    TORCH_CHECK(sliding_window >= 0 && sliding_window <= INT32_MAX, "sliding_window must be >= 0 (0: full attention), got ",
                sliding_window);
    m.window = static_cast<int>(sliding_window);
    m.qkv_bias = qkv_bias;
    m.qk_norm = qk_norm;
    // extras, per layer: [bqkv] if qkv_bias, then [q_norm, k_norm] if qk_norm
    const size_t n_extra = (qkv_bias ? 1 : 0) + (qk_norm ? 2 : 0);
    TORCH_CHECK(n_extra == 0 ? extras.empty() : static_cast<int64_t>(extras.size()) == n_layers,
                "extras: one list per layer when qkv_bias or qk_norm is set, got ", extras.size());    TORCH_CHECK(ada_on_device(embed), "embed must be a " ADA_DEVICE_TENSOR ", got ", embed.device());
    const at::Device dev = embed.device();
    const auto bf = at::kBFloat16;
    const int64_t qkv_n = (n_heads + 2 * n_kv_heads) * head_dim, qn = n_heads * head_dim;
    check_weight(embed, "embed", {vocab, d}, bf, dev);
    check_weight(norm, "norm", {d}, bf, dev);
    check_weight(lm_head, "lm_head", {vocab, d}, bf, dev);
    check_weight(cos, "cos", {max_seq, head_dim / 2}, at::kFloat, dev);
    check_weight(sin, "sin", {max_seq, head_dim / 2}, at::kFloat, dev);
    TORCH_CHECK(static_cast<int64_t>(layers.size()) == n_layers, "got ", layers.size(), " layers, expected ",
                n_layers);
    adadecode::rt::WeightPtrs w;
    w.embed = ada_ptr<const bf16>(embed);
    w.norm = ada_ptr<const bf16>(norm);
    w.lm_head = ada_ptr<const bf16>(lm_head);
    w.cos = ada_ptr<const float>(cos);
    w.sin = ada_ptr<const float>(sin);
    keep_ = {embed, norm, lm_head, cos, sin};
    for (int64_t l = 0; l < n_layers; ++l) {
      const auto& t = layers[l];
      const std::string p = "layer " + std::to_string(l) + " ";
      TORCH_CHECK(t.size() == 7, p, "needs 7 tensors (attn_norm, wqkv, wo, mlp_norm, w_gate, w_up, w_down), got ",
                  t.size());
      check_weight(t[0], p + "attn_norm", {d}, bf, dev);
      check_weight(t[1], p + "wqkv", {qkv_n, d}, bf, dev);
      check_weight(t[2], p + "wo", {d, qn}, bf, dev);
      check_weight(t[3], p + "mlp_norm", {d}, bf, dev);
      check_weight(t[4], p + "w_gate", {ffn, d}, bf, dev);
      check_weight(t[5], p + "w_up", {ffn, d}, bf, dev);
      check_weight(t[6], p + "w_down", {d, ffn}, bf, dev);
      adadecode::rt::LayerPtrs L;
      L.attn_norm = ada_ptr<const bf16>(t[0]);
      L.wqkv = ada_ptr<const bf16>(t[1]);
      L.wo = ada_ptr<const bf16>(t[2]);
      L.mlp_norm = ada_ptr<const bf16>(t[3]);
      L.w_gate = ada_ptr<const bf16>(t[4]);
      L.w_up = ada_ptr<const bf16>(t[5]);
      L.w_down = ada_ptr<const bf16>(t[6]);
      if (n_extra) {
        const auto& X = extras[l];
        TORCH_CHECK(X.size() == n_extra, p, "extras: expected ", n_extra, " tensors, got ", X.size());
        size_t i = 0;
        if (qkv_bias) {
          check_weight(X[i], p + "bqkv", {qkv_n}, bf, dev);
          L.bqkv = ada_ptr<const bf16>(X[i++]);
        }
        if (qk_norm) {
          check_weight(X[i], p + "q_norm", {head_dim}, bf, dev);
          L.q_norm = ada_ptr<const bf16>(X[i++]);
          check_weight(X[i], p + "k_norm", {head_dim}, bf, dev);
          L.k_norm = ada_ptr<const bf16>(X[i++]);
        }
        keep_.insert(keep_.end(), X.begin(), X.end());
      }
      w.layers.push_back(L);
      keep_.insert(keep_.end(), t.begin(), t.end());
    }
    dev_ = dev;
    // The weights may have been written on torch's streams: finish that before the engine's stream reads them.
    ADA_CHECK_LAUNCH(cudaDeviceSynchronize());
    TORCH_CHECK(max_seqs >= 1 && max_seqs <= 65536, "max_seqs must be in 1..65536, got ", max_seqs);
    eng_ = std::make_unique<adadecode::rt::Engine>(m, std::move(w), static_cast<int>(max_seq),
                                                   static_cast<int>(max_rows), static_cast<int>(prefill_chunk),
                                                   static_cast<int>(dev.index() < 0 ? 0 : dev.index()),
                                                   static_cast<int>(max_seqs));
  }

  // Every per-sequence call takes the sequence first (csrc/cuda/runtime/engine.h).
  void prefill(int64_t seq, const std::vector<int64_t>& tokens, int64_t start) {
    std::vector<int32_t> t(tokens.size());
    for (size_t i = 0; i < tokens.size(); ++i) {
      TORCH_CHECK(tokens[i] >= 0 && tokens[i] < eng_->dims().vocab, "token id ", tokens[i],
                  " is outside the vocabulary (0..", eng_->dims().vocab - 1, ")");
      t[i] = static_cast<int32_t>(tokens[i]);
    }
    TORCH_CHECK(start >= 0 && start <= INT32_MAX, "prefill: start must be >= 0, got ", start);
    py::gil_scoped_release nogil;
    eng_->prefill(static_cast<int>(seq), t.data(), static_cast<int>(t.size()), static_cast<int>(start));
  }

  void embed(int64_t seq, int64_t pos, int64_t token) {
    eng_->embed(static_cast<int>(seq), static_cast<int>(pos), static_cast<int>(token));
  }

  void run_layers(int64_t seq, int64_t first, int64_t last, int64_t l0, int64_t l1) {
    eng_->run_layers(static_cast<int>(seq), static_cast<int>(first), static_cast<int>(last), static_cast<int>(l0),
                     static_cast<int>(l1));
  }

  // segments: (seq, first, last, l0, l1) each, at most one per sequence
  void run_batch(const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>>& segments) {
    std::vector<adadecode::rt::Engine::Segment> segs;
    for (const auto& [seq, first, last, l0, l1] : segments)
      segs.push_back({static_cast<int>(seq), static_cast<int>(first), static_cast<int>(last), static_cast<int>(l0),
                      static_cast<int>(l1)});
    py::gil_scoped_release nogil;
    eng_->run_batch(segs);
  }

  std::pair<std::vector<int64_t>, std::vector<double>> final(int64_t seq, int64_t first, int64_t last,
                                                              const c10::optional<SamplingArg>& sampling) {
    const int R = static_cast<int>(last - first + 1);
    std::vector<int32_t> tok(R > 0 ? R : 0);
    std::vector<float> prob(R > 0 ? R : 0);
    const auto p = sample_params(sampling);
    {
      py::gil_scoped_release nogil;
      eng_->final_tokens(static_cast<int>(seq), static_cast<int>(first), static_cast<int>(last), tok.data(),
                         prob.data(), p ? &*p : nullptr);
    }
    return {std::vector<int64_t>(tok.begin(), tok.end()), std::vector<double>(prob.begin(), prob.end())};
  }

  // items: (seq, first, last, sampling or None) on distinct sequences -> (tokens, max_probs) of every row, in order
  std::pair<std::vector<int64_t>, std::vector<double>> final_batch(
      const std::vector<std::tuple<int64_t, int64_t, int64_t, c10::optional<SamplingArg>>>& items) {
    std::vector<adadecode::rt::Engine::FinalItem> its;
    std::vector<c10::optional<adadecode::SampleParams>> params(items.size());  // stable: its pointers are taken
    int64_t R = 0;
    for (size_t i = 0; i < items.size(); ++i) {
      const auto& [seq, first, last, sampling] = items[i];
      params[i] = sample_params(sampling);
      its.push_back({static_cast<int>(seq), static_cast<int>(first), static_cast<int>(last),
                     params[i] ? &*params[i] : nullptr});
      R += last >= first ? last - first + 1 : 0;  // the runtime checks every item's rows before anything runs
    }
    std::vector<int32_t> tok(R);
    std::vector<float> prob(R);
    {
      py::gil_scoped_release nogil;
      eng_->final_batch(its, tok.data(), prob.data());
    }
    return {std::vector<int64_t>(tok.begin(), tok.end()), std::vector<double>(prob.begin(), prob.end())};
  }

  at::Tensor final_normed(int64_t seq, int64_t first, int64_t last) {
    const int64_t R = last - first + 1;
    TORCH_CHECK(R >= 1, "final_normed: empty row range ", first, "..", last);
    at::Tensor out = at::empty({R, eng_->dims().d}, at::TensorOptions().device(dev_).dtype(at::kBFloat16));
    ada_wait_for_torch(dev_);
    eng_->final_normed(static_cast<int>(seq), static_cast<int>(first), static_cast<int>(last), ada_ptr<bf16>(out));
    return out;
  }

  at::Tensor hidden(int64_t seq, int64_t pos) {
    at::Tensor out = at::empty({eng_->dims().d}, at::TensorOptions().device(dev_).dtype(at::kBFloat16));
    ada_wait_for_torch(dev_);
    eng_->copy_row(static_cast<int>(seq), static_cast<int>(pos), ada_ptr<bf16>(out));
    return out;
  }

  std::pair<at::Tensor, at::Tensor> kv(int64_t seq, int64_t layer, int64_t length) {
    const auto& m = eng_->dims();
    auto opt = at::TensorOptions().device(dev_).dtype(at::kBFloat16);
    at::Tensor k = at::empty({length, m.n_kv_heads, m.head_dim}, opt), v = at::empty_like(k);
    ada_wait_for_torch(dev_);
    eng_->copy_kv(static_cast<int>(seq), static_cast<int>(layer), static_cast<int>(length), ada_ptr<bf16>(k),
                  ada_ptr<bf16>(v));
    return {k, v};
  }

  // heads: (layer, T [d, d] bf16, vocab [K] int32 or None, w_rest [d] bf16 or None)
  void set_heads(const std::vector<std::tuple<int64_t, at::Tensor, c10::optional<at::Tensor>,
                                              c10::optional<at::Tensor>>>& heads) {
    const int64_t d = eng_->dims().d, vocab = eng_->dims().vocab;
    std::vector<adadecode::rt::HeadPtrs> ptrs;
    std::vector<at::Tensor> keep;
    for (size_t i = 0; i < heads.size(); ++i) {
      const auto& [layer, T, ids, w_rest] = heads[i];
      const std::string p = "head " + std::to_string(i) + " ";
      adadecode::rt::HeadPtrs h;
      h.layer = static_cast<int>(layer);
      check_weight(T, p + "T", {d, d}, at::kBFloat16, dev_);
      h.T = ada_ptr<const bf16>(T);
      keep.push_back(T);
      h.n_vocab = static_cast<int>(vocab);
      if (ids.has_value()) {
        TORCH_CHECK(ids->dim() == 1 && ids->numel() >= 1 && ids->numel() <= vocab, p,
                    "vocab must be [K] with 1 <= K <= ", vocab, ", got ", ids->sizes());
        check_weight(*ids, p + "vocab", {ids->numel()}, at::kInt, dev_);
        const auto lo = ids->min().item<int64_t>(), hi = ids->max().item<int64_t>();
        TORCH_CHECK(lo >= 0 && hi < vocab, p, "vocab holds ids outside 0..", vocab - 1, " (", lo, "..", hi, ")");
        h.vocab = ada_ptr<const int32_t>(*ids);
        h.n_vocab = static_cast<int>(ids->numel());
        keep.push_back(*ids);
      }
      if (w_rest.has_value()) {
        TORCH_CHECK(ids.has_value(), p, "w_rest is given without a vocabulary subset");
        check_weight(*w_rest, p + "w_rest", {d}, at::kBFloat16, dev_);
        h.w_rest = ada_ptr<const bf16>(*w_rest);
        keep.push_back(*w_rest);
      }
      ptrs.push_back(h);
    }
    ADA_CHECK_LAUNCH(cudaDeviceSynchronize());  // head tensors written on torch's streams
    eng_->set_heads(std::move(ptrs));
    head_keep_ = std::move(keep);  // after the runtime dropped its graphs of the old heads
  }

  std::pair<int64_t, double> head(int64_t seq, int64_t pos, int64_t i, const c10::optional<SamplingArg>& sampling) {
    std::pair<int32_t, float> r;
    const auto p = sample_params(sampling);
    {
      py::gil_scoped_release nogil;
      r = eng_->head(static_cast<int>(seq), static_cast<int>(pos), static_cast<int>(i), p ? &*p : nullptr);
    }
    return {r.first, r.second};
  }

  void synchronize() {
    py::gil_scoped_release nogil;
    eng_->synchronize();
  }

  adadecode::rt::Engine& eng() { return *eng_; }

 private:
  std::vector<at::Tensor> keep_, head_keep_;
  at::Device dev_{kAdaDeviceType};
  std::unique_ptr<adadecode::rt::Engine> eng_;
};

}  // namespace

void register_engine(pybind11::module_& m) {
  // module-local: adadecode_cpu registers the same C++ type (csrc/common/model.h) as its HostOutOfMemory
  py::register_local_exception<adadecode::rt::OutOfMemory>(m, "DeviceOutOfMemory", PyExc_MemoryError);
  py::class_<PyEngine>(m, "Engine",
                       "The CUDA engine runtime (docs/design.md#contract): weights, KV cache and workspace on one device, "
                       "run_layers replayed from CUDA graphs cached per (seq, rows, l0, l1); max_seqs sequences, each "
                       "with its own KV cache and rows; every per-sequence call takes the sequence first. Host-side "
                       "contract checks live in adadecode.engines.cuda.CudaEngine; this class only keeps memory "
                       "accesses in bounds.")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor,
                    at::Tensor, std::vector<std::vector<at::Tensor>>, at::Tensor, at::Tensor, int64_t, int64_t,
                    int64_t, bool, bool, int64_t, std::vector<std::vector<at::Tensor>>, int64_t>(),
           py::arg("n_layers"), py::arg("d"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("head_dim"),
           py::arg("ffn"), py::arg("vocab"), py::arg("eps"), py::arg("embed"), py::arg("norm"), py::arg("lm_head"),
           py::arg("layers"), py::arg("cos"), py::arg("sin"), py::arg("max_seq"), py::arg("max_rows"),
           py::arg("prefill_chunk") = 256, py::arg("qkv_bias") = false, py::arg("qk_norm") = false,
           py::arg("sliding_window") = 0, py::arg("extras") = std::vector<std::vector<at::Tensor>>{},
           py::arg("max_seqs") = 1)
      .def("prefill", &PyEngine::prefill, py::arg("seq"), py::arg("tokens"), py::arg("start") = 0)
      .def("embed", &PyEngine::embed, py::arg("seq"), py::arg("pos"), py::arg("token"))
      .def("run_layers", &PyEngine::run_layers, py::arg("seq"), py::arg("first_pos"), py::arg("last_pos"),
           py::arg("l0"), py::arg("l1"))
      .def("run_batch", &PyEngine::run_batch, "run_layers of several sequences in one step: (seq, first, last, l0, l1)",
           py::arg("segments"))
      .def("final", &PyEngine::final,
           "(tokens, max_probs) of rows first..last; sampling (seed, inv_temperature, top_k, top_p) draws the tokens",
           py::arg("seq"), py::arg("first_pos"), py::arg("last_pos"), py::arg("sampling") = py::none())
      .def("final_batch", &PyEngine::final_batch,
           "(tokens, max_probs) of the rows of items (seq, first, last, sampling or None) on distinct sequences",
           py::arg("items"))
      .def("final_normed", &PyEngine::final_normed, "final-normed rows [R, d] bf16 (a new tensor)", py::arg("seq"),
           py::arg("first_pos"), py::arg("last_pos"))
      .def("hidden", &PyEngine::hidden, "the residual stream of row pos [d] bf16 (a new tensor)", py::arg("seq"),
           py::arg("pos"))
      .def("kv", &PyEngine::kv, "copies of K and V [length, n_kv_heads, head_dim] of a layer", py::arg("seq"),
           py::arg("layer"), py::arg("length"))
      .def("set_heads", &PyEngine::set_heads, "list of (layer, T, vocab int32 or None, w_rest or None)",
           py::arg("heads"))
      .def("head", &PyEngine::head, "(token, max_prob) of head i on row pos; with sampling, the head's own draw",
           py::arg("seq"), py::arg("pos"), py::arg("i"), py::arg("sampling") = py::none())
      .def("synchronize", &PyEngine::synchronize)
      .def_property("use_graphs", [](PyEngine& e) { return e.eng().use_graphs(); },
                    [](PyEngine& e, bool on) { e.eng().set_use_graphs(on); })
      .def_property_readonly("n_graphs", [](PyEngine& e) { return e.eng().n_graphs(); })
      .def_property("fused", [](PyEngine& e) { return e.eng().fused(); },
                    [](PyEngine& e, bool on) { e.eng().set_fused(on); })
      .def_property_readonly("pdl", [](PyEngine& e) { return e.eng().pdl(); })
      .def_property_readonly("kv_bytes", [](PyEngine& e) { return e.eng().kv_bytes(); })
      .def_property_readonly("max_seqs", [](PyEngine& e) { return e.eng().max_seqs(); })
      .def_property_readonly("prefill_chunk", [](PyEngine& e) { return e.eng().prefill_chunk(); })
      .def_property_readonly("workspace_bytes", [](PyEngine& e) { return e.eng().workspace_bytes(); });
}
