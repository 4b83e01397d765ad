// The CUDA engine runtime: the engine contract of docs/design.md#contract on the kernels of csrc/cuda/kernels.
// Torch-free: it holds raw device pointers (weights are owned by the caller, e.g. the torch binding in
// csrc/cuda/bindings/engine.cpp, and must outlive the Engine), allocates its own KV cache and workspace once,
// and runs everything on one dedicated non-blocking stream.
//
// Sequences (docs/design.md#contract, "Sequences"): an Engine of max_seqs sequences holds, for each, its own KV cache
// and its own ring of rows in flight, in fixed slots of one allocation each (sequence s owns region s); a row only
// ever reads its own sequence's region. Every per-sequence call takes the sequence.
//
// State, per sequence s (S = max_seqs, T = max_seq):
//   kv cache      [S][n_layers][K, V][T][Hkv][hd] bf16: K of layer l of s at kv + (2 (s L + l)) * T*Hkv*hd, V next
//   ring          [S][max_rows][d] bf16: the residual stream of the rows in flight, slot = pos % max_rows
// The workspace takes max(S * max_rows, prefill_chunk) rows (every sequence's rows in flight in one step).
// Host-side bookkeeping (which rows are live, their depth, the valid cache length) is the caller's job (the
// Python CudaEngine mirrors TorchEngine's checks); this layer only checks what keeps memory accesses in bounds.
//
// Graphs: run_layers(seq, first, last, l0, l1) = one by-value "gather" launch (copies the R rows from the ring into
// the contiguous work buffer and writes first_pos to a device int32) + one replay of a CUDA graph captured
// once per (seq, R, l0, l1): the layers [l0, l1) over the work buffer (positions read from the device int32) and a
// final scatter back into the ring. final(first, last) and head(pos, i) launch eagerly (their few kernels read
// the ring slots in place, by value) and end with one device-to-host copy of (token, max_prob) into pinned memory.
//
// run_batch (several sequences' run_layers in one step) launches eagerly, layer by layer: the rows of every segment
// that runs the layer sit end to end in the work buffer; the QKV, o_proj, gate/up and down GEMMs take them all
// (the skinny GEMM, in launches of at most 16 rows: one pass over the weights per 16 rows), and RoPE + the K/V
// append and attention run per segment (its sequence's cache, its positions: d_iota_ + first). A batch's QKV is the
// skinny GEMM + rope_append_kv (the fused QKV kernel writes one cache), bit for bit the fused kernel. final_batch:
// every item's rows gathered, the greedy ones in LM-head launches of up to 16 rows, each sampled item in its own
// launch with its own settings (a slot of d_sample_), one read-back. Not in graphs (keyed by the batch's shape:
// not done yet). A row's bits are those it gets alone.
//
// Fused (default): a decode layer is 5 launches (QKV with the norm, bias, RoPE and K/V append; attention; o_proj with
// the residual add; gate/up with the norm; down with the residual add), 6 with Qwen3's q/k head norms (the QKV GEMM
// with the norm and bias, then the head norms + RoPE + K/V append in rope_append_kv: the fused QKV kernel's blocks
// own 2 rotation pairs of a head, and a head's norm needs its whole sum of squares first), the final step 2 (norm +
// LM head, merge), each
// bit for bit the unfused launches it replaces; set_fused(false) runs those (the reference of the tests). On sm_90+
// the fused launches are programmatic dependents (PDL): each kernel's weight prefetch overlaps its predecessor.
#pragma once
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <map>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../kernels/sampling.cuh"
#include "common/model.h"

