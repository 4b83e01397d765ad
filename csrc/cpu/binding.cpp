// adadecode_cpu: the torch binding of the CPU engine runtime (engine.h); its submodule `testing` holds the kernels'
// probes that only the tests and benchmarks call. It checks every tensor it is given (CPU,
// dtype, shape, contiguity), copies what the runtime keeps (the weights are packed into its own buffers: the caller
// may drop its tensors), releases the GIL while the engine computes, and turns runtime errors into Python
// exceptions: OutOfMemory -> MemoryError, std::invalid_argument -> ValueError, std::out_of_range -> IndexError.
#include <torch/extension.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "../common/fixed_math.h"
#include "engine.h"
#include "kernels.h"
#include "sampling.h"

namespace py = pybind11;
namespace cpu = adadecode::cpu;

namespace {

void check(const at::Tensor& t, const std::string& name, at::IntArrayRef shape, at::ScalarType dt) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", c10::toString(dt), ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}
const uint16_t* bf16_ptr(const at::Tensor& t) { return reinterpret_cast<const uint16_t*>(t.data_ptr()); }

const cpu::Kernels* kernels_named(const std::string& isa) {
  const cpu::Kernels* k = isa.empty() ? cpu::best_kernels() : cpu::kernels_for(isa.c_str());
  if (k == nullptr) {
    std::string have;
    for (const char* const* p = cpu::supported_isas(); *p; ++p) have += std::string(have.empty() ? "" : ", ") + *p;
    // The Python side (EngineOptions) names a bad ISA first, with the variable it came from; this is the probes' and
    // the last line's check. A typo is not a missing CPU feature: say which it is.
    std::string known;
    bool is_known = false;
    for (const char* const* p = cpu::known_isas(); *p; ++p) {
      known += std::string(known.empty() ? "" : ", ") + *p;
      is_known = is_known || isa == *p;
    }
    if (!is_known)
      throw std::invalid_argument("CPU engine: unknown kernels '" + isa + "'; the kernel paths are " + known +
                                  " (this CPU runs: " + have + ")");
    throw std::invalid_argument("CPU engine: kernels '" + isa + "' do not run on this CPU (it runs: " + have + ")");
  }
  return k;
}

std::shared_ptr<cpu::Weights> make_weights(int64_t n_layers, int64_t d, int64_t n_heads, int64_t n_kv_heads,
                                           int64_t head_dim, int64_t ffn, int64_t vocab, double eps,
                                           const at::Tensor& embed, const at::Tensor& norm,
                                           const c10::optional<at::Tensor>& lm_head,
                                           const std::vector<std::vector<at::Tensor>>& layers, bool qkv_bias,
                                           bool qk_norm, int64_t sliding_window,
                                           const std::vector<std::vector<at::Tensor>>& extras) {
  cpu::ModelDims m;
  m.n_layers = static_cast<int>(n_layers), m.d = static_cast<int>(d), m.n_heads = static_cast<int>(n_heads);
  m.n_kv_heads = static_cast<int>(n_kv_heads), m.head_dim = static_cast<int>(head_dim), m.ffn = static_cast<int>(ffn);
  m.vocab = static_cast<int>(vocab), m.eps = static_cast<float>(eps);
  TORCH_CHECK(sliding_window >= 0 && sliding_window <= INT_MAX, "sliding_window must be >= 0 (0: full attention), got ",
              sliding_window);
  m.window = static_cast<int>(sliding_window), m.qkv_bias = qkv_bias, m.qk_norm = qk_norm;
  const size_t n_extra = (qkv_bias ? 1 : 0) + (qk_norm ? 2 : 0);
  TORCH_CHECK(extras.size() == (n_extra ? layers.size() : 0) || (n_extra == 0 && extras.empty()),
              "extras: one list per layer when qkv_bias or qk_norm is set, got ", extras.size(), " lists");
  const auto bf = at::kBFloat16;
  const int64_t q = n_heads * head_dim, kv = n_kv_heads * head_dim;
  check(embed, "embed", {vocab, d}, bf);
  check(norm, "norm", {d}, bf);
  if (lm_head) check(*lm_head, "lm_head", {vocab, d}, bf);
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == n_layers, "got ", layers.size(), " layers, expected ", n_layers);
  std::vector<cpu::LayerSource> src;
  for (size_t l = 0; l < layers.size(); ++l) {
    const auto& L = layers[l];
    TORCH_CHECK(L.size() == 9, "layer ", l, ": expected 9 tensors (attn_norm, wq, wk, wv, wo, mlp_norm, w_gate, w_up, w_down)");
    const std::string p = "layer " + std::to_string(l) + " ";
    check(L[0], p + "attn_norm", {d}, bf);
    check(L[1], p + "wq", {q, d}, bf);
    check(L[2], p + "wk", {kv, d}, bf);
    check(L[3], p + "wv", {kv, d}, bf);
    check(L[4], p + "wo", {d, q}, bf);
    check(L[5], p + "mlp_norm", {d}, bf);
    check(L[6], p + "w_gate", {ffn, d}, bf);
    check(L[7], p + "w_up", {ffn, d}, bf);
    check(L[8], p + "w_down", {d, ffn}, bf);
    cpu::LayerSource ls{bf16_ptr(L[0]), bf16_ptr(L[1]), bf16_ptr(L[2]), bf16_ptr(L[3]), bf16_ptr(L[4]),
                        bf16_ptr(L[5]), bf16_ptr(L[6]), bf16_ptr(L[7]), bf16_ptr(L[8])};
    if (n_extra) {  // [bqkv] if qkv_bias, then [q_norm, k_norm] if qk_norm
      const auto& X = extras[l];
      TORCH_CHECK(X.size() == n_extra, p, "extras: expected ", n_extra, " tensors (", qkv_bias ? "bqkv " : "",
                  qk_norm ? "q_norm k_norm" : "", "), got ", X.size());
      size_t i = 0;
      if (qkv_bias) check(X[i], p + "bqkv", {q + 2 * kv}, bf), ls.bqkv = bf16_ptr(X[i++]);
      if (qk_norm) {
        check(X[i], p + "q_norm", {head_dim}, bf), ls.q_norm = bf16_ptr(X[i++]);
        check(X[i], p + "k_norm", {head_dim}, bf), ls.k_norm = bf16_ptr(X[i++]);
      }
    }
    src.push_back(ls);
  }
  py::gil_scoped_release nogil;
  return std::make_shared<cpu::Weights>(m, bf16_ptr(embed), lm_head ? bf16_ptr(*lm_head) : nullptr, bf16_ptr(norm),
                                        src);
}

