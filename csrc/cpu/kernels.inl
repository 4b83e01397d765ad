// The CPU kernels, written once over the lane vector V (16 fp32 lanes) of the including translation unit:
// kernels_avx512.cpp, kernels_avx2.cpp and kernels_portable.cpp each include their vec_<isa>.h and then this file
// inside their own namespace. Contracts: kernels.h. The operation order of each output is the CUDA kernels'
// (lanes.h for dot products; attention.cu's chunks, scores, softmax statistics and merge), so the paths agree bit
// for bit with each other and with CudaEngine on the emulated device.
//
// Nothing here depends on which instruction set runs it except through V: the tile shapes (register blocking) vary
// with kVecRegs (tile_regs), and a tile shape only decides which outputs are computed together, never an output's order.

// Software prefetch distance in a weight stream, 16 KB ahead: the hardware prefetchers alone leave a decode step far
// from the read bandwidth, and 2 KB ahead is too close on the EPYC machines measured (bench/results/cpu-*.md).
constexpr int kPrefetchElems = 8192;

// Lane vectors a register tile of RT rows x CT columns keeps live over a step pair: the accumulators, and either
// the rows' two activation vectors (x kept, RT < CT; one weight pair at a time, converted from bf16 into two
// transient vectors) or the columns' two weight vectors (w kept; the activations are FMA memory operands and need
// no register of their own).
constexpr int tile_regs(int RT, int CT) { return RT * CT + (RT < CT ? 2 * RT + 2 : 2 * CT); }

template <int RT, int CT>
inline void block_dot(const uint16_t* const (&w)[CT], const float* x, int xs, int gfull, int tl, V (&acc)[RT][CT]) {
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CT; ++c) acc[r][c] = vzero();
  const int pairs = gfull * 4;
  for (int t = 0; t < pairs; ++t) {
    const float* x0 = x + t * 32;
    if constexpr (RT <= CT) {  // the rows' activations stay in registers
      V xa[RT], xb[RT];
      for (int r = 0; r < RT; ++r) xa[r] = vload(x0 + r * xs), xb[r] = vload(x0 + r * xs + 16);
      for (int c = 0; c < CT; ++c) {
        prefetch(w[c] + t * 32 + kPrefetchElems);
        V wa, wb;
        vload_bf16_pair(w[c] + t * 32, wa, wb);
        for (int r = 0; r < RT; ++r) acc[r][c] = vfma(wb, xb[r], vfma(wa, xa[r], acc[r][c]));
      }
    } else {  // the columns' weights stay in registers
      V wa[CT], wb[CT];
      for (int c = 0; c < CT; ++c) {
        prefetch(w[c] + t * 32 + kPrefetchElems);
        vload_bf16_pair(w[c] + t * 32, wa[c], wb[c]);
      }
      for (int r = 0; r < RT; ++r) {
        const V xa = vload(x0 + r * xs), xb = vload(x0 + r * xs + 16);
        for (int c = 0; c < CT; ++c) acc[r][c] = vfma(wb[c], xb, vfma(wa[c], xa, acc[r][c]));
      }
    }
  }
  if (tl == 0) return;
  // The tail chunks: only the first tl lanes own one; the other lanes' chains have ended. Those lanes load weight 0
  // and the activation row's padding 0, and a chain that starts at +0 never holds -0 (a round-to-nearest sum is
  // -0 only when both addends are), so acc + 0 * 0 keeps them bit for bit: a plain FMA, no per-step lane mask
  // (AVX2 has no masked FMA: a blend per FMA cost about as much as the FMAs themselves).
  for (int t = 0; t < 4; ++t) {
    const float* x0 = x + (pairs + t) * 32;
    for (int c = 0; c < CT; ++c) {
      V wa, wb;
      vload_bf16_pair_n(w[c] + pairs * 32 + t * 2 * tl, tl, wa, wb);
      for (int r = 0; r < RT; ++r) acc[r][c] = vfma(wb, vload(x0 + r * xs + 16), vfma(wa, vload(x0 + r * xs), acc[r][c]));
    }
  }
}

