// The CPU kernels, written once over the lane vector V (16 fp32 lanes) of the including translation unit:
// kernels_avx512bf16.cpp, kernels_avx512.cpp, kernels_avx2.cpp, kernels_neon.cpp and kernels_portable.cpp each
// include their vec_<isa>.h and then this file inside their own namespace. Contracts: kernels.h. The operation order of each output is the CUDA kernels'
// (lanes.h for dot products; attention.cu's chunks, scores, softmax statistics and merge), so the paths agree bit
// for bit with each other and with CudaEngine on the emulated device.
//
// Nothing here depends on which instruction set runs it except through V (and VS, VP: the dot products' sub-vector
// and bf16 pairs): the tile shapes (register blocking) vary with the registers, and a tile shape only decides which
// outputs are computed together, never an output's order.

// ---- the dot products -----------------------------------------------------------------------------------------------
// out[r][c] = x_r . w_c in lanes.h's order: per block b (16 lanes) and lane l one FMA chain over the lane's elements
// (group by group, element 2t then 2t + 1 of each pair t), from +0; block pairs (2w, 2w + 1) summed lane by lane and
// reduced by vreduce16's tree (warp w's butterfly); the warps added in order. Everything below only decides which
// chains run together and where their operands wait (the register tile, the loop order), never a chain's own steps.
//
// THE SEAM FOR WEIGHT FORMATS. The chains read weights through a weight source W (Bf16Weights below is the one
// written; a quantized format is another struct with the same members, and the tile and loop code is not touched):
//   W::Row                        one packed output row (a column of the product) as the source stores it
//   W::block(row, L, b)           its block b (L.woff[b] for bf16)
//   W::Group W::group(blk, g)     what the 4 pairs of full group g share, loaded once per group (a block format: its
//                                 16 lanes' scales, lane l's chunk being 8 consecutive elements of one block)
//   W::pair(blk, grp, p, s, a, b) pair p = 4 g + t of a full group, sub-vector s (lanes s kSubLanes ..): a <- the
//                                 lanes' element 2t, b <- element 2t + 1, as fp32 (the FMA paths)
//   W::tail_pair(blk, p0, t, tl, s, n, a, b)   pair t of the tail group (tl lanes, p0 = 4 gfull), this sub-vector's
//                                 first n lanes (the others 0)
//   W::pair_bf16(blk, grp, p), W::tail_pair_bf16(blk, p0, t, tl)   (the avx512bf16 path) the same values as 16
//                                 words of bf16 pairs, element 2t in the HIGH half: dequantise -> exact fp32 ->
//                                 round to bf16 (exact: the values ARE bf16, see below) -> pack (vp_pack)
//   W::prefetch(blk, p, skip)     ahead of pair p in the stream, skip bytes further (on the passes that read the
//                                 weights from memory or prefetch the next block's)
// A source must produce exactly the bf16 values the loader would hold (today the GGUF loader dequantises to bf16
// first): the chains' bits are then the bf16 matrix's, on every path. The matrix's ExpRange (dot_tile's wexp) is
// that of those values, computed once at load.
//
// THE BF16 DOT-PRODUCT INSTRUCTION (path avx512bf16). vdpbf16ps adds to each fp32 lane the products of the high
// halves, then of the low halves of its two bf16 pairs: two FMAs, each rounded to nearest even, with subnormal
// inputs (the accumulator included) and results flushed to zero and MXCSR ignored (Intel SDM; probed bit for bit on
// Zen 5 and Sapphire Rapids: ../shared/notes/bf16-dot-probe.md, and dispatch.cpp checks it on each CPU before it
// offers the path). With element 2t in the high half (lanes.h) that is the FMA chain of the order above, as long as
// no flush happens. The rule that guarantees it (no engine changes how it rounds; the emulated device and CUDA keep
// IEEE subnormals):
//   every weight and activation of the call is 0 or normal and finite (exponent field 1..254), and
//   Ew_lo + Ex_lo >= 142 and Ew_hi + Ex_hi + ceil(log2 K) <= 378 (biased exponents: ExpRange of the matrix and of
//   the call's rows; lo over the nonzero values)
// Proof: a nonzero bf16 with biased exponent e is an integer times 2^(e - 134), so every product w x is an integer
// times q = 2^(Ew_lo + Ex_lo - 268) >= 2^-126. A chain starts at +0; if the accumulator is a multiple of q, so is the
// exact sum acc + w x, and so is its rounding (to a grid of ulp <= q it is exact; else the result is a multiple of
// ulp, a multiple of q): so every accumulator and every result is 0 or of magnitude >= q >= 2^-126, never
// subnormal, and no input is. The largest |sum| is below K 2^(Ew_hi + Ex_hi - 252) <= 2^126 (with the rounding
// slack, below 2^127): nothing overflows, no infinity or NaN arises. With no flush and no special value, each step is
// the IEEE FMA. The default model's nonzero weights lie in 2^-18 .. 2^5 (Ew_lo = 109), so a call takes the
// instruction unless one of its activations is nonzero below 2^-94 (or a row is huge); a call that does not pass
// (tiny or subnormal values: tests/test_cpu_kernels.py plants them) runs the FMA chain instead, so every path gives
// the same bits for every input.
//
// Register tiles: the tile is RT rows x CT columns of sub-vector accumulators (VS: kSubLanes lanes; AVX-512 one zmm,
// AVX2 one ymm of the two in V, NEON one q register of four; kRegs of them). Either the columns' weight vectors stay
// in registers and the activations are FMA memory operands, or the rows' activations stay and each weight vector is
// loaded and split once for all RT rows (kFmaCols / kFmaXKept in vec_<isa>.h: sized for its registers). Loop order:
// dot_all below (a decode step's few row tiles inside column blocks; prefill's row tiles outside).

