"""Independent numpy references of the native engines' arithmetic (issue 32), written from the math and the documented
order (docs/cpu.md's table, the contracts in csrc/cpu/kernels.h and csrc/cpu/lanes.h, the CUDA kernels' definitions
in csrc/cuda/kernels/*.cuh / *.cu, csrc/common/fixed_math.h), never from the CPU kernels' code: numpy arrays, one
correctly rounded IEEE fp32 operation per numpy operation, and fp64 only where an exact result is needed.

Arithmetic ground rules
* numpy's float32 +, -, *, / and sqrt on float32 arrays are single IEEE operations rounded to nearest even (SSE/AVX
  scalar or vector instructions, never x87), so an expression such as `a * b + c` on float32 arrays is two roundings,
  exactly as the kernels' separate operations.
* numpy has no fused multiply-add. `fma32` computes fp32 fma(a, b, c) exactly (see its docstring for the proof);
  where both factors hold bf16 values (8 significant bits each) the product is exact in fp32 and an FMA is one
  rounded add, which is what `lanes_dot` uses (it checks that its inputs are bf16 values).
* bf16 rounding is round-to-nearest-even on the fp32 bit pattern (`bf16`).

What is referenced (all fp32 with the kernels' rounding points):
  lanes_dot      the CUDA skinny GEMM's order of a dot product of length K (lanes.h): chunk i of 8 elements on thread
                 i % NT (NT = 32 x 1..8 warps from K alone), one FMA chain per thread over its chunks in order and the
                 8 elements of a chunk in order, each warp's 32 lanes by the butterfly (lane j + 16, + 8, + 4, + 2,
                 + 1), the warps added in order
  rmsnorm        the sum of squares on 32 lanes in that order, inv = 1 / sqrt(ss / d + eps) (each op rounded),
                 bf16(g * bf16(x * inv))
  rope           rotate-half: lo = bf16(bf16(a c) - bf16(b s)), hi = bf16(bf16(b c) + bf16(a s)), c, s = bf16(table)
  silu_mul       bf16(bf16(silu(bf16 g)) * bf16 u), silu(g) = g / (1 + exp_fixed(-g))
  attention      scores q_scaled . k as one FMA chain over the head dims, chunks of 128 positions: the chunk's max, p =
                 exp2_fixed(s - m), l = the warp's sum (lane L: positions L, L+32, L+64, L+96 in order, then the
                 butterfly), o = the FMA chain of p_t v_t over positions in order; chunks merged in order (M = max,
                 w = exp2_fixed(m_c - M), L = fma(l_c, w, L), acc = fma(o_c, w, acc)), out = bf16(acc / L); a window
                 masks the positions before max(0, p - W + 1) and drops chunks wholly before it
  lm_stats       the LM head kernel's (max, argmax, sum of exps) folds: blocks of 64 columns in order, 256 strided
                 folds, a tree; the rest logit; l = M + log_f32(s), confidence exp_fixed(m - l)
  exp_fixed, exp2_fixed, log_f32, inv_sqrt: fixed_math.h's documented sequences in numpy fp32
and `RefModel`, a whole decoder (Llama, Mistral, Qwen2 biases, Qwen3 head norms, windows) built from them.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

F32 = np.float32


def f32c(bits: int) -> np.float32:
    """The fp32 constant with these bits."""
    return np.array([bits], np.uint32).view(np.float32)[0]


# ---- rounding ---------------------------------------------------------------------------------------------------
def bf16(x) -> np.ndarray:
    """Round fp32 values to bf16 (nearest, ties to even), kept as float32 values. NaN stays NaN."""
    x = np.asarray(x, np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), r).astype(np.float32)


def is_bf16(x) -> bool:
    x = np.asarray(x, np.float32)
    return bool(((x.view(np.uint32) & 0xFFFF) == 0).all())


def fma32(a, b, c) -> np.ndarray:
    """fp32 fma(a, b, c) = round(a * b + c), ONE rounding, for fp32 arrays, computed exactly in fp64.

    Why it is exact: the fp64 product of two fp32 values is exact (24 + 24 significant bits <= 53, exponents within
    fp64's normal range). The sum p + c is then rounded to fp64 and the error e = (p + c) - s is recovered exactly
    (Knuth's TwoSum, exact in fp64 without overflow). A plain fp64 sum rounded again to fp32 is NOT always the
    correctly rounded result (double rounding: p + c = 2^24 + 1 + 2^-30, a product 24929 * 673 plus a tiny c, rounds
    to 2^24 + 1 in fp64, an fp32 midpoint, and then to even, 2^24, while the true result rounds up to 2^24 + 2). So s
    is turned into the round-to-odd result (when e != 0 and s's last significand bit is even, the neighbour of s on
    e's side, which is odd), and round-to-odd at 53 bits followed by round-to-nearest at 24 bits is the correctly
    rounded result of the exact sum, because 53 >= 2 * 24 + 2 (Boldo and Melquiond, "Emulation of FMA and correctly
    rounded sums: proved algorithms using rounding to odd", IEEE Trans. Computers 57(4), 2008). The final fp32
    rounding (numpy's astype) is round-to-nearest-even, subnormal results and overflow included. tests/
    test_cpu_reference.py checks this function against exact rational arithmetic (Fraction) on random and
    adversarial inputs, the case above among them.
    """
    a = np.asarray(a, np.float32).astype(np.float64)
    b = np.asarray(b, np.float32).astype(np.float64)
    c = np.asarray(c, np.float32).astype(np.float64)
    p = a * b
    s = p + c
    bb = s - p
    e = (p - (s - bb)) + (c - bb)
    even = (s.view(np.int64) & 1) == 0
    fix = (e != 0) & even & np.isfinite(s)
    if fix.any():
        s = np.where(fix, np.nextafter(s, np.where(e > 0, np.inf, -np.inf)), s)
    return s.astype(np.float32)


def f32_round_fraction(q: Fraction) -> np.float32:
    """The fp32 value nearest to the rational q (ties to even; subnormals and overflow as IEEE): the exact oracle of
    fma32's test."""
    if q == 0:
        return np.float32(0.0)
    sign = -1 if q < 0 else 1
    q = abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()  # 2^(e-1) <= q < 2^(e+1)
    if Fraction(2) ** e > q:
        e -= 1
    # now 2^e <= q < 2^(e+1)
    e = max(e, -126)  # subnormal range: a fixed grid of 2^-149
    scaled = q / Fraction(2) ** (e - 23)
    n = scaled.numerator // scaled.denominator
    rem = scaled - n
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and n % 2 == 1):
        n += 1
    value = n * 2.0 ** (e - 23)  # exact in fp64 (n <= 2^24)
    if value >= 2.0 ** 128:
        return np.float32(sign * np.inf)
    return np.float32(sign * value)


# ---- fixed_math.h, in numpy fp32 -------------------------------------------------------------------------------
ROUND_MAGIC = F32(12582912.0)  # 1.5 * 2^23
EXP2_TAYLOR = [f32c(b) for b in (0x377FE5FE, 0x39218489, 0x3AAEC3FF, 0x3C1D955B, 0x3D635847, 0x3E75FDF0, 0x3F317218,
                                  0x3F800000)]
EXP_TAYLOR = [f32c(b) for b in (0x39500D01, 0x3AB60B61, 0x3C088889, 0x3D2AAAAB, 0x3E2AAAAB, 0x3F000000, 0x3F800000,
                                 0x3F800000)]
LOG2E, LN2_HI, LN2_LO = f32c(0x3FB8AA3B), f32c(0x3F318000), f32c(0xB95E8083)
LN2, SQRT2 = f32c(0x3F317218), f32c(0x3FB504F3)
LOG_C = [f32c(b) for b in (0x3E3A2E8C, 0x3E638E39, 0x3E924925, 0x3ECCCCCD, 0x3F2AAAAB)]


def _pow2(n: np.ndarray) -> np.ndarray:
    """2^n as fp32 from its bits, n in [-126, 127]."""
    return ((n.astype(np.int64) + 127) << 23).astype(np.uint32).view(np.float32)


def _pow2i_scale(p: np.ndarray, n: np.ndarray) -> np.ndarray:
    """p * 2^n in two exact-or-once-rounded multiplies: 2^(n >> 1), then 2^(n - (n >> 1))."""
    n1 = n >> 1
    with np.errstate(over="ignore"):  # 2^127.5 and above: inf, as the kernels give
        return (p * _pow2(n1)) * _pow2(n - n1)


def exp2_fixed(x) -> np.ndarray:
    """2^x: n = x rounded to nearest (ties even, by the 1.5 * 2^23 trick), f = x - n, the degree-7 Taylor polynomial
    of 2^f by fma in Horner form, then the two power-of-two scalings; < -126: 0, >= 128: inf, NaN: NaN."""
    x = np.asarray(x, np.float32)
    xs = np.where((x >= -126) & (x < 128), x, F32(0))
    n = (xs + ROUND_MAGIC) - ROUND_MAGIC
    f = xs - n
    p = np.full_like(xs, EXP2_TAYLOR[0])
    for c in EXP2_TAYLOR[1:]:
        p = fma32(p, f, np.full_like(xs, c))
    y = _pow2i_scale(p, n.astype(np.int64))
    y = np.where(x < -126, F32(0), y)
    y = np.where(x >= 128, F32(np.inf), y)
    return np.where(np.isnan(x), x, y).astype(np.float32)


def exp_fixed(x) -> np.ndarray:
    """e^x: n = round(x log2e) (the same trick), r = x - n ln2 in two fma steps (ln2 = hi + lo), the degree-7
    Taylor polynomial of e^r by fma, the scalings; < -103: 0, > 88.8: inf, NaN: NaN."""
    x = np.asarray(x, np.float32)
    xs = np.where((x >= -103) & (x <= F32(88.8)), x, F32(0))
    n = ((xs * LOG2E) + ROUND_MAGIC) - ROUND_MAGIC
    r = fma32(-n, np.full_like(xs, LN2_HI), xs)
    r = fma32(-n, np.full_like(xs, LN2_LO), r)
    p = np.full_like(xs, EXP_TAYLOR[0])
    for c in EXP_TAYLOR[1:]:
        p = fma32(p, r, np.full_like(xs, c))
    y = _pow2i_scale(p, n.astype(np.int64))
    y = np.where(x < -103, F32(0), y)
    y = np.where(x > F32(88.8), F32(np.inf), y)
    return np.where(np.isnan(x), x, y).astype(np.float32)


def log_f32(x) -> np.ndarray:
    """Natural log of positive normal floats: x = m 2^e (m in [sqrt2/2, sqrt2)), s = f / (f + 2), f = m - 1, the
    odd series 2 atanh(s) in Horner form over s^2 (each step a multiply and an add), then e ln2 + s p."""
    x = np.asarray(x, np.float32)
    bits = x.view(np.uint32)
    e = (bits >> 23).astype(np.int64) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).astype(np.uint32).view(np.float32)
    big = m > SQRT2
    m = np.where(big, m * F32(0.5), m)
    e = np.where(big, e + 1, e)
    f = m - F32(1)
    s = f / (f + F32(2))
    s2 = s * s
    p = np.full_like(x, LOG_C[0])
    for c in LOG_C[1:]:
        p = p * s2 + c
    p = p * s2 + F32(2)
    return (e.astype(np.float32) * LN2 + s * p).astype(np.float32)


def inv_sqrt(x) -> np.ndarray:
    """1 / sqrt(x), two roundings."""
    return (F32(1) / np.sqrt(np.asarray(x, np.float32))).astype(np.float32)


# ---- dot products in the skinny GEMM's order ----------------------------------------------------------------------
def skinny_lanes(K: int) -> int:
    """The GPU thread count of a reduction of length K: 32 per warp, one warp per 128 chunks of 8, 1..8 warps."""
    return min(8, max(1, -(-(K // 8) // 128))) * 32


def butterfly32(v: np.ndarray) -> np.ndarray:
    """Lane 0 of a 32-lane warp's xor butterfly over the last axis (adds lane j ^ 16, then ^ 8, ^ 4, ^ 2, ^ 1)."""
    lanes = np.arange(32)
    for o in (16, 8, 4, 2, 1):
        v = v + v[..., lanes ^ o]
    return v[..., 0]


def _lanes_steps(K: int, NT: int):
    """The chain steps of a reduction of length K on NT lanes, in order: (chunks [c0, c1) on lanes 0..c1-c0-1,
    element e of each chunk). Chunk i of 8 is step i // NT of lane i % NT's chain: the full steps g < K / 8 // NT on
    every lane, then one more on the first (K / 8) % NT lanes (the tail); every other lane's chain has ended."""
    nchunk = K // 8
    gfull, tail = divmod(nchunk, NT)
    for g in range(gfull):
        for e in range(8):
            yield g * NT, (g + 1) * NT, e
    if tail:
        for e in range(8):
            yield gfull * NT, nchunk, e


def _lanes_total(acc: np.ndarray) -> np.ndarray:
    """Each warp's 32 lanes by the butterfly, the warps added in order: acc [..., NT] -> [...]."""
    NT = acc.shape[-1]
    warps = acc.reshape(*acc.shape[:-1], NT // 32, 32)
    total = butterfly32(warps[..., 0, :])
    for wp in range(1, NT // 32):
        total = total + butterfly32(warps[..., wp, :])
    return total


def lanes_dot(x: np.ndarray, w: np.ndarray, NT: int | None = None, block: int = 1 << 17) -> np.ndarray:
    """out[r, n] = x[r] . w[n] in the order of lanes.h: fp32, every operation rounded. x [R, K] and w [N, K] must
    hold bf16 values (then each product is exact in fp32 and each FMA of the chain is one rounded add of it)."""
    x = np.ascontiguousarray(x, np.float32)
    w = np.ascontiguousarray(w, np.float32)
    assert x.ndim == 2 and w.ndim == 2 and x.shape[1] == w.shape[1] and x.shape[1] % 8 == 0
    assert is_bf16(x) and is_bf16(w), "lanes_dot relies on exact products: bf16 values only"
    R, K = x.shape
    N = w.shape[0]
    NT = NT or skinny_lanes(K)
    nchunk = K // 8
    # element e of chunk i at [e, i]: each step's operands are contiguous
    xg = np.ascontiguousarray(x.reshape(R, nchunk, 8).transpose(0, 2, 1))
    wg = np.ascontiguousarray(w.reshape(N, nchunk, 8).transpose(0, 2, 1))
    out = np.empty((R, N), np.float32)
    step = max(1, block // (R * NT))  # columns per pass: the accumulators stay in cache
    for n0 in range(0, N, step):
        ws = wg[n0:n0 + step]
        acc = np.zeros((R, ws.shape[0], NT), np.float32)
        for c0, c1, e in _lanes_steps(K, NT):
            acc[:, :, :c1 - c0] += xg[:, None, e, c0:c1] * ws[None, :, e, c0:c1]
        out[:, n0:n0 + step] = _lanes_total(acc)
    return out


def _lanes_reduce(prod: np.ndarray, NT: int) -> np.ndarray:
    """The lanes order over the last axis of exact fp32 products prod [..., K]: the sum of each row."""
    K = prod.shape[-1]
    p = prod.reshape(*prod.shape[:-1], K // 8, 8)
    acc = np.zeros((*prod.shape[:-1], NT), np.float32)
    for c0, c1, e in _lanes_steps(K, NT):
        acc[..., :c1 - c0] += p[..., c0:c1, e]
    return _lanes_total(acc)


def lanes_dot_rows(a: np.ndarray, b: np.ndarray, NT: int) -> np.ndarray:
    """a[r] . b[r] for each row in the lanes order with NT lanes (bf16 values: exact products)."""
    a = np.asarray(a, np.float32)
    b = np.asarray(b, np.float32)
    assert is_bf16(a) and is_bf16(b), "lanes_dot_rows relies on exact products: bf16 values only"
    return _lanes_reduce(a * b, NT)


def exact_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x . w^T in fp64: each product of bf16 values exact, the sum within K 2^-53 of sum |x_i w_i| (negligible next
    to fp32's 2^-24 per add): the value any fp32 order of the sum must stay near."""
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64).T


# ---- the layer's elementwise pieces -----------------------------------------------------------------------------
def rms_ss(x: np.ndarray) -> np.ndarray:
    """Each row's sum of squares on 32 lanes in the lanes order (RMSNorm's and the head norm's reduction, a function
    of the row length alone: rmsnorm_core.cuh's warp_row_inv_rms)."""
    return lanes_dot_rows(x, x, NT=32)


def rmsnorm(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    """bf16(g * bf16(x * inv)) for each row of x [R, d] (bf16 values), g [d] (bf16 values)."""
    x = np.asarray(x, np.float32)
    d = x.shape[-1]
    inv = inv_sqrt(rms_ss(x) / F32(d) + F32(eps))
    return bf16(g[None, :] * bf16(x * inv[:, None]))


def rope(y: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate-half RoPE of heads y [..., hd] (bf16 values) with cos/sin [..., hd/2] (fp32 tables, broadcast)."""
    half = y.shape[-1] // 2
    a, b = y[..., :half], y[..., half:]
    c, s = bf16(cos), bf16(sin)
    lo = bf16(bf16(a * c) - bf16(b * s))
    hi = bf16(bf16(b * c) + bf16(a * s))
    return np.concatenate([lo, hi], axis=-1)


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g, u = bf16(g), bf16(u)
    silu = g / (F32(1) + exp_fixed(-g))
    return bf16(bf16(silu) * u)


def residual_add(h: np.ndarray, y: np.ndarray) -> np.ndarray:
    return bf16(h + bf16(y))


# ---- attention --------------------------------------------------------------------------------------------------
CHUNK = 128


def attn_lo(p: np.ndarray, window: int) -> np.ndarray:
    return np.maximum(0, p - window + 1) if window > 0 else np.zeros_like(p)


def attn_partials(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, window: int = 0):
    """The chunk partials of rows at positions pos [R] (row r attends to attn_lo(p)..p): q [R, H, hd] (bf16 values,
    rotated), k/v [T, Hkv, hd] (the cache, bf16 values). Returns m, l [R, H, n_chunks] (log2 units) and o [R, H,
    n_chunks, hd], NaN for a chunk that holds no position of the row's window."""
    R, H, hd = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    T = max(int(pos.max()) + 1, k.shape[0])
    nch = -(-T // CHUNK)
    Tp = nch * CHUNK
    qscale = F32(1.4426950408889634) / np.sqrt(F32(hd))
    qs = q * qscale  # one rounding
    kk = np.zeros((Tp, Hkv, hd), np.float32)
    vv = np.zeros((Tp, Hkv, hd), np.float32)
    kk[:k.shape[0]], vv[:v.shape[0]] = k, v
    kh = np.arange(H) // G
    kq = kk[:, kh, :]  # [Tp, H, hd]
    vq = vv[:, kh, :]
    # scores: one FMA chain over the head dims in order, s = fma(k_d, q_d, s)
    s = np.zeros((R, H, Tp), np.float32)
    for d in range(hd):
        s = fma32(kq[None, :, :, d].transpose(0, 2, 1), qs[:, :, d:d + 1], s)
    t = np.arange(Tp)
    lo = attn_lo(pos, window)
    valid = (t[None, :] <= pos[:, None]) & (t[None, :] >= lo[:, None])  # [R, Tp]
    s = np.where(valid[:, None, :], s, F32(-np.inf)).reshape(R, H, nch, CHUNK)
    m = s.max(axis=-1)  # [R, H, nch]; -inf for a chunk with no valid position
    safe_m = np.where(np.isfinite(m), m, F32(0))
    p = np.where(s == -np.inf, F32(0), exp2_fixed(s - safe_m[..., None]))
    # l: lane L sums positions L, L + 32, L + 64, L + 96 in order, then the butterfly
    pl = p.reshape(R, H, nch, 4, 32)
    lane = F32(0) + pl[..., 0, :]
    for i in range(1, 4):
        lane = lane + pl[..., i, :]
    l = butterfly32(lane)  # [R, H, nch]
    # o: one FMA chain per dim over the chunk's valid positions in order
    o = np.zeros((R, H, nch, hd), np.float32)
    vc = vq.reshape(nch, CHUNK, H, hd)
    vmask = valid.reshape(R, nch, CHUNK)
    for j in range(CHUNK):
        nxt = fma32(p[..., j][..., None], vc[None, :, j].transpose(0, 2, 1, 3), o)
        o = np.where(vmask[:, None, :, j, None], nxt, o)
    none = ~vmask.any(-1)[:, None, :]  # [R, 1, nch]: no position of the row in the chunk
    m, l = np.where(none, F32(np.nan), m), np.where(none, F32(np.nan), l)
    return m, l, np.where(none[..., None], F32(np.nan), o)


def attn_merge(m: np.ndarray, l: np.ndarray, o: np.ndarray, pos: np.ndarray, window: int = 0) -> np.ndarray:
    """The merge of the chunks c0..nc-1 of each row (the chunks that hold its window) in order: M = their max,
    w = exp2_fixed(m_c - M), L = fma(l_c, w, L), acc = fma(o_c, w, acc), out = bf16(acc / L): [R, H, hd]."""
    R, H, nch, hd = o.shape
    c0 = attn_lo(pos, window) // CHUNK
    nc = pos // CHUNK + 1
    out = np.empty((R, H, hd), np.float32)
    for c_lo in np.unique(c0):
        for c_hi in np.unique(nc[c0 == c_lo]):
            rows = np.nonzero((c0 == c_lo) & (nc == c_hi))[0]
            M = np.full((len(rows), H), -np.inf, np.float32)
            for c in range(c_lo, c_hi):
                M = np.maximum(M, m[rows, :, c])
            L = np.zeros((len(rows), H), np.float32)
            acc = np.zeros((len(rows), H, hd), np.float32)
            for c in range(c_lo, c_hi):
                w = exp2_fixed(m[rows, :, c] - M)
                L = fma32(l[rows, :, c], w, L)
                acc = fma32(o[rows, :, c], w[..., None], acc)
            out[rows] = bf16(acc / L[..., None])
    return out


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, window: int = 0) -> np.ndarray:
    """q [R, H, hd] (bf16 values, rotated), k/v [T, Hkv, hd] (the cache, bf16 values), pos [R]: the rows'
    positions. Returns [R, H, hd] bf16 values: the partials of each chunk, merged in order."""
    m, l, o = attn_partials(q, k, v, pos, window)
    return attn_merge(m, l, o, pos, window)


def attention_fp64(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, window: int = 0) -> np.ndarray:
    """The same attention in fp64 without chunks (plain softmax): the value the chunked fp32 one must stay near."""
    R, H, hd = q.shape
    G = H // k.shape[1]
    out = np.empty((R, H, hd))
    for r in range(R):
        p = int(pos[r])
        lo = int(attn_lo(np.array([p]), window)[0])
        for h in range(H):
            kk = k[lo:p + 1, h // G].astype(np.float64)
            sc = kk @ q[r, h].astype(np.float64) / math.sqrt(hd)
            e = np.exp(sc - sc.max())
            out[r, h] = (e / e.sum()) @ v[lo:p + 1, h // G].astype(np.float64)
    return out


# ---- LM head statistics (csrc/cuda/kernels/lm_head.cu) ------------------------------------------------------------------
LM_COLS = 64
LM_MERGE_THREADS = 256


def _combine(am, as_, ai, bm, bs, bi):
    """The kernel's combine over arrays of states (m, s, idx): a holds the lower indices; idx < 0 is empty."""
    m = np.maximum(am, bm)
    idx = np.where((bm > am) | ((bm == am) & (bi < ai)), bi, ai)
    with np.errstate(invalid="ignore"):
        s = as_ * exp_fixed(np.where(ai >= 0, am - m, F32(0))) + bs * exp_fixed(np.where(bi >= 0, bm - m, F32(0)))
    ea, eb = ai < 0, bi < 0
    m = np.where(ea, bm, np.where(eb, am, m))
    s = np.where(ea, bs, np.where(eb, as_, s))
    idx = np.where(ea, bi, np.where(eb, ai, idx))
    return m.astype(np.float32), s.astype(np.float32), idx


def lm_stats(logits: np.ndarray, rest: np.float32 | None = None) -> tuple[int, np.float32]:
    """(argmax with ties to the lowest index, exp(max - lse)) of one row of bf16-rounded finite logits, lse over
    the logits and the rest logit if given, in the LM head kernel's fold order."""
    lg = np.asarray(logits, np.float32)
    n = lg.shape[0]
    nblk = -(-n // LM_COLS)
    pm = np.empty(nblk, np.float32)
    ps = np.empty(nblk, np.float32)
    pi = np.empty(nblk, np.int64)
    for b in range(nblk):
        v = lg[b * LM_COLS:(b + 1) * LM_COLS]
        # st = combine(st, {v_j, 1, j}) from the empty state: the first is {v_0, 1, j0}; then for each next one the
        # running max is the prefix max, s = s * exp(m_prev - m) + 1 * exp(v_j - m)
        run = np.maximum.accumulate(v)
        e_prev = exp_fixed(np.concatenate([[F32(0)], run[:-1] - run[1:]]).astype(np.float32))
        e_new = exp_fixed((v - run).astype(np.float32))
        s = F32(1)
        idx = 0
        for j in range(1, len(v)):
            s = F32(s * e_prev[j]) + F32(F32(1) * e_new[j])
            if v[j] > run[j - 1]:
                idx = j
        pm[b], ps[b], pi[b] = run[-1], s, b * LM_COLS + idx
    # 256 threads: thread t folds blocks t, t + 256, ... in order; then the tree
    tm = np.full(LM_MERGE_THREADS, -np.inf, np.float32)
    ts = np.zeros(LM_MERGE_THREADS, np.float32)
    ti = np.full(LM_MERGE_THREADS, -1, np.int64)
    for b0 in range(0, nblk, LM_MERGE_THREADS):
        sl = slice(b0, min(nblk, b0 + LM_MERGE_THREADS))
        k = sl.stop - sl.start
        tm[:k], ts[:k], ti[:k] = _combine(tm[:k], ts[:k], ti[:k], pm[sl], ps[sl], pi[sl])
    off = LM_MERGE_THREADS // 2
    while off > 0:
        tm[:off], ts[:off], ti[:off] = _combine(tm[:off], ts[:off], ti[:off], tm[off:2 * off], ts[off:2 * off],
                                                ti[off:2 * off])
        off //= 2
    m, s, idx = tm[0], ts[0], int(ti[0])
    M = m
    if rest is not None:
        M = np.maximum(m, F32(rest))
        s = F32(s * exp_fixed(np.array([m - M], np.float32))[0]) + exp_fixed(np.array([F32(rest) - M], np.float32))[0]
    lse = F32(M + log_f32(np.array([s], np.float32))[0])
    return idx, exp_fixed(np.array([m - lse], np.float32))[0]


def lowest_argmax(logits: np.ndarray) -> np.ndarray:
    return np.argmax(logits, axis=-1)  # numpy: the first maximum


# ---- a whole decoder ----------------------------------------------------------------------------------------------
_MEMO: dict = {}


def memo(fn):
    """Memoize fn(*args) here, keyed by its module, name and arguments: a reference computed once per process, even
    when the test module that asks for it is imported afresh (tests/test_cpu_mutants.py reruns test modules in one
    process, one planted change at a time; the reference does not depend on the engine, so it stays valid)."""
    def wrapped(*args):
        key = (fn.__module__, fn.__qualname__, args)
        if key not in _MEMO:
            _MEMO[key] = fn(*args)
        return _MEMO[key]
    wrapped.__wrapped__ = fn
    return wrapped
def _np_bf16(t) -> np.ndarray:
    """A torch tensor (any float dtype) as bf16 values in float32 numpy (rounded here, RNE)."""
    return bf16(t.detach().float().cpu().numpy())


class RefModel:
    """The native engines' decoder in numpy from the pieces above: forward over positions 0..n-1 (each row's bits
    depend on its own position and the cache, never on how rows are grouped: so one pass over every row stands for
    any prefill chunking and decode schedule)."""

    def __init__(self, cfg, weights, cos: np.ndarray, sin: np.ndarray):
        self.cfg = cfg
        self.cos, self.sin = np.asarray(cos, np.float32), np.asarray(sin, np.float32)
        self.embed = _np_bf16(weights.embed)
        self.norm = _np_bf16(weights.norm)
        self.lm_head = self.embed if weights.lm_head is weights.embed else _np_bf16(weights.lm_head)
        self.layers = []
        for lw in weights.layers:
            names = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")
            L = {k: _np_bf16(getattr(lw, k)) for k in names}
            if cfg.qkv_bias:
                L["b"] = np.concatenate([_np_bf16(lw.bq), _np_bf16(lw.bk), _np_bf16(lw.bv)])
            if cfg.qk_norm:
                L["q_norm"], L["k_norm"] = _np_bf16(lw.q_norm), _np_bf16(lw.k_norm)
            self.layers.append(L)

    def forward(self, tokens: list[int]) -> dict:
        """hidden[l] [n, d] after l layers (l = 0..L), k[l], v[l] [n, Hkv, hd] (the cache), all bf16 values."""
        c = self.cfg
        n = len(tokens)
        H, Hkv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        pos = np.arange(n)
        h = self.embed[np.asarray(tokens)]
        out = {"hidden": [h], "k": [], "v": []}
        for L in self.layers:
            x = rmsnorm(h, L["attn_norm"], c.rms_norm_eps)
            wqkv = np.concatenate([L["wq"], L["wk"], L["wv"]])
            y = lanes_dot(x, wqkv)
            if "b" in L:
                y = y + L["b"][None, :]  # into the fp32 sum, then the one rounding
            y = bf16(y)
            q = y[:, :H * hd].reshape(n, H, hd)
            k = y[:, H * hd:(H + Hkv) * hd].reshape(n, Hkv, hd)
            v = y[:, (H + Hkv) * hd:].reshape(n, Hkv, hd)
            if "q_norm" in L:
                q = rmsnorm(q.reshape(-1, hd), L["q_norm"], c.rms_norm_eps).reshape(n, H, hd)
                k = rmsnorm(k.reshape(-1, hd), L["k_norm"], c.rms_norm_eps).reshape(n, Hkv, hd)
            cos, sin = self.cos[pos][:, None, :], self.sin[pos][:, None, :]
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            out["k"].append(k)
            out["v"].append(v)
            a = attention(q, k, v, pos, c.sliding_window or 0).reshape(n, H * hd)
            h = residual_add(h, lanes_dot(a, L["wo"]))
            x = rmsnorm(h, L["mlp_norm"], c.rms_norm_eps)
            act = silu_mul(lanes_dot(x, L["w_gate"]), lanes_dot(x, L["w_up"]))
            h = residual_add(h, lanes_dot(act, L["w_down"]))
            out["hidden"].append(h)
        return out

    def logits(self, h: np.ndarray) -> np.ndarray:
        """bf16 logits [R, vocab] of rows at depth L."""
        return bf16(lanes_dot(rmsnorm(h, self.norm, self.cfg.rms_norm_eps), self.lm_head))

    def head(self, h: np.ndarray, head) -> tuple[int, np.float32]:
        """(token, confidence) of an engine head (T, vocab, w_rest) on one row h [d] at the head's layer."""
        x = rmsnorm(h[None], self.norm, self.cfg.rms_norm_eps)
        z = bf16(lanes_dot(x, _np_bf16(head.T)))
        E = self.lm_head if head.vocab is None else self.lm_head[head.vocab.numpy()]
        lg = bf16(lanes_dot(z, E))[0]
        rest = None
        if head.w_rest is not None:
            rest = bf16(lanes_dot(z, _np_bf16(head.w_rest)[None], NT=256))[0, 0]
        idx, conf = lm_stats(lg, rest)
        return (idx if head.vocab is None else int(head.vocab[idx])), conf
