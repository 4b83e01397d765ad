// The CUDA engine runtime (see engine.h for the contract and the graph strategy).
#include "engine.h"

#include <cstdio>
#include <sstream>
#include <stdexcept>

#include "../kernels/add_rmsnorm.cuh"
#include "../kernels/attention.cuh"
#include "../kernels/embedding.cuh"
#include "../kernels/gemm_tc.cuh"
#include "../kernels/lm_head.cuh"
#include "../kernels/rope_kv.cuh"
#include "../kernels/skinny_gemm.cuh"

namespace adadecode::rt {
namespace {

[[noreturn]] void throw_cuda(cudaError_t e, const char* expr, const char* file, int line) {
  std::ostringstream s;
  s << "CUDA engine: " << expr << " failed: " << cudaGetErrorName(e) << " (" << cudaGetErrorString(e) << ") at "
    << file << ":" << line;
  throw std::runtime_error(s.str());
}

#define RT_CHECK(expr)                                                  \
  do {                                                                  \
    const cudaError_t rt_err_ = (expr);                                 \
    if (rt_err_ != cudaSuccess) throw_cuda(rt_err_, #expr, __FILE__, __LINE__); \
  } while (0)

constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Rows r = 0..gridDim.x-1: dst[r] = ring[(first + r) % max_rows] (nvec 16-byte vectors per row). Block 0 also
// publishes first to *pos_out (when given) for the captured graph that follows.
__global__ void gather_rows_kernel(const uint4* __restrict__ ring, int max_rows, int first, int nvec,
                                   uint4* __restrict__ dst, int32_t* __restrict__ pos_out) {
  const int r = blockIdx.x;
  const uint4* src = ring + static_cast<size_t>((first + r) % max_rows) * nvec;
  uint4* out = dst + static_cast<size_t>(r) * nvec;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) out[i] = src[i];
  if (pos_out != nullptr && r == 0 && threadIdx.x == 0) *pos_out = first;
}

// Rows r = 0..gridDim.x-1: ring[(*first_pos + r) % max_rows] = src[r].
__global__ void scatter_rows_kernel(const uint4* __restrict__ src, const int32_t* __restrict__ first_pos,
                                    int max_rows, int nvec, uint4* __restrict__ ring) {
  const int r = blockIdx.x;
  uint4* dst = ring + static_cast<size_t>((*first_pos + r) % max_rows) * nvec;
  const uint4* in = src + static_cast<size_t>(r) * nvec;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) dst[i] = in[i];
}

// Rows r = 0..gridDim.x-1: ring[(first + r) % max_rows] = src[r] (by value: run_batch's eager put-back).
__global__ void put_rows_kernel(const uint4* __restrict__ src, int max_rows, int first, int nvec,
                                uint4* __restrict__ ring) {
  const int r = blockIdx.x;
  uint4* dst = ring + static_cast<size_t>((first + r) % max_rows) * nvec;
  const uint4* in = src + static_cast<size_t>(r) * nvec;
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) dst[i] = in[i];
}

constexpr int kCopyThreads = 128;

// Attention workspace: decode (max_rows rows against up to max_seq positions) or a prefill chunk against up to
// kPrefillCtxBudget positions; longer prefill contexts run the chunk's attention in row groups that fit.
constexpr int kPrefillCtxBudget = 8192;
size_t attention_ws_floats(const ModelDims& m, int max_seq, int max_rows, int chunk) {
  const size_t dec = adadecode::attention_workspace_floats(max_rows, m.n_heads, m.head_dim, max_seq);
  const size_t pre = adadecode::attention_workspace_floats(chunk, m.n_heads, m.head_dim,
                                                           max_seq < kPrefillCtxBudget ? max_seq : kPrefillCtxBudget);
  return dec > pre ? dec : pre;
}

struct Layout {  // byte offsets of the workspace buffers inside the arena
  size_t ring, hw, hx, xn, z, qkv, attn, act, attn_ws, lm_ws, pos, iota, tokens, out, sample, total;
};

// Rows per LM-head launch: a final's (max_rows), or up to 16 of a final_batch's greedy rows.
int lm_rows(int max_rows, int max_seqs) {
  const int64_t B = static_cast<int64_t>(max_rows) * max_seqs;
  return static_cast<int>(B < kMaxRows ? B : kMaxRows);
}

Layout layout(const ModelDims& m, int max_seq, int max_rows, int chunk, int max_seqs) {
  const size_t B = static_cast<size_t>(max_rows) * max_seqs;  // every sequence's rows in flight: one step's most
  const size_t P = B > static_cast<size_t>(chunk) ? B : static_cast<size_t>(chunk);
  const size_t qkv_n = static_cast<size_t>(m.n_heads + 2 * m.n_kv_heads) * m.head_dim;
  const size_t attn_floats = attention_ws_floats(m, max_seq, max_rows, chunk);  // one segment's attention at a time
  const size_t lm_floats = adadecode::lm_head_sample_workspace_floats(lm_rows(max_rows, max_seqs), m.vocab);
  Layout L{};
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += align_up(bytes);
    return at;
  };
  L.ring = take(B * m.d * sizeof(bf16));
  L.hw = take(P * m.d * sizeof(bf16));
  L.hx = take(B * m.d * sizeof(bf16));
  L.xn = take(P * m.d * sizeof(bf16));
  L.z = take(static_cast<size_t>(max_rows) * m.d * sizeof(bf16));
  L.qkv = take(P * qkv_n * sizeof(bf16));
  L.attn = take(P * m.n_heads * m.head_dim * sizeof(bf16));
  L.act = take(P * m.ffn * sizeof(bf16));
  L.attn_ws = take(attn_floats * sizeof(float));
  L.lm_ws = take(lm_floats * sizeof(float));
  L.pos = take(sizeof(int32_t));
  L.iota = take(static_cast<size_t>(max_seq) * sizeof(int32_t));
  L.tokens = take(static_cast<size_t>(max_seq) * sizeof(int32_t));
  L.out = take(2 * B * sizeof(int32_t));
  L.sample = take(static_cast<size_t>(max_seqs) * sizeof(adadecode::SampleParams));
  L.total = off;
  return L;
}