// out[r * ldo + c] for a tile of RT rows and CT columns: block pairs (2w, 2w+1) are warp w; its butterfly is
// vreduce16 of their sum; warps are added in order.
template <int RT, int CT>
inline void dot_tile_rc(const LaneLayout& L, const uint16_t* const* w, const float* xp, int xs, float* out, int ldo) {
  alignas(64) float first[RT * CT * 16];
  float total[RT][CT] = {};  // set at the first block pair
  for (int b = 0; b < L.nblk; b += 2) {
    V acc[RT][CT];
    const uint16_t* wb[CT];
    for (int c = 0; c < CT; ++c) wb[c] = w[c] + L.woff[b];
    block_dot<RT, CT>(wb, xp + L.xoff[b], xs, L.gfull, L.tail_lanes[b], acc);
    for (int r = 0; r < RT; ++r)
      for (int c = 0; c < CT; ++c) vstore(first + (r * CT + c) * 16, acc[r][c]);
    for (int c = 0; c < CT; ++c) wb[c] = w[c] + L.woff[b + 1];
    block_dot<RT, CT>(wb, xp + L.xoff[b + 1], xs, L.gfull, L.tail_lanes[b + 1], acc);
    for (int r = 0; r < RT; ++r)
      for (int c = 0; c < CT; ++c) {
        const float s = vreduce16(vadd(vload(first + (r * CT + c) * 16), acc[r][c]));
        total[r][c] = b == 0 ? s : total[r][c] + s;
      }
  }
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CT; ++c) out[r * ldo + c] = total[r][c];
}

// Columns per register tile. Up to 2 rows: one column at a time, each weight row read start to end (one sequential
// stream the prefetchers follow; measured on the default model, 1 thread: 4 columns at a time made a decode layer
// ~1.4x slower at 1 row). From 4 rows the widest tile that fits (4, 2 or 1 columns, tile_regs < kVecRegs) shares
// each activation load between its columns.
constexpr int cols_for(int RT) {
  return RT <= 2 ? 1 : tile_regs(RT, 4) < kVecRegs ? 4 : tile_regs(RT, 2) < kVecRegs ? 2 : 1;
}
constexpr bool rows_fit(int RT) { return tile_regs(RT, 1) < kVecRegs; }

// Columns [c0, c0 + cn) of RT rows.
template <int RT>
inline void dot_cols(const LaneLayout& L, const uint16_t* const* w, int c0, int cn, const float* xp, int xs,
                     float* out, int ldo) {
  constexpr int CT = cols_for(RT);
  int c = c0;
  const int end = c0 + cn;
  for (; c + CT <= end; c += CT) dot_tile_rc<RT, CT>(L, w + c, xp, xs, out + c, ldo);
  if constexpr (CT > 2) {
    for (; c + 2 <= end; c += 2) dot_tile_rc<RT, 2>(L, w + c, xp, xs, out + c, ldo);
  }
  for (; c < end; ++c) dot_tile_rc<RT, 1>(L, w + c, xp, xs, out + c, ldo);
}

// The rows of the next register tile, of the n rows left: 8, 4 or 3 where they fit this instruction set's
// registers, else 2 or 1.
constexpr int next_rows(int n) {
  return n >= 8 && rows_fit(8) ? 8 : n >= 4 && rows_fit(4) ? 4 : n >= 3 && rows_fit(3) ? 3 : n >= 2 ? 2 : 1;
}

// Columns in the outer loop, row tiles inside: a block of kColBlock weight rows is read from memory once and stays
// in L1 for every row tile (rows in the outer loop read the whole matrix once per row tile).
constexpr int kColBlock = 4;

inline void k_dot_tile(const LaneLayout& L, const uint16_t* const* w, int C, const float* xp, int xs, int R,
                       float* out) {
  for (int c0 = 0; c0 < C; c0 += kColBlock) {
    const int cn = C - c0 < kColBlock ? C - c0 : kColBlock;
    for (int r = 0; r < R;) {
      const int rt = next_rows(R - r);
      const float* x = xp + r * xs;
      float* o = out + r * C;
      switch (rt) {
        case 8: if constexpr (rows_fit(8)) dot_cols<8>(L, w, c0, cn, x, xs, o, C); break;
        case 4: if constexpr (rows_fit(4)) dot_cols<4>(L, w, c0, cn, x, xs, o, C); break;
        case 3: if constexpr (rows_fit(3)) dot_cols<3>(L, w, c0, cn, x, xs, o, C); break;
        case 2: dot_cols<2>(L, w, c0, cn, x, xs, o, C); break;
        default: dot_cols<1>(L, w, c0, cn, x, xs, o, C); break;
      }
      r += rt;
    }
  }
}

inline void k_permute(const LaneLayout& L, const float* x, float* xp) {
  const int32_t* src = L.xsrc.data();
  for (int i = 0; i < L.xlen; i += 16) vstore(xp + i, vgather(x, src + i));  // xlen is a multiple of 16
}

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
constexpr int kMaxQ = 4;  // queries scored together (they share the K loads)

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

inline const Kernels* make_kernels() {
  static const Kernels k{kIsaName,       k_permute,  k_dot_tile,     k_dot_f32, k_bf16_to_f32, k_f32_to_bf16,
                         k_round_bf16,   k_norm_apply, k_residual_add, k_silu_mul, k_rope,       k_attn_chunk,
                         k_attn_merge,   k_argmax,   k_exp,          k_exp2,       k_read_sum};
  return &k;
}
