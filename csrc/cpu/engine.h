// The CPU engine runtime: the engine contract of docs/design.md#contract on the CPU kernels (kernels.h) and a thread pool.
// Torch-free: the caller hands over bf16 weights (HF layout, [out, in] row-major) once; they are packed into the
// kernels' lane order (lanes.h) and held here, once (the caller may drop its copy).
//
// Sequences (docs/design.md#contract, "Sequences"): an Engine of max_seqs sequences holds, for each, its own KV cache
// and its own ring of rows in flight, in fixed slots: sequence s owns region s of one cache allocation (the layout
// below, sequence-major), and slots s * max_rows .. s * max_rows + max_rows - 1 of the ring. A row only ever reads its
// own sequence's region. Every per-sequence call takes the sequence; run_batch runs run_layers of several sequences
// as one forward: for each layer, the rows of every segment that runs it go through its 5 jobs together (one pass
// over the weights), each row attending to its own sequence's cache up to its own position and appending K/V there.
// A row's bits are those it gets alone (the kernels' order is a function of the shapes alone).
//
// State, per sequence s (S = max_seqs; nkb = ceil(max_seq / 16)):
//   K cache   [S][n_layers][n_kv_heads][nkb blocks][head_dim][16] bf16 (lane = position: scores of 16 positions are
//             one vector FMA chain over the head dims)
//   V cache   [S][n_layers][n_kv_heads][max_seq][head_dim] bf16
//   ring      [S][max_rows][d] bf16: the residual stream of the rows in flight, slot = pos % max_rows
// The workspace takes max(S * max_rows, prefill_chunk) rows: the most one step runs (every sequence's rows in flight).
// Host-side bookkeeping (which rows are live, their depth, the valid cache length) is the caller's (the Python
// CpuEngine, with TorchEngine's checks); this layer checks what keeps memory accesses in bounds.
//
// A decode layer is 5 jobs on the pool, each the CUDA fused launch it mirrors, bit for bit: (1) RMSNorm + QKV +
// RoPE + K/V append, items = heads, each row's K/V into its own sequence's region at its own position; (2) attention,
// items = (row block, kv head, 128-position chunk), a row block being up to 16 rows of one segment (one sequence,
// contiguous positions), the last item of a (row block, kv head) merges its chunks; (3) o_proj + residual; (4) RMSNorm + gate/up + SiLU * up; (5) down + residual: items = column
// ranges. Each thread prepares its own copy of a job's inputs (the norm, the lane permutation) before its first
// item: nothing waits for a thread that never comes.
//
// The jobs (engine.cpp) see a JobContext (the kernels, the model, the caches, the workspace, the layouts), never the
// Engine: its state is private, and the heads are packed by set_heads from their sources (HeadSource).
#pragma once
#include <atomic>
#include <cstdint>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../common/model.h"
#include "kernels.h"
#include "lanes.h"
#include "sampling.h"
#include "thread_pool.h"

namespace adadecode::cpu {

using adadecode::ModelDims;    // csrc/common/model.h, shared with the CUDA engine
using adadecode::OutOfMemory;  // an allocation that does not fit: the binding turns it into a Python MemoryError

// Memory this process may still take (MemAvailable), SIZE_MAX when unknown.
size_t available_memory();

// 64-byte aligned storage (2 MB aligned and advised for huge pages when large: the weights stream through the TLB).
template <class T>
class Buffer {
 public:
  Buffer() = default;
  explicit Buffer(size_t n, const char* what);
  T* data() { return p_.get(); }
  const T* data() const { return p_.get(); }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }

 private:
  struct Free {
    void operator()(T* p) const;
  };
  std::unique_ptr<T, Free> p_;
  size_t n_ = 0;
};

// A linear layer's weights [N, K] in lane order: row n at data + n * K. The model's matrices live in one arena of
// the Weights, in the order a token reads them (huge pages, one stream); a head's T owns its buffer.
struct PackedMatrix {
  int N = 0, K = 0;
  const LaneLayout* L = nullptr;
  uint16_t* data = nullptr;
  ExpRange exp;  // of its values (lanes.h), for dot_tile
  Buffer<uint16_t> own;
  const uint16_t* row(int n) const { return data + static_cast<size_t>(n) * K; }
  size_t bytes() const { return static_cast<size_t>(N) * K * sizeof(uint16_t); }
};