__global__ void iota_kernel(int32_t* p, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) p[i] = i;
}

}  // namespace

size_t kv_cache_bytes(const ModelDims& m, int max_seq, int max_seqs) {
  return 2 * static_cast<size_t>(max_seqs) * m.n_layers * max_seq * m.n_kv_heads * m.head_dim * sizeof(bf16);
}

size_t workspace_bytes(const ModelDims& m, int max_seq, int max_rows, int chunk, int max_seqs) {
  return layout(m, max_seq, max_rows, chunk, max_seqs).total;
}

Engine::Engine(const ModelDims& dims, WeightPtrs weights, int max_seq, int max_rows, int prefill_chunk, int device,
               int max_seqs)
    : dims_(dims), w_(std::move(weights)), max_seq_(max_seq), max_rows_(max_rows), chunk_(prefill_chunk),
      device_(device), max_seqs_(max_seqs), out_rows_(0) {
  const ModelDims& m = dims_;
  auto bad = [](const std::string& s) { throw std::invalid_argument("CUDA engine: " + s); };
  if (m.n_layers < 1 || m.d < 8 || m.n_heads < 1 || m.n_kv_heads < 1 || m.ffn < 8 || m.vocab < 1)
    bad("model dimensions must be positive");
  if (m.d % 8 != 0) bad("hidden size " + std::to_string(m.d) + " must be a multiple of 8");
  if (m.ffn % 8 != 0) bad("intermediate size " + std::to_string(m.ffn) + " must be a multiple of 8");
  if (m.window < 0) bad("sliding_window " + std::to_string(m.window) + " must be >= 1 (0: full attention)");
  if (m.qk_norm && m.n_heads + m.n_kv_heads > adadecode::kRopeMaxNormHeads)
    bad("qk_norm with " + std::to_string(m.n_heads + m.n_kv_heads) + " q + kv heads: at most " +
        std::to_string(adadecode::kRopeMaxNormHeads));
  if (m.head_dim != 64 && m.head_dim != 128) bad("head_dim " + std::to_string(m.head_dim) + " is not 64 or 128");
  if (m.n_heads % m.n_kv_heads != 0 || m.n_heads / m.n_kv_heads > 128)
    bad("n_heads " + std::to_string(m.n_heads) + " must be a multiple (at most 128x) of n_kv_heads " +
        std::to_string(m.n_kv_heads));
  if (max_rows < 1 || max_rows > kMaxRows)
    bad("max_rows " + std::to_string(max_rows) + " must be in 1.." + std::to_string(kMaxRows) +
        " (the batch-invariant skinny GEMM takes at most 16 rows)");
  if (max_seq < 1) bad("max_seq must be >= 1");
  if (prefill_chunk < 1) bad("prefill_chunk must be >= 1");
  if (max_seqs < 1 || max_seqs > (1 << 16)) bad("max_seqs must be in 1..65536");
  out_rows_ = max_seqs * max_rows;
  if (static_cast<int>(w_.layers.size()) != m.n_layers)
    bad("got weights of " + std::to_string(w_.layers.size()) + " layers, expected " + std::to_string(m.n_layers));
  auto need = [&](const void* p, const std::string& name) {
    if (p == nullptr) bad(name + " is missing");
    if (!aligned16(p)) bad(name + " is not 16-byte aligned");
  };
  need(w_.embed, "embed");
  need(w_.norm, "norm");
  need(w_.lm_head, "lm_head");
  need(w_.cos, "cos table");
  need(w_.sin, "sin table");
  for (int l = 0; l < m.n_layers; ++l) {
    const LayerPtrs& L = w_.layers[l];
    const std::string p = "layer " + std::to_string(l) + " ";
    need(L.attn_norm, p + "attn_norm");
    need(L.wqkv, p + "wqkv");
    need(L.wo, p + "wo");
    need(L.mlp_norm, p + "mlp_norm");
    need(L.w_gate, p + "w_gate");
    need(L.w_up, p + "w_up");
    if (m.qkv_bias) need(L.bqkv, p + "bqkv (qkv_bias is set)");
    if (m.qk_norm) need(L.q_norm, p + "q_norm (qk_norm is set)"), need(L.k_norm, p + "k_norm (qk_norm is set)");
    need(L.w_down, p + "w_down");
  }
  qkv_n_ = (m.n_heads + 2 * m.n_kv_heads) * m.head_dim;
  layer_kv_elems_ = static_cast<size_t>(max_seq) * m.n_kv_heads * m.head_dim;
  kv_bytes_ = kv_cache_bytes(m, max_seq, max_seqs);
  const Layout lay = layout(m, max_seq, max_rows, prefill_chunk, max_seqs);
  ws_bytes_ = lay.total;
  attn_ws_floats_ = attention_ws_floats(m, max_seq, max_rows, prefill_chunk);

  RT_CHECK(cudaSetDevice(device_));
  try {
    auto oom = [&](const char* what, size_t bytes, cudaError_t e) {
      size_t free_b = 0, total_b = 0;
      cudaGetLastError();
      cudaMemGetInfo(&free_b, &total_b);
      std::ostringstream s;
      s << "CUDA engine: " << what << " of " << gib(bytes) << " does not fit on CUDA device " << device_ << ": KV cache of ";
      if (max_seqs > 1) s << max_seqs << " sequences x ";
      s << "max_seq=" << max_seq << " x " << m.n_layers << " layers x " << m.n_kv_heads << " kv heads x head_dim " << m.head_dim
        << " = " << gib(kv_bytes_) << " (bf16) + workspace for max_rows=" << max_rows << ", prefill chunk "
        << prefill_chunk << " = " << gib(ws_bytes_) << "; " << gib(free_b) << " free of " << gib(total_b) << " ("
        << cudaGetErrorString(e) << ")";
      throw OutOfMemory(s.str());
    };
    size_t free_b = 0, total_b = 0;
    RT_CHECK(cudaMemGetInfo(&free_b, &total_b));
    if (kv_bytes_ + ws_bytes_ > free_b) oom("KV cache and workspace", kv_bytes_ + ws_bytes_, cudaErrorMemoryAllocation);
    cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&kv_), kv_bytes_);
    if (e != cudaSuccess) {
      kv_ = nullptr;
      oom("KV cache", kv_bytes_, e);
    }
    e = cudaMalloc(reinterpret_cast<void**>(&arena_), ws_bytes_);
    if (e != cudaSuccess) {
      arena_ = nullptr;
      oom("workspace", ws_bytes_, e);
    }
    e = cudaMallocHost(reinterpret_cast<void**>(&h_out_), 2 * static_cast<size_t>(out_rows_) * sizeof(int32_t));
    if (e != cudaSuccess) {
      h_out_ = nullptr;
      cudaGetLastError();
      throw OutOfMemory(std::string("CUDA engine: pinned host buffer of ") +
                        std::to_string(2 * out_rows_ * sizeof(int32_t)) + " bytes: " + cudaGetErrorString(e));
    }
    e = cudaMallocHost(reinterpret_cast<void**>(&h_sample_), static_cast<size_t>(max_seqs) * sizeof(SampleParams));
    if (e != cudaSuccess) {
      h_sample_ = nullptr;
      cudaGetLastError();
      throw OutOfMemory(std::string("CUDA engine: pinned host buffer for the sampling settings: ") +
                        cudaGetErrorString(e));
    }
    RT_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));

    ring_ = reinterpret_cast<bf16*>(arena_ + lay.ring);
    hw_ = reinterpret_cast<bf16*>(arena_ + lay.hw);
    hx_ = reinterpret_cast<bf16*>(arena_ + lay.hx);
    xn_ = reinterpret_cast<bf16*>(arena_ + lay.xn);
    z_ = reinterpret_cast<bf16*>(arena_ + lay.z);
    qkv_ = reinterpret_cast<bf16*>(arena_ + lay.qkv);
    attn_ = reinterpret_cast<bf16*>(arena_ + lay.attn);
    act_ = reinterpret_cast<bf16*>(arena_ + lay.act);
    attn_ws_ = reinterpret_cast<float*>(arena_ + lay.attn_ws);
    lm_ws_ = reinterpret_cast<float*>(arena_ + lay.lm_ws);
    d_pos_ = reinterpret_cast<int32_t*>(arena_ + lay.pos);
    d_iota_ = reinterpret_cast<int32_t*>(arena_ + lay.iota);
    d_tokens_ = reinterpret_cast<int32_t*>(arena_ + lay.tokens);
    d_out_ = reinterpret_cast<int32_t*>(arena_ + lay.out);
    d_sample_ = reinterpret_cast<SampleParams*>(arena_ + lay.sample);

    // Defined contents everywhere (the cache past a sequence's length is never read, but zeros make any slip
    // reproducible), positions 0..max_seq-1 for the prefill chunks.
    RT_CHECK(cudaMemsetAsync(kv_, 0, kv_bytes_, stream_));
    RT_CHECK(cudaMemsetAsync(arena_, 0, ws_bytes_, stream_));
    pdl_ = adadecode::pdl_supported(device_);
    iota_kernel<<<(max_seq + 255) / 256, 256, 0, stream_>>>(d_iota_, max_seq);
    RT_CHECK(cudaGetLastError());
    RT_CHECK(cudaStreamSynchronize(stream_));
  } catch (...) {
    release();
    throw;
  }
}

