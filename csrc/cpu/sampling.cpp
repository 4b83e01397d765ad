// Seeded sampling on the CPU (sampling.h: the rule and why it is the reference's, bit for bit). Built with
// -ffp-contract=off like every CPU source: each + and * below is one IEEE operation, as in the reference; the
// per-candidate ones go through rn:: (fixed_math.h) as in sampling.cuh.
#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "../cuda/kernels/sampling.cuh"

namespace adadecode::cpu {

namespace {
constexpr float kGumbelLo = -3.f, kGumbelHi = 17.f;  // sampling.py: GUMBEL_LO, GUMBEL_HI
// fl(a + b): one IEEE addition (this translation unit fuses nothing; rn::add's volatile is for other builds and
// costs a store and a load on every token of the scans)
inline float add(float a, float b) { return a + b; }
}

int32_t sample_row(const float* l, int n, const int32_t* ids, int32_t pos, const SampleRule& rule, SampleScratch& s) {
  if (n <= 0) return -1;
  s.z.resize(n);
  float* z = s.z.data();
  const float inv_t = rule.inv_temperature;
  float m = -INFINITY;
  bool finite = true;
  for (int j = 0; j < n; ++j) {
    const float v = l[j] * inv_t;  // one rounding
    z[j] = v;
    finite = finite && std::isfinite(v);
    m = v > m ? v : m;
  }
  if (!finite) return -1;

  // Only the candidates, tokens with fl(z + 17) >= fl(m - 3), can win. They are a top set (rounding is monotone),
  // every token of positive top-p weight is one (z - m >= -17), and what is kept is { z >= thr }: so past this point
  // only candidates are looked at. They are sorted into buckets of m - z (integer steps: the z order, coarsely).
  constexpr int kBuckets = 21;  // m - z in [0, 20] for every candidate; bucket 21: the others (no branch per token)
  const float floor_c = add(m, kGumbelLo);
  auto bucket = [&](float zj) {
    const float d = m - zj;
    const int b = d < kBuckets ? static_cast<int>(d) : kBuckets - 1;
    return add(zj, kGumbelHi) >= floor_c ? b : kBuckets;
  };
  int start[kBuckets + 2] = {};
  for (int j = 0; j < n; ++j) ++start[bucket(z[j]) + 1];
  for (int b = 0; b <= kBuckets; ++b) start[b + 1] += start[b];
  const int nc = start[kBuckets];
  s.idx.resize(n);
  {
    int fill[kBuckets + 1];
    for (int b = 0; b <= kBuckets; ++b) fill[b] = start[b];
    for (int j = 0; j < n; ++j) s.idx[fill[bucket(z[j])]++] = j;
  }

  float thr = -INFINITY;  // kept: z >= thr (as values: -0 and +0 alike)
  if (rule.top_k > 0 && rule.top_k < n && rule.top_k <= nc) {
    // the top_k-th largest z lies in the first bucket where the count from the top reaches top_k (with fewer
    // candidates than top_k it lies below them all and keeps them all: thr = -inf)
    int b = 0;
    while (start[b + 1] < rule.top_k) ++b;
    s.keys.clear();
    for (int i = start[b]; i < start[b + 1]; ++i) s.keys.push_back(order_key(z[s.idx[i]]));
    auto kth = s.keys.begin() + (rule.top_k - 1 - start[b]);
    // order_key: a total order equal to the numeric one (-0 as +0), invertible back to the value
    std::nth_element(s.keys.begin(), kth, s.keys.end(), [](uint32_t x, uint32_t y) { return x > y; });
    const uint32_t key = *kth;
    thr = rn::as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
  }
  if (rule.top_p < 1.0) {
    // the kept tokens of positive weight (all candidates), heaviest first; the threshold is the z where the
    // cumulative weight first reaches the target (sampling.py: a sort and a cumulative sum)
    s.keys.clear();
    uint64_t total = 0;
    for (int i = 0; i < nc; ++i) {
      const int32_t j = s.idx[i];
      if (!(z[j] >= thr)) continue;
      const uint64_t w = top_p_weight(z[j], m);
      if (w == 0) continue;
      total += w;
      s.keys.push_back(static_cast<uint32_t>(j));
    }
    const uint64_t target = static_cast<uint64_t>(std::ceil(static_cast<double>(total) * rule.top_p));
    std::sort(s.keys.begin(), s.keys.end(), [&](uint32_t a, uint32_t b) { return z[a] > z[b]; });
    uint64_t cum = 0;
    for (uint32_t j : s.keys) {
      cum += top_p_weight(z[j], m);
      if (cum >= target) {
        thr = std::max(thr, z[j]);
        break;
      }
    }
  }
  // The draw: argmax of y = fl(z + gumbel) over the kept candidates, ties to the lowest index. Visited from the
  // largest z down (bucket order), a candidate with fl(z + 17) < the best y so far is skipped without its noise: its
  // y is at most fl(z + 16.64) <= fl(z + 17) < the best (rounding is monotone), so it can neither win nor tie. The
  // visiting order does not change the result (the largest y, the lowest index among equal ones), only the draws.
  float best = -INFINITY;
  int32_t bj = -1;
  for (int i = 0; i < nc; ++i) {
    const int32_t j = s.idx[i];
    if (!(z[j] >= thr) || (bj >= 0 && add(z[j], kGumbelHi) < best)) continue;
    const float y = rn::add(z[j], gumbel_noise(rule.seed, pos, ids ? ids[j] : j));
    if (bj < 0 || y > best || (y == best && j < bj)) best = y, bj = j;
  }
  return bj;
}

}  // namespace adadecode::cpu