struct Bf16Weights {
  using Row = const uint16_t*;
  struct Group {};
  static Row block(Row r, const LaneLayout& L, int b) { return r + L.woff[b]; }
  static Group group(Row, int) { return {}; }
  static void pair(Row r, const Group&, int p, int s, VS& a, VS& b) { vs_load_pair(r + p * 32 + s * 2 * kSubLanes, a, b); }
  static void tail_pair(Row r, int p0, int t, int tl, int s, int n, VS& a, VS& b) {
    vs_load_pair_n(r + p0 * 32 + t * 2 * tl + s * 2 * kSubLanes, n, a, b);
  }
#if ADA_BF16_DOT
  static VP pair_bf16(Row r, const Group&, int p) { return vp_load(r + p * 32); }
  static VP tail_pair_bf16(Row r, int p0, int t, int tl) { return vp_load_n(r + p0 * 32 + t * 2 * tl, tl); }
#endif
  static void prefetch(Row r, int p, int skip) { prefetch_stream(reinterpret_cast<const char*>(r + p * 32) + skip); }
};

// The FMA chains: activations in the permuted fp32 form (block b at xoff[b]; pair p: steps 2p and 2p + 1, 16 floats
// each).
template <class W_>
struct PathFma {
  using W = W_;
  using Row = typename W::Row;
  using X = const float*;
  static constexpr int kSubs = kSub;
  static constexpr int kMaxRows = kFmaMaxRows;
  static constexpr int cols(int RT) { return kFmaCols[RT]; }
  static constexpr bool x_kept(int RT) { return kFmaXKept[RT]; }
  static X xblock(const float* xrow, int xoff) { return xrow + xoff; }

  template <int RT, int CT, bool kXKept, bool kPf>
  static void chain(const Row (&w)[CT], const X (&x)[RT], int gfull, int tl, int s, int pf_skip, VS (&acc)[RT][CT]) {
    for (int r = 0; r < RT; ++r)
      for (int c = 0; c < CT; ++c) acc[r][c] = vs_zero();
    const int so = s * kSubLanes;
    for (int g = 0; g < gfull; ++g) {
      typename W::Group gs[CT];
      for (int c = 0; c < CT; ++c) gs[c] = W::group(w[c], g);
      for (int t = 0; t < 4; ++t) {
        const int p = 4 * g + t;
        if constexpr (kPf) {
          if (s == 0)
            for (int c = 0; c < CT; ++c) W::prefetch(w[c], p, pf_skip);
        }
        if constexpr (kXKept) {
          VS xa[RT], xb[RT];
          for (int r = 0; r < RT; ++r) xa[r] = vs_load(x[r] + p * 32 + so), xb[r] = vs_load(x[r] + p * 32 + 16 + so);
          for (int c = 0; c < CT; ++c) {
            VS wa, wb;
            W::pair(w[c], gs[c], p, s, wa, wb);
            for (int r = 0; r < RT; ++r) acc[r][c] = vs_fma(wa, xa[r], acc[r][c]);
            for (int r = 0; r < RT; ++r) acc[r][c] = vs_fma(wb, xb[r], acc[r][c]);
          }
        } else {
          VS wa[CT], wb[CT];
          for (int c = 0; c < CT; ++c) W::pair(w[c], gs[c], p, s, wa[c], wb[c]);
          for (int r = 0; r < RT; ++r)
            for (int c = 0; c < CT; ++c) acc[r][c] = vs_fma(wa[c], vs_load(x[r] + p * 32 + so), acc[r][c]);
          for (int r = 0; r < RT; ++r)
            for (int c = 0; c < CT; ++c) acc[r][c] = vs_fma(wb[c], vs_load(x[r] + p * 32 + 16 + so), acc[r][c]);
        }
      }
    }
    // The tail group: only lanes < tl own a chunk; a sub-vector past them has no step (its chains have ended), one
    // that straddles tl loads weight 0 and the activation row's padding 0 in its other lanes, and a chain that
    // starts at +0 never holds -0 (a round-to-nearest sum is -0 only when both addends are), so acc + 0 * 0 keeps
    // them bit for bit (a plain FMA, no per-step lane mask).
    if (tl <= so) return;
    const int n = tl - so < kSubLanes ? tl - so : kSubLanes, p0 = 4 * gfull;
    for (int t = 0; t < 4; ++t) {
      const int p = p0 + t;
      for (int c = 0; c < CT; ++c) {
        VS wa, wb;
        W::tail_pair(w[c], p0, t, tl, s, n, wa, wb);
        for (int r = 0; r < RT; ++r)
          acc[r][c] = vs_fma(wb, vs_load(x[r] + p * 32 + 16 + so), vs_fma(wa, vs_load(x[r] + p * 32 + so), acc[r][c]));
      }
    }
  }
};

