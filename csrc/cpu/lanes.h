// The lane layout of the CPU kernels: the reduction order of the CUDA skinny GEMM (csrc/cuda/kernels/skinny_core.cuh),
// laid out so that 16-lane vectors can follow it.
//
// On the GPU, a dot product of length K is split into 16-byte chunks of 8 elements; chunk i belongs to thread
// i % NT (NT = skinny_threads(K): 32 per warp, 1..8 warps, a function of K alone), which runs one fp32 FMA chain
// over its chunks in increasing order, 8 elements in order per chunk; the 32 lanes of each warp then meet in a
// fixed butterfly and the warps are added in order. Here each GPU thread is one vector lane: lane block b (16
// lanes) holds threads 16b .. 16b + 15, so a warp is the block pair (2w, 2w + 1) and its butterfly is
// vreduce16(block 2w + block 2w + 1) (the butterfly's first step adds lane j + 16 to lane j).
//
// A packed weight row stores, block after block, the values in the order the block's lanes consume them: full
// groups g = 0 .. gfull-1 (each thread's g-th chunk), then, if the block has tail lanes (threads with one more
// chunk, tail = nchunk % NT of them in all), the tail group of tail_lanes[b] lanes. Within a group the 8 steps
// (e = element of the chunk) come in pairs (e, e + 1) = (2t, 2t + 1), interleaved per lane: 32-bit word l of pair
// t holds lane l's element 2t in its HIGH half and 2t + 1 in its LOW half (the lane's FMA order is element 2t, then
// 2t + 1). So one 64-byte load gives both steps' 16 lanes by a mask and a shift (no shuffle), on AVX-512 as on two
// AVX2 loads or four NEON loads; and the word is what the bf16 dot-product instruction (AVX512_BF16 vdpbf16ps)
// takes: it multiplies and adds the high (odd-slot) halves first, then the low halves, i.e. element 2t then 2t + 1
// (kernels.inl: when its rounding is that of the FMAs). Lane l <- element 8 * (g * NT + 16 b + l) + e. Nothing is
// padded: a packed row is K values, a permutation of the row (the weights are held once, in this order).
// A permuted activation row (fp32) has the same order, with each block's tail group padded to 16 lanes (slot K
// of the source is a 0) so that every vector load is whole.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace adadecode::cpu {

// The GPU's thread count for a reduction of length K (skinny_core.cuh: skinny_threads).
inline int skinny_lanes(int K) {
  int warps = (K / 8 + 127) / 128;
  if (warps < 1) warps = 1;
  if (warps > 8) warps = 8;
  return warps * 32;
}

struct LaneLayout {
  int K = 0, NT = 0, nblk = 0, gfull = 0;
  std::vector<int> tail_lanes;   // [nblk] lanes of block b with a tail chunk (0..16)
  std::vector<int> woff, xoff;   // [nblk] start of block b in a packed weight row / a permuted activation row
  int xlen = 0;                  // floats in a permuted activation row
  std::vector<int32_t> wsrc;     // [K] packed slot -> element index
  std::vector<int32_t> xsrc;     // [xlen] permuted slot -> element index, K for a padding 0

  LaneLayout() = default;
  LaneLayout(int K_, int NT_) : K(K_), NT(NT_) {
    if (K <= 0 || K % 8 != 0) throw std::invalid_argument("lane layout: K = " + std::to_string(K) + " is not a positive multiple of 8");
    if (NT <= 0 || NT % 32 != 0) throw std::invalid_argument("lane layout: NT = " + std::to_string(NT) + " is not a multiple of 32");
    const int nchunk = K / 8;
    nblk = NT / 16;
    gfull = nchunk / NT;
    const int tail = nchunk % NT;
    tail_lanes.resize(nblk);
    woff.resize(nblk);
    xoff.resize(nblk);
    int w = 0, x = 0;
    for (int b = 0; b < nblk; ++b) {
      const int tl = tail - 16 * b;
      tail_lanes[b] = tl < 0 ? 0 : tl > 16 ? 16 : tl;
      woff[b] = w;
      xoff[b] = x;
      auto group = [&](int g, int lanes) {  // lanes active (16 but in the tail)
        for (int t = 0; t < 4; ++t)
          for (int l = 0; l < lanes; ++l)
            for (int h = 0; h < 2; ++h) wsrc.push_back(8 * (g * NT + 16 * b + l) + 2 * t + 1 - h);  // low: 2t + 1
        for (int e = 0; e < 8; ++e)
          for (int l = 0; l < 16; ++l) xsrc.push_back(l < lanes ? 8 * (g * NT + 16 * b + l) + e : K);
      };
      for (int g = 0; g < gfull; ++g) group(g, 16);
      if (tail_lanes[b]) group(gfull, tail_lanes[b]);
      w = static_cast<int>(wsrc.size());
      x = static_cast<int>(xsrc.size());
    }
    xlen = x;
    if (w != K) throw std::logic_error("lane layout: packed row of " + std::to_string(w) + " values, K = " + std::to_string(K));
  }
};

// The range of the biased exponent fields (bits 7..14 of a bf16 value, 23..30 of an fp32 one) over a set of
// values: lo = the smallest over the nonzero ones (0 when one is subnormal; 255 when all are zero), hi = the largest
// over all (255: an infinity or NaN). The bf16 dot-product path needs this of a matrix (once, at load) and of each
// activation row (kernels.inl: when its flushes cannot differ from the FMAs).
struct ExpRange {
  int lo = 255, hi = 0;
  void add_bits16(uint16_t h) {
    const int e = (h >> 7) & 0xff;
    if (h & 0x7fff) lo = e < lo ? e : lo;
    hi = e > hi ? e : hi;
  }
  void merge(const ExpRange& o) {
    lo = o.lo < lo ? o.lo : lo;
    hi = o.hi > hi ? o.hi : hi;
  }
};
inline ExpRange bf16_exp_range(const uint16_t* p, size_t n) {
  ExpRange r;
  for (size_t i = 0; i < n; ++i) r.add_bits16(p[i]);
  return r;
}

}  // namespace adadecode::cpu