// (seed, inv_temperature, top_k, top_p): a Sampling of adadecode/engines/sampling.py
using SamplingArgs = std::tuple<uint64_t, double, int64_t, double>;
cpu::SampleRule rule_of(const SamplingArgs& a) {
  cpu::SampleRule r;
  r.seed = std::get<0>(a), r.inv_temperature = static_cast<float>(std::get<1>(a));
  r.top_k = static_cast<int32_t>(std::max<int64_t>(0, std::min<int64_t>(std::get<2>(a), INT32_MAX))), r.top_p = std::get<3>(a);
  return r;
}

class PyEngine {
 public:
  PyEngine(std::shared_ptr<cpu::Weights> w, const at::Tensor& cos, const at::Tensor& sin, int64_t max_seq,
           int64_t max_rows, int64_t prefill_chunk, int64_t threads, const std::string& isa, int64_t max_seqs) {
    TORCH_CHECK(w != nullptr, "weights must be given");
    const int64_t half = w->dims().head_dim / 2;
    check(cos, "cos", {max_seq, half}, at::kFloat);
    check(sin, "sin", {max_seq, half}, at::kFloat);
    TORCH_CHECK(max_seqs >= 1 && max_seqs <= INT_MAX, "max_seqs must be >= 1, got ", max_seqs);
    const cpu::Kernels* k = kernels_named(isa);
    py::gil_scoped_release nogil;
    e_ = std::make_unique<cpu::Engine>(std::move(w), cos.data_ptr<float>(), sin.data_ptr<float>(),
                                       static_cast<int>(max_seq), static_cast<int>(max_rows),
                                       static_cast<int>(prefill_chunk), static_cast<int>(threads), k,
                                       static_cast<int>(max_seqs));
  }