#if ADA_BF16_DOT
// The bf16 dot-product chains: activations as bf16 pairs (permute_x: block b at word xoff[b] / 2, pair p at + 16 p),
// one vdpbf16ps per pair of steps.
template <class W_>
struct PathDp {
  using W = W_;
  using Row = typename W::Row;
  using X = const uint32_t*;
  static constexpr int kSubs = 1;
  static constexpr int kMaxRows = kDpMaxRows;
  static constexpr int cols(int RT) { return kDpCols[RT]; }
  static constexpr bool x_kept(int RT) { return kDpXKept[RT]; }
  static X xblock(const float* xrow, int xoff) { return reinterpret_cast<const uint32_t*>(xrow) + xoff / 2; }

  template <int RT, int CT, bool kXKept, bool kPf>
  static void chain(const Row (&w)[CT], const X (&x)[RT], int gfull, int tl, int, int pf_skip, VS (&acc)[RT][CT]) {
    for (int r = 0; r < RT; ++r)
      for (int c = 0; c < CT; ++c) acc[r][c] = vs_zero();
    for (int g = 0; g < gfull; ++g) {
      typename W::Group gs[CT];
      for (int c = 0; c < CT; ++c) gs[c] = W::group(w[c], g);
      for (int t = 0; t < 4; ++t) {
        const int p = 4 * g + t;
        if constexpr (kPf) {
          for (int c = 0; c < CT; ++c) W::prefetch(w[c], p, pf_skip);
        }
        if constexpr (kXKept) {
          VP xv[RT];
          for (int r = 0; r < RT; ++r) xv[r] = vp_load(x[r] + p * 16);
          for (int c = 0; c < CT; ++c) {
            const VP wv = W::pair_bf16(w[c], gs[c], p);
            for (int r = 0; r < RT; ++r) acc[r][c] = vs_dp(acc[r][c], wv, xv[r]);
          }
        } else {
          VP wv[CT];
          for (int c = 0; c < CT; ++c) wv[c] = W::pair_bf16(w[c], gs[c], p);
          for (int r = 0; r < RT; ++r) {
            const VP xv = vp_load(x[r] + p * 16);
            for (int c = 0; c < CT; ++c) acc[r][c] = vs_dp(acc[r][c], wv[c], xv);
          }
        }
      }
    }
    if (tl == 0) return;  // the tail: weights past tl load as 0, the activations' padding is 0 (as above)
    const int p0 = 4 * gfull;
    for (int t = 0; t < 4; ++t)
      for (int c = 0; c < CT; ++c) {
        const VP wv = W::tail_pair_bf16(w[c], p0, t, tl);
        for (int r = 0; r < RT; ++r) acc[r][c] = vs_dp(acc[r][c], wv, vp_load(x[r] + (p0 + t) * 16));
      }
  }
};
#endif

// out[r * ldo + c] for a tile of RT rows and CT columns: for each block pair (2w, 2w + 1) the chains of both
// blocks, lane-summed (the butterfly's first step), then vreduce16's tree for all RT x CT outputs at once; warps
// added in order.
template <class P, int RT, int CT, bool kXKept, bool kPf>
inline void dot_tile_rc(const LaneLayout& L, const typename P::Row* w, const float* x, int xs, float* out, int ldo,
                        int pf_skip) {
  constexpr int N = RT * CT;
  alignas(64) float F[2][N * 16];  // the chains' lanes of blocks 2w, 2w + 1
  float total[N] = {};
  for (int b = 0; b < L.nblk; b += 2) {
    for (int h = 0; h < 2; ++h) {
      const int blk = b + h;
      typename P::Row wb[CT];
      typename P::X xb[RT];
      for (int c = 0; c < CT; ++c) wb[c] = P::W::block(w[c], L, blk);
      for (int r = 0; r < RT; ++r) xb[r] = P::xblock(x + static_cast<size_t>(r) * xs, L.xoff[blk]);
      for (int s = 0; s < P::kSubs; ++s) {
        VS acc[RT][CT];
        P::template chain<RT, CT, kXKept, kPf>(wb, xb, L.gfull, L.tail_lanes[blk], s, pf_skip, acc);
        for (int r = 0; r < RT; ++r)
          for (int c = 0; c < CT; ++c) vs_store(F[h] + (r * CT + c) * 16 + s * kSubLanes, acc[r][c]);
      }
    }
    float sums[N];
    vreduce16_pairs(F[0], F[1], N, sums);
    for (int i = 0; i < N; ++i) total[i] = b == 0 ? sums[i] : total[i] + sums[i];
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CT; ++c) out[r * ldo + c] = total[r * CT + c];
}

