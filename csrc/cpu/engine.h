// The CPU engine runtime: the engine contract of docs/design.md#contract on the CPU kernels (kernels.h) and a thread pool.
// Torch-free: the caller hands over bf16 weights (HF layout, [out, in] row-major) once; they are packed into the
// kernels' lane order (lanes.h) and held here, once (the caller may drop its copy).
//
// State of one sequence:
//   K cache   layer l, kv head j: [ceil(max_seq / 16)] blocks of [head_dim][16] bf16 (lane = position: scores of 16
//             positions are one vector FMA chain over the head dims)
//   V cache   layer l, kv head j: [max_seq][head_dim] bf16
//   ring      [max_rows][d] bf16: the residual stream of the rows in flight, slot = pos % max_rows
// Host-side bookkeeping (which rows are live, their depth, the valid cache length) is the caller's (the Python
// CpuEngine, with TorchEngine's checks); this layer checks what keeps memory accesses in bounds.
//
// A decode layer is 5 jobs on the pool, each the CUDA fused launch it mirrors, bit for bit: (1) RMSNorm + QKV +
// RoPE + K/V append, items = heads; (2) attention, items = (kv head, 128-position chunk), the last item of a kv head
// merges its chunks; (3) o_proj + residual; (4) RMSNorm + gate/up + SiLU * up; (5) down + residual: items = column
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

// Bytes of the K and V caches of an Engine of max_seq positions (K in whole blocks of kKBlock positions): the one
// formula, which the Python side checks against available_memory() before it builds an Engine.
size_t kv_cache_bytes(const ModelDims& dims, int64_t max_seq);

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
  std::vector<float> best;     // [max_rows] this thread's running argmax per row (LM-head jobs)
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
  uint16_t* k_cache;  // [n_layers][n_kv_heads][nkb blocks][head_dim][kKBlock]
  uint16_t* v_cache;  // [n_layers][n_kv_heads][max_seq][head_dim]
  int max_seq, nkb;
  uint16_t* hw;       // [P, d] bf16: the rows being run (P = max(max_rows, prefill_chunk))
  const float* cos;   // [max_seq, head_dim / 2]
  const float* sin;
  float* q;           // [P, max(H hd, d)]: rotated q (a head's z)
  float* attn;        // [P, H hd]: attention's output
  float* act;         // [P, ffn]: SiLU(gate) * up
  std::vector<ThreadWs>& ws;
  const LaneLayout *L_d, *L_norm, *L_rest, *L_q, *L_ffn, *L_hd;  // L_hd: a head's norm (32 lanes)

  uint16_t* k_layer(int l) const { return k_cache + static_cast<size_t>(l) * m.n_kv_heads * nkb * kKBlock * m.head_dim; }
  uint16_t* v_layer(int l) const { return v_cache + static_cast<size_t>(l) * m.n_kv_heads * max_seq * m.head_dim; }
};

class Engine {
 public:
  Engine(std::shared_ptr<Weights> weights, const float* cos, const float* sin, int max_seq, int max_rows,
         int prefill_chunk, int threads, const Kernels* kernels);

  void prefill(const int32_t* tokens, int n);
  void embed(int pos, int token);
  void run_layers(int first, int last, int l0, int l1);
  // Greedy tokens of rows first..last; token -1 for a row whose logits hold a NaN or no finite maximum. With
  // `logits` ([R, vocab] fp32), the bf16-rounded logits too.
  void final_tokens(int first, int last, int32_t* tokens, float* logits = nullptr);
  // Tokens of rows first..last drawn by `rule` for positions row + 1 from the same bf16-rounded logits
  // (sampling.h: the reference rule, bit for bit); token -1 for a row whose tempered logits are not finite.
  void final_sample(int first, int last, const SampleRule& rule, int32_t* tokens);
  // Packs the heads (T into the kernels' lane order, E: the LM head's rows of the vocabulary, w_rest into the rest
  // logit's lanes) and keeps them; the sources may be dropped afterwards.
  void set_heads(const std::vector<HeadSource>& heads);
  // (token, confidence) of head i on row pos (token -1: non-finite); with `logits` ([head_vocab(i)] fp32), the
  // head's bf16-rounded logits over its real tokens. With `rule`, the token is the head's own draw for position
  // pos + 1 over its real tokens (noise keyed by their global ids); the confidence stays the greedy statistics'.
  std::pair<int32_t, float> head(int pos, int i, float* logits = nullptr, const SampleRule* rule = nullptr);
  void copy_row(int pos, uint16_t* dst) const;
  void copy_kv(int layer, int length, uint16_t* k_dst, uint16_t* v_dst) const;

  const ModelDims& dims() const { return w_->dims(); }
  const Weights& weights() const { return *w_; }
  int max_seq() const { return max_seq_; }
  int max_rows() const { return max_rows_; }
  int threads() const { return pool_.size(); }
  void set_schedule(ThreadPool::Schedule s, uint64_t seed) { pool_.set_schedule(s, seed); }
  const char* isa() const { return k_.name; }
  size_t kv_bytes() const { return k_cache_.bytes() + v_cache_.bytes(); }
  int n_heads_set() const { return static_cast<int>(heads_.size()); }
  int head_vocab(int i) const;  // the real tokens of head i (its vocabulary subset, or the model's)

 private:
  JobContext context();
  uint16_t* ring_row(int pos) { return ring_.data() + static_cast<size_t>(pos % max_rows_) * dims().d; }
  void check_rows(const char* what, int first, int last) const;
  void forward(int R, int first, int l0, int l1);  // layers [l0, l1) over hw_[0..R) at positions first + r

  const Kernels& k_;
  std::shared_ptr<Weights> w_;
  int max_seq_, max_rows_, chunk_, nkb_;
  Buffer<uint16_t> k_cache_, v_cache_, ring_, hw_;
  Buffer<float> cos_, sin_, q_, attn_, act_, part_o_, part_ml_, lg_;
  Buffer<float> lg_rows_;    // [max_rows, vocab]: final_sample's logits (allocated at its first call)
  SampleScratch sample_ws_;
  int job_counter_ = 0;
  std::vector<ThreadWs> ws_;
  std::vector<Head> heads_;
  ThreadPool pool_;
  const LaneLayout *L_d_, *L_norm_, *L_rest_, *L_q_, *L_ffn_, *L_hd_;
};

}  // namespace adadecode::cpu