  // Every per-sequence call takes the sequence first (engine.h).
  void prefill(int64_t seq, const std::vector<int32_t>& tokens, int64_t start) {
    TORCH_CHECK(start >= 0 && start <= INT_MAX, "prefill: start must be >= 0, got ", start);
    py::gil_scoped_release nogil;
    e_->prefill(static_cast<int>(seq), tokens.data(), static_cast<int>(tokens.size()), static_cast<int>(start));
  }
  void embed(int64_t seq, int64_t pos, int64_t token) {
    e_->embed(static_cast<int>(seq), static_cast<int>(pos), static_cast<int>(token));
  }
  void run_layers(int64_t seq, int64_t first, int64_t last, int64_t l0, int64_t l1) {
    py::gil_scoped_release nogil;
    e_->run_layers(static_cast<int>(seq), static_cast<int>(first), static_cast<int>(last), static_cast<int>(l0),
                   static_cast<int>(l1));
  }
  // segments: (seq, first, last, l0, l1) each, at most one per sequence
  void run_batch(const std::vector<std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t>>& segments) {
    std::vector<cpu::Segment> segs;
    for (const auto& [seq, first, last, l0, l1] : segments)
      segs.push_back(cpu::Segment{static_cast<int>(seq), static_cast<int>(first), static_cast<int>(last),
                                  static_cast<int>(l0), static_cast<int>(l1)});
    py::gil_scoped_release nogil;
    e_->run_batch(segs);
  }
  // (tokens, logits [R, vocab] fp32 or None); token -1: the row's logits are not finite. sampling: (seed,
  // inv_temperature, top_k, top_p) draws the tokens for positions row + 1 (sampling.h) instead of the argmax.
  std::tuple<std::vector<int32_t>, c10::optional<at::Tensor>> final(int64_t seq, int64_t first, int64_t last,
                                                                    bool with_logits,
                                                                    const c10::optional<SamplingArgs>& sampling) {
    return final_batch({{seq, first, last}}, with_logits, std::vector<c10::optional<SamplingArgs>>{sampling});
  }
  // The rows of spans (seq, first, last) in one LM-head pass: (tokens, logits [rows, vocab] or None), in span order;
  // sampling: none, or one per span (None: that span's greedy tokens), each span drawn as final's
  std::tuple<std::vector<int32_t>, c10::optional<at::Tensor>> final_batch(
      const std::vector<std::tuple<int64_t, int64_t, int64_t>>& spans, bool with_logits,
      const c10::optional<std::vector<c10::optional<SamplingArgs>>>& sampling) {
    std::vector<cpu::RowSpan> rows;
    int64_t R = 0;
    for (const auto& [seq, first, last] : spans) {
      TORCH_CHECK(last - first + 1 >= 1 && last - first + 1 <= e_->max_rows(), "final: rows ", first, "..", last,
                  " must be 1..", e_->max_rows(), " rows");
      rows.push_back(cpu::RowSpan{static_cast<int>(seq), static_cast<int>(first), static_cast<int>(last)});
      R += last - first + 1;
    }
    TORCH_CHECK(R >= 1 && R <= static_cast<int64_t>(e_->max_seqs()) * e_->max_rows(), "final: ", R,
                " rows, must be 1..", static_cast<int64_t>(e_->max_seqs()) * e_->max_rows());
    TORCH_CHECK(!sampling || sampling->size() == spans.size(), "final: ", sampling ? sampling->size() : 0,
                " sampling rules for ", spans.size(), " spans");
    std::vector<cpu::SampleRule> rule_store;
    std::vector<const cpu::SampleRule*> rules;
    bool any = false;
    if (sampling) {
      rule_store.reserve(spans.size());
      for (const auto& a : *sampling) {
        rule_store.push_back(a ? rule_of(*a) : cpu::SampleRule{});
        rules.push_back(a ? &rule_store.back() : nullptr);
        any = any || a.has_value();
      }
    }
    std::vector<int32_t> tokens(R);
    c10::optional<at::Tensor> logits;
    if (with_logits) logits = at::empty({R, e_->dims().vocab}, at::kFloat);
    {
      py::gil_scoped_release nogil;
      e_->final_batch(rows, tokens.data(), with_logits ? logits->data_ptr<float>() : nullptr, any ? &rules : nullptr);
    }
    return {tokens, logits};
  }
  // heads: (layer, T [d, d] bf16, vocab int32 [K] or None, w_rest bf16 [d] or None); the engine packs them
  void set_heads(const std::vector<std::tuple<int64_t, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>>>& specs) {
    const int64_t d = e_->dims().d;
    std::vector<cpu::HeadSource> heads;
    for (size_t i = 0; i < specs.size(); ++i) {
      const auto& [layer, T, vocab, w_rest] = specs[i];
      const std::string p = "head " + std::to_string(i) + " ";
      check(T, p + "T", {d, d}, at::kBFloat16);
      cpu::HeadSource h;
      h.layer = static_cast<int>(layer);
      h.T = bf16_ptr(T);
      if (vocab) {
        TORCH_CHECK(vocab->device().is_cpu() && vocab->scalar_type() == at::kInt && vocab->dim() == 1 &&
                        vocab->is_contiguous() && vocab->numel() >= 1 && vocab->numel() <= INT_MAX,
                    p, "vocab must be a non-empty contiguous 1-d int32 CPU tensor");
        h.vocab = vocab->data_ptr<int32_t>();
        h.n_vocab = static_cast<int>(vocab->numel());
      }
      if (w_rest) {
        check(*w_rest, p + "w_rest", {d}, at::kBFloat16);
        h.w_rest = bf16_ptr(*w_rest);
      }
      heads.push_back(h);
    }
    e_->set_heads(heads);
  }
  // (token, confidence, logits over the head's real tokens or None); token -1: not finite. sampling: as final's,
  // the head's own draw for position pos + 1.
  std::tuple<int32_t, float, c10::optional<at::Tensor>> head(int64_t seq, int64_t pos, int64_t i, bool with_logits,
                                                            const c10::optional<SamplingArgs>& sampling) {
    const cpu::SampleRule rule = sampling ? rule_of(*sampling) : cpu::SampleRule{};
    c10::optional<at::Tensor> logits;
    if (with_logits) {
      TORCH_CHECK(i >= 0 && i < e_->n_heads_set(), "head index ", i, " outside 0..", e_->n_heads_set() - 1);
      logits = at::empty({e_->head_vocab(static_cast<int>(i))}, at::kFloat);
    }
    std::pair<int32_t, float> r;
    {
      py::gil_scoped_release nogil;
      r = e_->head(static_cast<int>(seq), static_cast<int>(pos), static_cast<int>(i),
                   with_logits ? logits->data_ptr<float>() : nullptr, sampling ? &rule : nullptr);
    }
    return {r.first, r.second, logits};
  }
  at::Tensor hidden(int64_t seq, int64_t pos) {
    at::Tensor out = at::empty({e_->dims().d}, at::kBFloat16);
    e_->copy_row(static_cast<int>(seq), static_cast<int>(pos), reinterpret_cast<uint16_t*>(out.data_ptr()));
    return out;
  }
  std::tuple<at::Tensor, at::Tensor> kv(int64_t seq, int64_t layer, int64_t length) {
    const auto& m = e_->dims();
    TORCH_CHECK(length >= 0 && length <= e_->max_seq(), "kv: length ", length, " outside 0..", e_->max_seq());
    at::Tensor k = at::empty({length, m.n_kv_heads, m.head_dim}, at::kBFloat16);
    at::Tensor v = at::empty({length, m.n_kv_heads, m.head_dim}, at::kBFloat16);
    e_->copy_kv(static_cast<int>(seq), static_cast<int>(layer), static_cast<int>(length),
                reinterpret_cast<uint16_t*>(k.data_ptr()), reinterpret_cast<uint16_t*>(v.data_ptr()));
    return {k, v};
  }

