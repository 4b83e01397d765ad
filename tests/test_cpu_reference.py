"""CpuEngine against references written apart from it (issue 32): tests/numpy_ref.py builds the decoder from the math
and the documented order (docs/cpu.md, csrc/cpu/lanes.h, the CUDA kernels' definitions, fixed_math.h's sequences) in
numpy, one IEEE fp32 operation per numpy operation, so a change of order or rounding point in the shared kernel
source (csrc/cpu/kernels.inl, which every instruction set compiles) or in the jobs (engine.cpp) shows up here, where
a comparison of one path with another, or with the emulated device (which shares fixed_math.h and the CUDA order),
cannot see it.

* The reference's own arithmetic first: its fma is the correctly rounded fma (exact rational arithmetic decides), its
  exp_fixed / exp2_fixed are fixed_math.h's sequences bit for bit and within 2 ulp of the true values, log_f32 within
  a few ulp, its dot products are sums of the exact products within the bound of any fp32 summation, its attention
  is softmax attention, its norm, RoPE and SiLU x up are their fp64 values within bf16's rounding, its head
  confidence is the softmax probability (each tolerance stated and justified where it is checked).
* Exact where the order is specified: the dot product of every instruction set for K reaching the main loop on 1 to 8
  warps with odd tails and 1..8 rows (lane_dot), bit for bit; and the whole engine on every path and 1, 2, 3 threads:
  K/V of every layer and position, hidden states, logits, greedy tokens and both heads' (token, confidence) on
  models whose reductions reach every loop (conftest.LOOP_MODELS), three 128-position attention chunks with and
  without a window that straddles them, and the four families (Qwen2 biases, Qwen3 head norms, Mistral's window).
* Where the engine's bf16 rounding would hide an order (a reordered fp32 sum changes a bf16 value about once in
  2^16): the attention chunk partials in fp32 through the test probes (against numpy and the emulated device), the
  merge on partials that cancel, and the engine's dot products on inputs built so that every step of the order
  moves the bf16 result.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

import numpy_ref as R
from adadecode.engines.cpu import CpuEngine, CpuWeights, rope_tables
from adadecode.engines.head import Head

from conftest import engine_model

adadecode_cpu = pytest.importorskip("adadecode_cpu", reason="adadecode_cpu is not built (see README)")
ISAS = adadecode_cpu.isas()

pytestmark = pytest.mark.exactness


def same_bits(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and np.array_equal(a.view(np.int32), b.view(np.int32))


def ulp32(x: np.ndarray) -> np.ndarray:
    """The fp32 ulp of |x| (normal range)."""
    return np.exp2(np.floor(np.log2(np.abs(x))) - 23)


# ---- the reference's own arithmetic --------------------------------------------------------------------------------
def fma_cases() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n = 3000
    mant = lambda: rng.integers(1 << 23, 1 << 24, n).astype(np.float64)  # noqa: E731 (24-bit significands)
    a = (mant() * np.exp2(rng.integers(-40, 20, n) - 23.0) * rng.choice([-1, 1], n)).astype(np.float32)
    b = (mant() * np.exp2(rng.integers(-40, 20, n) - 23.0) * rng.choice([-1, 1], n)).astype(np.float32)
    c = (mant() * np.exp2(rng.integers(-90, 40, n) - 23.0) * rng.choice([-1, 1], n)).astype(np.float32)
    c[::3] = -(a[::3].astype(np.float64) * b[::3]).astype(np.float32)  # cancellation: c ~ -a b
    # products exactly halfway between two fp32 values (24929 * 673 = 2^24 + 1), with tiny addends of either sign:
    # the cases a plain fp64 sum rounded again to fp32 gets wrong (double rounding)
    A = [24929.0, 24929.0, 24929.0, 24929.0 * 2.0**-30, 1.0, 2.0**-75]
    B = [673.0, 673.0, -673.0, 673.0, 2.0**-126, 2.0**-75]
    C = [2.0**-30, -2.0**-30, -2.0**-30, 2.0**-80, -2.0**-149, 2.0**-149]  # ... and subnormal results
    return (np.concatenate([a, np.float32(A)]), np.concatenate([b, np.float32(B)]), np.concatenate([c, np.float32(C)]))


def test_the_reference_fma_is_the_correctly_rounded_fma():
    a, b, c = fma_cases()
    got = R.fma32(a, b, c)
    want = np.array([R.f32_round_fraction(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z)))
                     for x, y, z in zip(a, b, c)], np.float32)
    assert same_bits(got, want), f"{int((got != want).sum())} of {a.size} differ"
    # the double-rounding cases are in the set: the naive fp64 sum would have failed this test
    naive = (a.astype(np.float64) * b + c).astype(np.float32)
    assert int((naive != want).sum()) >= 3


def exp_inputs() -> np.ndarray:
    rng = np.random.default_rng(1)
    edges = [np.nan, np.inf, -np.inf, 0.0, -0.0, 88.72, 88.8, 88.81, -103.0, -103.01, -126.0, -126.01, 127.4999,
             127.5, 127.99999, 128.0, -0.5, 0.5, 1.5, 2.5, -87.3, -125.5, 1e-30]
    return np.concatenate([np.float32(edges), (rng.standard_normal(100_000) * 40).astype(np.float32),
                           np.linspace(-140, 140, 100_001, dtype=np.float32)]).astype(np.float32)


@pytest.mark.parametrize("base2", [False, True], ids=["exp", "exp2"])
def test_fixed_exps_are_the_documented_sequences_on_every_path(base2):
    """numpy's fixed_math.h sequence == the scalar C function == each vector path, bit for bit (NaN as NaN); and
    within 2 ulp of the true value in the normal range (fixed_math.h's claim)."""
    x = exp_inputs()
    want = (R.exp2_fixed if base2 else R.exp_fixed)(x)
    for name, got in [("scalar", adadecode_cpu.testing.fixed_exp_scalar(torch.from_numpy(x), base2).numpy())] + [
            (isa, adadecode_cpu.testing.fixed_exp(torch.from_numpy(x), isa, base2).numpy()) for isa in ISAS]:
        nan = np.isnan(want)
        assert (np.isnan(got) == nan).all() and same_bits(got[~nan], want[~nan]), name
    lo, hi = (-125.9, 127.9) if base2 else (-87.3, 88.7)
    inside = (x > lo) & (x < hi)
    true = (np.exp2 if base2 else np.exp)(x[inside].astype(np.float64))
    err = np.abs(want[inside] - true) / ulp32(true)
    assert err.max() <= 2.0, f"max error {err.max():.3f} ulp"


def test_log_f32_is_within_a_few_ulp():
    """log_f32 (the heads' log-sum-exp) on positive normal floats: within 4 ulp of the log's magnitude, or 2^-22
    absolute near log = 0 (its last step adds e ln2 and s p, each rounded: a few ulp of the larger)."""
    rng = np.random.default_rng(2)
    x = np.concatenate([np.exp2(rng.uniform(-125, 127, 200_000)), rng.uniform(0.5, 2.0, 100_000)]).astype(np.float32)
    got = R.log_f32(x).astype(np.float64)
    true = np.log(x.astype(np.float64))
    tol = np.maximum(4 * ulp32(np.where(true == 0, 1.0, true)), 2.0**-22)
    assert (np.abs(got - true) <= tol).all()


# ---- dot products: the documented order, on every path ------------------------------------------------------------
# K: 1 warp (128 chunks: 4 full steps), 2 warps with tails of 1 and 7 lanes, 3 warps with a tail of 65 (4 whole lane
# blocks and one lane more), 4 warps, and the cap of 8 warps (1025 chunks) with a tail of 1
LOOP_KS = [1024, 1032, 1080, 2056, 2824, 4096, 8200]


def bf16_array(shape, seed: int) -> np.ndarray:
    return R.bf16(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


@pytest.mark.parametrize("isa", ISAS)
def test_dot_is_the_documented_order_for_every_loop_and_row_count(isa):
    """Every K of LOOP_KS, R = 1..8 rows (every register tile shape of the path: 1, 2, 3, 4 and 8 rows, 1, 2 and 4
    columns) and 11 columns (tiles of 4 + 4 + 2 + 1): lane_dot == the numpy order bit for bit."""
    for K in LOOP_KS:
        x, w = bf16_array((8, K), K), bf16_array((11, K), K + 1)
        want = R.lanes_dot(x, w)
        for rows in range(1, 9):
            got = adadecode_cpu.testing.lane_dot(torch.from_numpy(x[:rows]), torch.from_numpy(w).bfloat16(), isa).numpy()
            assert same_bits(got, want[:rows]), f"{isa}: K = {K}, {rows} rows"


def test_the_reference_dot_is_a_sum_of_the_exact_products():
    """Any order of K fp32 additions of exact products stays within (K - 1) 2^-24 sum |x_i w_i| (1 + 2^-20) of the
    exact dot product (each addition's error is at most 2^-24 of a partial sum, itself at most sum |x_i w_i|): a
    dropped, doubled or misplaced term would not."""
    for K in LOOP_KS + [8, 72, 576]:
        x, w = bf16_array((3, K), 2 * K), bf16_array((5, K), 2 * K + 1)
        got = R.lanes_dot(x, w).astype(np.float64)
        exact = R.exact_dot(x, w)
        bound = (K - 1) * 2.0**-24 * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T) * (1 + 2**-20)
        assert (np.abs(got - exact) <= bound).all(), K
    # and a single term anywhere lands where it should: a one-hot row picks w's column
    K = 2056
    w = bf16_array((4, K), 9)
    for j in (0, 7, 8, 767, 768, 2055):
        x = np.zeros((1, K), np.float32)
        x[0, j] = 1.0
        assert same_bits(R.lanes_dot(x, w)[0], w[:, j]), j


# ---- the layer's pieces against their fp64 values (the reference computes the right function) ---------------------
def test_the_reference_norm_rope_and_silu_are_their_math():
    """Each within its roundings of the fp64 value (bf16's unit roundoff is 2^-8: 8 significant bits):
    RMSNorm bf16(g bf16(x inv)): two bf16 roundings, 2^-7 relative (1% more for the fp32 inv's few 2^-24) of
    g x / sqrt(mean(x^2) + eps); RoPE: bf16(bf16(a c) -+ bf16(b s)) with c, s the bf16 table values: 2^-8 of each
    product and 2^-8 of the result, within 2^-7 (|a c| + |b s|) (1% more) of the exact rotation; SiLU x up
    bf16(bf16(silu(g)) u): two bf16 roundings after an fp32 silu of a few ulp (exp_fixed's 2, the add's and the
    division's), 2^-7 relative (1% more)."""
    rng = np.random.default_rng(3)
    x = R.bf16(rng.standard_normal((6, 2056)).astype(np.float32) * 3)
    g = R.bf16(rng.uniform(0.5, 1.5, 2056).astype(np.float32))
    xd = x.astype(np.float64)
    want = g * xd / np.sqrt((xd**2).mean(-1, keepdims=True) + 1e-5)
    got = R.rmsnorm(x, g, 1e-5)
    assert (np.abs(got - want) <= 1.01 * 2.0**-7 * np.abs(want)).all()

    y = R.bf16(rng.standard_normal((5, 3, 120)).astype(np.float32))
    ang = rng.uniform(-7, 7, (5, 1, 60))
    cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    c, s = R.bf16(cos).astype(np.float64), R.bf16(sin).astype(np.float64)
    a, b = y[..., :60].astype(np.float64), y[..., 60:].astype(np.float64)
    exact = np.concatenate([a * c - b * s, b * c + a * s], -1)
    scale = np.concatenate([np.abs(a * c) + np.abs(b * s), np.abs(b * c) + np.abs(a * s)], -1)
    assert (np.abs(R.rope(y, cos, sin) - exact) <= 1.01 * 2.0**-7 * scale).all()

    gu = R.bf16(rng.standard_normal((2, 4000)).astype(np.float32) * 4)
    want = gu[0] / (1 + np.exp(-gu[0].astype(np.float64))) * gu[1]
    got = R.silu_mul(gu[0], gu[1])
    assert (np.abs(got - want) <= 1.01 * 2.0**-7 * np.abs(want)).all()


@pytest.mark.parametrize("window", [0, 150, 37])
def test_the_reference_attention_is_softmax_attention(window):
    """Rows at positions across three 128-position chunks (and a window that makes rows skip chunk 0): the chunked
    fp32 computation is within 2^-8 |out| + 2^-16 max |v| of fp64 softmax attention. The output's bf16 rounding is
    2^-8 relative (bf16's unit roundoff); everything before it is fp32 (a 64-term score chain, exp2_fixed's 2 ulp,
    sums of at most 128 terms per chunk and 3 chunks): far below 2^-16 of the values' scale with scores of order 1."""
    rng = np.random.default_rng(4 + window)
    T, Hkv, H, hd = 300, 2, 4, 64
    k = R.bf16(rng.standard_normal((T, Hkv, hd)).astype(np.float32))
    v = R.bf16(rng.standard_normal((T, Hkv, hd)).astype(np.float32))
    pos = np.array([0, 1, 127, 128, 129, 200, 255, 256, 276, 277, 299])
    q = R.bf16(rng.standard_normal((len(pos), H, hd)).astype(np.float32))
    got = R.attention(q, k, v, pos, window)
    want = R.attention_fp64(q, k, v, pos, window)
    assert (np.abs(got - want) <= 2.0**-8 * np.abs(want) + 2.0**-16 * np.abs(v).max()).all()


def test_the_reference_head_confidence_is_the_softmax_probability():
    """exp(max - lse) by the kernel's folds is within 2^-14 relative of the fp64 softmax probability of the argmax,
    over 16 400 logits (257 blocks of 64: one merge thread folds two blocks) and with a rest logit: the sum of exps
    passes at most 64 + 2 + 8 folds (a block, the strided merge, the tree), each at most three roundings of 2^-24
    relative (two products by exp_fixed's results, which are within 2 ulp, and a sum), so it is within about 2^-16
    relative; log_f32 turns that into an absolute error of lse, and exp_fixed(m - lse) back into a relative one, with
    a few ulp of its own."""
    rng = np.random.default_rng(5)
    for n, rest in ((16_400, None), (1000, np.float32(2.5)), (300, np.float32(-40.0))):
        lg = R.bf16(rng.standard_normal(n).astype(np.float32) * 3)
        idx, conf = R.lm_stats(lg, rest)
        assert idx == int(np.argmax(lg))
        full = lg.astype(np.float64) if rest is None else np.append(lg.astype(np.float64), float(rest))
        lse = full.max() + math.log(np.exp(full - full.max()).sum())
        p = math.exp(float(lg.max()) - lse)
        assert abs(float(conf) - p) <= 2.0**-14 * p, (n, float(conf), p)
    tied = np.zeros(200, np.float32)
    tied[[70, 133, 199]] = 4.0  # ties across blocks of 64: the lowest index
    assert R.lm_stats(tied)[0] == 70


# ---- attention kernels on raw arrays: the chunk partials (fp32) and the merge ----------------------------------------
def attn_inputs(rng, T: int, R: int, H: int, Hkv: int, hd: int):
    """q [R, H, hd] (numpy), k, v [T, Hkv, hd] (bf16 tensors): random bf16 values."""
    kv = [torch.from_numpy(R_bf16(rng, (T, Hkv, hd))).bfloat16() for _ in range(2)]
    return R_bf16(rng, (R, H, hd)), kv[0], kv[1]


def R_bf16(rng, shape) -> np.ndarray:
    return R.bf16(rng.standard_normal(shape).astype(np.float32))


def same_with_nan(a, b) -> bool:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    return a.shape == b.shape and bool((nan == np.isnan(b)).all()) and same_bits(a[~nan], b[~nan])


@pytest.mark.parametrize("isa", ISAS)
def test_attention_partials_and_merge_are_the_reference(isa):
    """Rows across three 128-position chunks, without and with windows (one that leaves chunk 0 out of later rows,
    one shorter than a chunk), head_dim 120 (a partial vector) with 3 query heads per kv head, and head_dim 64 with
    MQA: every chunk's (max, sum of exps) and P.V bit for bit (fp32, before any rounding), and the merge's output."""
    rng = np.random.default_rng(8)
    for window, first, rows, H, Hkv, hd in ((0, 258, 42, 6, 2, 120), (150, 240, 60, 6, 2, 120), (37, 90, 50, 4, 1, 64),
                                            (0, 0, 20, 4, 1, 64)):
        T = first + rows
        q, k, v = attn_inputs(rng, T, rows, H, Hkv, hd)
        pos = np.arange(first, T)
        po, pml = adadecode_cpu.testing.attn_partials(torch.from_numpy(q), k, v, first, window, isa)
        m, l, o = R.attn_partials(q, k.float().numpy(), v.float().numpy(), pos, window)
        what = f"{isa}: window {window}, rows {first}..{T - 1}, hd {hd}"
        assert np.isfinite(m).mean() > 0.3  # partials to compare (NaN: the chunk is past the row or its window)
        assert same_with_nan(pml[..., 0].numpy(), m), f"{what}: chunk maxima"
        assert same_with_nan(pml[..., 1].numpy(), l), f"{what}: chunk sums of exps"
        assert same_with_nan(po.numpy(), o), f"{what}: chunk P.V"
        out = adadecode_cpu.testing.attn_merge(po, pml, first, window, isa)
        assert same_bits(out.numpy(), R.attn_merge(m, l, o, pos, window)), f"{what}: merged output"


def test_attention_partials_are_the_emulated_devices():
    """The CPU kernels' chunk partials (fp32: max, sum of exps, P.V) equal the CUDA kernel's on the emulated device
    bit for bit (its two-launch path leaves them in its workspace), rows across three chunks, head_dim 64 and 128."""
    emu = pytest.importorskip("adadecode_emu", reason="adadecode_emu is not built (ADADECODE_BUILD_EMU=0)")
    rng = np.random.default_rng(10)
    for first, rows, H, Hkv, hd in ((258, 42, 6, 2, 128), (100, 60, 4, 1, 64)):
        T = first + rows
        q, k, v = attn_inputs(rng, T, rows, H, Hkv, hd)
        po, pml = adadecode_cpu.testing.attn_partials(torch.from_numpy(q), k, v, first, 0, ISAS[0])
        put = lambda t: emu.empty(list(t.shape), t.dtype).copy_(t)  # noqa: E731 (the device's guarded memory)
        n = emu.attention_workspace_floats(rows, H, hd, T)
        ws = put(torch.full((n,), float("nan")))
        ws[:emu.attention_counters] = 0
        out = put(torch.zeros(rows, H * hd, dtype=torch.bfloat16))
        emu.attention(put(torch.from_numpy(q).reshape(rows, H * hd).bfloat16()), put(k), put(v),
                      put(torch.tensor([first], dtype=torch.int32)), out, H, T, workspace=ws, single_launch=False)
        nch = po.shape[2]
        body = ws[emu.attention_counters:].clone()
        e_o = body[:rows * H * nch * hd].reshape(rows, H, nch, hd)
        e_ml = body[rows * H * nch * hd:rows * H * nch * (hd + 2)].reshape(rows, H, nch, 2)
        what = f"rows {first}..{T - 1}, hd {hd}"
        assert np.isfinite(pml.numpy()).mean() > 0.5  # most slots hold a partial (NaN: the chunk is past the row)
        assert same_with_nan(pml.numpy(), e_ml.numpy()), f"{what}: chunk (max, sum of exps)"
        assert same_with_nan(po.numpy(), e_o.numpy()), f"{what}: chunk P.V"
        merged = adadecode_cpu.testing.attn_merge(po, pml, first, 0, ISAS[0]).reshape(rows, H * hd)
        assert torch.equal(merged.bfloat16(), out.clone()), f"{what}: merged output"


@pytest.mark.parametrize("isa", ISAS)
def test_attention_merge_order_on_cancelling_partials(isa):
    """Partials chosen so that the merge's order shows in its rounded output: three chunks of equal max (every
    weight exactly 1) whose P.V are +B u, -B u (B = 2^40) and a small s: in chunk order acc = (B u - B u) + s = s
    exactly, so out = bf16(s / L) with L = l0 + l1 + l2 exact; any other order absorbs s into B u and gives 0. Half
    the rows hold random partials instead (the merge of general values, against the reference)."""
    rng = np.random.default_rng(9)
    rows, H, hd, first = 96, 8, 64, 256  # positions 256..351: chunks 0, 1, 2
    m = np.zeros((rows, H, 3), np.float32)
    l = np.float32(rng.integers(1, 64, (rows, H, 3)))
    u = R_bf16(rng, (rows, H, hd))
    small = R_bf16(rng, (rows, H, hd))
    o = np.stack([u * np.float32(2.0**40), -u * np.float32(2.0**40), small], axis=2)
    rand = np.arange(rows) % 2 == 1
    m[rand] = np.float32(rng.standard_normal((int(rand.sum()), H, 3)) * 4)
    o[rand] = np.float32(rng.standard_normal((int(rand.sum()), H, 3, hd)) * 20)
    pos = np.arange(first, first + rows)
    out = adadecode_cpu.testing.attn_merge(torch.from_numpy(o), torch.from_numpy(np.stack([m, l], -1)), first, 0, isa).numpy()
    exact = R.bf16(small / l.sum(-1, keepdims=True))  # the cancelling rows, from the math alone
    assert same_bits(out[~rand], exact[~rand]), f"{isa}: the chunks are not merged in order"
    assert same_bits(out, R.attn_merge(m, l, o, pos, 0)), f"{isa}: the merge of random partials"


# ---- the engine's dot products on inputs whose sum depends on every step of the order --------------------------------
def absorbing_model():
    """loop-llama's shape, one layer, with layer 0's K and V projections on inputs that make the documented order
    visible in the bf16 results: embedding rows of +-1 (so the normed rows, with a norm gain of 1, are exactly +-1:
    rms 1, and bf16(+-1 x inv) = +-1) that are +1 on 64 "big" dims; K and V weight rows of small bf16 values (in
    [1/8, 1/4]) with 4 pairs +B, -B (B = 2^40 times a bf16 value) on big dims. Each sum is then the sum of the small
    products that were NOT added while an uncancelled B sat in the same accumulator (a lane's chain, a warp's
    butterfly, the warps' sum), and that set depends on every step of the order: a change of order in any loop
    (main steps, tail, tiles of several rows, lanes, warps) changes the value by whole small terms, far more than
    bf16's rounding hides."""
    from adadecode.model.config import LlamaConfig

    from conftest import LOOP_MODELS, random_weights, tiny_hf_config

    cfg = LlamaConfig.from_hf(tiny_hf_config(**{**LOOP_MODELS["loop-llama"], "num_hidden_layers": 1}))
    w = random_weights(cfg, seed=31)
    g = torch.Generator().manual_seed(32)
    d, kv = cfg.d, cfg.n_kv_heads * cfg.head_dim
    big = torch.randperm(d, generator=g)[:64]
    w.embed = (torch.randint(0, 2, (cfg.vocab_size, d), generator=g) * 2 - 1).float()
    w.embed[:, big] = 1.0
    w.layers[0].attn_norm = torch.ones(d)

    def rows() -> torch.Tensor:
        sign = torch.randint(0, 2, (kv, d), generator=g) * 2 - 1
        x = (torch.rand(kv, d, generator=g) + 1) / 8 * sign
        for r in range(kv):
            at = big[torch.randperm(64, generator=g)[:8]]
            b = (torch.rand(4, generator=g) + 1) * 2.0**40
            x[r, at[:4]], x[r, at[4:]] = b, -b
        return x.bfloat16().float()

    w.layers[0].wk, w.layers[0].wv = rows(), rows()
    return cfg, w


def test_engine_dot_products_follow_the_order_on_absorbing_inputs():
    """Layer 0's K and V (bf16(x . w), K then rotated) of 40 rows: 4 prefilled, then run_layers calls of 1, 2, ..., 8
    rows (every register tile), on every path x 1, 2 (reversed pool), 3 threads, bit for bit against the numpy order;
    and the inputs do tell orders apart: a sum in plain sequential order differs from the documented one."""
    cfg, w = absorbing_model()
    tokens = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(33)).tolist()
    xn = R.rmsnorm(R.bf16(w.embed[tokens].numpy()), np.ones(cfg.d, np.float32), cfg.rms_norm_eps)
    assert (np.abs(xn) == 1).all()
    wk, wv = w.layers[0].wk.numpy(), w.layers[0].wv.numpy()
    v_ref = R.bf16(R.lanes_dot(xn, wv)).reshape(40, cfg.n_kv_heads, cfg.head_dim)
    cos, sin = rope_tables(cfg, 48)
    k_ref = R.rope(R.bf16(R.lanes_dot(xn, wk)).reshape(40, cfg.n_kv_heads, cfg.head_dim), cos.numpy()[:40, None],
                   sin.numpy()[:40, None])
    sequential = R.bf16(np.array([[np.float32(sum_seq(xn[r] * wv[c])) for c in range(8)] for r in range(8)]))
    assert (sequential != v_ref.reshape(40, -1)[:8, :8]).mean() > 0.5  # the order shows
    packed = CpuWeights(cfg, w)
    for isa in ISAS:
        for threads, schedule in ((1, None), (2, "reverse"), (3, None)):
            e = CpuEngine(cfg, packed, max_seq=48, max_rows=8, threads=threads, isa=isa, schedule=schedule,
                          prefill_chunk=4)
            e.prefill(tokens[:4])
            p = 4
            for rows in range(1, 9):
                for i in range(rows):
                    e.embed(p + i, tokens[p + i])
                e.run_layers(p, p + rows - 1, 0, 1)
                p += rows
            k, v = e.kv(0)
            what = f"{isa} x {threads} threads ({schedule or 'natural'} pool)"
            assert same_bits(v.float().numpy(), v_ref), f"{what}: V of layer 0"
            assert same_bits(k.float().numpy(), k_ref), f"{what}: K of layer 0"