Engine::~Engine() { release(); }

void Engine::release() {
  if (stream_) cudaStreamSynchronize(stream_);
  free_graphs(layer_graphs_);
  if (kv_) cudaFree(kv_);
  if (arena_) cudaFree(arena_);
  if (h_out_) cudaFreeHost(h_out_);
  if (h_sample_) cudaFreeHost(h_sample_);
  if (stream_) cudaStreamDestroy(stream_);
  kv_ = nullptr;
  arena_ = nullptr;
  h_out_ = nullptr;
  h_sample_ = nullptr;
  stream_ = nullptr;
  cudaGetLastError();
}

void Engine::free_graphs(std::map<Key, Graph>& m) {
  for (auto& kv : m)
    if (kv.second.exec) cudaGraphExecDestroy(kv.second.exec);
  m.clear();
}

void Engine::check_seq(const char* what, int seq) const {
  if (seq < 0 || seq >= max_seqs_) {
    std::ostringstream s;
    s << "CUDA engine: " << what << ": sequence " << seq << " outside 0.." << max_seqs_ - 1;
    throw std::out_of_range(s.str());
  }
}

void Engine::check_rows(const char* what, int first, int last) const {
  const int R = last - first + 1;
  if (first < 0 || last >= max_seq_ || R < 1 || R > max_rows_) {
    std::ostringstream s;
    s << "CUDA engine: " << what << ": rows " << first << ".." << last << " must be 1.." << max_rows_
      << " rows inside 0.." << max_seq_ - 1;
    throw std::out_of_range(s.str());
  }
}