  // The pool's test schedules (thread_pool.h): "natural", "reverse" or "shuffle" (seeded).
  void set_schedule(const std::string& name, uint64_t seed) {
    using S = cpu::ThreadPool::Schedule;
    const S s = name == "natural" ? S::kNatural : name == "reverse" ? S::kReverse : name == "shuffle" ? S::kShuffle
                                                                                                     : S(-1);
    TORCH_CHECK(s != S(-1), "schedule must be 'natural', 'reverse' or 'shuffle', got '", name, "'");
    e_->set_schedule(s, seed);
  }
  std::string isa() const { return e_->isa(); }
  int threads() const { return e_->threads(); }
  int max_seqs() const { return e_->max_seqs(); }
  int prefill_chunk() const { return e_->prefill_chunk(); }
  int64_t kv_bytes() const { return static_cast<int64_t>(e_->kv_bytes()); }
  int64_t weight_bytes() const { return static_cast<int64_t>(e_->weights().bytes()); }

 private:
  std::unique_ptr<cpu::Engine> e_;
};

std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (const char* const* p = cpu::supported_isas(); *p; ++p) out.emplace_back(*p);
  return out;
}

// ---- probes for tests and benchmarks only (the submodule adadecode_cpu.testing; no engine calls them) -------------
// exp_fixed (base2 false) or exp2_fixed of every element, through the vector kernels of `isa` (tests).
at::Tensor fixed_exp(const at::Tensor& x, const std::string& isa, bool base2) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous fp32 CPU tensor");
  const cpu::Kernels* k = kernels_named(isa);
  at::Tensor y = at::empty_like(x);
  (base2 ? k->exp2 : k->exp)(x.data_ptr<float>(), y.data_ptr<float>(), static_cast<int>(x.numel()));
  return y;
}

// The scalar fixed-math functions of csrc/common/fixed_math.h, element by element (the reference of the tests).
at::Tensor fixed_exp_scalar(const at::Tensor& x, bool base2) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous(), "x must be a contiguous fp32 CPU tensor");
  at::Tensor y = at::empty_like(x);
  const float* a = x.data_ptr<float>();
  float* b = y.data_ptr<float>();
  for (int64_t i = 0; i < x.numel(); ++i) b[i] = base2 ? adadecode::exp2_fixed(a[i]) : adadecode::exp_fixed(a[i]);
  return y;
}