namespace adadecode::rt {

using bf16 = __nv_bfloat16;

// The model's sizes (window: attention.cuh's sliding window; qkv_bias / qk_norm: every layer has the biases / the q
// and k head norms, LayerPtrs) and the error of a device allocation that does not fit (the binding turns it into a
// Python MemoryError): csrc/common/model.h, shared with the CPU engine.
using adadecode::ModelDims;
using adadecode::OutOfMemory;

// Non-owning device pointers, all bf16 row-major in the HF [out, in] layout, 16-byte aligned.
struct LayerPtrs {
  const bf16* attn_norm = nullptr;  // [d]
  const bf16* wqkv = nullptr;       // [(H + 2 Hkv) hd, d]: q rows, then k rows, then v rows
  const bf16* wo = nullptr;         // [d, H hd]
  const bf16* mlp_norm = nullptr;   // [d]
  const bf16* w_gate = nullptr;     // [ffn, d]
  const bf16* w_up = nullptr;       // [ffn, d]
  const bf16* w_down = nullptr;     // [d, ffn]
  const bf16* bqkv = nullptr;       // [(H + 2 Hkv) hd] (bq; bk; bv) when dims.qkv_bias (Qwen2)
  const bf16* q_norm = nullptr;     // [hd] when dims.qk_norm (Qwen3)
  const bf16* k_norm = nullptr;     // [hd] when dims.qk_norm
};

struct WeightPtrs {
  const bf16* embed = nullptr;    // [vocab, d]
  const bf16* norm = nullptr;     // [d]
  const bf16* lm_head = nullptr;  // [vocab, d] (may equal embed)
  const float* cos = nullptr;     // [max_seq, hd/2] fp32
  const float* sin = nullptr;     // [max_seq, hd/2] fp32
  std::vector<LayerPtrs> layers;
};

struct HeadPtrs {
  int layer = 0;
  const bf16* T = nullptr;          // [d, d]
  const int32_t* vocab = nullptr;   // [n_vocab] sorted ids, or nullptr (full vocabulary)
  int n_vocab = 0;                  // K, or the model's vocab when vocab == nullptr
  const bf16* w_rest = nullptr;     // [d] or nullptr
};

// The skinny GEMM (batch invariant) takes at most 16 rows: more rows per call would go to the tensor cores.
constexpr int kMaxRows = 16;
// Graphs kept per cache (layers / final / heads) before the cache is emptied and re-filled on demand.
constexpr size_t kMaxGraphsPerCache = 4096;

class Engine {
 public:
  // device: the CUDA device of the weights. prefill_chunk: rows per prefill step (bounds the workspace).
  Engine(const ModelDims& dims, WeightPtrs weights, int max_seq, int max_rows, int prefill_chunk, int device,
         int max_seqs = 1);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // One sequence's run_layers in a run_batch; one sequence's rows for final_batch (sampling: nullptr for greedy).
  struct Segment {
    int seq = 0, first = 0, last = 0, l0 = 0, l1 = 0;
  };
  struct FinalItem {
    int seq = 0, first = 0, last = 0;
    const SampleParams* sampling = nullptr;
  };

