// Seeded sampling on the CPU engine's logits: the rule of adadecode/engines/sampling.py (read its docstring), bit for
// bit, as the CUDA epilogue (csrc/cuda/kernels/lm_head.cu: perturb + select) applies it, in C++ without torch:
//   z[j] = fl(l[j] * inv_t); top-k: keep z >= the top_k-th largest z (ties at it: all kept); top-p: integer weights
//   w[j] = floor(exp_f32(z[j] - max z) 2^24) (0 below -17), target = ceil(double(sum w) * top_p), keep z >= the
//   largest z value v with sum(w[z >= v]) >= target; token = argmax over kept j of fl(z[j] + gumbel(seed, pos,
//   id[j])), ties to the lowest j.
// The noise, the weights and the fixed exp/log are csrc/cuda/kernels/sampling.cuh's functions (the same source as the GPU
// epilogue). The thresholds are values, found here by selection and a sort of the few tokens within 17 of the
// maximum (the kernel: radix select over order_key): the same values, so the same kept set. Only the tokens that can
// win get noise (sampling.py: the noise lies in [-3, 17], so a token with fl(z + 17) < fl(max z - 3) loses whatever
// the draws), which gives the same argmax as noising every kept token.
#pragma once
#include <cstdint>
#include <vector>

namespace adadecode::cpu {

struct SampleRule {
  uint64_t seed = 0;
  float inv_temperature = 1.f;  // fp32(1 / temperature), > 0 (sampling.py: Sampling.inv_temperature)
  int32_t top_k = 0;            // 0 or >= n: every token
  double top_p = 1.0;           // (0, 1]; 1: no nucleus
};

// Scratch a caller may keep between rows (no allocation once it has grown).
struct SampleScratch {
  std::vector<float> z;
  std::vector<uint32_t> keys;
  std::vector<int32_t> idx;
};

// The index j in [0, n) drawn from logits l (fp32) for the token at position `pos`, with ids[j] the token id of
// column j as the noise key (nullptr: j); -1 when a tempered logit is not finite (sampling.py raises there).
int32_t sample_row(const float* l, int n, const int32_t* ids, int32_t pos, const SampleRule& rule, SampleScratch& s);

}  // namespace adadecode::cpu
