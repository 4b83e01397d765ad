// adadecode_cuda: thin torch bindings over the torch-free kernels in csrc/cuda/kernels.
// Each op checks its tensors (device, dtype, shape, contiguity), launches on the current stream and
// checks the launch. Outputs are written into tensors the caller allocates (CUDA-graph friendly).
#include <cmath>
#include <cstring>
#include <utility>

#include "checks.h"
#include "../kernels/add_rmsnorm.cuh"
#include "../kernels/attention.cuh"
#include "../kernels/embedding.cuh"
#include "../kernels/gemm_tc.cuh"
#include "../kernels/lm_head.cuh"
#include "../kernels/rope_kv.cuh"
#include "../kernels/skinny_gemm.cuh"

namespace {

using bf16 = __nv_bfloat16;

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* an, const char* bn) {
  TORCH_CHECK(a.device() == b.device(), an, " and ", bn, " must be on the same device, got ", a.device(), " and ",
              b.device());
}

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
  const bf16* dptr = nullptr;
  if (delta.has_value()) {
    ADA_CHECK_CUDA_TENSOR(*delta, at::kBFloat16);
    TORCH_CHECK(delta->sizes() == residual.sizes(), "delta must be ", residual.sizes(), ", got ", delta->sizes());
    dptr = ada_ptr<const bf16>(*delta);
  }
  ADA_CHECK_LAUNCH(adadecode::add_rmsnorm(ada_ptr<bf16>(residual), dptr, ada_ptr<const bf16>(weight),
                                          ada_ptr<bf16>(out), rows, d, static_cast<float>(eps), ada_stream()));
}