// out [R, N] = x [R, K] (fp32, bf16 values) . w [N, K] (bf16) in the CUDA skinny GEMM's order, through `isa`.
at::Tensor lane_dot(const at::Tensor& x, const at::Tensor& w, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "lane_dot: x [R, K] and w [N, K]");
  const int64_t R = x.size(0), N = w.size(0), K = x.size(1);
  check(x, "x", {R, K}, at::kFloat);
  check(w, "w", {N, K}, at::kBFloat16);
  TORCH_CHECK(K % 8 == 0 && K > 0, "lane_dot: K must be a positive multiple of 8");
  const cpu::Kernels* k = kernels_named(isa);
  const cpu::LaneLayout L(static_cast<int>(K), cpu::skinny_lanes(static_cast<int>(K)));
  std::vector<uint16_t> packed(N * K);
  const uint16_t* wp = bf16_ptr(w);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < K; ++j) packed[n * K + j] = wp[n * K + L.wsrc[j]];
  const float* xv = x.data_ptr<float>();
  for (int64_t i = 0; i < R * K; ++i) {
    uint32_t u;
    std::memcpy(&u, xv + i, 4);
    TORCH_CHECK((u & 0xffff) == 0, "lane_dot: x must hold bf16 values (as every activation of the engine does)");
  }
  std::vector<float> row(K + 1, 0.f), xp(R * L.xlen);
  for (int64_t r = 0; r < R; ++r) {
    std::memcpy(row.data(), xv + r * K, K * sizeof(float));
    k->permute_x(L, row.data(), xp.data() + r * L.xlen);
  }
  std::vector<const uint16_t*> ptrs(N);
  for (int64_t n = 0; n < N; ++n) ptrs[n] = packed.data() + n * K;
  at::Tensor out = at::empty({R, N}, at::kFloat);
  k->dot_tile(L, ptrs.data(), static_cast<int>(N), xp.data(), L.xlen, static_cast<int>(R), out.data_ptr<float>(),
              cpu::bf16_exp_range(packed.data(), packed.size()));
  return out;
}

// Seeded draws (sampling.h) from logits [R, n] fp32 at positions pos[r], the noise keyed by ids [n] (None: 0..n-1):
// the C++ sampler against the Python reference (tests). -1: a tempered logit is not finite.
std::vector<int32_t> sample_rows(const at::Tensor& logits, const c10::optional<at::Tensor>& ids,
                                 const std::vector<int32_t>& pos, uint64_t seed, double inv_temperature, int64_t top_k,
                                 double top_p) {
  TORCH_CHECK(logits.dim() == 2, "sample_rows: logits [R, n]");
  const int64_t R = logits.size(0), n = logits.size(1);
  check(logits, "logits", {R, n}, at::kFloat);
  TORCH_CHECK(static_cast<int64_t>(pos.size()) == R, "sample_rows: one position per row");
  if (ids) check(*ids, "ids", {n}, at::kInt);
  cpu::SampleRule rule;
  rule.seed = seed, rule.inv_temperature = static_cast<float>(inv_temperature);
  rule.top_k = static_cast<int32_t>(top_k), rule.top_p = top_p;
  cpu::SampleScratch scratch;
  std::vector<int32_t> out(R);
  for (int64_t r = 0; r < R; ++r)
    out[r] = cpu::sample_row(logits.data_ptr<float>() + r * n, static_cast<int>(n), ids ? ids->data_ptr<int32_t>() : nullptr,
                             pos[r], rule, scratch);
  return out;
}

// ---- test probes (issue 32: tests/test_cpu_reference.py) ------------------------------------------------------------
// The attention kernels on raw arrays, no engine. The engine rounds attention's result to bf16 at once, which hides
// most changes of order inside it (a reordered fp32 sum changes a bf16 value only where it crosses a rounding
// boundary): these expose the chunk partials in fp32, and run the merge on partials the test chooses.