// All C columns of RT rows: tiles of the path's width for RT rows, the remaining columns one at a time.
template <class P, int RT, bool kPf>
inline void dot_cols(const LaneLayout& L, const typename P::Row* w, int C, const float* x, int xs, float* out,
                     int ldo, int pf_skip) {
  constexpr int CT = P::cols(RT);
  constexpr bool XK = P::x_kept(RT);
  int c = 0;
  for (; c + CT <= C; c += CT) dot_tile_rc<P, RT, CT, XK, kPf>(L, w + c, x, xs, out + c, ldo, pf_skip);
  if constexpr (CT > 1) {
    for (; c < C; ++c) dot_tile_rc<P, RT, 1, false, kPf>(L, w + c, x, xs, out + c, ldo, pf_skip);
  }
}

// pf < 0: no software prefetch (the weights are in cache); else the stream's, pf bytes further
template <class P, int RT>
inline void dot_rows(const LaneLayout& L, const typename P::Row* w, int C, const float* x, int xs, float* out,
                     int ldo, int pf) {
  if (pf >= 0)
    dot_cols<P, RT, true>(L, w, C, x, xs, out, ldo, pf);
  else
    dot_cols<P, RT, false>(L, w, C, x, xs, out, ldo, 0);
}

template <class P>
inline void dot_rows_n(int rt, const LaneLayout& L, const typename P::Row* w, int C, const float* x, int xs, float* o,
                       int ldo, int pf) {
  switch (rt) {
    case 8: if constexpr (P::kMaxRows >= 8) dot_rows<P, 8>(L, w, C, x, xs, o, ldo, pf); break;
    case 7: if constexpr (P::kMaxRows >= 7) dot_rows<P, 7>(L, w, C, x, xs, o, ldo, pf); break;
    case 6: if constexpr (P::kMaxRows >= 6) dot_rows<P, 6>(L, w, C, x, xs, o, ldo, pf); break;
    case 5: if constexpr (P::kMaxRows >= 5) dot_rows<P, 5>(L, w, C, x, xs, o, ldo, pf); break;
    case 4: if constexpr (P::kMaxRows >= 4) dot_rows<P, 4>(L, w, C, x, xs, o, ldo, pf); break;
    case 3: if constexpr (P::kMaxRows >= 3) dot_rows<P, 3>(L, w, C, x, xs, o, ldo, pf); break;
    case 2: if constexpr (P::kMaxRows >= 2) dot_rows<P, 2>(L, w, C, x, xs, o, ldo, pf); break;
    default: dot_rows<P, 1>(L, w, C, x, xs, o, ldo, pf); break;
  }
}

// R rows in tiles of at most P::kMaxRows rows, as even as they come (64 rows: 12 x 5 + 4; 8: 4 + 4): each row's bits
// are the same in any tile. Few tiles (a decode step's rows): columns outside, kColBlock at a time, the row tiles
// inside; the first tile of a block streams the block's weights from memory (software prefetch ahead of it), the
// second runs from L1 (prefetching the next block's weights during it was slower: kPrefetchNextBlock). Many
// tiles (prefill): row tiles outside, so a tile's rows stay in L1 while the call's columns (in L2 after the first
// tile) pass.
constexpr int kColBlock = 8;
#ifndef ADA_EXP_PF_NEXT
constexpr bool kPrefetchNextBlock = false;  // measured slower on Sapphire Rapids (R = 6, 8: 7.9-9.4 vs 9.3-10.9 GB/s)
#else
constexpr bool kPrefetchNextBlock = true;
#endif
template <class P>
inline void dot_all(const LaneLayout& L, const typename P::Row* w, int C, const float* xp, int xs, int R, float* out) {
  const int ntiles = (R + P::kMaxRows - 1) / P::kMaxRows, base = R / ntiles, extra = R % ntiles;
  if (ntiles <= 2) {
    const int block_bytes = kColBlock * L.K * 2;  // the packed bf16 rows of a block (the prefetch skip)
    for (int c0 = 0; c0 < C; c0 += kColBlock) {
      const int cn = C - c0 < kColBlock ? C - c0 : kColBlock;
      for (int i = 0, r = 0; i < ntiles; ++i) {
        const int rt = base + (i < extra ? 1 : 0);
        dot_rows_n<P>(rt, L, w + c0, cn, xp + static_cast<size_t>(r) * xs, xs, out + static_cast<size_t>(r) * C + c0, C,
                      i == 0 ? 0 : kPrefetchNextBlock ? block_bytes : -1);
        r += rt;
      }
    }
    return;
  }
  for (int i = 0, r = 0; i < ntiles; ++i) {
    const int rt = base + (i < extra ? 1 : 0);
    dot_rows_n<P>(rt, L, w, C, xp + static_cast<size_t>(r) * xs, xs, out + static_cast<size_t>(r) * C, C, r == 0 ? 0 : -1);
    r += rt;
  }
}

inline void k_permute(const LaneLayout& L, const float* x, float* xp) {
  const int32_t* src = L.xsrc.data();
  for (int i = 0; i < L.xlen; i += 16) vstore(xp + i, vgather(x, src + i));  // xlen is a multiple of 16
}