// out[r] = table[tokens[r]]. tokens [R] int32, table [vocab, d] bf16, out [R, d] bf16.
void embedding(at::Tensor tokens, at::Tensor table, at::Tensor out) {
  ADA_CHECK_CUDA_TENSOR(tokens, at::kInt);
  ADA_CHECK_CUDA_TENSOR(table, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(out, at::kBFloat16);
  TORCH_CHECK(tokens.dim() == 1, "tokens must be [R], got ", tokens.sizes());
  TORCH_CHECK(table.dim() == 2 && table.size(1) % 8 == 0, "table must be [vocab, d] with d % 8 == 0, got ", table.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == tokens.size(0) && out.size(1) == table.size(1), "out must be [",
              tokens.size(0), ", ", table.size(1), "], got ", out.sizes());
  if (tokens.numel() == 0) return;
  ADA_CHECK_LAUNCH(adadecode::embedding(ada_ptr<const int32_t>(tokens), ada_ptr<const bf16>(table), ada_ptr<bf16>(out),
                                        tokens.size(0), table.size(1), table.size(0), ada_stream()));
}

// The fused input of the decode kernels (skinny_gemm, qkv_rope, lm_head_*): rows RMS-normalised on the fly
// (norm_weight, eps) and, with ring_first >= 0, read from a ring x [W, K] in place: row r = x[(ring_first + r) % W].
struct FusedIn {
  adadecode::XRows x;
  adadecode::RowNorm norm;
};
FusedIn fused_in(const at::Tensor& x, const c10::optional<at::Tensor>& norm_weight, double eps, int64_t ring_first,
                 int64_t R) {
  FusedIn f{};
  f.x.base = ada_ptr<const bf16>(x);
  if (ring_first >= 0) {
    TORCH_CHECK(R <= x.size(0), "a ring of ", x.size(0), " rows cannot hold ", R, " rows");
    f.x.first = static_cast<int>(ring_first);
    f.x.wrap = static_cast<int>(x.size(0));
  } else {
    TORCH_CHECK(R == x.size(0), "x must have ", R, " rows, got ", x.sizes());
  }
  if (norm_weight.has_value()) {
    ADA_CHECK_CUDA_TENSOR(*norm_weight, at::kBFloat16);
    TORCH_CHECK(norm_weight->numel() == x.size(1), "norm_weight must be [", x.size(1), "], got ", norm_weight->sizes());
    f.norm.weight = ada_ptr<const bf16>(*norm_weight);
    f.norm.eps = static_cast<float>(eps);
  }
  return f;
}

// Shared checks of the three GEMM entry points; returns (M, N, K).
struct GemmArgs {
  const bf16 *x, *w, *w_up, *residual;
  bf16* out;
  int M, N, K;
};
GemmArgs gemm_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& out,
                   const c10::optional<at::Tensor>& residual, const c10::optional<at::Tensor>& w_up) {
  ADA_CHECK_CUDA_TENSOR(x, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(w, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(out, at::kBFloat16);
  TORCH_CHECK(x.dim() == 2, "x must be [M, K], got ", x.sizes());
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(1), "w must be [N, ", x.size(1), "], got ", w.sizes());
  TORCH_CHECK(x.size(1) % 8 == 0, "K (x.shape[1]) must be a multiple of 8, got ", x.size(1));
  TORCH_CHECK(out.dim() == 2 && out.size(1) == w.size(0), "out must be [M, ", w.size(0), "], got ", out.sizes());
  check_same_device(x, w, "x", "w");
  GemmArgs a{ada_ptr<const bf16>(x), ada_ptr<const bf16>(w), nullptr, nullptr, ada_ptr<bf16>(out),
             static_cast<int>(out.size(0)), static_cast<int>(w.size(0)), static_cast<int>(x.size(1))};
  TORCH_CHECK(!(residual.has_value() && w_up.has_value()), "give residual or w_up, not both");
  if (residual.has_value()) {
    ADA_CHECK_CUDA_TENSOR(*residual, at::kBFloat16);
    TORCH_CHECK(residual->sizes() == out.sizes(), "residual must be ", out.sizes(), ", got ", residual->sizes());
    a.residual = ada_ptr<const bf16>(*residual);
  }
  if (w_up.has_value()) {
    ADA_CHECK_CUDA_TENSOR(*w_up, at::kBFloat16);
    TORCH_CHECK(w_up->sizes() == w.sizes(), "w_up must be ", w.sizes(), ", got ", w_up->sizes());
    a.w_up = ada_ptr<const bf16>(*w_up);
  }
  return a;
}

void skinny_gemm(at::Tensor x, at::Tensor w, at::Tensor out, c10::optional<at::Tensor> residual,
                 c10::optional<at::Tensor> w_up, c10::optional<at::Tensor> norm_weight, double eps,
                 int64_t ring_first, bool pdl) {
  const GemmArgs a = gemm_args(x, w, out, residual, w_up);
  TORCH_CHECK(a.M >= 1 && a.M <= 16, "skinny_gemm takes 1..16 rows, got ", a.M);
  const FusedIn f = fused_in(x, norm_weight, eps, ring_first, a.M);
  ADA_CHECK_LAUNCH(adadecode::skinny_gemm(f.x, f.norm, a.w, a.w_up, a.residual, a.out, a.M, a.N, a.K, ada_stream(),
                                          pdl));
}

// gemm_tc and linear: any number of rows (0: nothing to do), the same arguments and epilogues.
template <auto Launch>
void any_rows_gemm(at::Tensor x, at::Tensor w, at::Tensor out, c10::optional<at::Tensor> residual,
                   c10::optional<at::Tensor> w_up) {
  const GemmArgs a = gemm_args(x, w, out, residual, w_up);
  TORCH_CHECK(a.M == x.size(0), "out must have x's ", x.size(0), " rows, got ", out.sizes());
  if (a.M == 0) return;
  ADA_CHECK_LAUNCH(Launch(a.x, a.w, a.w_up, a.residual, a.out, a.M, a.N, a.K, ada_stream(), nullptr));
}

// The checks rope_append_kv and qkv_rope share: caches [max_seq, Hkv, hd], fp32 cos/sin tables [>= max_seq,
// hd/2], one int32 first_pos. Returns (max_seq, head_dim).
std::pair<int64_t, int64_t> rope_cache_args(const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cos,
                                            const at::Tensor& sin, const at::Tensor& first_pos, int64_t n_kv_heads) {
  ADA_CHECK_CUDA_TENSOR(k_cache, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(v_cache, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(cos, at::kFloat);
  ADA_CHECK_CUDA_TENSOR(sin, at::kFloat);
  ADA_CHECK_CUDA_TENSOR(first_pos, at::kInt);
  TORCH_CHECK(k_cache.dim() == 3 && k_cache.size(1) == n_kv_heads, "k_cache must be [max_seq, ", n_kv_heads,
              ", head_dim], got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must be ", k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t max_seq = k_cache.size(0), hd = k_cache.size(2);
  TORCH_CHECK(hd % 16 == 0, "head_dim must be a multiple of 16, got ", hd);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) >= max_seq && cos.size(1) == hd / 2, "cos must be [>= ", max_seq, ", ",
              hd / 2, "], got ", cos.sizes());
  TORCH_CHECK(sin.sizes() == cos.sizes(), "sin must be ", cos.sizes(), ", got ", sin.sizes());
  TORCH_CHECK(first_pos.numel() == 1, "first_pos must hold one int32, got ", first_pos.sizes());
  return {max_seq, hd};
}

// Rotates the q and k parts of qkv [R, (H + 2 Hkv) hd] in place (q) / into k_cache, copies v into v_cache.
void rope_append_kv(at::Tensor qkv, at::Tensor k_cache, at::Tensor v_cache, at::Tensor cos, at::Tensor sin,
                    at::Tensor first_pos, int64_t n_heads, int64_t n_kv_heads) {
  ADA_CHECK_CUDA_TENSOR(qkv, at::kBFloat16);
  const auto [max_seq, hd] = rope_cache_args(k_cache, v_cache, cos, sin, first_pos, n_kv_heads);
  TORCH_CHECK(qkv.dim() == 2 && qkv.size(1) == (n_heads + 2 * n_kv_heads) * hd, "qkv must be [R, ",
              (n_heads + 2 * n_kv_heads) * hd, "], got ", qkv.sizes());
  if (qkv.size(0) == 0) return;
  ADA_CHECK_LAUNCH(adadecode::rope_append_kv(ada_ptr<bf16>(qkv), ada_ptr<bf16>(k_cache), ada_ptr<bf16>(v_cache),
                                             ada_ptr<const float>(cos), ada_ptr<const float>(sin),
                                             ada_ptr<const int32_t>(first_pos), qkv.size(0), n_heads, n_kv_heads, hd,
                                             max_seq, ada_stream()));
}

// Decode's QKV in one launch: norm (norm_weight) -> x @ wqkv.T -> RoPE + K/V append = add_rmsnorm, skinny_gemm,
// rope_append_kv bit for bit. Writes the rotated q part of qkv_out [R, (H + 2 Hkv) hd] (not its k / v parts).
void qkv_rope(at::Tensor x, at::Tensor wqkv, at::Tensor qkv_out, at::Tensor k_cache, at::Tensor v_cache,
              at::Tensor cos, at::Tensor sin, at::Tensor first_pos, int64_t n_heads, int64_t n_kv_heads,
              c10::optional<at::Tensor> norm_weight, double eps, int64_t ring_first, bool pdl) {
  ADA_CHECK_CUDA_TENSOR(x, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(wqkv, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(qkv_out, at::kBFloat16);
  const auto [max_seq, hd] = rope_cache_args(k_cache, v_cache, cos, sin, first_pos, n_kv_heads);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 8 == 0, "x must be [rows, d] with d % 8 == 0, got ", x.sizes());
  const int64_t d = x.size(1), qkv_n = (n_heads + 2 * n_kv_heads) * hd;
  TORCH_CHECK(wqkv.dim() == 2 && wqkv.size(0) == qkv_n && wqkv.size(1) == d, "wqkv must be [", qkv_n, ", ", d,
              "], got ", wqkv.sizes());
  TORCH_CHECK(qkv_out.dim() == 2 && qkv_out.size(1) == qkv_n, "qkv_out must be [R, ", qkv_n, "], got ",
              qkv_out.sizes());
  const int64_t R = qkv_out.size(0);
  TORCH_CHECK(R >= 1 && R <= 16, "qkv_rope takes 1..16 rows, got ", R);
  const FusedIn f = fused_in(x, norm_weight, eps, ring_first, R);
  ADA_CHECK_LAUNCH(adadecode::skinny_qkv_rope(f.x, f.norm, ada_ptr<const bf16>(wqkv), ada_ptr<bf16>(qkv_out),
                                              ada_ptr<bf16>(k_cache), ada_ptr<bf16>(v_cache),
                                              ada_ptr<const float>(cos), ada_ptr<const float>(sin),
                                              ada_ptr<const int32_t>(first_pos), R, d, n_heads, n_kv_heads, hd,
                                              max_seq, ada_stream(), pdl));
}

int64_t attention_workspace_floats(int64_t R, int64_t n_heads, int64_t head_dim, int64_t max_ctx) {
  return static_cast<int64_t>(adadecode::attention_workspace_floats(R, n_heads, head_dim, max_ctx));
}

// q: [R, q_stride] bf16 (head h of row r at column h*hd); out [R, H*hd] bf16. A given workspace holds zero
// counters (its first attention_counters floats: see attention.cuh); without one a zeroed one is made.
void attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor first_pos, at::Tensor out,
               int64_t n_heads, int64_t max_ctx, c10::optional<at::Tensor> workspace, bool single_launch, bool pdl) {
  ADA_CHECK_CUDA_TENSOR(q, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(k_cache, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(v_cache, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(first_pos, at::kInt);
  ADA_CHECK_CUDA_TENSOR(out, at::kBFloat16);
  TORCH_CHECK(k_cache.dim() == 3, "k_cache must be [max_seq, n_kv_heads, head_dim], got ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache must be ", k_cache.sizes(), ", got ", v_cache.sizes());
  const int64_t n_kv = k_cache.size(1), hd = k_cache.size(2), R = q.size(0);
  TORCH_CHECK(hd == 64 || hd == 128, "attention supports head_dim 64 or 128, got ", hd);
  TORCH_CHECK(n_heads % n_kv == 0, "n_heads (", n_heads, ") must be a multiple of n_kv_heads (", n_kv, ")");
  TORCH_CHECK(q.dim() == 2 && q.size(1) >= n_heads * hd && q.size(1) % 8 == 0, "q must be [R, >= ", n_heads * hd,
              "] with a row length that is a multiple of 8, got ", q.sizes());
  TORCH_CHECK(out.dim() == 2 && out.size(0) == R && out.size(1) == n_heads * hd, "out must be [", R, ", ",
              n_heads * hd, "], got ", out.sizes());
  TORCH_CHECK(first_pos.numel() == 1, "first_pos must hold one int32, got ", first_pos.sizes());
  TORCH_CHECK(max_ctx >= 1 && max_ctx <= k_cache.size(0), "max_ctx must be in 1..", k_cache.size(0), ", got ", max_ctx);
  if (R == 0) return;
  const int64_t need = adadecode::attention_workspace_floats(R, n_heads, hd, max_ctx);
  const at::Tensor ws = workspace.has_value() ? ada_workspace(workspace, need, q)
                                              : at::zeros({need}, q.options().dtype(at::kFloat));
  ADA_CHECK_LAUNCH(adadecode::attention(ada_ptr<const bf16>(q), q.size(1), ada_ptr<const bf16>(k_cache),
                                        ada_ptr<const bf16>(v_cache), ada_ptr<const int32_t>(first_pos),
                                        ada_ptr<bf16>(out), ada_ptr<float>(ws), R, n_heads, n_kv, hd, max_ctx,
                                        ada_stream(), single_launch, pdl));
}

int64_t lm_head_workspace_floats(int64_t R, int64_t n) {
  return static_cast<int64_t>(adadecode::lm_head_workspace_floats(R, n));
}

// x [R, d] bf16; w [vocab, d] bf16; token [R] int32, max_prob [R] fp32, lse [R] fp32 (optional). params: nullptr
// (argmax) or the device sampling settings (lm_head_sample).
void lm_head_checked(const at::Tensor& x, const at::Tensor& w, const at::Tensor& token, const at::Tensor& max_prob,
                     const c10::optional<at::Tensor>& lse, const c10::optional<at::Tensor>& vocab_subset,
                     const c10::optional<at::Tensor>& w_rest, bool round_bf16,
                     const c10::optional<at::Tensor>& workspace, const adadecode::SampleParams* params,
                     const c10::optional<at::Tensor>& norm_weight, double eps, int64_t ring_first, bool pdl) {
  ADA_CHECK_CUDA_TENSOR(x, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(w, at::kBFloat16);
  ADA_CHECK_CUDA_TENSOR(token, at::kInt);
  ADA_CHECK_CUDA_TENSOR(max_prob, at::kFloat);
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 8 == 0, "x must be [R, d] with d % 8 == 0, got ", x.sizes());
  const int64_t R = ring_first >= 0 ? token.numel() : x.size(0), d = x.size(1);
  TORCH_CHECK(R >= 1 && R <= 16, "lm_head_argmax takes 1..16 rows, got ", R);
  TORCH_CHECK(w.dim() == 2 && w.size(1) == d, "w must be [vocab, ", d, "], got ", w.sizes());
  TORCH_CHECK(token.numel() == R, "token must be [", R, "], got ", token.sizes());
  TORCH_CHECK(max_prob.numel() == R, "max_prob must be [", R, "], got ", max_prob.sizes());
  float* lse_ptr = nullptr;
  if (lse.has_value()) {
    ADA_CHECK_CUDA_TENSOR(*lse, at::kFloat);
    TORCH_CHECK(lse->numel() == R, "lse must be [", R, "], got ", lse->sizes());
    lse_ptr = ada_ptr<float>(*lse);
  }
  int64_t n = w.size(0);
  const int32_t* sub = nullptr;
  if (vocab_subset.has_value()) {
    ADA_CHECK_CUDA_TENSOR(*vocab_subset, at::kInt);
    TORCH_CHECK(vocab_subset->dim() == 1 && vocab_subset->numel() >= 1, "vocab_subset must be [K >= 1], got ",
                vocab_subset->sizes());
    n = vocab_subset->numel();
    sub = ada_ptr<const int32_t>(*vocab_subset);
  }
  const bf16* rest = nullptr;
  if (w_rest.has_value()) {
    ADA_CHECK_CUDA_TENSOR(*w_rest, at::kBFloat16);
    TORCH_CHECK(w_rest->numel() == d, "w_rest must be [", d, "], got ", w_rest->sizes());
    rest = ada_ptr<const bf16>(*w_rest);
  }
  const int64_t need = params ? adadecode::lm_head_sample_workspace_floats(R, n) : adadecode::lm_head_workspace_floats(R, n);
  const at::Tensor ws = ada_workspace(workspace, need, x);
  const FusedIn f = fused_in(x, norm_weight, eps, ring_first, R);
  TORCH_CHECK(!(f.norm.weight && rest), "norm_weight and w_rest cannot be combined (the rest logit reads raw rows)");
  if (params)
    ADA_CHECK_LAUNCH(adadecode::lm_head_sample(f.x, f.norm, ada_ptr<const bf16>(w), sub, n, rest, params,
                                               ada_ptr<int32_t>(token), ada_ptr<float>(max_prob), lse_ptr,
                                               ada_ptr<float>(ws), R, d, round_bf16, ada_stream(), pdl));
  else
    ADA_CHECK_LAUNCH(adadecode::lm_head_argmax(f.x, f.norm, ada_ptr<const bf16>(w), sub, n, rest,
                                               ada_ptr<int32_t>(token), ada_ptr<float>(max_prob), lse_ptr,
                                               ada_ptr<float>(ws), R, d, round_bf16, ada_stream(), pdl));
}

void lm_head_argmax(at::Tensor x, at::Tensor w, at::Tensor token, at::Tensor max_prob, c10::optional<at::Tensor> lse,
                    c10::optional<at::Tensor> vocab_subset, c10::optional<at::Tensor> w_rest, bool round_bf16,
                    c10::optional<at::Tensor> workspace, c10::optional<at::Tensor> norm_weight, double eps,
                    int64_t ring_first, bool pdl) {
  lm_head_checked(x, w, token, max_prob, lse, vocab_subset, w_rest, round_bf16, workspace, nullptr, norm_weight, eps,
                  ring_first, pdl);
}

int64_t lm_head_sample_workspace_floats(int64_t R, int64_t n) {
  return static_cast<int64_t>(adadecode::lm_head_sample_workspace_floats(R, n));
}

// lm_head_argmax's logits, then token[r] drawn by the seeded sampling rule (adadecode/engines/sampling.py) for position
// pos + r; max_prob / lse as lm_head_argmax's. Same tensors as lm_head_argmax.
void lm_head_sample(at::Tensor x, at::Tensor w, at::Tensor token, at::Tensor max_prob, uint64_t seed, int64_t pos,
                    double inv_temperature, int64_t top_k, double top_p,
                    c10::optional<at::Tensor> lse, c10::optional<at::Tensor> vocab_subset,
                    c10::optional<at::Tensor> w_rest, bool round_bf16, c10::optional<at::Tensor> workspace,
                    c10::optional<at::Tensor> norm_weight, double eps, int64_t ring_first, bool pdl) {
  ADA_CHECK_CUDA_TENSOR(x, at::kBFloat16);
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1, "x must be [R, d], got ", x.sizes());
  const int64_t R = ring_first >= 0 ? token.numel() : x.size(0);
  TORCH_CHECK(inv_temperature > 0 && std::isfinite(inv_temperature), "inv_temperature must be > 0, got ",
              inv_temperature);
  TORCH_CHECK(top_k >= 0, "top_k must be >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, "top_p must be in (0, 1], got ", top_p);
  TORCH_CHECK(pos >= 0 && pos <= INT32_MAX - 16, "pos must be a non-negative int32, got ", pos);
  adadecode::SampleParams p{};
  p.seed = seed;
  p.top_p = top_p;
  p.inv_temperature = static_cast<float>(inv_temperature);
  p.top_k = static_cast<int32_t>(top_k < INT32_MAX ? top_k : INT32_MAX);
  p.pos = static_cast<int32_t>(pos);
  at::Tensor params = at::empty({static_cast<int64_t>(sizeof p)}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(params.data_ptr(), &p, sizeof p);
  params = params.to(x.device());  // ordered before the launch on the current stream
  const int64_t n = vocab_subset.has_value() ? vocab_subset->numel() : w.size(0);
  const at::Tensor ws = ada_workspace(workspace, adadecode::lm_head_sample_workspace_floats(R, n), x);
  lm_head_checked(x, w, token, max_prob, lse, vocab_subset, w_rest, round_bf16, ws,
                  reinterpret_cast<const adadecode::SampleParams*>(params.data_ptr()), norm_weight, eps, ring_first,
                  pdl);
}

}  // namespace

// csrc/cuda/bindings/engine.cpp: adadecode_cuda.Engine.
void register_engine(pybind11::module_& m);
#ifdef ADADECODE_EMU
void register_emu(pybind11::module_& m);  // csrc/emu/bindings_emu.cpp: device tensors, thread order, counters
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  register_engine(m);
#ifdef ADADECODE_EMU
  register_emu(m);
#endif
  m.doc() = "adadecode CUDA kernels (torch bindings over csrc/cuda/kernels; every op writes into caller tensors)";
  m.def("add_rmsnorm", &add_rmsnorm, "residual += delta; out = RMSNorm(residual) * weight (bf16, in place)",
        py::arg("residual"), py::arg("delta"), py::arg("weight"), py::arg("out"), py::arg("eps"));
  m.def("embedding", &embedding, "out[r] = table[tokens[r]] (bf16; out-of-range ids give a NaN row)",
        py::arg("tokens"), py::arg("table"), py::arg("out"));
  m.def("skinny_gemm", &skinny_gemm,
        "out = x @ w.T for 1..16 rows (batch invariant); + residual, or silu(x @ w.T) * (x @ w_up.T)",
        py::arg("x"), py::arg("w"), py::arg("out"), py::arg("residual") = py::none(), py::arg("w_up") = py::none(),
        py::arg("norm_weight") = py::none(), py::arg("eps") = 1e-5, py::arg("ring_first") = -1, py::arg("pdl") = false);
  m.def("gemm_tc", &any_rows_gemm<&adadecode::gemm_tc>,
        "tensor-core out = x @ w.T for any rows (prefill); same epilogues as skinny_gemm",
        py::arg("x"), py::arg("w"), py::arg("out"), py::arg("residual") = py::none(), py::arg("w_up") = py::none());
  m.def("linear", &any_rows_gemm<&adadecode::linear>,
        "skinny_gemm for <= 16 rows, gemm_tc above", py::arg("x"), py::arg("w"), py::arg("out"),
        py::arg("residual") = py::none(), py::arg("w_up") = py::none());
  m.def("rope_append_kv", &rope_append_kv,
        "RoPE on the q/k parts of qkv (q in place, k into k_cache) and v into v_cache at positions first_pos + r",
        py::arg("qkv"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cos"), py::arg("sin"), py::arg("first_pos"),
        py::arg("n_heads"), py::arg("n_kv_heads"));
  m.def("qkv_rope", &qkv_rope,
        "decode QKV in one launch: [norm] -> x @ wqkv.T -> RoPE, K/V into the caches at first_pos + r (q into qkv_out)",
        py::arg("x"), py::arg("wqkv"), py::arg("qkv_out"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cos"),
        py::arg("sin"), py::arg("first_pos"), py::arg("n_heads"), py::arg("n_kv_heads"), py::arg("norm_weight") = py::none(), py::arg("eps") = 1e-5, py::arg("ring_first") = -1, py::arg("pdl") = false);
  m.def("attention_workspace_floats", &attention_workspace_floats, "fp32 workspace size of attention",
        py::arg("R"), py::arg("n_heads"), py::arg("head_dim"), py::arg("max_ctx"));
  m.def("attention", &attention,
        "causal GQA attention of R rows at first_pos.. against the cache 0..pos (split-sequence, LSE merge; "
        "single_launch: the merge in the last block of each group, else a second kernel)",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("first_pos"), py::arg("out"),
        py::arg("n_heads"), py::arg("max_ctx"), py::arg("workspace") = py::none(), py::arg("single_launch") = true, py::arg("pdl") = false);
  m.attr("attention_counters") = adadecode::kAttnCounters;  // leading workspace floats that must start zero
  m.def("lm_head_workspace_floats", &lm_head_workspace_floats, "fp32 workspace size of lm_head_argmax",
        py::arg("R"), py::arg("n"));
  m.def("lm_head_argmax", &lm_head_argmax,
        "token = argmax(x @ w[subset].T) (lowest id on ties), max_prob and lse via log-sum-exp; no logits written",
        py::arg("x"), py::arg("w"), py::arg("token"), py::arg("max_prob"), py::arg("lse") = py::none(),
        py::arg("vocab_subset") = py::none(), py::arg("w_rest") = py::none(), py::arg("round_bf16") = false,
        py::arg("workspace") = py::none(), py::arg("norm_weight") = py::none(), py::arg("eps") = 1e-5, py::arg("ring_first") = -1, py::arg("pdl") = false);
  m.def("lm_head_sample_workspace_floats", &lm_head_sample_workspace_floats, "fp32 workspace size of lm_head_sample",
        py::arg("R"), py::arg("n"));
  m.def("lm_head_sample", &lm_head_sample,
        "token = the seeded draw (adadecode.engines.sampling) from x @ w[subset].T for positions pos + r; max_prob, "
        "lse as lm_head_argmax",
        py::arg("x"), py::arg("w"), py::arg("token"), py::arg("max_prob"), py::arg("seed"), py::arg("pos"),
        py::arg("inv_temperature"), py::arg("top_k"), py::arg("top_p"), py::arg("lse") = py::none(),
        py::arg("vocab_subset") = py::none(), py::arg("w_rest") = py::none(), py::arg("round_bf16") = false,
        py::arg("workspace") = py::none(), py::arg("norm_weight") = py::none(), py::arg("eps") = 1e-5, py::arg("ring_first") = -1, py::arg("pdl") = false);
}