def sum_seq(prod: np.ndarray) -> np.float32:
    s = np.float32(0)
    for p in prod:
        s = np.float32(s + p)
    return s


# ---- the engine, every path and thread count, bit for bit against the reference ---------------------------------
# (prompt length, prefill chunk): chunks of several rows with a shorter last one
CASES = {
    "loop-llama": (13, 8),
    "loop-qwen3": (13, 8),
    "chunks-llama": (296, 64),
    "chunks-qwen2-window": (296, 64),
    "qwen2-bias-window": (37, 16),
    "qwen3-qknorm-hd128": (37, 16),
    "mistral-window": (37, 16),
    "hd8-gqa": (37, 16),
}
NEW = 5


def heads_of(cfg, seed: int) -> list[Head]:
    """A logit-lens head at layer 1 (full vocabulary) and one at the last layer but one (or 1) with T perturbed, a
    restricted vocabulary that spans several LM-head items and a rest logit."""
    g = torch.Generator().manual_seed(seed)
    d = cfg.d
    vocab = torch.randperm(cfg.vocab_size, generator=g)[:cfg.vocab_size // 3].sort().values
    return [Head.identity(1, d),
            Head(layer=max(1, cfg.n_layers - 1), T=torch.eye(d) + 0.05 * torch.randn(d, d, generator=g), vocab=vocab,
                 w_rest=0.05 * torch.randn(d, generator=g))]


@R.memo
def reference(name: str):
    """(cfg, weights, prompt, new tokens, heads, the reference forward, its logits and head answers, max_seq): numpy
    and torch only, no engine (so it may be shared by engines built from other sources)."""
    cfg, w = engine_model(name, seed=11)
    n, _ = CASES[name]
    g = torch.Generator().manual_seed(12)
    prompt = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
    new = torch.randint(0, cfg.vocab_size, (NEW,), generator=g).tolist()
    max_seq = n + NEW + 3
    cos, sin = rope_tables(cfg, max_seq)
    ref = R.RefModel(cfg, w, cos.numpy(), sin.numpy())
    out = ref.forward(prompt + new)
    rows = slice(n, n + NEW)
    logits = ref.logits(out["hidden"][-1][rows])
    heads = heads_of(cfg, 13)
    head_answers = [[ref.head(out["hidden"][h.layer][p], h) for p in range(n, n + NEW)] for h in heads]
    return cfg, w, prompt, new, heads, out, logits, head_answers, max_seq


def path_configs():
    """Every path this CPU runs, each with another thread count and pool schedule: 3 threads with the items shuffled
    over them, 2 with every share under the other thread's index (thread_pool.h: so every thread index runs items,
    whatever the machine's load), 1 thread (ADADECODE_CPU_SCHEDULE or the natural pool)."""
    return [(isa, *((3, "shuffle:2"), (2, "reverse"), (1, None))[i % 3]) for i, isa in enumerate(ISAS)]


@pytest.mark.parametrize("name", list(CASES))
def test_engine_is_the_numpy_reference_bit_for_bit(name):
    cfg, w, prompt, new, heads, out, logits, head_answers, max_seq = reference(name)
    packed = CpuWeights(cfg, w)
    n = len(prompt)
    first, last = n, n + NEW - 1
    for isa, threads, schedule in path_configs():
        what = f"{name}, {isa} x {threads} threads ({schedule or 'natural'} pool)"
        e = CpuEngine(cfg, packed, max_seq=max_seq, max_rows=8, threads=threads, isa=isa, schedule=schedule,
                      prefill_chunk=CASES[name][1])
        assert e.isa == isa
        e.set_heads(heads)
        e.prefill(prompt)
        for i, t in enumerate(new):
            e.embed(n + i, t)
        e.run_layers(first, first, 0, cfg.n_layers)  # one row alone, then the other four together
        e.run_layers(first + 1, last, 0, cfg.n_layers)
        for layer in range(cfg.n_layers):
            k, v = e.kv(layer)
            assert same_bits(k.float().numpy(), out["k"][layer]), f"{what}: K of layer {layer}"
            assert same_bits(v.float().numpy(), out["v"][layer]), f"{what}: V of layer {layer}"
        hidden = np.stack([e.hidden(p).float().numpy() for p in range(first, last + 1)])
        assert same_bits(hidden, out["hidden"][-1][first:last + 1]), f"{what}: hidden states"
        assert same_bits(e.final_logits(first, last).numpy(), logits), f"{what}: logits"
        assert e.final(first, last) == R.lowest_argmax(logits).tolist(), f"{what}: tokens"
        for hi, h in enumerate(heads):
            e.truncate(n)
            for i, t in enumerate(new):
                e.embed(n + i, t)
            e.run_layers(first, last, 0, h.layer)
            for i, p in enumerate(range(first, last + 1)):
                token, conf = e.head(p, hi)
                want_token, want_conf = head_answers[hi][i]
                assert (token, np.float32(conf)) == (want_token, want_conf), f"{what}: head {hi} at row {p}"