// Raw bf16 weights of one layer as the caller holds them (HF layout), only read by the constructor.
struct LayerSource {
  const uint16_t *attn_norm, *wq, *wk, *wv, *wo, *mlp_norm, *w_gate, *w_up, *w_down;
  // bqkv: [H hd + 2 Hkv hd] (bq, bk, bv stacked) when dims.qkv_bias; q_norm, k_norm: [hd] when dims.qk_norm
  const uint16_t *bqkv = nullptr, *q_norm = nullptr, *k_norm = nullptr;
};

class Weights {
 public:
  // embed [vocab, d]; lm_head [vocab, d] or nullptr when tied to embed; norm [d].
  Weights(const ModelDims& dims, const uint16_t* embed, const uint16_t* lm_head, const uint16_t* norm,
          const std::vector<LayerSource>& layers);
  const ModelDims& dims() const { return dims_; }
  const LaneLayout& layout(int K, int NT);  // cached; NT = 0: the skinny GEMM's lane count for K
  size_t bytes() const { return bytes_; }
  bool tied() const { return tied_; }
  void embedding(int token, uint16_t* out) const;  // the HF row of `token` (unpacked when tied)

  // gate_up: the rows of W_gate and W_up interleaved by blocks of kGateUpBlock (16 gate rows, the same 16 up rows,
  // ...; the last block may be shorter), so a gate/up item reads one contiguous stream.
  struct Layer {
    Buffer<uint16_t> attn_norm, mlp_norm;
    Buffer<uint16_t> bqkv, q_norm, k_norm;  // empty unless the model has them (ModelDims.qkv_bias / qk_norm)
    PackedMatrix wqkv, wo, gate_up, w_down;
  };
  std::vector<Layer> layers;
  Buffer<uint16_t> norm, embed;  // embed: only when untied (tied: lm_head's rows, unpacked on lookup)
  PackedMatrix lm_head;
  // Packs the rows (HF layout, K values each) into m in this order: in the arena while it has room, else into m's
  // own buffer (heads, packed after the model).
  void pack(PackedMatrix& m, int K, const std::vector<const uint16_t*>& rows);

 private:
  Buffer<uint16_t> arena_;
  size_t arena_used_ = 0;
  ModelDims dims_;
  bool tied_ = false;
  size_t bytes_ = 0;
  std::map<std::pair<int, int>, std::unique_ptr<LaneLayout>> layouts_;
};

// Bytes of the K and V caches of an Engine of max_seqs sequences of max_seq positions (K in whole blocks of kKBlock
// positions): the one formula, which the Python side checks against available_memory() before it builds an Engine.
size_t kv_cache_bytes(const ModelDims& dims, int64_t max_seq, int64_t max_seqs = 1);

constexpr int kGateUpBlock = 16;  // = the gate/up job's columns per item (engine.cpp: kColsPerItem)

struct Head {
  int layer = 0;
  PackedMatrix T;                 // [d, d]
  std::vector<int32_t> vocab;     // token ids, ascending (empty: the full vocabulary)
  PackedMatrix E;                 // [vocab.size(), d]: the LM head's rows of `vocab`, copied contiguously by
                                  // set_heads (gathered rows scattered over the LM head read ~3x slower than one stream)
  std::vector<float> w_rest;      // rest-logit weights permuted into the 256-lane layout (empty: none)
};

// A head as the caller holds it (bf16 bit patterns, HF layout), only read by Engine::set_heads, which packs it.
struct HeadSource {
  int layer = 0;
  const uint16_t* T = nullptr;       // [d, d]
  const int32_t* vocab = nullptr;    // [n_vocab] ascending ids, or nullptr (the full vocabulary)
  int n_vocab = 0;
  const uint16_t* w_rest = nullptr;  // [d] or nullptr (only with a vocabulary)
};