void Engine::check_layers(int l0, int l1) const {
  if (l0 < 0 || l0 >= l1 || l1 > dims_.n_layers)
    throw std::out_of_range("CUDA engine: run_layers: layers [" + std::to_string(l0) + ", " + std::to_string(l1) +
                            ") outside 0.." + std::to_string(dims_.n_layers));
}

void Engine::gather(int seq, int first, int R, bf16* dst, int32_t* pos_out) {
  gather_rows_kernel<<<R, kCopyThreads, 0, stream_>>>(reinterpret_cast<const uint4*>(ring_of(seq)), max_rows_, first,
                                                       dims_.d / 8, reinterpret_cast<uint4*>(dst), pos_out);
  RT_CHECK(cudaGetLastError());
}

void Engine::put_back(int seq, int first, int R, const bf16* src) {
  put_rows_kernel<<<R, kCopyThreads, 0, stream_>>>(reinterpret_cast<const uint4*>(src), max_rows_, first, dims_.d / 8,
                                                    reinterpret_cast<uint4*>(ring_of(seq)));
  RT_CHECK(cudaGetLastError());
}

// Layers [l0, l1) over rows hw_[0..R), the spans' rows end to end. Every launch on stream_, nothing else: capturable.
// Decode rows (R <= kMaxRows) take the fused path unless set_fused(false): 5 launches per layer, each bit for bit
// the unfused sequence it replaces (the RMSNorms in the prologues of the QKV and gate/up GEMMs, RoPE and the K/V
// append in the QKV epilogue, the residual adds in the o_proj and down epilogues, attention in one launch).
// Several spans (a run_batch's layer: decode rows of several sequences): the GEMMs take every row, in skinny
// launches of at most kMaxRows rows (never the tensor cores: a row's bits are those it gets alone), and RoPE + the
// K/V append and attention run per span, on the span's sequence's cache at its positions.
void Engine::enqueue_layer_body(int R, int l0, int l1, const std::vector<Span>& spans, int max_ctx) {
  const ModelDims& m = dims_;
  const int d = m.d, H = m.n_heads, Hkv = m.n_kv_heads, hd = m.head_dim, qn = H * hd;
  cudaStream_t s = stream_;
  const bool batch = spans.size() > 1;
  const bool fused = fused_ && (batch || R <= kMaxRows);
  // A GEMM over rows [0, R): one launch (linear picks its kernel by R), or for a batch groups of kMaxRows rows.
  auto by_rows = [&](auto&& gemm) {
    if (!batch) return gemm(0, R);
    for (int r0 = 0; r0 < R; r0 += kMaxRows) gemm(r0, R - r0 < kMaxRows ? R - r0 : kMaxRows);
  };
  for (int l = l0; l < l1; ++l) {
    const LayerPtrs& L = w_.layers[l];
    const bf16* bias = m.qkv_bias ? L.bqkv : nullptr;
    const bf16* qn_w = m.qk_norm ? L.q_norm : nullptr;
    const bf16* kn_w = m.qk_norm ? L.k_norm : nullptr;
    if (fused && !m.qk_norm && !batch) {
      const Span& sp = spans[0];
      RT_CHECK(adadecode::skinny_qkv_rope(adadecode::XRows{hw_}, adadecode::RowNorm{L.attn_norm, m.eps}, L.wqkv, qkv_,
                                          k_cache(sp.seq, l), v_cache(sp.seq, l), w_.cos, w_.sin, sp.pos, R, d, H, Hkv,
                                          hd, max_seq_, s, pdl_, bias));
    } else {
      // Qwen3 (the head norms need whole heads, which the fused QKV kernel's blocks do not own), a batch (the fused
      // kernel appends to one cache) or unfused: the QKV GEMM, then RoPE + the K/V append per span
      if (fused) {
        by_rows([&](int r0, int n) {
          RT_CHECK(adadecode::skinny_gemm(adadecode::XRows{hw_ + static_cast<size_t>(r0) * d},
                                          adadecode::RowNorm{L.attn_norm, m.eps}, L.wqkv, nullptr, nullptr,
                                          qkv_ + static_cast<size_t>(r0) * qkv_n_, n, qkv_n_, d, s, pdl_, bias));
        });
      } else {
        RT_CHECK(adadecode::add_rmsnorm(hw_, nullptr, L.attn_norm, xn_, R, d, m.eps, s));
        by_rows([&](int r0, int n) {
          RT_CHECK(adadecode::linear(xn_ + static_cast<size_t>(r0) * d, L.wqkv, nullptr, nullptr,
                                     qkv_ + static_cast<size_t>(r0) * qkv_n_, n, qkv_n_, d, s, bias));
        });
      }
      for (const Span& sp : spans)
        RT_CHECK(adadecode::rope_append_kv(qkv_ + static_cast<size_t>(sp.r0) * qkv_n_, k_cache(sp.seq, l),
                                           v_cache(sp.seq, l), w_.cos, w_.sin, sp.pos, sp.R, H, Hkv, hd, max_seq_, s,
                                           qn_w, kn_w, m.eps));
    }
    // Per span, rows [r0, r0 + n) per attention launch, n bounded by the workspace (decode: all its rows in one).
    for (const Span& sp : spans) {
      for (int r0 = 0; r0 < sp.R;) {
        int n = sp.R - r0;
        while (n > 1 && adadecode::attention_workspace_floats(n, H, hd, max_ctx) > attn_ws_floats_) n = (n + 1) / 2;
        // Decode passes the single int d_pos_: `pos + r0` is only a position array in prefill and run_batch
        // (d_iota_). The workspace is sized for max_rows decode rows over max_seq, so decode never splits; keep it so.
        if (sp.pos == d_pos_ && n != sp.R) throw std::logic_error("CUDA engine: decode attention would split its rows");
        const size_t row = static_cast<size_t>(sp.r0 + r0);
        RT_CHECK(adadecode::attention(qkv_ + row * qkv_n_, qkv_n_, k_cache(sp.seq, l), v_cache(sp.seq, l), sp.pos + r0,
                                      attn_ + row * qn, attn_ws_, n, H, Hkv, hd, max_ctx, s,
                                      /*single_launch=*/fused, /*pdl=*/fused && pdl_, m.window));
        r0 += n;
      }
    }
    if (fused) {
      const adadecode::RowNorm none{};
      by_rows([&](int r0, int n) {
        bf16* h = hw_ + static_cast<size_t>(r0) * d;
        RT_CHECK(adadecode::skinny_gemm(adadecode::XRows{attn_ + static_cast<size_t>(r0) * qn}, none, L.wo, nullptr,
                                        h, h, n, d, qn, s, pdl_));
      });
      by_rows([&](int r0, int n) {
        RT_CHECK(adadecode::skinny_gemm(adadecode::XRows{hw_ + static_cast<size_t>(r0) * d},
                                        adadecode::RowNorm{L.mlp_norm, m.eps}, L.w_gate, L.w_up, nullptr,
                                        act_ + static_cast<size_t>(r0) * m.ffn, n, m.ffn, d, s, pdl_));
      });
      by_rows([&](int r0, int n) {
        bf16* h = hw_ + static_cast<size_t>(r0) * d;
        RT_CHECK(adadecode::skinny_gemm(adadecode::XRows{act_ + static_cast<size_t>(r0) * m.ffn}, none, L.w_down,
                                        nullptr, h, h, n, d, m.ffn, s, pdl_));
      });
      continue;
    }
    by_rows([&](int r0, int n) {  // h += o_proj(attn), in place
      bf16* h = hw_ + static_cast<size_t>(r0) * d;
      RT_CHECK(adadecode::linear(attn_ + static_cast<size_t>(r0) * qn, L.wo, nullptr, h, h, n, d, qn, s));
    });
    RT_CHECK(adadecode::add_rmsnorm(hw_, nullptr, L.mlp_norm, xn_, R, d, m.eps, s));
    by_rows([&](int r0, int n) {  // silu(gate) * up
      RT_CHECK(adadecode::linear(xn_ + static_cast<size_t>(r0) * d, L.w_gate, L.w_up, nullptr,
                                 act_ + static_cast<size_t>(r0) * m.ffn, n, m.ffn, d, s));
    });
    by_rows([&](int r0, int n) {  // h += down(act)
      bf16* h = hw_ + static_cast<size_t>(r0) * d;
      RT_CHECK(adadecode::linear(act_ + static_cast<size_t>(r0) * m.ffn, L.w_down, nullptr, h, h, n, d, m.ffn, s));
    });
  }
}