  // Forward over tokens[0..n) (host ids, already checked to be in the vocabulary) at positions start..start+n-1 of
  // sequence seq (its cache holding 0..start-1) through the tensor-core path in chunks of prefill_chunk rows from
  // start; fills every layer's cache there and leaves the hidden state of row start+n-1 (depth L) in its ring slot.
  // A prefill in pieces has the bits of one call when every piece but the last is a whole number of chunks (the
  // chunks then start at the same positions; a chunk of more than 16 rows goes to the tensor cores, whose order
  // differs from the skinny GEMM's). Synchronous.
  void prefill(int seq, const int32_t* tokens, int n, int start = 0);
  // Ring slot of pos <- embedding row of token (a device-to-device copy; asynchronous).
  void embed(int seq, int pos, int token);
  // Layers [l0, l1) for rows first..last (their hidden states in the ring), causal into the cache. Async.
  void run_layers(int seq, int first, int last, int l0, int l1);
  // Several sequences' run_layers in one step (at most one segment per sequence, all checked before any runs): layer
  // by layer, the rows of every segment with l0 <= l < l1 together. Async.
  void run_batch(const std::vector<Segment>& segments);
  // Greedy tokens and their probabilities of rows first..last (final norm + LM head, bf16-rounded logits,
  // lowest id on ties). tokens/probs: host arrays of last - first + 1. Synchronous. A non-finite row gives
  // token -1 and prob NaN (the caller raises). With `sampling` (its pos is ignored), row first + r draws the
  // token of position first + 1 + r by the seeded sampling rule instead (probs stay the greedy token's).
  void final_tokens(int seq, int first, int last, int32_t* tokens, float* probs,
                    const SampleParams* sampling = nullptr);
  // final_tokens of several items on distinct sequences in one step: tokens/probs in item order. Synchronous.
  void final_batch(const std::vector<FinalItem>& items, int32_t* tokens, float* probs);
  // The final-normed rows first..last into dst (device, [R, d] bf16), for logits in tests. Synchronous.
  void final_normed(int seq, int first, int last, bf16* dst);
  void set_heads(std::vector<HeadPtrs> heads);
  // (token, max_prob) of head i on row pos. Synchronous. With `sampling`, the token is the head's own draw for
  // position pos + 1 (the noise the final layer's draw there uses); max_prob stays the head's largest probability.
  std::pair<int32_t, float> head(int seq, int pos, int i, const SampleParams* sampling = nullptr);
  // Ring row of pos into dst (device, [d] bf16). Synchronous.
  void copy_row(int seq, int pos, bf16* dst);
  // K and V of positions 0..length-1 of a layer into k_dst, v_dst (device, [length, Hkv, hd] bf16). Synchronous.
  void copy_kv(int seq, int layer, int length, bf16* k_dst, bf16* v_dst);
  void synchronize();
  // Graphs on (default) or every call launched eagerly (same kernels, same arguments: the same bits).
  void set_use_graphs(bool on) { use_graphs_ = on; }
  bool use_graphs() const { return use_graphs_; }
  // Fused decode kernels on (default) or the unfused sequence (same bits, more launches). Drops the layer graphs.
  void set_fused(bool on);
  bool fused() const { return fused_; }
  bool pdl() const { return pdl_ && fused_; }  // programmatic dependent launches in use

  int n_graphs() const { return static_cast<int>(layer_graphs_.size()); }
  size_t kv_bytes() const { return kv_bytes_; }
  size_t workspace_bytes() const { return ws_bytes_; }
  cudaStream_t stream() const { return stream_; }
  const ModelDims& dims() const { return dims_; }
  int max_seq() const { return max_seq_; }
  int max_rows() const { return max_rows_; }
  int max_seqs() const { return max_seqs_; }
  int prefill_chunk() const { return chunk_; }

 private:
  struct Graph {
    cudaGraphExec_t exec = nullptr;
  };
  using Key = std::tuple<int, int, int, int>;  // (seq, R, l0, l1)
  // Rows hw_[r0, r0 + R) of sequence seq, at positions *pos + r (device int32: d_pos_, or d_iota_ + first).
  struct Span {
    int seq = 0, r0 = 0, R = 0;
    const int32_t* pos = nullptr;
  };

  bf16* k_cache(int seq, int l) const {
    return kv_ + (2 * (static_cast<size_t>(seq) * dims_.n_layers + l)) * layer_kv_elems_;
  }
  bf16* v_cache(int seq, int l) const { return k_cache(seq, l) + layer_kv_elems_; }
  bf16* ring_of(int seq) const { return ring_ + static_cast<size_t>(seq) * max_rows_ * dims_.d; }
  bf16* ring_row(int seq, int pos) const { return ring_of(seq) + static_cast<size_t>(pos % max_rows_) * dims_.d; }