// Per-thread scratch of the jobs (engine.cpp).
struct ThreadWs {
  std::vector<float> row, tmp, xn, out;
  Buffer<float> xp;            // the dot products' activation rows, 64-byte aligned (whole-line vector loads)
  std::vector<float> best;     // [max_seqs * max_rows] this thread's running argmax per row (LM-head jobs)
  std::vector<int> best_idx;
  std::vector<char> ok;
  int job = -1;                // the LM-head job those belong to (a thread that took no item keeps an old one)
};

// What the jobs of a step (engine.cpp) read and write, and all they see of an Engine: the kernels, the model, the KV
// cache, the workspace and the lane layouts. The pointers are the Engine's buffers.
struct JobContext {
  const Kernels& k;
  const ModelDims& m;
  const Weights& w;
  uint16_t* k_cache;  // [max_seqs][n_layers][n_kv_heads][nkb blocks][head_dim][kKBlock]
  uint16_t* v_cache;  // [max_seqs][n_layers][n_kv_heads][max_seq][head_dim]
  int max_seq, nkb;
  uint16_t* hw;       // [P, d] bf16: the rows being run (P = max(max_seqs * max_rows, prefill_chunk))
  const float* cos;   // [max_seq, head_dim / 2]
  const float* sin;
  float* q;           // [P, max(H hd, d)]: rotated q (a head's z)
  float* attn;        // [P, H hd]: attention's output
  float* act;         // [P, ffn]: SiLU(gate) * up
  std::vector<ThreadWs>& ws;
  const LaneLayout *L_d, *L_norm, *L_rest, *L_q, *L_ffn, *L_hd;  // L_hd: a head's norm (32 lanes)

  // layer l of sequence seq's region
  uint16_t* k_layer(int seq, int l) const {
    return k_cache + (static_cast<size_t>(seq) * m.n_layers + l) * m.n_kv_heads * nkb * kKBlock * m.head_dim;
  }
  uint16_t* v_layer(int seq, int l) const {
    return v_cache + (static_cast<size_t>(seq) * m.n_layers + l) * m.n_kv_heads * max_seq * m.head_dim;
  }
};

// Rows first..last (positions) of sequence seq: a prefill chunk, a final, one segment's rows in a layer's jobs.
struct RowSpan {
  int seq = 0, first = 0, last = 0;
  int rows() const { return last - first + 1; }
};

// One sequence's run_layers in a run_batch: rows first..last of sequence seq, layers [l0, l1).
struct Segment {
  int seq = 0, first = 0, last = 0, l0 = 0, l1 = 0;
};

struct LayerJob;  // engine.cpp: a layer's 5 jobs over the rows of some spans

class Engine {
 public:
  Engine(std::shared_ptr<Weights> weights, const float* cos, const float* sin, int max_seq, int max_rows,
         int prefill_chunk, int threads, const Kernels* kernels, int max_seqs = 1);

