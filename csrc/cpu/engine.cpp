// The CPU engine runtime (engine.h: the contract, the state, the jobs of a layer).
#include "engine.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "../common/fixed_math.h"

namespace adadecode::cpu {
namespace {

[[noreturn]] void bad(const std::string& why) { throw std::invalid_argument("CPU engine: " + why); }

// Output columns per item of a column-split job: enough bytes per item (16 columns of K = 576 bf16 are 18 KB) that
// claiming costs nothing, few enough that a thread that stalls holds back little.
constexpr int kColsPerItem = 16;
constexpr int kVocabPerItem = 32;
constexpr int kRowBlock = 16;  // attention: rows per item (a decode call is one block)

inline uint16_t bf16_bits(float f) {  // f already a bf16 value
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace

size_t available_memory() {
#if defined(__linux__)
  if (FILE* f = std::fopen("/proc/meminfo", "r")) {
    char line[256];
    unsigned long long kb = 0;
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "MemAvailable: %llu kB", &kb) == 1) break;
    std::fclose(f);
    if (kb) return static_cast<size_t>(kb) * 1024;
  }
#endif
  return SIZE_MAX;  // unknown: the allocation itself decides
}

size_t kv_cache_bytes(const ModelDims& m, int64_t max_seq, int64_t max_seqs) {
  const size_t per_position = static_cast<size_t>(m.n_layers) * m.n_kv_heads * m.head_dim * sizeof(uint16_t);
  const size_t k_positions = static_cast<size_t>((max_seq + kKBlock - 1) / kKBlock) * kKBlock;  // whole K blocks
  return static_cast<size_t>(max_seqs) * per_position * (k_positions + static_cast<size_t>(max_seq));  // every region
}

// ---- buffers ------------------------------------------------------------------------------------------------------
template <class T>
Buffer<T>::Buffer(size_t n, const char* what) : n_(n) {
  if (n == 0) return;
  const size_t bytes = n * sizeof(T);
  const size_t align = bytes >= (size_t{4} << 20) ? (size_t{2} << 20) : 64;
  const size_t rounded = (bytes + align - 1) / align * align;
  void* p = std::aligned_alloc(align, rounded);
  if (p == nullptr) throw OutOfMemory(std::string("CPU engine: ") + what + " of " + gib(bytes) + " does not fit in memory");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (align > 64) madvise(p, rounded, MADV_HUGEPAGE);
#endif
  std::memset(p, 0, rounded);  // defined contents, and the pages are touched here rather than mid-decode
  p_.reset(static_cast<T*>(p));
}
template <class T>
void Buffer<T>::Free::operator()(T* p) const {
  std::free(p);
}
template class Buffer<uint16_t>;
template class Buffer<float>;

// ---- weights ------------------------------------------------------------------------------------------------------
namespace {
// The row pointers of matrices (pointer, rows) stacked in order, each row K values.
std::vector<const uint16_t*> rows_of(std::initializer_list<std::pair<const uint16_t*, int>> parts, int K) {
  std::vector<const uint16_t*> out;
  for (const auto& [p, n] : parts)
    for (int i = 0; i < n; ++i) out.push_back(p + static_cast<size_t>(i) * K);
  return out;
}
}  // namespace

const LaneLayout& Weights::layout(int K, int NT) {
  if (NT == 0) NT = skinny_lanes(K);
  auto& slot = layouts_[{K, NT}];
  if (!slot) slot = std::make_unique<LaneLayout>(K, NT);
  return *slot;
}

void Weights::pack(PackedMatrix& m, int K, const std::vector<const uint16_t*>& rows) {
  const int N = static_cast<int>(rows.size());
  m.N = N;
  m.K = K;
  m.L = &layout(K, 0);
  const size_t n_elems = static_cast<size_t>(N) * K;
  if (arena_used_ + n_elems <= arena_.size()) {
    m.data = arena_.data() + arena_used_;
    arena_used_ += n_elems;
  } else {
    m.own = Buffer<uint16_t>(n_elems, "packed weights");
    m.data = m.own.data();
  }
  const int32_t* src = m.L->wsrc.data();
  for (int n = 0; n < N; ++n) {
    const uint16_t* in = rows[n];
    uint16_t* out = m.data + static_cast<size_t>(n) * K;
    for (int j = 0; j < K; ++j) out[j] = in[src[j]];
  }
  m.exp = bf16_exp_range(m.data, n_elems);
  bytes_ += n_elems * sizeof(uint16_t);
}

Weights::Weights(const ModelDims& dims, const uint16_t* embed, const uint16_t* lm_head, const uint16_t* norm,
                 const std::vector<LayerSource>& layers_in)
    : dims_(dims), tied_(lm_head == nullptr) {
  const ModelDims& m = dims_;
  // Bounds that keep the kernels' accesses inside their buffers (a head's 256-entry scratch, the 8-value lane
  // chunks, whole kv groups). What a model may be is checked, with the field's name, by the Python side
  // (adadecode.engines.cpu.check_supported) before this runs.
  if (m.n_layers < 1 || m.d < 8 || m.d % 8 || m.n_heads < 1 || m.n_kv_heads < 1 || m.n_heads % m.n_kv_heads ||
      m.ffn < 8 || m.ffn % 8 || m.vocab < 1 || m.head_dim < 2 || m.head_dim % 2 || m.head_dim > 256 ||
      m.n_heads * m.head_dim % 8 || (m.qk_norm && m.head_dim % 8) || m.window < 0 || !(m.eps > 0.f) ||
      !std::isfinite(m.eps))
    bad("model dimensions outside what the kernels take");
  if (static_cast<int>(layers_in.size()) != m.n_layers)
    bad("got weights of " + std::to_string(layers_in.size()) + " layers, expected " + std::to_string(m.n_layers));
  const int d = m.d, q = m.n_heads * m.head_dim, kv = m.n_kv_heads * m.head_dim;
  auto copy = [&](Buffer<uint16_t>& b, const uint16_t* src, size_t n) {
    b = Buffer<uint16_t>(n, "weights");
    std::memcpy(b.data(), src, n * sizeof(uint16_t));
    bytes_ += b.bytes();
  };
  copy(this->norm, norm, d);
  if (!tied_) copy(this->embed, embed, static_cast<size_t>(m.vocab) * d);
  const size_t per_layer = static_cast<size_t>(q + 2 * kv) * d + static_cast<size_t>(d) * q + 3 * static_cast<size_t>(m.ffn) * d;
  arena_ = Buffer<uint16_t>(per_layer * m.n_layers + static_cast<size_t>(m.vocab) * d, "packed weights");
  layers.resize(m.n_layers);
  for (int l = 0; l < m.n_layers; ++l) {
    const LayerSource& s = layers_in[l];
    Layer& L = layers[l];
    copy(L.attn_norm, s.attn_norm, d);
    copy(L.mlp_norm, s.mlp_norm, d);
    const std::string at = "layer " + std::to_string(l) + ": ";
    if (m.qkv_bias) {
      if (!s.bqkv) bad(at + "qkv_bias is set but the layer has no q/k/v biases");
      copy(L.bqkv, s.bqkv, static_cast<size_t>(q) + 2 * kv);
    }
    if (m.qk_norm) {
      if (!s.q_norm || !s.k_norm) bad(at + "qk_norm is set but the layer has no q_norm / k_norm weights");
      copy(L.q_norm, s.q_norm, m.head_dim);
      copy(L.k_norm, s.k_norm, m.head_dim);
    }
    pack(L.wqkv, d, rows_of({{s.wq, q}, {s.wk, kv}, {s.wv, kv}}, d));
    pack(L.wo, q, rows_of({{s.wo, d}}, q));
    std::vector<const uint16_t*> gu;
    for (int n0 = 0; n0 < m.ffn; n0 += kGateUpBlock) {
      const int cn = std::min(kGateUpBlock, m.ffn - n0);
      for (int c = 0; c < cn; ++c) gu.push_back(s.w_gate + static_cast<size_t>(n0 + c) * d);
      for (int c = 0; c < cn; ++c) gu.push_back(s.w_up + static_cast<size_t>(n0 + c) * d);
    }
    pack(L.gate_up, d, gu);
    pack(L.w_down, m.ffn, rows_of({{s.w_down, d}}, m.ffn));
  }
  pack(this->lm_head, d, rows_of({{tied_ ? embed : lm_head, m.vocab}}, d));  // last: read after the layers
}

void Weights::embedding(int token, uint16_t* out) const {
  const int d = dims_.d;
  if (!tied_) {
    std::memcpy(out, embed.data() + static_cast<size_t>(token) * d, d * sizeof(uint16_t));
    return;
  }
  const uint16_t* row = lm_head.row(token);
  const int32_t* src = lm_head.L->wsrc.data();
  for (int j = 0; j < d; ++j) out[src[j]] = row[j];
}

// ---- the jobs -------------------------------------------------------------------------------------------------------
// A layer's 5 jobs over the rows of some spans (engine.h: RowSpan), laid end to end in hw: row r of hw is position
// row_pos[r] of sequence row_seq[r]. One span for run_layers and a prefill chunk; one per segment running the layer
// for run_batch.
struct LayerJob {
  const JobContext* c = nullptr;
  int R = 0, layer = 0;
  std::vector<int> row_seq, row_pos;  // per row of hw
  std::vector<int> span_seq;          // per span
  std::vector<AttnArgs> attn;         // per span: its rows' q, partials and output; its sequence's cache of the layer
  // attention items: (row block, kv head, chunk); a row block is up to kRowBlock rows of one span (rows rb_r0..rb_r1-1
  // of the span: the span's own indices, as its AttnArgs take them); a (row block, kv head)'s last chunk to finish
  // merges
  std::vector<int> rb_span, rb_r0, rb_r1, need;
  std::vector<int> item_rb, item_kh, item_c;
  std::unique_ptr<std::atomic<int>[]> count;
  size_t kv_read = 0;  // K and V bytes the attention job reads (the pool's size hint)
};

namespace {

// Row r of `rows` (bf16, stride d) RMS-normalised (rmsnorm_core.cuh: the sum of squares in the 32-lane order, then
// inv = 1 / sqrt(ss / d + eps), then norm_elem) and permuted into L_d: t.xp + r * xlen.
void prep_norm(const JobContext& cx, ThreadWs& t, const uint16_t* rows, int R, const uint16_t* g) {
  const Kernels& k = cx.k;
  const int d = cx.m.d;
  const LaneLayout &Ln = *cx.L_norm, &Ld = *cx.L_d;
  for (int r = 0; r < R; ++r) {
    k.bf16_to_f32(rows + static_cast<size_t>(r) * d, t.row.data(), d);
    t.row[d] = 0.f;
    k.permute(Ln, t.row.data(), t.tmp.data());
    const float ss = k.dot_f32(Ln, t.tmp.data(), t.tmp.data());
    const float inv = inv_sqrt(rn::add(rn::div(ss, static_cast<float>(d)), cx.m.eps));
    k.norm_apply(t.row.data(), inv, g, t.xn.data(), d);
    t.xn[d] = 0.f;
    k.permute_x(Ld, t.xn.data(), t.xp.data() + static_cast<size_t>(r) * Ld.xlen);
  }
}

// Rows of fp32 activations (bf16 values, stride K) permuted into L.
void prep_plain(const JobContext& cx, ThreadWs& t, const float* rows, int R, int K, const LaneLayout& L) {
  for (int r = 0; r < R; ++r) {
    std::memcpy(t.xn.data(), rows + static_cast<size_t>(r) * K, K * sizeof(float));
    t.xn[K] = 0.f;
    cx.k.permute_x(L, t.xn.data(), t.xp.data() + static_cast<size_t>(r) * L.xlen);
  }
}

void qkv_item(void* ctx, int thread, int item, bool first) {
  auto& j = *static_cast<LayerJob*>(ctx);
  const JobContext& cx = *j.c;
  ThreadWs& t = cx.ws[thread];
  const ModelDims& m = cx.m;
  const Weights::Layer& W = cx.w.layers[j.layer];
  if (first) prep_norm(cx, t, cx.hw, j.R, W.attn_norm.data());
  const int hd = m.head_dim, half = hd / 2, H = m.n_heads, Hkv = m.n_kv_heads;
  const uint16_t* ptrs[256];
  for (int c = 0; c < hd; ++c) ptrs[c] = W.wqkv.row(item * hd + c);
  cx.k.dot_tile(*cx.L_d, ptrs, hd, t.xp.data(), cx.L_d->xlen, j.R, t.out.data(), W.wqkv.exp);
  float rot[256], bias[256];
  const bool has_bias = W.bqkv.size() > 0;
  if (has_bias) cx.k.bf16_to_f32(W.bqkv.data() + static_cast<size_t>(item) * hd, bias, hd);
  const uint16_t* head_g = item >= H + Hkv || W.q_norm.size() == 0 ? nullptr
                           : item < H ? W.q_norm.data() : W.k_norm.data();
  for (int r = 0; r < j.R; ++r) {
    const int pos = j.row_pos[r], seq = j.row_seq[r];  // its K/V go to its own sequence's cache
    float* y = t.out.data() + static_cast<size_t>(r) * hd;
    // the bias joins the fp32 sum, then one rounding to bf16 (skinny_gemm.cu's epilogue: bf16(acc + b))
    if (has_bias)
      for (int c = 0; c < hd; ++c) y[c] = y[c] + bias[c];
    cx.k.round_bf16(y, y, hd);
    if (item >= H + Hkv) {  // v: into the cache as it is
      const int kh = item - H - Hkv;
      cx.k.f32_to_bf16(y, cx.v_layer(seq, j.layer) + (static_cast<size_t>(kh) * cx.max_seq + pos) * hd, hd);
      continue;
    }
    if (head_g) {  // Qwen3's q/k norm over the head: rope_kv.cu's order (the sum of squares on 32 lanes)
      std::memcpy(t.row.data(), y, hd * sizeof(float));
      t.row[hd] = 0.f;
      cx.k.permute(*cx.L_hd, t.row.data(), t.tmp.data());
      const float ss = cx.k.dot_f32(*cx.L_hd, t.tmp.data(), t.tmp.data());
      const float inv = inv_sqrt(rn::add(rn::div(ss, static_cast<float>(hd)), m.eps));
      cx.k.norm_apply(y, inv, head_g, y, hd);
    }
    cx.k.rope(y, cx.cos + static_cast<size_t>(pos) * half, cx.sin + static_cast<size_t>(pos) * half, hd,
              rot);
    if (item < H) {
      std::memcpy(cx.q + (static_cast<size_t>(r) * H + item) * hd, rot, hd * sizeof(float));
    } else {  // k: lane pos % 16 of its position block
      const int kh = item - H;
      uint16_t* kb = cx.k_layer(seq, j.layer) + ((static_cast<size_t>(kh) * cx.nkb + pos / kKBlock) * hd) * kKBlock;
      for (int dd = 0; dd < hd; ++dd) kb[dd * kKBlock + pos % kKBlock] = bf16_bits(rot[dd]);
    }
  }
}

void attn_item(void* ctx, int, int item, bool) {
  auto& j = *static_cast<LayerJob*>(ctx);
  const JobContext& cx = *j.c;
  const int rb = j.item_rb[item], kh = j.item_kh[item], c = j.item_c[item];
  const AttnArgs& a = j.attn[j.rb_span[rb]];  // the span's rows, its sequence's cache
  const int r0 = j.rb_r0[rb], r1 = j.rb_r1[rb];
  cx.k.attn_chunk(a, kh, c, r0, r1);
  const int slot = rb * cx.m.n_kv_heads + kh;
  if (j.count[slot].fetch_add(1, std::memory_order_acq_rel) + 1 != j.need[rb]) return;
  const int G = cx.m.n_heads / cx.m.n_kv_heads;
  for (int r = r0; r < r1; ++r)
    for (int g = 0; g < G; ++g) cx.k.attn_merge(a, r, kh * G + g);
}

// Column items of a residual GEMM: h[:, n0:n1] = bf16(h + bf16(x W^T)).
void residual_item(const JobContext& cx, ThreadWs& t, int R, const PackedMatrix& W, int item) {
  const int n0 = item * kColsPerItem, cn = std::min(kColsPerItem, W.N - n0);
  const uint16_t* ptrs[kColsPerItem];
  for (int c = 0; c < cn; ++c) ptrs[c] = W.row(n0 + c);
  cx.k.dot_tile(*W.L, ptrs, cn, t.xp.data(), W.L->xlen, R, t.out.data(), W.exp);
  for (int r = 0; r < R; ++r)
    cx.k.residual_add(t.out.data() + static_cast<size_t>(r) * cn, cx.hw + static_cast<size_t>(r) * W.N + n0, cn);
}

void o_item(void* ctx, int thread, int item, bool first) {
  auto& j = *static_cast<LayerJob*>(ctx);
  const JobContext& cx = *j.c;
  ThreadWs& t = cx.ws[thread];
  const int q = cx.m.n_heads * cx.m.head_dim;
  if (first) prep_plain(cx, t, cx.attn, j.R, q, *cx.L_q);
  residual_item(cx, t, j.R, cx.w.layers[j.layer].wo, item);
}

void gate_up_item(void* ctx, int thread, int item, bool first) {
  auto& j = *static_cast<LayerJob*>(ctx);
  const JobContext& cx = *j.c;
  ThreadWs& t = cx.ws[thread];
  const Weights::Layer& W = cx.w.layers[j.layer];
  if (first) prep_norm(cx, t, cx.hw, j.R, W.mlp_norm.data());
  const int ffn = cx.m.ffn, n0 = item * kGateUpBlock, cn = std::min(kGateUpBlock, ffn - n0);
  const uint16_t* ptrs[2 * kGateUpBlock];
  for (int c = 0; c < 2 * cn; ++c) ptrs[c] = W.gate_up.row(2 * n0 + c);  // cn gate rows, then the same cn up rows
  cx.k.dot_tile(*cx.L_d, ptrs, 2 * cn, t.xp.data(), cx.L_d->xlen, j.R, t.out.data(), W.gate_up.exp);
  for (int r = 0; r < j.R; ++r) {
    const float* gu = t.out.data() + static_cast<size_t>(r) * 2 * cn;
    cx.k.silu_mul(gu, gu + cn, cx.act + static_cast<size_t>(r) * ffn + n0, cn);
  }
}

void down_item(void* ctx, int thread, int item, bool first) {
  auto& j = *static_cast<LayerJob*>(ctx);
  const JobContext& cx = *j.c;
  ThreadWs& t = cx.ws[thread];
  if (first) prep_plain(cx, t, cx.act, j.R, cx.m.ffn, *cx.L_ffn);
  residual_item(cx, t, j.R, cx.w.layers[j.layer].w_down, item);
}

int col_items(int n, int per) { return (n + per - 1) / per; }

// LM head (all rows of W: the LM head, or a head's copy of its vocabulary rows) for R normed rows: logits rounded to bf16 (as the CUDA LM
// head with round_bf16), into `logits` (row stride n) when given, and each thread's running argmax.
struct LmJob {
  const JobContext* c;
  int R, n, job;
  const PackedMatrix* W;  // the LM head, or a head's rows of it
  const uint16_t* rows;  // the rows to normalise (final) or nullptr (the head: t.xp already holds z, see head())
  const float* z;        // head: the transformed row (bf16 values)
  float* logits;
};

void lm_item(void* ctx, int thread, int item, bool first) {
  auto& j = *static_cast<LmJob*>(ctx);
  const JobContext& cx = *j.c;
  ThreadWs& t = cx.ws[thread];
  if (first) {
    if (j.rows)
      prep_norm(cx, t, j.rows, j.R, cx.w.norm.data());
    else
      prep_plain(cx, t, j.z, 1, cx.m.d, *cx.L_d);
    for (int r = 0; r < j.R; ++r) t.best[r] = -INFINITY, t.best_idx[r] = -1, t.ok[r] = 1;
    t.job = j.job;
  }
  const PackedMatrix& W = *j.W;
  const int n0 = item * kVocabPerItem, cn = std::min(kVocabPerItem, j.n - n0);
  const uint16_t* ptrs[kVocabPerItem];
  for (int c = 0; c < cn; ++c) ptrs[c] = W.row(n0 + c);
  cx.k.dot_tile(*W.L, ptrs, cn, t.xp.data(), W.L->xlen, j.R, t.out.data(), W.exp);
  for (int r = 0; r < j.R; ++r) {
    float* y = t.out.data() + static_cast<size_t>(r) * cn;
    cx.k.round_bf16(y, y, cn);
    if (j.logits) std::memcpy(j.logits + static_cast<size_t>(r) * j.n + n0, y, cn * sizeof(float));
    if (!cx.k.argmax(y, cn, n0, &t.best[r], &t.best_idx[r])) t.ok[r] = 0;
  }
}

// The head's T: z = bf16(T . norm(row)), columns split.
struct HeadTJob {
  const JobContext* c;
  const PackedMatrix* T;
  const uint16_t* row;
  float* z;
};

void head_t_item(void* ctx, int thread, int item, bool first) {
  auto& j = *static_cast<HeadTJob*>(ctx);
  const JobContext& cx = *j.c;
  ThreadWs& t = cx.ws[thread];
  if (first) prep_norm(cx, t, j.row, 1, cx.w.norm.data());
  const int d = cx.m.d, n0 = item * kColsPerItem, cn = std::min(kColsPerItem, d - n0);
  const uint16_t* ptrs[kColsPerItem];
  for (int c = 0; c < cn; ++c) ptrs[c] = j.T->row(n0 + c);
  cx.k.dot_tile(*cx.L_d, ptrs, cn, t.xp.data(), cx.L_d->xlen, 1, t.out.data(), j.T->exp);
  cx.k.round_bf16(t.out.data(), j.z + n0, cn);
}

// Statistics of an LM-head row over its n logits (bf16-rounded), in the CUDA kernel's order (lm_head.cu: blocks of
// kLmHeadCols folded in order, the blocks merged by 256 strided folds and a tree), with an optional rest logit.
struct LmStats {
  int idx = -1;            // argmax (lowest index on ties); -1 when a logit is NaN or the row is not finite
  float max_prob = 0.f;    // exp(max - lse)
};
constexpr int kLmHeadCols = 64;
constexpr int kLmMergeThreads = 256;

// LM-head statistics in the CUDA kernel's order (lm_head.cu: combine, blocks of kLmHeadCols folded in order, the
// blocks merged by 256 strided folds and a tree, then the rest logit). Every fold is the kernel's combine; its exps
// come in bulk from k.exp (the same bits as exp_fixed), the folds themselves are scalar.
LmStats lm_stats(const Kernels& k, const float* lg, int n, bool has_rest, float rest) {
  struct St {
    float m, s;
    int idx;
  };
  auto combine = [](const St& a, const St& b) -> St {
    if (a.idx < 0) return b;
    if (b.idx < 0) return a;
    St o;
    o.m = std::fmax(a.m, b.m);
    o.idx = (b.m > a.m || (b.m == a.m && b.idx < a.idx)) ? b.idx : a.idx;
    o.s = rn::add(rn::mul(a.s, exp_fixed(rn::sub(a.m, o.m))), rn::mul(b.s, exp_fixed(rn::sub(b.m, o.m))));
    if (std::isnan(a.s) || std::isnan(b.s) || std::isnan(a.m) || std::isnan(b.m)) o.s = NAN;
    return o;
  };
  const int nblk = (n + kLmHeadCols - 1) / kLmHeadCols;
  std::vector<St> part(nblk);
  // Inside a block the running max is a prefix max; the fold's two exps are exp(prev max - max) and exp(v - max)
  std::vector<float> arg(2 * static_cast<size_t>(n)), ex(2 * static_cast<size_t>(n));
  std::vector<float> runm(n);
  for (int b = 0; b < nblk; ++b) {
    const int j0 = b * kLmHeadCols, j1 = std::min(n, j0 + kLmHeadCols);
    float m = lg[j0];
    runm[j0] = m;
    for (int j = j0 + 1; j < j1; ++j) {
      const float nm = std::fmax(m, lg[j]);
      arg[2 * j] = rn::sub(m, nm);
      arg[2 * j + 1] = rn::sub(lg[j], nm);
      m = nm;
      runm[j] = m;
    }
  }
  k.exp(arg.data(), ex.data(), 2 * n);
  for (int b = 0; b < nblk; ++b) {
    const int j0 = b * kLmHeadCols, j1 = std::min(n, j0 + kLmHeadCols);
    St st{lg[j0], 1.f, j0};  // combine({-inf, 0, -1}, one) = one
    for (int j = j0 + 1; j < j1; ++j) {
      const float v = lg[j];
      St o;
      o.m = runm[j];
      o.idx = v > st.m ? j : st.idx;
      // combine(st, {v, 1, j}): 1 * exp(v - m) is exp(v - m) exactly
      o.s = rn::add(rn::mul(st.s, ex[2 * j]), ex[2 * j + 1]);
      if (std::isnan(st.s) || std::isnan(st.m) || std::isnan(v)) o.s = NAN;
      st = o;
    }
    part[b] = st;
  }
  St sm[kLmMergeThreads];
  for (int tid = 0; tid < kLmMergeThreads; ++tid) {
    St st{-INFINITY, 0.f, -1};
    for (int b = tid; b < nblk; b += kLmMergeThreads) st = combine(st, part[b]);
    sm[tid] = st;
  }
  for (int off = kLmMergeThreads / 2; off > 0; off >>= 1)
    for (int tid = 0; tid < off; ++tid) sm[tid] = combine(sm[tid], sm[tid + off]);
  const float m = sm[0].m;
  float s = sm[0].s, M = m;
  if (has_rest) {
    M = std::fmax(m, rest);
    s = rn::add(rn::mul(s, exp_fixed(rn::sub(m, M))), exp_fixed(rn::sub(rest, M)));
    if (std::isnan(rest)) s = NAN;
  }
  const float l = std::isnan(s) ? NAN : rn::add(M, log_f32(s));
  LmStats out;
  const bool badrow = std::isnan(l) || sm[0].idx < 0;
  out.idx = badrow ? -1 : sm[0].idx;
  out.max_prob = badrow ? NAN : exp_fixed(rn::sub(m, l));
  return out;
}

}  // namespace

// ---- the engine ---------------------------------------------------------------------------------------------------
Engine::Engine(std::shared_ptr<Weights> weights, const float* cos, const float* sin, int max_seq, int max_rows,
               int prefill_chunk, int threads, const Kernels* kernels, int max_seqs)
    : k_(kernels ? *kernels : *kernels_for("portable")), w_(std::move(weights)), max_seq_(max_seq),
      max_rows_(max_rows), chunk_(prefill_chunk), max_seqs_(max_seqs), pool_(threads) {
  if (kernels == nullptr) bad("no kernels for this instruction set on this CPU");
  if (!w_) bad("no weights");
  const ModelDims& m = dims();
  // bounds only: the ranges a caller may ask for are EngineOptions' (adadecode/engines/options.py)
  if (max_seq < 1 || max_rows < 1 || prefill_chunk < 1 || max_seqs < 1)
    bad("max_seq, max_rows, prefill_chunk and max_seqs must be >= 1");
  if (static_cast<int64_t>(max_seqs) * max_rows > (int64_t{1} << 20)) bad("max_seqs x max_rows above 2^20 rows");
  nkb_ = (max_seq + kKBlock - 1) / kKBlock;
  const int hd = m.head_dim, H = m.n_heads, Hkv = m.n_kv_heads, q = H * hd;
  const size_t kv_elems = static_cast<size_t>(max_seqs) * m.n_layers * Hkv * hd;  // every sequence's region
  const size_t k_elems = kv_elems * nkb_ * kKBlock, v_elems = kv_elems * max_seq;
  const size_t kv_bytes = kv_cache_bytes(m, max_seq, max_seqs);
  // Refused before it is touched: a cache larger than the free memory would be killed mid-fill, not refused (the
  // Python side refuses it first, with the sizes; this is the runtime's own guard).
  if (kv_bytes > available_memory())
    throw OutOfMemory("CPU engine: KV cache of " + gib(kv_bytes) + " does not fit in the " + gib(available_memory()) +
                      " of memory available");
  k_cache_ = Buffer<uint16_t>(k_elems, "K cache");
  v_cache_ = Buffer<uint16_t>(v_elems, "V cache");
  const int B = max_seqs * max_rows;  // the most rows one step runs: every sequence's rows in flight
  const int P = std::max(B, prefill_chunk);
  ring_ = Buffer<uint16_t>(static_cast<size_t>(B) * m.d, "rows");
  hw_ = Buffer<uint16_t>(static_cast<size_t>(P) * m.d, "rows");
  q_ = Buffer<float>(static_cast<size_t>(P) * std::max(q, m.d), "activations");
  attn_ = Buffer<float>(static_cast<size_t>(P) * q, "activations");
  act_ = Buffer<float>(static_cast<size_t>(P) * m.ffn, "activations");
  lg_ = Buffer<float>(m.vocab, "head logits");
  const int n_chunks = (max_seq + kAttnChunk - 1) / kAttnChunk;
  part_o_ = Buffer<float>(static_cast<size_t>(P) * H * n_chunks * hd, "attention workspace");
  part_ml_ = Buffer<float>(static_cast<size_t>(P) * H * n_chunks * 2, "attention workspace");
  cos_ = Buffer<float>(static_cast<size_t>(max_seq) * hd / 2, "RoPE tables");
  sin_ = Buffer<float>(static_cast<size_t>(max_seq) * hd / 2, "RoPE tables");
  std::memcpy(cos_.data(), cos, cos_.bytes());
  std::memcpy(sin_.data(), sin, sin_.bytes());
  L_d_ = &w_->layout(m.d, 0);
  L_norm_ = &w_->layout(m.d, 32);
  L_rest_ = &w_->layout(m.d, 256);
  L_q_ = &w_->layout(q, 0);
  L_ffn_ = &w_->layout(m.ffn, 0);
  L_hd_ = m.qk_norm ? &w_->layout(hd, 32) : L_norm_;  // only read with qk_norm (head_dim % 8 == 0 then)
  const int kmax = std::max({m.d, q, m.ffn});
  const int xlen = std::max({L_d_->xlen, L_q_->xlen, L_ffn_->xlen, L_rest_->xlen});
  ws_.resize(pool_.size());
  for (auto& t : ws_) {
    t.row.assign(kmax + 1, 0.f);
    t.xn.assign(kmax + 1, 0.f);
    t.tmp.assign(std::max({L_norm_->xlen, L_rest_->xlen, L_hd_->xlen}), 0.f);
    t.xp = Buffer<float>(static_cast<size_t>(P) * xlen, "activations");
    t.out.assign(static_cast<size_t>(P) * std::max({hd, 2 * kColsPerItem, kVocabPerItem}), 0.f);
    t.best.assign(B, 0.f);
    t.best_idx.assign(B, -1);
    t.ok.assign(B, 1);
  }
}

JobContext Engine::context() {
  return JobContext{k_, dims(), *w_, k_cache_.data(), v_cache_.data(), max_seq_, nkb_, hw_.data(), cos_.data(),
                    sin_.data(), q_.data(), attn_.data(), act_.data(), ws_, L_d_, L_norm_, L_rest_, L_q_, L_ffn_,
                    L_hd_};
}

void Engine::check_seq(const char* what, int seq) const {
  if (seq < 0 || seq >= max_seqs_)
    throw std::out_of_range(std::string("CPU engine: ") + what + ": sequence " + std::to_string(seq) + " outside 0.." +
                            std::to_string(max_seqs_ - 1));
}

void Engine::check_rows(const char* what, int first, int last) const {
  const int R = last - first + 1;
  if (first < 0 || last >= max_seq_ || R < 1 || R > max_rows_)
    throw std::out_of_range(std::string("CPU engine: ") + what + ": rows " + std::to_string(first) + ".." +
                            std::to_string(last) + " must be 1.." + std::to_string(max_rows_) + " rows inside 0.." +
                            std::to_string(max_seq_ - 1));
}

void Engine::stage(const std::vector<RowSpan>& spans) {
  const int d = dims().d;
  uint16_t* dst = hw_.data();
  for (const RowSpan& sp : spans)
    for (int p = sp.first; p <= sp.last; ++p, dst += d) std::memcpy(dst, ring_row(sp.seq, p), d * sizeof(uint16_t));
}

void Engine::unstage(const std::vector<RowSpan>& spans) {
  const int d = dims().d;
  const uint16_t* src = hw_.data();
  for (const RowSpan& sp : spans)
    for (int p = sp.first; p <= sp.last; ++p, src += d) std::memcpy(ring_row(sp.seq, p), src, d * sizeof(uint16_t));
}

std::unique_ptr<LayerJob> Engine::layer_job(const JobContext& cx, const std::vector<RowSpan>& spans) {
  const ModelDims& m = dims();
  const int H = m.n_heads, Hkv = m.n_kv_heads, hd = m.head_dim, q = H * hd;
  const int n_chunks = (max_seq_ + kAttnChunk - 1) / kAttnChunk;
  auto job = std::make_unique<LayerJob>();
  LayerJob& j = *job;
  j.c = &cx;
  int r0 = 0;  // the span's first row in hw
  for (size_t s = 0; s < spans.size(); ++s) {
    const RowSpan& sp = spans[s];
    const int R = sp.rows();
    for (int r = 0; r < R; ++r) j.row_seq.push_back(sp.seq), j.row_pos.push_back(sp.first + r);
    j.span_seq.push_back(sp.seq);
    AttnArgs a;  // the span's rows of q, the partials and the output; k_blocks and v: run_layer, per layer
    a.q = q_.data() + static_cast<size_t>(r0) * q;
    a.part_o = part_o_.data() + static_cast<size_t>(r0) * H * n_chunks * hd;
    a.part_ml = part_ml_.data() + static_cast<size_t>(r0) * H * n_chunks * 2;
    a.out = attn_.data() + static_cast<size_t>(r0) * q;
    a.R = R, a.first = sp.first, a.n_heads = H, a.n_kv_heads = Hkv, a.head_dim = hd, a.max_seq = max_seq_;
    a.n_chunks = n_chunks;
    a.window = m.window;
    a.qscale = 1.4426950408889634f / std::sqrt(static_cast<float>(hd));  // attention.cu's launcher, the same bits
    j.attn.push_back(a);
    for (int b = 0; b < R; b += kRowBlock) {
      const int rb = static_cast<int>(j.rb_span.size()), e = std::min(R, b + kRowBlock);
      const int nc = (sp.first + e - 1) / kAttnChunk + 1;
      // chunks before the window of the block's first row hold no position any of its rows attends to
      const int c0 = attn_lo(sp.first + b, m.window) / kAttnChunk;
      j.rb_span.push_back(static_cast<int>(s)), j.rb_r0.push_back(b), j.rb_r1.push_back(e), j.need.push_back(nc - c0);
      for (int kh = 0; kh < Hkv; ++kh)
        for (int c = c0; c < nc; ++c) j.item_rb.push_back(rb), j.item_kh.push_back(kh), j.item_c.push_back(c);
    }
    j.kv_read += 4 * static_cast<size_t>(Hkv) * hd * (sp.first + R);  // K and V bf16 of every position read
    r0 += R;
  }
  j.R = r0;
  j.count = std::make_unique<std::atomic<int>[]>(j.rb_span.size() * Hkv);
  return job;
}

void Engine::run_layer(LayerJob& j, int l) {
  const ModelDims& m = dims();
  const int H = m.n_heads, Hkv = m.n_kv_heads;
  const JobContext& cx = *j.c;
  j.layer = l;
  for (size_t s = 0; s < j.attn.size(); ++s) {
    j.attn[s].k_blocks = cx.k_layer(j.span_seq[s], l);
    j.attn[s].v = cx.v_layer(j.span_seq[s], l);
  }
  for (size_t i = 0; i < j.rb_span.size() * Hkv; ++i) j.count[i].store(0);
  const Weights::Layer& W = w_->layers[l];
  pool_.run(H + 2 * Hkv, qkv_item, &j, W.wqkv.bytes());
  pool_.run(static_cast<int>(j.item_c.size()), attn_item, &j, j.kv_read);
  pool_.run(col_items(m.d, kColsPerItem), o_item, &j, W.wo.bytes());
  pool_.run(col_items(m.ffn, kGateUpBlock), gate_up_item, &j, W.gate_up.bytes());
  pool_.run(col_items(m.d, kColsPerItem), down_item, &j, W.w_down.bytes());
}

void Engine::forward(const std::vector<RowSpan>& spans, int l0, int l1) {
  const JobContext cx = context();
  const std::unique_ptr<LayerJob> j = layer_job(cx, spans);
  for (int l = l0; l < l1; ++l) run_layer(*j, l);
}

void Engine::prefill(int seq, const int32_t* tokens, int n, int start) {
  const ModelDims& m = dims();
  check_seq("prefill", seq);
  if (n < 1 || start < 0 || start > max_seq_ - n)
    throw std::out_of_range("CPU engine: prefill of " + std::to_string(n) + " tokens from position " +
                            std::to_string(start) + ": need 1.." + std::to_string(max_seq_) + " positions in all");
  for (int i = 0; i < n; ++i)
    if (tokens[i] < 0 || tokens[i] >= m.vocab)
      throw std::out_of_range("CPU engine: token id " + std::to_string(tokens[i]) + " is outside the vocabulary");
  int s = 0;
  for (; s < n; s += chunk_) {  // the decode step on R rows: any chunking (and any piece of a prompt) the same bits
    const int R = std::min(chunk_, n - s);
    for (int r = 0; r < R; ++r) w_->embedding(tokens[s + r], hw_.data() + static_cast<size_t>(r) * m.d);
    forward({RowSpan{seq, start + s, start + s + R - 1}}, 0, m.n_layers);
  }
  s -= chunk_;
  std::memcpy(ring_row(seq, start + n - 1), hw_.data() + static_cast<size_t>(n - 1 - s) * m.d, m.d * sizeof(uint16_t));
}

void Engine::embed(int seq, int pos, int token) {
  check_seq("embed", seq);
  if (pos < 0 || pos >= max_seq_)
    throw std::out_of_range("CPU engine: embed at position " + std::to_string(pos) + " outside 0.." +
                            std::to_string(max_seq_ - 1));
  if (token < 0 || token >= dims().vocab)
    throw std::out_of_range("CPU engine: token id " + std::to_string(token) + " is outside the vocabulary");
  w_->embedding(token, ring_row(seq, pos));
}

void Engine::run_layers(int seq, int first, int last, int l0, int l1) { run_batch({Segment{seq, first, last, l0, l1}}); }

void Engine::run_batch(const std::vector<Segment>& segs) {
  if (segs.empty()) throw std::out_of_range("CPU engine: run_batch: no segments");
  std::vector<char> seen(max_seqs_, 0);
  int lo = dims().n_layers, hi = 0;
  for (const Segment& g : segs) {  // every segment checked before any runs
    check_seq("run_layers", g.seq);
    check_rows("run_layers", g.first, g.last);
    if (g.l0 < 0 || g.l0 >= g.l1 || g.l1 > dims().n_layers)
      throw std::out_of_range("CPU engine: run_layers: layers [" + std::to_string(g.l0) + ", " + std::to_string(g.l1) +
                              ") outside 0.." + std::to_string(dims().n_layers));
    if (seen[g.seq]++) throw std::out_of_range("CPU engine: run_batch: two segments of sequence " + std::to_string(g.seq));
    lo = std::min(lo, g.l0), hi = std::max(hi, g.l1);
  }
  // Layer by layer, the rows of the segments that run it sit end to end in hw_ (in the segments' order) and go
  // through its jobs together; where that set changes, the rows go back to their rings and the new set is staged.
  const JobContext cx = context();
  std::vector<int> active, want;
  std::vector<RowSpan> spans;
  std::unique_ptr<LayerJob> j;
  for (int l = lo; l < hi; ++l) {
    want.clear();
    for (int i = 0; i < static_cast<int>(segs.size()); ++i)
      if (segs[i].l0 <= l && l < segs[i].l1) want.push_back(i);
    if (want != active) {
      unstage(spans);
      active = want;
      spans.clear();
      for (int i : active) spans.push_back(RowSpan{segs[i].seq, segs[i].first, segs[i].last});
      stage(spans);
      j = active.empty() ? nullptr : layer_job(cx, spans);
    }
    if (j) run_layer(*j, l);
  }
  unstage(spans);
}

void Engine::final_tokens(int seq, int first, int last, int32_t* tokens, float* logits) {
  final_batch({RowSpan{seq, first, last}}, tokens, logits);
}

void Engine::final_sample(int seq, int first, int last, const SampleRule& rule, int32_t* tokens) {
  const std::vector<const SampleRule*> rules{&rule};
  final_batch({RowSpan{seq, first, last}}, tokens, nullptr, &rules);
}

void Engine::final_batch(const std::vector<RowSpan>& spans, int32_t* tokens, float* logits,
                         const std::vector<const SampleRule*>* rules) {
  if (spans.empty()) throw std::out_of_range("CPU engine: final: no rows");
  if (rules && rules->size() != spans.size()) bad("final: one sampling rule (or none) per span");
  int R = 0;
  for (const RowSpan& sp : spans) {
    check_seq("final", sp.seq);
    check_rows("final", sp.first, sp.last);
    R += sp.rows();
  }
  if (R < 1 || R > max_seqs_ * max_rows_)
    throw std::out_of_range("CPU engine: final: " + std::to_string(R) + " rows, must be 1.." +
                            std::to_string(max_seqs_ * max_rows_) + " (max_seqs x max_rows)");
  const int V = dims().vocab;
  bool draw = false;
  for (size_t s = 0; rules && s < spans.size(); ++s) draw = draw || (*rules)[s] != nullptr;
  float* lg = logits;  // a draw reads the logits rows: the caller's, or lg_rows_
  if (draw && lg == nullptr) {
    if (lg_rows_.size() == 0) lg_rows_ = Buffer<float>(static_cast<size_t>(max_seqs_) * max_rows_ * V, "logits");
    lg = lg_rows_.data();
  }
  stage(spans);
  const JobContext cx = context();
  LmJob j{&cx, R, V, ++job_counter_, &w_->lm_head, hw_.data(), nullptr, lg};
  pool_.run(col_items(V, kVocabPerItem), lm_item, &j, w_->lm_head.bytes());
  for (int r = 0; r < R; ++r) {
    float best = -INFINITY;
    int idx = -1;
    bool ok = true;
    for (const auto& t : ws_) {
      if (t.job != j.job) continue;  // took no item of this job
      ok = ok && t.ok[r];
      if (t.best_idx[r] >= 0 && (t.best[r] > best || (t.best[r] == best && t.best_idx[r] < idx)))
        best = t.best[r], idx = t.best_idx[r];
    }
    tokens[r] = ok && idx >= 0 && std::isfinite(best) ? idx : -1;
  }
  int r0 = 0;  // a sampled span's rows drawn for positions row + 1 (sampling.h), each from its own logits row
  for (size_t s = 0; s < spans.size(); r0 += spans[s].rows(), ++s) {
    const SampleRule* rule = rules ? (*rules)[s] : nullptr;
    if (rule == nullptr) continue;
    for (int r = 0; r < spans[s].rows(); ++r)
      tokens[r0 + r] = sample_row(lg + static_cast<size_t>(r0 + r) * V, V, nullptr, spans[s].first + r + 1, *rule,
                                  sample_ws_);
  }
}

void Engine::set_heads(const std::vector<HeadSource>& sources) {
  const ModelDims& m = dims();
  for (size_t i = 0; i < sources.size(); ++i) {  // bounds (the Python side checks every head first, by name)
    const HeadSource& h = sources[i];
    const std::string p = "head " + std::to_string(i) + ": ";
    if (h.layer < 0 || h.layer > m.n_layers) bad(p + "layer outside 0..L");
    if (h.T == nullptr) bad(p + "no T");
    if (h.vocab != nullptr && h.n_vocab < 1) bad(p + "an empty vocabulary subset");
    for (int n = 0; h.vocab != nullptr && n < h.n_vocab; ++n)
      if (h.vocab[n] < 0 || h.vocab[n] >= m.vocab) bad(p + "vocabulary id " + std::to_string(h.vocab[n]) + " outside the model's");
    if (h.w_rest != nullptr && h.vocab == nullptr) bad(p + "w_rest needs a vocabulary subset");
  }
  const int d = m.d;
  const PackedMatrix& W = w_->lm_head;
  std::vector<Head> heads;
  for (const HeadSource& src : sources) {
    Head h;
    h.layer = src.layer;
    std::vector<const uint16_t*> rows;
    for (int n = 0; n < d; ++n) rows.push_back(src.T + static_cast<size_t>(n) * d);
    w_->pack(h.T, d, rows);  // in the lane order of the skinny GEMM over d
    if (src.vocab != nullptr) {
      h.vocab.assign(src.vocab, src.vocab + src.n_vocab);
      // the LM head's rows of the vocabulary, copied contiguously (one stream instead of scattered rows)
      h.E.N = src.n_vocab;
      h.E.K = W.K;
      h.E.L = W.L;
      h.E.exp = W.exp;  // a superset of its rows' range
      h.E.own = Buffer<uint16_t>(static_cast<size_t>(h.E.N) * W.K, "head vocabulary rows");
      h.E.data = h.E.own.data();
      for (int n = 0; n < h.E.N; ++n)
        std::memcpy(h.E.data + static_cast<size_t>(n) * W.K, W.row(h.vocab[n]), W.K * sizeof(uint16_t));
    }
    if (src.w_rest != nullptr) {  // fp32 values permuted into the rest logit's 256-lane layout
      const LaneLayout& L = *L_rest_;
      std::vector<float> x(d + 1, 0.f);
      for (int j = 0; j < d; ++j) {
        const uint32_t u = static_cast<uint32_t>(src.w_rest[j]) << 16;
        std::memcpy(&x[j], &u, 4);
      }
      h.w_rest.resize(L.xlen);
      for (int j = 0; j < L.xlen; ++j) h.w_rest[j] = x[L.xsrc[j]];
    }
    heads.push_back(std::move(h));
  }
  heads_ = std::move(heads);
}

int Engine::head_vocab(int i) const {
  if (i < 0 || i >= static_cast<int>(heads_.size()))
    throw std::out_of_range("CPU engine: head index " + std::to_string(i) + " outside 0.." +
                            std::to_string(static_cast<int>(heads_.size()) - 1));
  return heads_[i].vocab.empty() ? dims().vocab : static_cast<int>(heads_[i].vocab.size());
}

std::pair<int32_t, float> Engine::head(int seq, int pos, int i, float* logits, const SampleRule* rule) {
  if (i < 0 || i >= static_cast<int>(heads_.size()))
    throw std::out_of_range("CPU engine: head index " + std::to_string(i) + " outside 0.." +
                            std::to_string(static_cast<int>(heads_.size()) - 1));
  check_seq("head", seq);
  check_rows("head", pos, pos);
  const Head& h = heads_[i];
  const int d = dims().d;
  std::memcpy(hw_.data(), ring_row(seq, pos), d * sizeof(uint16_t));
  float* z = q_.data();
  const JobContext cx = context();
  HeadTJob tj{&cx, &h.T, hw_.data(), z};
  pool_.run(col_items(d, kColsPerItem), head_t_item, &tj, h.T.bytes());
  const int n = h.vocab.empty() ? dims().vocab : static_cast<int>(h.vocab.size());
  float* lg = lg_.data();
  LmJob j{&cx, 1, n, ++job_counter_, h.vocab.empty() ? &w_->lm_head : &h.E, nullptr, z, lg};
  pool_.run(col_items(n, kVocabPerItem), lm_item, &j, static_cast<size_t>(n) * d * sizeof(uint16_t));
  float rest = 0.f;
  if (!h.w_rest.empty()) {  // lm_head.cu's merge: x . w_rest over 256 threads (8 warps), rounded to bf16
    ThreadWs& t = ws_[0];
    std::memcpy(t.xn.data(), z, d * sizeof(float));
    t.xn[d] = 0.f;
    k_.permute(*L_rest_, t.xn.data(), t.tmp.data());
    rest = k_.dot_f32(*L_rest_, t.tmp.data(), h.w_rest.data());
    k_.round_bf16(&rest, &rest, 1);
  }
  const LmStats st = lm_stats(k_, lg, n, !h.w_rest.empty(), rest);
  if (logits) std::memcpy(logits, lg, n * sizeof(float));
  int32_t col = st.idx;  // greedy, or the head's draw
  if (rule && col >= 0) col = sample_row(lg, n, h.vocab.empty() ? nullptr : h.vocab.data(), pos + 1, *rule, sample_ws_);
  const int32_t token = col < 0 ? -1 : (h.vocab.empty() ? col : h.vocab[col]);
  return {token, st.max_prob};
}

void Engine::copy_row(int seq, int pos, uint16_t* dst) const {
  check_seq("hidden", seq);
  check_rows("hidden", pos, pos);
  std::memcpy(dst, ring_row(seq, pos), dims().d * sizeof(uint16_t));
}

void Engine::copy_kv(int seq, int layer, int length, uint16_t* k_dst, uint16_t* v_dst) const {
  const ModelDims& m = dims();
  check_seq("kv", seq);
  if (layer < 0 || layer >= m.n_layers || length < 0 || length > max_seq_)
    throw std::out_of_range("CPU engine: kv of layer " + std::to_string(layer) + ", length " + std::to_string(length) +
                            " is outside the cache");
  const int hd = m.head_dim, Hkv = m.n_kv_heads;
  const JobContext cx = const_cast<Engine*>(this)->context();  // only read here
  for (int p = 0; p < length; ++p)
    for (int kh = 0; kh < Hkv; ++kh) {
      const uint16_t* kb = cx.k_layer(seq, layer) + ((static_cast<size_t>(kh) * nkb_ + p / kKBlock) * hd) * kKBlock;
      uint16_t* ko = k_dst + (static_cast<size_t>(p) * Hkv + kh) * hd;
      for (int dd = 0; dd < hd; ++dd) ko[dd] = kb[dd * kKBlock + p % kKBlock];
      std::memcpy(v_dst + (static_cast<size_t>(p) * Hkv + kh) * hd,
                  cx.v_layer(seq, layer) + (static_cast<size_t>(kh) * max_seq_ + p) * hd, hd * sizeof(uint16_t));
    }
}

}  // namespace adadecode::cpu