void Engine::enqueue_layers(int seq, int R, int l0, int l1) {
  enqueue_layer_body(R, l0, l1, {Span{seq, 0, R, d_pos_}}, max_seq_);
  scatter_rows_kernel<<<R, kCopyThreads, 0, stream_>>>(reinterpret_cast<const uint4*>(hw_), d_pos_, max_rows_,
                                                        dims_.d / 8, reinterpret_cast<uint4*>(ring_of(seq)));
  RT_CHECK(cudaGetLastError());
}

void Engine::enqueue_readback() {
  RT_CHECK(cudaMemcpyAsync(h_out_, d_out_, 2 * static_cast<size_t>(out_rows_) * sizeof(int32_t),
                           cudaMemcpyDeviceToHost, stream_));
}

// Final norm + LM head (+ sampling) of rows first..first+R-1, then the read-back copy. Launched eagerly (a graph
// would freeze `first`): fused, the LM head reads the ring slots in place with the norm in its prologue (2 kernels
// greedy); unfused, gather + add_rmsnorm + LM head.
void Engine::enqueue_final(int seq, int first, int R, bool sample) {
  const ModelDims& m = dims_;
  float* probs = reinterpret_cast<float*>(d_out_ + out_rows_);
  adadecode::XRows x{ring_of(seq), first, max_rows_};
  adadecode::RowNorm norm{w_.norm, m.eps};
  if (!fused_) {
    gather(seq, first, R, hx_, nullptr);
    RT_CHECK(adadecode::add_rmsnorm(hx_, nullptr, w_.norm, xn_, R, m.d, m.eps, stream_));
    x = adadecode::XRows{xn_};
    norm = adadecode::RowNorm{};
  }
  if (sample)
    RT_CHECK(adadecode::lm_head_sample(x, norm, w_.lm_head, nullptr, m.vocab, nullptr, d_sample_, d_out_, probs,
                                       nullptr, lm_ws_, R, m.d, /*round_bf16=*/true, stream_, pdl()));
  else
    RT_CHECK(adadecode::lm_head_argmax(x, norm, w_.lm_head, nullptr, m.vocab, nullptr, d_out_, probs, nullptr, lm_ws_,
                                       R, m.d, /*round_bf16=*/true, stream_, pdl()));
  enqueue_readback();
}