#if ADA_BF16_DOT
// The pair form: word l of pair p = bf16(x[2t]) << 16 | bf16(x[2t + 1]) in lanes.h's order (xlen / 2 words), then
// the row's ExpRange (lo | hi << 8) in word xlen / 2. x holds bf16 values (every producer rounds to bf16): the pairs
// are exact.
inline uint32_t& x_exp_word(const LaneLayout& L, const float* xp) {
  return const_cast<uint32_t*>(reinterpret_cast<const uint32_t*>(xp))[L.xlen / 2];
}
inline void k_permute_x(const LaneLayout& L, const float* x, float* xp) {
  const int32_t* src = L.xsrc.data();
  uint32_t* out = reinterpret_cast<uint32_t*>(xp);
  ExpAcc ea = exp_acc_init();
  for (int i = 0; i < L.xlen; i += 32) {
    const V e = vgather(x, src + i), o = vgather(x, src + i + 16);
    vp_store(out + i / 2, vp_pack(e, o));
    exp_acc_add(ea, e);
    exp_acc_add(ea, o);
  }
  out[L.xlen / 2] = exp_acc_word(ea);
}
inline ExpRange x_exp(const LaneLayout& L, const float* xp) {
  const uint32_t w = x_exp_word(L, xp);
  ExpRange r;
  r.lo = static_cast<int>(w & 0xff), r.hi = static_cast<int>((w >> 8) & 0xff);
  return r;
}
inline std::atomic<long>& dp_fallbacks() {  // calls that took the FMA chains (tests: bf16_dot_fallbacks)
  static std::atomic<long> n{0};
  return n;
}
inline bool dp_exact(const LaneLayout& L, const float* xp, int xs, int R, ExpRange w) {
  ExpRange x;
  for (int r = 0; r < R; ++r) x.merge(x_exp(L, xp + static_cast<size_t>(r) * xs));
  int log2k = 0;
  while ((1 << log2k) < L.K) ++log2k;
  return x.lo >= 1 && w.lo >= 1 && x.hi <= 254 && w.hi <= 254 && x.lo + w.lo >= 142 && x.hi + w.hi + log2k <= 378;
}
inline void k_dot_tile(const LaneLayout& L, const uint16_t* const* w, int C, const float* xp, int xs, int R,
                       float* out, ExpRange wexp) {
  if (dp_exact(L, xp, xs, R, wexp)) {
    dot_all<PathDp<Bf16Weights>>(L, w, C, xp, xs, R, out);
    return;
  }
  // Values the instruction would flush: the FMA chains on the fp32 rows, unpacked from the pairs (exact).
  dp_fallbacks().fetch_add(1, std::memory_order_relaxed);
  thread_local std::vector<float> unpacked;
  unpacked.resize(static_cast<size_t>(R) * L.xlen);
  for (int r = 0; r < R; ++r) {
    const uint32_t* in = reinterpret_cast<const uint32_t*>(xp + static_cast<size_t>(r) * xs);
    float* o = unpacked.data() + static_cast<size_t>(r) * L.xlen;
    for (int i = 0; i < L.xlen; i += 32) {
      V a, b;
      vload_bf16_pair(reinterpret_cast<const uint16_t*>(in + i / 2), a, b);
      vstore(o + i, a);
      vstore(o + i + 16, b);
    }
  }
  dot_all<PathFma<Bf16Weights>>(L, w, C, unpacked.data(), L.xlen, R, out);
}
#else
inline void k_permute_x(const LaneLayout& L, const float* x, float* xp) { k_permute(L, x, xp); }
inline void k_dot_tile(const LaneLayout& L, const uint16_t* const* w, int C, const float* xp, int xs, int R,
                       float* out, ExpRange) {
  dot_all<PathFma<Bf16Weights>>(L, w, C, xp, xs, R, out);
}
#endif

inline float k_dot_f32(const LaneLayout& L, const float* a, const float* b) {
  float total = 0.f;
  for (int blk = 0; blk < L.nblk; blk += 2) {
    V acc[2];
    for (int h = 0; h < 2; ++h) {
      const float* pa = a + L.xoff[blk + h];
      const float* pb = b + L.xoff[blk + h];
      V s = vzero();
      const int steps = L.gfull * 8;
      for (int i = 0; i < steps; ++i) s = vfma(vload(pa + i * 16), vload(pb + i * 16), s);
      const int tl = L.tail_lanes[blk + h];
      if (tl)
        for (int e = 0; e < 8; ++e)
          s = vfma_first(vload(pa + (steps + e) * 16), vload(pb + (steps + e) * 16), s, tl);
      acc[h] = s;
    }
    const float w = vreduce16(vadd(acc[0], acc[1]));
    total = blk == 0 ? w : total + w;
  }
  return total;
}

// Elementwise kernels: whole vectors, then the remainder lanes through the _n forms (same operations).
template <class F>
inline void each16(int n, F&& f) {
  int i = 0;
  for (; i + 16 <= n; i += 16) f(i, 16);
  if (i < n) f(i, n - i);
}