// q [R, H, hd] fp32 (bf16 values: rotated q), k, v [T, Hkv, hd] bf16 (the cache): rows r at positions first + r
// (first + R <= T), sliding window `window` (0: none). Every (kv head, chunk) item the engine would run for these
// rows, through `isa`: (part_o [R, H, n_chunks, hd], part_ml [R, H, n_chunks, 2] = (max, sum of exps) in log2
// units), NaN where no partial is written (chunks past a row or wholly before its window).
std::tuple<at::Tensor, at::Tensor> probe_attn_partials(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       int64_t first, int64_t window, const std::string& isa) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "attn_partials: q [R, H, hd], k and v [T, Hkv, hd]");
  const int64_t R = q.size(0), H = q.size(1), hd = q.size(2), T = k.size(0), Hkv = k.size(1);
  check(q, "q", {R, H, hd}, at::kFloat);
  check(k, "k", {T, Hkv, hd}, at::kBFloat16);
  check(v, "v", {T, Hkv, hd}, at::kBFloat16);
  TORCH_CHECK(R >= 1 && Hkv >= 1 && H % Hkv == 0 && hd % 2 == 0 && hd <= 256 && first >= 0 && first + R <= T &&
                  window >= 0, "attn_partials: needs R >= 1, H % Hkv == 0, even hd <= 256, 0 <= first, first + R <= T");
  const cpu::Kernels* kern = kernels_named(isa);
  const int64_t B = cpu::kKBlock, nkb = (T + B - 1) / B, nch = (T + cpu::kAttnChunk - 1) / cpu::kAttnChunk;
  std::vector<uint16_t> kb(static_cast<size_t>(Hkv * nkb * hd * B), 0), vb(static_cast<size_t>(Hkv * T * hd));
  const uint16_t *ks = bf16_ptr(k), *vs = bf16_ptr(v);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t kh = 0; kh < Hkv; ++kh)
      for (int64_t d = 0; d < hd; ++d) {
        kb[((kh * nkb + t / B) * hd + d) * B + t % B] = ks[(t * Hkv + kh) * hd + d];
        vb[(kh * T + t) * hd + d] = vs[(t * Hkv + kh) * hd + d];
      }
  at::Tensor part_o = at::full({R, H, nch, hd}, NAN, at::kFloat), part_ml = at::full({R, H, nch, 2}, NAN, at::kFloat);
  cpu::AttnArgs a;
  a.q = q.data_ptr<float>(), a.k_blocks = kb.data(), a.v = vb.data();
  a.part_o = part_o.data_ptr<float>(), a.part_ml = part_ml.data_ptr<float>();
  a.R = static_cast<int>(R), a.first = static_cast<int>(first), a.n_heads = static_cast<int>(H);
  a.n_kv_heads = static_cast<int>(Hkv), a.head_dim = static_cast<int>(hd), a.max_seq = static_cast<int>(T);
  a.n_chunks = static_cast<int>(nch), a.window = static_cast<int>(window);
  a.qscale = 1.4426950408889634f / std::sqrt(static_cast<float>(hd));  // as the engine (engine.cpp: forward)
  const int c0 = cpu::attn_lo(a.first, a.window) / cpu::kAttnChunk, nc = (a.first + a.R - 1) / cpu::kAttnChunk + 1;
  for (int kh = 0; kh < a.n_kv_heads; ++kh)
    for (int c = c0; c < nc; ++c) kern->attn_chunk(a, kh, c, 0, a.R);
  return {part_o, part_ml};
}

// The merge of given partials (part_o [R, H, n_chunks, hd], part_ml [R, H, n_chunks, 2]) for rows at positions
// first + r with window `window`, through `isa`: out [R, H, hd] fp32 (bf16 values).
at::Tensor probe_attn_merge(const at::Tensor& part_o, const at::Tensor& part_ml, int64_t first, int64_t window,
                            const std::string& isa) {
  TORCH_CHECK(part_o.dim() == 4, "attn_merge: part_o [R, H, n_chunks, hd]");
  const int64_t R = part_o.size(0), H = part_o.size(1), nch = part_o.size(2), hd = part_o.size(3);
  check(part_o, "part_o", {R, H, nch, hd}, at::kFloat);
  check(part_ml, "part_ml", {R, H, nch, 2}, at::kFloat);
  TORCH_CHECK(R >= 1 && hd <= 256 && first >= 0 && window >= 0 && (first + R - 1) / cpu::kAttnChunk < nch,
              "attn_merge: rows first..first+R-1 must lie inside the n_chunks chunks of 128 positions, hd <= 256");
  const cpu::Kernels* kern = kernels_named(isa);
  at::Tensor out = at::empty({R, H, hd}, at::kFloat);
  cpu::AttnArgs a;
  a.part_o = part_o.data_ptr<float>(), a.part_ml = part_ml.data_ptr<float>(), a.out = out.data_ptr<float>();
  a.R = static_cast<int>(R), a.first = static_cast<int>(first), a.n_heads = static_cast<int>(H);
  a.head_dim = static_cast<int>(hd), a.n_chunks = static_cast<int>(nch), a.window = static_cast<int>(window);
  for (int r = 0; r < a.R; ++r)
    for (int h = 0; h < a.n_heads; ++h) kern->attn_merge(a, r, h);
  return out;
}

void def_test_probes(py::module_& m) {
  m.def("attn_partials", &probe_attn_partials, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("first"),
        py::arg("window"), py::arg("isa"), "tests: the attention chunk partials of rows first.. (fp32)");
  m.def("attn_merge", &probe_attn_merge, py::arg("part_o"), py::arg("part_ml"), py::arg("first"), py::arg("window"),
        py::arg("isa"), "tests: the attention merge of given chunk partials");
}
// ---- end of the test probes -----------------------------------------------------------------------------------------