// Head i on row pos: norm + T (fused: one skinny launch reading the ring slot) + LM head over the head's vocabulary.
void Engine::enqueue_head(int seq, int pos, int i, bool sample) {
  const ModelDims& m = dims_;
  const HeadPtrs& h = heads_.at(i);
  float* probs = reinterpret_cast<float*>(d_out_ + out_rows_);
  if (fused_) {
    RT_CHECK(adadecode::skinny_gemm(adadecode::XRows{ring_of(seq), pos, max_rows_}, adadecode::RowNorm{w_.norm, m.eps},
                                    h.T, nullptr, nullptr, z_, 1, m.d, m.d, stream_, pdl()));
  } else {
    gather(seq, pos, 1, hx_, nullptr);
    RT_CHECK(adadecode::add_rmsnorm(hx_, nullptr, w_.norm, xn_, 1, m.d, m.eps, stream_));
    RT_CHECK(adadecode::skinny_gemm(xn_, h.T, nullptr, nullptr, z_, 1, m.d, m.d, stream_));
  }
  const adadecode::XRows z{z_};
  if (sample)
    RT_CHECK(adadecode::lm_head_sample(z, adadecode::RowNorm{}, w_.lm_head, h.vocab, h.n_vocab, h.w_rest, d_sample_,
                                       d_out_, probs, nullptr, lm_ws_, 1, m.d, /*round_bf16=*/true, stream_, pdl()));
  else
    RT_CHECK(adadecode::lm_head_argmax(z, adadecode::RowNorm{}, w_.lm_head, h.vocab, h.n_vocab, h.w_rest, d_out_,
                                       probs, nullptr, lm_ws_, 1, m.d, /*round_bf16=*/true, stream_, pdl()));
  enqueue_readback();
}

void Engine::set_sample_params(int slot, const SampleParams& p, int pos) {
  if (!(p.inv_temperature > 0.f) || !(p.top_p > 0.0 && p.top_p <= 1.0) || p.top_k < 0)
    throw std::invalid_argument("CUDA engine: sampling needs inv_temperature > 0, top_p in (0, 1], top_k >= 0");
  h_sample_[slot] = p;  // the previous call that used it has synchronized
  h_sample_[slot].pos = pos;
  RT_CHECK(cudaMemcpyAsync(d_sample_ + slot, h_sample_ + slot, sizeof(SampleParams), cudaMemcpyHostToDevice, stream_));
}

template <typename F>
cudaGraphExec_t Engine::capture(F&& body, const std::string& what) {
  // Nothing of an earlier call may still be pending when the capture starts (it would not be part of the
  // graph anyway; the sync makes errors of the eager first run surface here, named).
  RT_CHECK(cudaStreamSynchronize(stream_));
  RT_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
  try {
    body();
  } catch (...) {
    cudaGraph_t g = nullptr;
    cudaStreamEndCapture(stream_, &g);
    if (g) cudaGraphDestroy(g);
    cudaGetLastError();
    throw;
  }
  cudaGraph_t g = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream_, &g);
  if (end != cudaSuccess) {
    if (g) cudaGraphDestroy(g);
    throw_cuda(end, ("cudaStreamEndCapture (" + what + ")").c_str(), __FILE__, __LINE__);
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, g, 0);
  cudaGraphDestroy(g);
  if (inst != cudaSuccess) throw_cuda(inst, ("cudaGraphInstantiate (" + what + ")").c_str(), __FILE__, __LINE__);
  return exec;
}

// Replays the graph of `key` from `cache`, or, on the first call of that key, runs `body` eagerly (which also
// performs any one-time initialisation a kernel launcher does outside of capture) and captures it for later.
template <typename F>
void Engine::run_cached(std::map<Key, Graph>& cache, const Key& key, F&& body, const std::string& what) {
  if (!use_graphs_) {
    body();
    return;
  }
  auto it = cache.find(key);
  if (it != cache.end()) {
    RT_CHECK(cudaGraphLaunch(it->second.exec, stream_));
    return;
  }
  body();
  if (cache.size() >= kMaxGraphsPerCache) free_graphs(cache);  // bounded: a pathological key sequence re-captures
  cache[key] = Graph{capture(body, what)};
}

void Engine::prefill(int seq, const int32_t* tokens, int n, int start) {
  const ModelDims& m = dims_;
  check_seq("prefill", seq);
  if (n < 1 || start < 0 || start > max_seq_ - n) {
    throw std::out_of_range("CUDA engine: prefill of " + std::to_string(n) + " tokens from position " +
                            std::to_string(start) + ": need 1.." + std::to_string(max_seq_) + " positions (max_seq)");
  }
  for (int i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= m.vocab)
      throw std::out_of_range("CUDA engine: token id " + std::to_string(tokens[i]) + " is outside the vocabulary");
  RT_CHECK(cudaSetDevice(device_));
  RT_CHECK(cudaMemcpyAsync(d_tokens_, tokens, static_cast<size_t>(n) * sizeof(int32_t), cudaMemcpyHostToDevice,
                           stream_));
  int s = 0, mrows = 0;
  for (; s < n; s += chunk_) {  // chunks from `start`: whole-chunk pieces keep the chunks (and the bits) of one call
    mrows = n - s < chunk_ ? n - s : chunk_;
    RT_CHECK(adadecode::embedding(d_tokens_ + s, w_.embed, hw_, mrows, m.d, m.vocab, stream_));
    enqueue_layer_body(mrows, 0, m.n_layers, {Span{seq, 0, mrows, d_iota_ + start + s}}, start + s + mrows);
  }
  s -= chunk_;  // start of the last chunk
  RT_CHECK(cudaMemcpyAsync(ring_row(seq, start + n - 1), hw_ + static_cast<size_t>(n - 1 - s) * m.d,
                           m.d * sizeof(bf16), cudaMemcpyDeviceToDevice, stream_));
  RT_CHECK(cudaStreamSynchronize(stream_));  // `tokens` (pageable) is read by then; errors surface here
}

void Engine::embed(int seq, int pos, int token) {
  check_seq("embed", seq);
  if (pos < 0 || pos >= max_seq_)
    throw std::out_of_range("CUDA engine: embed at position " + std::to_string(pos) + " outside 0.." +
                            std::to_string(max_seq_ - 1));
  if (token < 0 || token >= dims_.vocab)
    throw std::out_of_range("CUDA engine: token id " + std::to_string(token) + " is outside the vocabulary");
  RT_CHECK(cudaMemcpyAsync(ring_row(seq, pos), w_.embed + static_cast<size_t>(token) * dims_.d,
                           dims_.d * sizeof(bf16), cudaMemcpyDeviceToDevice, stream_));
}