inline V load_any(const float* p, int n) { return n == 16 ? vload(p) : vload_n(p, n); }
inline V load_any_bf16(const uint16_t* p, int n) { return n == 16 ? vload_bf16(p) : vload_bf16_n(p, n); }
inline void store_any(float* p, V a, int n) {
  if (n == 16)
    vstore(p, a);
  else
    vstore_n(p, a, n);
}
inline void store_any_bf16(uint16_t* p, V a, int n) {
  if (n == 16) {
    vstore_bf16(p, a);
  } else {
    alignas(64) uint16_t t[16];
    vstore_bf16(t, a);
    for (int j = 0; j < n; ++j) p[j] = t[j];
  }
}

inline void k_bf16_to_f32(const uint16_t* src, float* dst, int n) {
  each16(n, [&](int i, int m) { store_any(dst + i, load_any_bf16(src + i, m), m); });
}
inline void k_f32_to_bf16(const float* src, uint16_t* dst, int n) {
  each16(n, [&](int i, int m) { store_any_bf16(dst + i, load_any(src + i, m), m); });
}
inline void k_round_bf16(const float* src, float* dst, int n) {
  each16(n, [&](int i, int m) { store_any(dst + i, vbf16_round(load_any(src + i, m)), m); });
}
inline void k_norm_apply(const float* x, float inv, const uint16_t* g, float* out, int n) {
  const V iv = vset1(inv);
  each16(n, [&](int i, int m) {
    const V nx = vbf16_round(vmul(load_any(x + i, m), iv));
    store_any(out + i, vbf16_round(vmul(load_any_bf16(g + i, m), nx)), m);
  });
}
inline void k_residual_add(const float* y, uint16_t* h, int n) {
  each16(n, [&](int i, int m) {
    const V s = vadd(load_any_bf16(h + i, m), vbf16_round(load_any(y + i, m)));
    store_any_bf16(h + i, vbf16_round(s), m);
  });
}
inline void k_silu_mul(const float* g, const float* u, float* act, int n) {
  const V one = vset1(1.f);
  each16(n, [&](int i, int m) {
    const V gv = vbf16_round(load_any(g + i, m)), uv = vbf16_round(load_any(u + i, m));
    const V silu = vdiv(gv, vadd(one, vexp(vneg(gv))));
    store_any(act + i, vbf16_round(vmul(vbf16_round(silu), uv)), m);
  });
}
inline void k_rope(const float* y, const float* cos, const float* sin, int head_dim, float* out) {
  const int half = head_dim / 2;
  each16(half, [&](int i, int m) {
    const V a = load_any(y + i, m), b = load_any(y + half + i, m);
    const V c = vbf16_round(load_any(cos + i, m)), s = vbf16_round(load_any(sin + i, m));
    store_any(out + i, vbf16_round(vsub(vbf16_round(vmul(a, c)), vbf16_round(vmul(b, s)))), m);
    store_any(out + half + i, vbf16_round(vadd(vbf16_round(vmul(b, c)), vbf16_round(vmul(a, s)))), m);
  });
}
inline void k_exp(const float* x, float* y, int n) {
  each16(n, [&](int i, int m) { store_any(y + i, vexp(load_any(x + i, m)), m); });
}
inline void k_exp2(const float* x, float* y, int n) {
  each16(n, [&](int i, int m) { store_any(y + i, vexp2(load_any(x + i, m)), m); });
}

inline bool k_argmax(const float* v, int n, int base, float* best, int* best_idx) {
  float b = *best;
  int bi = *best_idx;
  bool ok = true;
  each16(n, [&](int i, int m) {
    const V x = load_any(v + i, m);
    // a NaN anywhere: the row is bad (the CUDA kernel's merge gives token -1); checked per vector
    alignas(64) float t[16];
    vstore(t, x);
    float mx = -INFINITY;
    for (int j = 0; j < m; ++j) {
      if (t[j] != t[j]) ok = false;
      mx = t[j] > mx ? t[j] : mx;
    }
    // The best is the greatest value, and among equal values the lowest index: a total order, so the result is
    // the same whichever items a thread visits and in whatever order (the pool may hand a thread a later item
    // first). b == -inf exactly when no index is held (bi < 0): a -inf logit never becomes the best.
    if (mx < b || (mx == b && (bi < 0 || base + i >= bi))) return;
    for (int j = 0; j < m; ++j)
      if (t[j] > b || (t[j] == b && bi >= 0 && base + i + j < bi)) b = t[j], bi = base + i + j;
  });
  *best = b;
  *best_idx = bi;
  return ok;
}