// Read bandwidth (bytes/s) of `threads` threads summing a buffer of `mib` MiB that no cache holds, best of `reps`
// passes: the ceiling a decode step (every weight read once) can reach on this machine, measured in the same run.
double read_bandwidth(int64_t mib, int64_t threads, int64_t reps, const std::string& isa) {
  TORCH_CHECK(mib >= 1 && threads >= 1 && reps >= 1, "read_bandwidth: mib, threads, reps must be >= 1");
  const cpu::Kernels* k = kernels_named(isa);
  const size_t n = static_cast<size_t>(mib) << 18;  // floats
  cpu::Buffer<float> buf(n, "bandwidth probe");
  for (size_t i = 0; i < n; ++i) buf.data()[i] = static_cast<float>(i & 1023);
  cpu::ThreadPool pool(static_cast<int>(threads));
  struct Ctx {
    const cpu::Kernels* k;
    const float* p;
    float sink[1024];
  } ctx{k, buf.data(), {}};
  constexpr int64_t kChunk = 1 << 18;  // 1 MiB of floats per item
  const int items = static_cast<int>(n / kChunk);
  py::gil_scoped_release nogil;
  double best = 1e30;
  for (int64_t r = 0; r < reps + 1; ++r) {  // the first pass warms the pages and the threads
    const auto t0 = std::chrono::steady_clock::now();
    pool.run(items, [](void* c, int thread, int item, bool) {
      auto& x = *static_cast<Ctx*>(c);
      x.sink[thread & 1023] += x.k->read_sum(x.p + static_cast<int64_t>(item) * kChunk, kChunk);
    }, &ctx);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) best = std::min(best, s);
  }
  return static_cast<double>(items) * kChunk * sizeof(float) / best;
}