void Engine::run_layers(int seq, int first, int last, int l0, int l1) {
  check_seq("run_layers", seq);
  check_rows("run_layers", first, last);
  check_layers(l0, l1);
  const int R = last - first + 1;
  gather(seq, first, R, hw_, d_pos_);
  run_cached(layer_graphs_, Key{seq, R, l0, l1}, [&] { enqueue_layers(seq, R, l0, l1); },
             "run_layers seq " + std::to_string(seq) + " R=" + std::to_string(R) + " layers [" + std::to_string(l0) +
                 ", " + std::to_string(l1) + ")");
}

void Engine::run_batch(const std::vector<Segment>& segs) {
  if (segs.empty()) throw std::out_of_range("CUDA engine: run_batch: no segments");
  std::vector<char> seen(max_seqs_, 0);
  int lo = dims_.n_layers, hi = 0;
  for (const Segment& g : segs) {  // every segment checked before any runs
    check_seq("run_layers", g.seq);
    check_rows("run_layers", g.first, g.last);
    check_layers(g.l0, g.l1);
    if (seen[g.seq]++)
      throw std::out_of_range("CUDA engine: run_batch: two segments of sequence " + std::to_string(g.seq));
    lo = g.l0 < lo ? g.l0 : lo;
    hi = g.l1 > hi ? g.l1 : hi;
  }
  if (segs.size() == 1) {  // one sequence: run_layers' graphs
    run_layers(segs[0].seq, segs[0].first, segs[0].last, segs[0].l0, segs[0].l1);
    return;
  }
  RT_CHECK(cudaSetDevice(device_));
  // Layer by layer, the rows of the segments that run it sit end to end in hw_ (in the segments' order); where that
  // set changes, the rows go back to their rings and the new set is gathered.
  std::vector<int> active, want;
  std::vector<Span> spans;
  int R = 0;
  auto put_all = [&] {  // spans[i] holds the rows of segment active[i]
    for (size_t i = 0; i < spans.size(); ++i)
      put_back(spans[i].seq, segs[active[i]].first, spans[i].R, hw_ + static_cast<size_t>(spans[i].r0) * dims_.d);
  };
  for (int l = lo; l < hi; ++l) {
    want.clear();
    for (int i = 0; i < static_cast<int>(segs.size()); ++i)
      if (segs[i].l0 <= l && l < segs[i].l1) want.push_back(i);
    if (want != active) {
      put_all();
      active = want;
      spans.clear();
      R = 0;
      for (int i : active) {
        const Segment& g = segs[i];
        const int n = g.last - g.first + 1;
        spans.push_back(Span{g.seq, R, n, d_iota_ + g.first});
        gather(g.seq, g.first, n, hw_ + static_cast<size_t>(R) * dims_.d, nullptr);
        R += n;
      }
    }
    if (R) enqueue_layer_body(R, l, l + 1, spans, max_seq_);
  }
  put_all();
}

void Engine::final_tokens(int seq, int first, int last, int32_t* tokens, float* probs, const SampleParams* sampling) {
  check_seq("final", seq);
  check_rows("final", first, last);
  const int R = last - first + 1;
  const bool sample = sampling != nullptr;
  if (sample) set_sample_params(0, *sampling, first + 1);
  enqueue_final(seq, first, R, sample);
  RT_CHECK(cudaStreamSynchronize(stream_));
  for (int r = 0; r < R; ++r) {
    tokens[r] = h_out_[r];
    std::memcpy(&probs[r], &h_out_[out_rows_ + r], sizeof(float));
  }
}

void Engine::final_batch(const std::vector<FinalItem>& items, int32_t* tokens, float* probs) {
  if (items.empty()) throw std::out_of_range("CUDA engine: final_batch: no items");
  std::vector<char> seen(max_seqs_, 0);
  for (const FinalItem& it : items) {
    check_seq("final", it.seq);
    check_rows("final", it.first, it.last);
    if (seen[it.seq]++) throw std::out_of_range("CUDA engine: final_batch: two items of sequence " + std::to_string(it.seq));
  }
  if (items.size() == 1) {
    final_tokens(items[0].seq, items[0].first, items[0].last, tokens, probs, items[0].sampling);
    return;
  }
  const ModelDims& m = dims_;
  // Rows gathered into hx_, the greedy items' first (one LM head over them, up to kMaxRows rows a launch), then each
  // sampled item's (a launch of its own, its settings in slot k of d_sample_).
  std::vector<int> at(items.size());  // each item's first row in hx_ (and in the read-back)
  int R = 0;
  for (int pass = 0; pass < 2; ++pass)
    for (size_t i = 0; i < items.size(); ++i)
      if ((items[i].sampling != nullptr) == (pass == 1)) at[i] = R, R += items[i].last - items[i].first + 1;
  int greedy = 0;
  for (const FinalItem& it : items)
    if (it.sampling == nullptr) greedy += it.last - it.first + 1;
  RT_CHECK(cudaSetDevice(device_));
  int slot = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const FinalItem& it = items[i];
    if (it.sampling) set_sample_params(slot++, *it.sampling, it.first + 1);  // checked before any launch
  }
  for (size_t i = 0; i < items.size(); ++i)
    gather(items[i].seq, items[i].first, items[i].last - items[i].first + 1, hx_ + static_cast<size_t>(at[i]) * m.d,
           nullptr);
  const bf16* x = hx_;
  adadecode::RowNorm norm{w_.norm, m.eps};
  if (!fused_) {  // the unfused final: add_rmsnorm into xn_, then the LM head on it
    RT_CHECK(adadecode::add_rmsnorm(hx_, nullptr, w_.norm, xn_, R, m.d, m.eps, stream_));
    x = xn_;
    norm = adadecode::RowNorm{};
  }
  float* d_probs = reinterpret_cast<float*>(d_out_ + out_rows_);
  for (int r0 = 0; r0 < greedy; r0 += kMaxRows) {
    const int n = greedy - r0 < kMaxRows ? greedy - r0 : kMaxRows;
    RT_CHECK(adadecode::lm_head_argmax(adadecode::XRows{x + static_cast<size_t>(r0) * m.d}, norm, w_.lm_head, nullptr,
                                       m.vocab, nullptr, d_out_ + r0, d_probs + r0, nullptr, lm_ws_, n, m.d,
                                       /*round_bf16=*/true, stream_, pdl()));
  }
  slot = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    const FinalItem& it = items[i];
    if (!it.sampling) continue;
    RT_CHECK(adadecode::lm_head_sample(adadecode::XRows{x + static_cast<size_t>(at[i]) * m.d}, norm, w_.lm_head, nullptr,
                                       m.vocab, nullptr, d_sample_ + slot++, d_out_ + at[i], d_probs + at[i], nullptr,
                                       lm_ws_, it.last - it.first + 1, m.d, /*round_bf16=*/true, stream_, pdl()));
  }
  enqueue_readback();
  RT_CHECK(cudaStreamSynchronize(stream_));
  int out = 0;
  for (size_t i = 0; i < items.size(); ++i)
    for (int r = 0; r < items[i].last - items[i].first + 1; ++r, ++out) {
      tokens[out] = h_out_[at[i] + r];
      std::memcpy(&probs[out], &h_out_[out_rows_ + at[i] + r], sizeof(float));
    }
}