// ---- attention (csrc/cuda/kernels/attention.cu, bit for bit) -----------------------------------------------------------
// For each query (row r, head h) of the chunk: q scaled by qscale (log2 units); scores s_t = one FMA chain over the
// head dims in order, -inf past the row's position; m = their max; p_t = exp2(s_t - m) (0 where -inf);
// l = the warp's sum of p (lane L: positions L, L + 32, L + 64, L + 96 in order, then the butterfly: vectors 0, 2, 4,
// 6 are lanes 0-15, vectors 1, 3, 5, 7 lanes 16-31); o = sum_t p_t v_t (one FMA chain per dim over positions in
// order). A sliding window (a.window > 0) masks the positions before attn_lo(p) to -inf as the causal mask masks
// those past p, drops their P.V terms, and gives no partial for a chunk wholly before the window.
constexpr int kMaxQ = kAttnQueries;  // queries scored together (they share the K loads; vec_<isa>.h)

inline void k_attn_chunk(const AttnArgs& a, int kh, int c, int r0, int r1) {
  const int hd = a.head_dim, H = a.n_heads, G = H / a.n_kv_heads, t0 = c * kAttnChunk;
  const int nkb = (a.max_seq + kKBlock - 1) / kKBlock;
  const uint16_t* kbase = a.k_blocks + static_cast<int64_t>(kh) * nkb * hd * kKBlock;
  const uint16_t* vbase = a.v + static_cast<int64_t>(kh) * a.max_seq * hd;
  constexpr int kMaxHd = 256;
  alignas(64) float qs[kMaxQ][kMaxHd];
  alignas(64) float S[kMaxQ][kAttnChunk];
  int qr[kMaxQ], qh[kMaxQ], qp[kMaxQ], qn[kMaxQ], qlo[kMaxQ];  // qlo: the window's first position - t0
  const int nvec = (hd + 15) / 16, last = hd - 16 * (nvec - 1);  // the last vector may be partial
  // P.V holds nvec accumulators per query: as many queries at once as the register budget allows
  const int pv_q = kAccBudget / nvec >= kMaxQ ? kMaxQ : kAccBudget / nvec >= 1 ? kAccBudget / nvec : 1;

  int nq = 0;
  auto flush = [&]() {
    if (nq == 0) return;
    int nmax = 0;
    for (int i = 0; i < nq; ++i) nmax = qn[i] > nmax ? qn[i] : nmax;
    const int nb = (nmax + kKBlock - 1) / kKBlock;
    for (int i = 0; i < nq; ++i)
      for (int j = nb * kKBlock; j < kAttnChunk; ++j) S[i][j] = -INFINITY;
    for (int j = 0; j < nb; ++j) {
      const uint16_t* kb = kbase + static_cast<int64_t>(t0 / kKBlock + j) * hd * kKBlock;
      V acc[kMaxQ];
      for (int i = 0; i < kMaxQ; ++i) acc[i] = vzero();
      for (int d = 0; d < hd; ++d) {
        const V kv = vload_bf16(kb + d * kKBlock);
        for (int i = 0; i < nq; ++i) acc[i] = vfma(kv, vset1(qs[i][d]), acc[i]);
      }
      for (int i = 0; i < nq; ++i) vstore(S[i] + j * kKBlock, vmask_after(acc[i], t0 + j * kKBlock, qp[i]));
    }
    for (int i = 0; i < nq; ++i)
      for (int t = 0; t < qlo[i]; ++t) S[i][t] = -INFINITY;  // before the window (attention.cu: the same mask)
    for (int i = 0; i < nq; ++i) {
      V P[kAttnChunk / 16];
      V mv = vload(S[i]);
      for (int j = 1; j < kAttnChunk / 16; ++j) mv = vmax(mv, vload(S[i] + 16 * j));
      const float m = vmax16(mv);
      const V m16 = vset1(m);
      for (int j = 0; j < kAttnChunk / 16; ++j) {
        const V s = vload(S[i] + 16 * j);
        P[j] = vzero_where_neginf(s, vexp2(vsub(s, m16)));
        vstore(S[i] + 16 * j, P[j]);
      }
      const V lo = vadd(vadd(vadd(P[0], P[2]), P[4]), P[6]);
      const V hi = vadd(vadd(vadd(P[1], P[3]), P[5]), P[7]);
      const int64_t o = (static_cast<int64_t>(qr[i]) * H + qh[i]) * a.n_chunks + c;
      a.part_ml[2 * o] = m;
      a.part_ml[2 * o + 1] = vreduce16(vadd(lo, hi));
    }
    for (int i0 = 0; i0 < nq; i0 += pv_q) {
      const int n = nq - i0 < pv_q ? nq - i0 : pv_q;
      V acc[kMaxQ][kMaxHd / 16];
      int tmax = 0;
      for (int i = 0; i < n; ++i) {
        for (int v = 0; v < nvec; ++v) acc[i][v] = vzero();
        tmax = qn[i0 + i] > tmax ? qn[i0 + i] : tmax;
      }
      for (int t = 0; t < tmax; ++t) {
        const uint16_t* vr = vbase + static_cast<int64_t>(t0 + t) * hd;
        V vv[kMaxHd / 16];
        for (int v = 0; v < nvec; ++v) vv[v] = load_any_bf16(vr + 16 * v, v == nvec - 1 ? last : 16);
        for (int i = 0; i < n; ++i) {
          // past this query's row or before its window: no term (not a 0 * v: v may be anything)
          if (t >= qn[i0 + i] || t < qlo[i0 + i]) continue;
          const V p = vset1(S[i0 + i][t]);
          for (int v = 0; v < nvec; ++v) acc[i][v] = vfma(p, vv[v], acc[i][v]);
        }
      }
      for (int i = 0; i < n; ++i) {
        float* po = a.part_o + ((static_cast<int64_t>(qr[i0 + i]) * H + qh[i0 + i]) * a.n_chunks + c) * hd;
        for (int v = 0; v < nvec; ++v) store_any(po + 16 * v, acc[i][v], v == nvec - 1 ? last : 16);
      }
    }
    nq = 0;
  };

  const V qscale = vset1(a.qscale);
  for (int r = r0; r < r1; ++r) {
    const int p = a.first + r;
    if (p < t0) continue;  // this chunk is past the row: no partial
    const int lo = attn_lo(p, a.window);
    if (lo >= t0 + kAttnChunk) continue;  // wholly before the row's window: no partial either
    for (int g = 0; g < G; ++g) {
      const int h = kh * G + g;
      const float* q = a.q + (static_cast<int64_t>(r) * H + h) * hd;
      for (int v = 0; v < nvec; ++v) {
        const int m = v == nvec - 1 ? last : 16;
        store_any(qs[nq] + 16 * v, vmul(load_any(q + 16 * v, m), qscale), m);
      }
      qr[nq] = r, qh[nq] = h, qp[nq] = p;
      qn[nq] = p - t0 + 1 < kAttnChunk ? p - t0 + 1 : kAttnChunk;
      qlo[nq] = lo > t0 ? lo - t0 : 0;
      if (++nq == kMaxQ) flush();
    }
  }
  flush();
}