// fp32 FMA FLOP/s of `threads` threads each running 12 independent FMA chains on the kernels of `isa` (best of
// `reps`): the compute ceiling of the benchmarks, measured in the same run as the read bandwidth.
double fma_peak(int64_t threads, int64_t reps, const std::string& isa) {
  TORCH_CHECK(threads >= 1 && reps >= 1, "fma_peak: threads, reps must be >= 1");
  const cpu::Kernels* k = kernels_named(isa);
  cpu::ThreadPool pool(static_cast<int>(threads));
  struct Ctx {
    const cpu::Kernels* k;
    double flops[1024];
    float sink[1024][64];
  };
  auto ctx = std::make_unique<Ctx>();
  ctx->k = k;
  for (auto& s : ctx->sink)
    for (int i = 0; i < 64; ++i) s[i] = 1.f + 1e-6f * static_cast<float>(i);
  py::gil_scoped_release nogil;
  double best = 0.0;
  for (int64_t r = 0; r < reps + 1; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.run(static_cast<int>(threads), [](void* c, int thread, int, bool) {
      auto& x = *static_cast<Ctx*>(c);
      x.flops[thread & 1023] += x.k->fma_probe(2000000, x.sink[thread & 1023]);
    }, ctx.get(), SIZE_MAX);
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (r > 0) best = std::max(best, ctx->flops[0] / static_cast<double>(r + 1) * static_cast<double>(threads) / s);
  }
  return best;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "adadecode's CPU engine: the engine contract on native batch-invariant kernels (csrc/cpu)";
  // module-local: the CUDA bindings register the same C++ type (csrc/common/model.h) as their DeviceOutOfMemory
  py::register_local_exception<cpu::OutOfMemory>(m, "HostOutOfMemory", PyExc_MemoryError);
  py::class_<cpu::Weights, std::shared_ptr<cpu::Weights>>(m, "Weights")
      .def(py::init(&make_weights), py::arg("n_layers"), py::arg("d"), py::arg("n_heads"), py::arg("n_kv_heads"),
           py::arg("head_dim"), py::arg("ffn"), py::arg("vocab"), py::arg("eps"), py::arg("embed"), py::arg("norm"),
           py::arg("lm_head"), py::arg("layers"), py::arg("qkv_bias") = false, py::arg("qk_norm") = false,
           py::arg("sliding_window") = 0, py::arg("extras") = std::vector<std::vector<at::Tensor>>{})
      .def_property_readonly("bytes", [](const cpu::Weights& w) { return static_cast<int64_t>(w.bytes()); });
  py::class_<PyEngine>(m, "Engine")
      .def(py::init<std::shared_ptr<cpu::Weights>, const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                    int64_t, const std::string&, int64_t>(),
           py::arg("weights"), py::arg("cos"), py::arg("sin"), py::arg("max_seq"), py::arg("max_rows"),
           py::arg("prefill_chunk"), py::arg("threads"), py::arg("isa") = "", py::arg("max_seqs") = 1)
      .def("prefill", &PyEngine::prefill, py::arg("seq"), py::arg("tokens"), py::arg("start") = 0)
      .def("embed", &PyEngine::embed, py::arg("seq"), py::arg("pos"), py::arg("token"))
      .def("run_layers", &PyEngine::run_layers, py::arg("seq"), py::arg("first"), py::arg("last"), py::arg("l0"),
           py::arg("l1"))
      .def("run_batch", &PyEngine::run_batch, py::arg("segments"),
           "run_layers of several sequences as one forward: segments (seq, first, last, l0, l1)")
      .def("final", &PyEngine::final, py::arg("seq"), py::arg("first"), py::arg("last"), py::arg("logits") = false,
           py::arg("sampling") = py::none())
      .def("final_batch", &PyEngine::final_batch, py::arg("spans"), py::arg("logits") = false,
           py::arg("sampling") = py::none(),
           "the rows of spans (seq, first, last) in one LM-head pass: (tokens, logits or None) in span order; "
           "sampling: None or one rule (or None) per span")
      .def("set_heads", &PyEngine::set_heads)
      .def("head", &PyEngine::head, py::arg("seq"), py::arg("pos"), py::arg("i"), py::arg("logits") = false,
           py::arg("sampling") = py::none())
      .def("hidden", &PyEngine::hidden, py::arg("seq"), py::arg("pos"))
      .def("kv", &PyEngine::kv, py::arg("seq"), py::arg("layer"), py::arg("length"))
      .def("set_schedule", &PyEngine::set_schedule, py::arg("schedule"), py::arg("seed") = 0)
      .def_property_readonly("isa", &PyEngine::isa)
      .def_property_readonly("threads", &PyEngine::threads)
      .def_property_readonly("max_seqs", &PyEngine::max_seqs)
      .def_property_readonly("prefill_chunk", &PyEngine::prefill_chunk)
      .def_property_readonly("kv_bytes", &PyEngine::kv_bytes)
      .def_property_readonly("weight_bytes", &PyEngine::weight_bytes);
  m.def("isas", &isas, "the kernel paths this CPU runs, best first");
  m.def("known_isas", [] {
    std::vector<std::string> out;
    for (const char* const* p = cpu::known_isas(); *p; ++p) out.emplace_back(*p);
    return out;
  }, "every kernel path this build knows, whether or not this CPU runs it");
  m.def("kv_cache_bytes", [](const cpu::Weights& w, int64_t max_seq, int64_t max_seqs) {
          TORCH_CHECK(max_seq >= 1, "max_seq must be >= 1, got ", max_seq);
          TORCH_CHECK(max_seqs >= 1, "max_seqs must be >= 1, got ", max_seqs);
          return static_cast<int64_t>(cpu::kv_cache_bytes(w.dims(), max_seq, max_seqs));
        }, py::arg("weights"), py::arg("max_seq"), py::arg("max_seqs") = 1,
        "bytes of the KV caches of an Engine of max_seqs sequences of max_seq positions");
  m.def("available_memory", [] { return static_cast<int64_t>(std::min<size_t>(cpu::available_memory(), INT64_MAX)); },
        "bytes of memory this process may still take (MemAvailable)");

  // The one seam for what only tests and benchmarks call: no engine uses these (adadecode/testing/ wraps them).
  py::module_ t = m.def_submodule("testing", "probes of the CPU kernels for tests and benchmarks (not the engine)");
  t.def("read_bandwidth", &read_bandwidth, py::arg("mib") = 1024, py::arg("threads") = 1, py::arg("reps") = 5,
        py::arg("isa") = "", "bytes/s of `threads` threads reading a buffer of `mib` MiB (best of `reps`)");
  t.def("fixed_exp", &fixed_exp, py::arg("x"), py::arg("isa"), py::arg("base2"),
        "exp_fixed / exp2_fixed of every element through the vector kernels of `isa`");
  t.def("fixed_exp_scalar", &fixed_exp_scalar, py::arg("x"), py::arg("base2"),
        "the scalar sequences of fixed_math.h, element by element");
  t.def("lane_dot", &lane_dot, py::arg("x"), py::arg("w"), py::arg("isa"),
        "x [R, K] . w [N, K] in the CUDA skinny GEMM's order, through `isa`");
  def_test_probes(t);  // the attention probes (the test probes block above)
  t.def("fma_peak", &fma_peak, py::arg("threads") = 1, py::arg("reps") = 3, py::arg("isa") = "",
        "fp32 FMA FLOP/s of `threads` threads (12 independent chains each, best of `reps`)");
  t.def("sample_rows", &sample_rows, py::arg("logits"), py::arg("ids"), py::arg("pos"), py::arg("seed"),
        py::arg("inv_temperature"), py::arg("top_k"), py::arg("top_p"),
        "seeded draws of the C++ sampler (csrc/cpu/sampling.h) from logits [R, n]: tests against sampling.py");
  t.def("bf16_dot_fallbacks", &cpu::bf16_dot_fallbacks,
        "calls of the avx512bf16 dot products that ran the FMA chains (values the instruction would flush)");
}