void Engine::final_normed(int seq, int first, int last, bf16* dst) {
  check_seq("final_normed", seq);
  check_rows("final_normed", first, last);
  const int R = last - first + 1;
  gather(seq, first, R, hx_, nullptr);
  RT_CHECK(adadecode::add_rmsnorm(hx_, nullptr, w_.norm, dst, R, dims_.d, dims_.eps, stream_));
  RT_CHECK(cudaStreamSynchronize(stream_));
}

void Engine::set_heads(std::vector<HeadPtrs> heads) {
  for (size_t i = 0; i < heads.size(); ++i) {
    const HeadPtrs& h = heads[i];
    const std::string p = "CUDA engine: head " + std::to_string(i) + ": ";
    if (h.layer < 0 || h.layer > dims_.n_layers) throw std::invalid_argument(p + "layer outside 0..L");
    if (h.T == nullptr || !aligned16(h.T)) throw std::invalid_argument(p + "T missing or not 16-byte aligned");
    if (h.w_rest != nullptr && !aligned16(h.w_rest)) throw std::invalid_argument(p + "w_rest not 16-byte aligned");
    if (h.vocab == nullptr ? h.n_vocab != dims_.vocab : (h.n_vocab < 1 || h.n_vocab > dims_.vocab))
      throw std::invalid_argument(p + "vocabulary of " + std::to_string(h.n_vocab) + " ids, model vocab " +
                                  std::to_string(dims_.vocab));
  }
  RT_CHECK(cudaStreamSynchronize(stream_));  // launches of the old heads may still run
  heads_ = std::move(heads);
}

std::pair<int32_t, float> Engine::head(int seq, int pos, int i, const SampleParams* sampling) {
  if (i < 0 || i >= static_cast<int>(heads_.size()))
    throw std::out_of_range("CUDA engine: head index " + std::to_string(i) + " outside 0.." +
                            std::to_string(static_cast<int>(heads_.size()) - 1));
  check_seq("head", seq);
  check_rows("head", pos, pos);
  const bool sample = sampling != nullptr;
  if (sample) set_sample_params(0, *sampling, pos + 1);
  enqueue_head(seq, pos, i, sample);
  RT_CHECK(cudaStreamSynchronize(stream_));
  float p;
  std::memcpy(&p, &h_out_[out_rows_], sizeof(float));
  return {h_out_[0], p};
}

void Engine::copy_row(int seq, int pos, bf16* dst) {
  check_seq("hidden", seq);
  check_rows("hidden", pos, pos);
  RT_CHECK(cudaMemcpyAsync(dst, ring_row(seq, pos), dims_.d * sizeof(bf16), cudaMemcpyDeviceToDevice, stream_));
  RT_CHECK(cudaStreamSynchronize(stream_));
}

void Engine::copy_kv(int seq, int layer, int length, bf16* k_dst, bf16* v_dst) {
  check_seq("kv", seq);
  if (layer < 0 || layer >= dims_.n_layers || length < 0 || length > max_seq_)
    throw std::out_of_range("CUDA engine: kv of layer " + std::to_string(layer) + ", length " +
                            std::to_string(length) + " is outside the cache");
  const size_t bytes = static_cast<size_t>(length) * dims_.n_kv_heads * dims_.head_dim * sizeof(bf16);
  if (bytes) {
    RT_CHECK(cudaMemcpyAsync(k_dst, k_cache(seq, layer), bytes, cudaMemcpyDeviceToDevice, stream_));
    RT_CHECK(cudaMemcpyAsync(v_dst, v_cache(seq, layer), bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  RT_CHECK(cudaStreamSynchronize(stream_));
}

void Engine::set_fused(bool on) {
  if (on == fused_) return;
  RT_CHECK(cudaStreamSynchronize(stream_));
  free_graphs(layer_graphs_);  // captured with the other kernels
  fused_ = on;
}

void Engine::synchronize() { RT_CHECK(cudaStreamSynchronize(stream_)); }

}  // namespace adadecode::rt
