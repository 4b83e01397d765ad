// What the two native engines (the CPU engine, csrc/cpu, and the CUDA engine runtime, csrc/cuda/runtime) share: the
// model's sizes, the error their bindings turn into a Python MemoryError, and how a size is written in a message.
// Torch-free and CUDA-free.
#pragma once
#include <cstddef>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace adadecode {

// head_dim is its own field: n_heads * head_dim need not be d (Qwen3: 16 x 128 heads on d = 1024). window > 0: a row
// at position p attends to positions max(0, p - window + 1)..p (Mistral / Qwen2 sliding windows); 0: all of 0..p.
struct ModelDims {
  int n_layers = 0, d = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0, ffn = 0, vocab = 0;
  float eps = 1e-5f;
  int window = 0;
  bool qkv_bias = false;  // Qwen2: q, k, v projections with biases (added to the fp32 sums before the bf16 rounding)
  bool qk_norm = false;   // Qwen3: each q and k head RMS-normalised over head_dim after the projection, before RoPE
};

// An allocation that does not fit (host or device memory): each binding turns it into a MemoryError of its module.
struct OutOfMemory : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// "1.234 GiB"
inline std::string gib(size_t bytes) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.3f GiB", static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

}  // namespace adadecode