inline void k_attn_merge(const AttnArgs& a, int r, int h) {
  // chunks c0..nc-1: those that hold a position of the row's window, in order (attention.cu: merge_pairs)
  const int hd = a.head_dim, H = a.n_heads, p = a.first + r, nc = p / kAttnChunk + 1;
  const int c0 = attn_lo(p, a.window) / kAttnChunk;
  const int64_t base = (static_cast<int64_t>(r) * H + h) * a.n_chunks;
  const float* ml = a.part_ml + 2 * base;
  float M = -INFINITY;
  for (int c = c0; c < nc; ++c) M = ml[2 * c] > M ? ml[2 * c] : M;
  constexpr int kMaxHd = 256;
  V acc[kMaxHd / 16];
  const int nvec = (hd + 15) / 16, last = hd - 16 * (nvec - 1);
  for (int v = 0; v < nvec; ++v) acc[v] = vzero();
  float L = 0.f;
  for (int c = c0; c < nc; ++c) {
    const float w = exp2_fixed(ml[2 * c] - M);
    L = std::fmaf(ml[2 * c + 1], w, L);
    const float* po = a.part_o + (base + c) * hd;
    const V wv = vset1(w);
    for (int v = 0; v < nvec; ++v) acc[v] = vfma(load_any(po + 16 * v, v == nvec - 1 ? last : 16), wv, acc[v]);
  }
  float* out = a.out + (static_cast<int64_t>(r) * H + h) * hd;
  const V Lv = vset1(L);
  for (int v = 0; v < nvec; ++v) store_any(out + 16 * v, vbf16_round(vdiv(acc[v], Lv)), v == nvec - 1 ? last : 16);
}

// Sum of n floats with four vector accumulators (the read-bandwidth probe: loads, few operations; n % 64 == 0).
inline float k_read_sum(const float* p, int64_t n) {
  V a = vzero(), b = vzero(), c = vzero(), d = vzero();
  for (int64_t i = 0; i < n; i += 64) {
    a = vadd(a, vload(p + i));
    b = vadd(b, vload(p + i + 16));
    c = vadd(c, vload(p + i + 32));
    d = vadd(d, vload(p + i + 48));
  }
  return vreduce16(vadd(vadd(a, b), vadd(c, d)));
}

inline double k_fma_probe(int64_t n, float* sink) {
  VS a[12];
  const VS x = vs_load(sink), y = vs_load(sink + kSubLanes);  // the caller's values: nothing is folded away
  for (int j = 0; j < 12; ++j) a[j] = vs_load(sink + 2 * kSubLanes);
  for (int64_t i = 0; i < n; ++i)
    for (int j = 0; j < 12; ++j) a[j] = vs_fma(a[j], x, y);
  VS s = a[0];
  for (int j = 1; j < 12; ++j) s = vs_add(s, a[j]);
  vs_store(sink, s);
  return 2.0 * 12 * kSubLanes * static_cast<double>(n);
}

inline const Kernels* make_kernels() {
  static const Kernels k{kIsaName,     k_permute,    k_permute_x,    k_dot_tile, k_dot_f32,     k_bf16_to_f32,
                         k_f32_to_bf16, k_round_bf16, k_norm_apply,   k_residual_add, k_silu_mul, k_rope,
                         k_attn_chunk,  k_attn_merge, k_argmax,       k_exp,      k_exp2,        k_read_sum,
                         k_fma_probe};
  return &k;
}