  void check_seq(const char* what, int seq) const;
  void check_rows(const char* what, int first, int last) const;
  void check_layers(int l0, int l1) const;
  // Layers [l0, l1) over hw_[0..R), the rows of `spans` end to end (one span: a run_layers or a prefill chunk; more:
  // a run_batch's layer); attention grid sized for max_ctx.
  void enqueue_layer_body(int R, int l0, int l1, const std::vector<Span>& spans, int max_ctx);
  void enqueue_layers(int seq, int R, int l0, int l1);  // captured: layer body at *d_pos_ + scatter to the ring
  void enqueue_final(int seq, int first, int R, bool sample);  // norm + lm head (+ sampling) + read-back copy
  void enqueue_head(int seq, int pos, int i, bool sample);     // norm + T + lm head (+ sampling) + read-back copy
  void enqueue_readback();
  void set_sample_params(int slot, const SampleParams& p, int pos);  // into d_sample_[slot], in stream order
  void gather(int seq, int first, int R, bf16* dst, int32_t* pos_out);  // ring rows -> dst (by value)
  void put_back(int seq, int first, int R, const bf16* src);            // src rows -> ring (by value)
  template <typename F>
  cudaGraphExec_t capture(F&& body, const std::string& what);
  template <typename F>
  void run_cached(std::map<Key, Graph>& cache, const Key& key, F&& body, const std::string& what);
  void free_graphs(std::map<Key, Graph>& m);
  void release();

  ModelDims dims_;
  WeightPtrs w_;
  int max_seq_, max_rows_, chunk_, device_, max_seqs_;
  int out_rows_;  // max_seqs * max_rows: the rows one step's read-back holds
  int qkv_n_;  // (H + 2 Hkv) hd
  size_t layer_kv_elems_ = 0;
  size_t attn_ws_floats_ = 0;
  size_t kv_bytes_ = 0, ws_bytes_ = 0;
  bool use_graphs_ = true;
  bool fused_ = true;
  bool pdl_ = false;
  cudaStream_t stream_ = nullptr;

  // device memory
  bf16* kv_ = nullptr;     // all layers' K and V
  char* arena_ = nullptr;  // the workspace below, one allocation
  bf16* ring_ = nullptr;   // [max_seqs, max_rows, d]
  bf16* hw_ = nullptr;     // [P = max(max_seqs * max_rows, chunk), d]: rows being run (decode) / the prefill chunk
  bf16* hx_ = nullptr;     // [max_seqs * max_rows, d]: rows gathered for final / head
  bf16* xn_ = nullptr;     // [P, d]: normed activations
  bf16* z_ = nullptr;      // [max_rows, d]: head transform output
  bf16* qkv_ = nullptr;    // [P, qkv_n]
  bf16* attn_ = nullptr;   // [P, H hd]
  bf16* act_ = nullptr;    // [P, ffn]
  float* attn_ws_ = nullptr;
  float* lm_ws_ = nullptr;
  int32_t* d_pos_ = nullptr;    // first_pos of the current run_layers (read by the captured graphs)
  int32_t* d_iota_ = nullptr;   // [max_seq] 0..max_seq-1: first_pos pointers for the prefill chunks
  int32_t* d_tokens_ = nullptr; // [max_seq] prompt ids
  int32_t* d_out_ = nullptr;    // [2 * out_rows_]: token ids, then max_prob bit patterns
  int32_t* h_out_ = nullptr;    // pinned mirror of d_out_
  SampleParams* d_sample_ = nullptr;  // [max_seqs]: the sampling settings final / head read (slot i: item i)
  SampleParams* h_sample_ = nullptr;  // pinned staging for d_sample_ (every call that writes it synchronizes)

  std::map<Key, Graph> layer_graphs_;
  std::vector<HeadPtrs> heads_;
};

// Bytes of the KV caches (every sequence's) and of the workspace an Engine of these sizes allocates (for error
// messages / tests).
size_t kv_cache_bytes(const ModelDims& dims, int max_seq, int max_seqs = 1);
size_t workspace_bytes(const ModelDims& dims, int max_seq, int max_rows, int prefill_chunk, int max_seqs = 1);

}  // namespace adadecode::rt