  // Every call below acts on one sequence `seq` (0..max_seqs-1) but run_batch and final_batch, which take several.
  // prefill: tokens at positions start..start+n-1, the cache holding 0..start-1 (a prefill in pieces); any piece
  // size gives the bits of one call (prefill is the decode step on more rows).
  void prefill(int seq, const int32_t* tokens, int n, int start = 0);
  void embed(int seq, int pos, int token);
  void run_layers(int seq, int first, int last, int l0, int l1);
  // Several sequences' run_layers as one forward (at most one segment per sequence; all checked before any runs):
  // layer by layer, the rows of every segment with l0 <= l < l1 run the layer's jobs together.
  void run_batch(const std::vector<Segment>& segments);
  // Greedy tokens of rows first..last; token -1 for a row whose logits hold a NaN or no finite maximum. With
  // `logits` ([R, vocab] fp32), the bf16-rounded logits too.
  void final_tokens(int seq, int first, int last, int32_t* tokens, float* logits = nullptr);
  // Tokens of rows first..last drawn by `rule` for positions row + 1 from the same bf16-rounded logits
  // (sampling.h: the reference rule, bit for bit); token -1 for a row whose tempered logits are not finite.
  void final_sample(int seq, int first, int last, const SampleRule& rule, int32_t* tokens);
  // The rows of several spans in one LM-head pass (at most max_seqs * max_rows rows in all): tokens and logits rows
  // in span order. With `rules` (one per span, nullptr: greedy), a span's tokens are drawn as final_sample's.
  void final_batch(const std::vector<RowSpan>& spans, int32_t* tokens, float* logits = nullptr,
                   const std::vector<const SampleRule*>* rules = nullptr);
  // Packs the heads (T into the kernels' lane order, E: the LM head's rows of the vocabulary, w_rest into the rest
  // logit's lanes) and keeps them; the sources may be dropped afterwards.
  void set_heads(const std::vector<HeadSource>& heads);
  // (token, confidence) of head i on row pos (token -1: non-finite); with `logits` ([head_vocab(i)] fp32), the
  // head's bf16-rounded logits over its real tokens. With `rule`, the token is the head's own draw for position
  // pos + 1 over its real tokens (noise keyed by their global ids); the confidence stays the greedy statistics'.
  std::pair<int32_t, float> head(int seq, int pos, int i, float* logits = nullptr, const SampleRule* rule = nullptr);
  void copy_row(int seq, int pos, uint16_t* dst) const;
  void copy_kv(int seq, int layer, int length, uint16_t* k_dst, uint16_t* v_dst) const;

  const ModelDims& dims() const { return w_->dims(); }
  const Weights& weights() const { return *w_; }
  int max_seq() const { return max_seq_; }
  int max_rows() const { return max_rows_; }
  int max_seqs() const { return max_seqs_; }
  int prefill_chunk() const { return chunk_; }
  int threads() const { return pool_.size(); }
  void set_schedule(ThreadPool::Schedule s, uint64_t seed) { pool_.set_schedule(s, seed); }
  const char* isa() const { return k_.name; }
  size_t kv_bytes() const { return k_cache_.bytes() + v_cache_.bytes(); }
  int n_heads_set() const { return static_cast<int>(heads_.size()); }
  int head_vocab(int i) const;  // the real tokens of head i (its vocabulary subset, or the model's)

 private:
  JobContext context();
  uint16_t* ring_row(int seq, int pos) {
    return ring_.data() + (static_cast<size_t>(seq) * max_rows_ + pos % max_rows_) * dims().d;
  }
  const uint16_t* ring_row(int seq, int pos) const {
    return ring_.data() + (static_cast<size_t>(seq) * max_rows_ + pos % max_rows_) * dims().d;
  }
  void check_seq(const char* what, int seq) const;
  void check_rows(const char* what, int first, int last) const;
  void stage(const std::vector<RowSpan>& spans);    // their ring rows -> hw_, end to end
  void unstage(const std::vector<RowSpan>& spans);  // hw_ -> their ring rows
  std::unique_ptr<LayerJob> layer_job(const JobContext& cx, const std::vector<RowSpan>& spans);
  void run_layer(LayerJob& j, int l);  // layer l over the spans' rows in hw_
  void forward(const std::vector<RowSpan>& spans, int l0, int l1);  // layers [l0, l1) over hw_

  const Kernels& k_;
  std::shared_ptr<Weights> w_;
  int max_seq_, max_rows_, chunk_, nkb_, max_seqs_;
  Buffer<uint16_t> k_cache_, v_cache_, ring_, hw_;
  Buffer<float> cos_, sin_, q_, attn_, act_, part_o_, part_ml_, lg_;
  Buffer<float> lg_rows_;    // [max_seqs * max_rows, vocab]: sampled rows' logits (allocated at the first draw)
  SampleScratch sample_ws_;
  int job_counter_ = 0;
  std::vector<ThreadWs> ws_;
  std::vector<Head> heads_;
  ThreadPool pool_;
  const LaneLayout *L_d_, *L_norm_, *L_rest_, *L_q_, *L_ffn_, *L_hd_;
};

}  // namespace adadecode::cpu
