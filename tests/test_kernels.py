"""The CUDA kernels against fp32/fp64 torch references (issue 3), on a GPU (adadecode_cuda, marked `gpu`) and on
the emulated device (adadecode_emu: the same csrc/ sources on the CPU, csrc/emu; CI runs these).

Every test: fresh random inputs (never zeros), outputs poisoned with NaN (or a sentinel for ints) before each
launch, an explicit finiteness check (a NaN never passes a tolerance test), shapes of SmolLM2-135M, Llama-3.1-8B
and odd ones, and, where rows are batched, bitwise batch invariance: row i computed alone is bit-for-bit the
row computed at every index of launches of R = 1..16 rows (docs/design.md#invariance).

Emulated, the 8B shapes and the largest prefill GEMMs are left to the GPU (minutes per test on a CPU), the
invariance sweep takes the indices 0, R/2 and R-1 of R in 1, 2, 3, 5, 8, 13, 16 (every row bucket of the
kernels), and the LM head of the SmolLM2 shape reads 4096 vocabulary rows (its full 49152 in the ties test).
Device tensors of the emulated device live between guard pages: a kernel that reads or writes past one fails.
"""
from __future__ import annotations

import importlib
import math
import os
import types

import pytest
import torch

BF = torch.bfloat16

# name: (d, n_heads, n_kv_heads, head_dim, ffn, vocab)
SMOL = dict(d=576, H=9, Hkv=3, hd=64, ffn=1536, vocab=49152)
L8B = dict(d=4096, H=32, Hkv=8, hd=128, ffn=14336, vocab=128256)
ODD = dict(d=200, H=5, Hkv=1, hd=64, ffn=328, vocab=1003)
ODD128 = dict(d=392, H=6, Hkv=2, hd=128, ffn=1000, vocab=777)
SHAPES = {"smol": SMOL, "8b": L8B, "odd": ODD, "odd128": ODD128}
EMU_MAX_VOCAB = 4096


class Device:
    """Where the kernels run: `cuda` (adadecode_cuda, CUDA tensors) or `emu` (adadecode_emu, CPU tensors in the
    emulated device's guarded memory)."""

    def __init__(self, name: str):
        self.name, self.emu = name, name == "emu"
        module = "adadecode_emu" if self.emu else "adadecode_cuda"
        try:
            self.ops = importlib.import_module(module)
        except ImportError as e:
            if self.emu and os.environ.get("ADADECODE_BUILD_EMU") != "0":
                pytest.fail(f"adadecode_emu does not load ({e}): `pip install --no-build-isolation -e .` builds it")
            pytest.skip(f"{module} is not built ({e})")
        self.torch = "cpu" if self.emu else "cuda"
        if self.emu:  # threads of a block in a seeded random order between synchronisation points
            self.ops.set_schedule(os.environ.get("ADADECODE_EMU_ORDER", "random"), 7)

    def put(self, t: torch.Tensor) -> torch.Tensor:
        """t in device memory (on the emulated device: a fresh guarded allocation holding a copy)."""
        return self.ops.empty(list(t.shape), t.dtype).copy_(t) if self.emu else t

    def invariance_rows(self) -> list[tuple[int, int]]:
        """(R, i) pairs: every index of every R = 1..16 (emulated: indices 0, R/2, R-1 of some R)."""
        if not self.emu:
            return [(R, i) for R in range(1, 17) for i in range(R)]
        return sorted({(R, i) for R in (1, 2, 3, 5, 8, 13, 16) for i in (0, R // 2, R - 1)})

    def vocab(self, s: dict) -> int:
        return min(s["vocab"], EMU_MAX_VOCAB) if self.emu else s["vocab"]


_devices: dict[str, Device] = {}


@pytest.fixture
def dev(request) -> Device:
    if request.param not in _devices:
        _devices[request.param] = Device(request.param)
    return _devices[request.param]


def on_devices(cases, emu=lambda *case: True):
    """Parametrize `dev` (indirect) and the case values: every case on the GPU, those `emu` accepts emulated."""
    out = []
    for c in cases:
        c = c if isinstance(c, tuple) else (c,)
        out.append(pytest.param("cuda", *c, marks=pytest.mark.gpu))
        if emu(*c):
            out.append(pytest.param("emu", *c))
    return out


def not_8b(shape, *rest):
    return shape != "8b"


BOTH = on_devices([()])  # tests without further parameters


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def gen(dev, seed: int) -> torch.Generator:
    return torch.Generator(device=dev.torch).manual_seed(seed)


def randn(dev, *shape, g, scale=1.0, dtype=BF):
    t = torch.randn(*shape, generator=g, device=dev.torch, dtype=torch.float32) * scale
    t[t == 0] = 1e-3  # never zeros
    return dev.put(t.to(dtype))


def nan_like(dev, shape, dtype=BF):
    return dev.put(torch.full(shape, float("nan"), device=dev.torch, dtype=dtype))


def assert_close_bf16(out: torch.Tensor, ref: torch.Tensor, what: str, rtol=1.6e-2, atol_frac=1e-2):
    """bf16 output vs a float reference: finite everywhere, |out-ref| <= rtol |ref| + atol_frac * rms(ref)."""
    out = out.double()
    ref = ref.double()
    assert torch.isfinite(out).all(), f"{what}: non-finite output ({(~torch.isfinite(out)).sum().item()} values)"
    scale = ref.pow(2).mean().sqrt().item() + 1e-30
    err = (out - ref).abs()
    bound = rtol * ref.abs() + atol_frac * scale
    bad = err > bound
    assert not bad.any(), (f"{what}: {bad.sum().item()} / {bad.numel()} values out of tolerance, "
                           f"max err {err.max().item():.3e}, rms(ref) {scale:.3e}")


def assert_bitwise(a: torch.Tensor, b: torch.Tensor, what: str):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ai = a.view(torch.int16) if a.dtype == BF else a.view(torch.int32) if a.dtype == torch.float32 else a
    bi = b.view(torch.int16) if b.dtype == BF else b.view(torch.int32) if b.dtype == torch.float32 else b
    assert torch.equal(ai, bi), f"{what}: not bitwise equal (batch invariance broken)"


# ---------------------------------------------------------------------------------------------------------------
# embedding
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dev,shape", on_devices(["smol", "8b", "odd"], not_8b), indirect=["dev"])
def test_embedding(dev, shape):
    s = SHAPES[shape]
    g = gen(dev, 1)
    table = randn(dev, s["vocab"], s["d"], g=g)
    tokens = dev.put(torch.randint(0, s["vocab"], (16,), device=dev.torch, dtype=torch.int32, generator=g))
    tokens[3] = s["vocab"] - 1
    tokens[4] = 0
    out = nan_like(dev, (16, s["d"]))
    dev.ops.embedding(tokens, table, out)
    assert_bitwise(out, table[tokens.long()], "embedding")
    bad = dev.put(tokens.clone())
    bad[5] = s["vocab"]
    out = nan_like(dev, (16, s["d"]))
    out.zero_()
    dev.ops.embedding(bad, table, out)
    assert torch.isnan(out[5]).all(), "an out-of-range id must give a NaN row"
    keep = torch.arange(16, device=dev.torch) != 5
    assert_bitwise(out[keep], table[bad[keep].long()], "embedding (other rows)")


# ---------------------------------------------------------------------------------------------------------------
# add_rmsnorm
# ---------------------------------------------------------------------------------------------------------------
def rmsnorm_ref(residual, delta, weight, eps):
    h = residual if delta is None else (residual + delta)  # bf16 add, rounded, as the kernel and HF do
    hf = h.double()
    n = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)).to(BF)
    return h, weight.double() * n.double()


@pytest.mark.parametrize("dev,shape,with_delta", on_devices([(s, w) for s in ("smol", "8b", "odd") for w in (True, False)],
                                                            not_8b), indirect=["dev"])
def test_add_rmsnorm(dev, shape, with_delta):
    d = SHAPES[shape]["d"]
    g = gen(dev, 2)
    eps = 1e-5
    res0 = randn(dev, 16, d, g=g)
    delta = randn(dev, 16, d, g=g) if with_delta else None
    w = (1 + 0.1 * randn(dev, d, g=g, dtype=torch.float32)).to(BF)
    res = dev.put(res0.clone())
    out = nan_like(dev, (16, d))
    dev.ops.add_rmsnorm(res, delta, w, out, eps)
    h_ref, out_ref = rmsnorm_ref(res0, delta, w, eps)
    assert_bitwise(res, h_ref, "add_rmsnorm residual")
    assert_close_bf16(out, out_ref, "add_rmsnorm out")
    for R, i in dev.invariance_rows():
        r2 = randn(dev, R, d, g=g)
        d2 = randn(dev, R, d, g=g) if with_delta else None
        r2[i] = res0[0]
        if with_delta:
            d2[i] = delta[0]
        o2 = nan_like(dev, (R, d))
        dev.ops.add_rmsnorm(r2, d2, w, o2, eps)
        assert_bitwise(o2[i], out[0], f"add_rmsnorm R={R} i={i}")


# ---------------------------------------------------------------------------------------------------------------
# GEMMs: skinny (decode), tensor core (prefill), linear (dispatch)
# ---------------------------------------------------------------------------------------------------------------
def gemm_ref(x, w, residual=None, w_up=None):
    """HF bf16 semantics from an fp64 product: y rounded to bf16, then the residual add / silu * up in bf16."""
    y = (x.double() @ w.double().T)
    if w_up is not None:
        u = (x.double() @ w_up.double().T)
        gate = y.to(BF)
        return (torch.nn.functional.silu(gate.float()).to(BF).double() * u.to(BF).double())
    if residual is not None:
        return residual.double() + y.to(BF).double()
    return y


def layer_gemm_shapes(s):
    """(name, N, K, epilogue) of one Llama layer: fused qkv, o (+residual), gate/up (silu-mul), down (+residual)."""
    qkv = (s["H"] + 2 * s["Hkv"]) * s["hd"]
    return [("qkv", qkv, s["d"], "plain"), ("o", s["d"], s["H"] * s["hd"], "residual"),
            ("gateup", s["ffn"], s["d"], "silu"), ("down", s["d"], s["ffn"], "residual")]


GEMM_CASES = [(shape, name, N, K, ep) for shape in ("smol", "8b", "odd")
              for (name, N, K, ep) in layer_gemm_shapes(SHAPES[shape])]
GEMM_CASES += [("odd", "n_tail", 13, 72, "plain"), ("odd", "n_tail_silu", 7, 8, "silu"), ("odd", "k8", 5, 8, "residual")]


def make_gemm(dev, N, K, ep, g, M=16):
    x = randn(dev, M, K, g=g)
    w = randn(dev, N, K, g=g, scale=K ** -0.5)
    w_up = randn(dev, N, K, g=g, scale=K ** -0.5) if ep == "silu" else None
    residual = randn(dev, M, N, g=g) if ep == "residual" else None
    return x, w, w_up, residual


def call_gemm(dev, fn, x, w, w_up, residual):
    out = nan_like(dev, (x.shape[0], w.shape[0]))
    if residual is not None:
        out.copy_(residual)  # in place: out aliases the residual
        fn(x, w, out, residual=out)
    else:
        fn(x, w, out, w_up=w_up)
    return out


@pytest.mark.parametrize("dev,shape,name,N,K,ep", on_devices(GEMM_CASES, not_8b), indirect=["dev"])
def test_skinny_gemm(dev, shape, name, N, K, ep):
    g = gen(dev, 3)
    x, w, w_up, residual = make_gemm(dev, N, K, ep, g)
    for R in range(1, 17):
        out = call_gemm(dev, dev.ops.skinny_gemm, x[:R], w, w_up, None if residual is None else residual[:R])
        ref = gemm_ref(x[:R], w, None if residual is None else residual[:R], w_up)
        assert_close_bf16(out, ref, f"skinny_gemm {shape}/{name} R={R}")
    # non-aliased residual gives the same bits as the in-place form
    if residual is not None:
        out = nan_like(dev, (16, N))
        dev.ops.skinny_gemm(x, w, out, residual=residual)
        assert_bitwise(out, call_gemm(dev, dev.ops.skinny_gemm, x, w, w_up, residual), "residual aliasing")
    # batch invariance: row 0 alone vs at every index of R = 1..16 rows (other rows fresh random)
    alone = call_gemm(dev, dev.ops.skinny_gemm, x[:1], w, w_up, None if residual is None else residual[:1])
    for R, i in dev.invariance_rows():
        xb = randn(dev, R, K, g=g)
        xb[i] = x[0]
        rb = None
        if residual is not None:
            rb = randn(dev, R, N, g=g)
            rb[i] = residual[0]
        out = call_gemm(dev, dev.ops.skinny_gemm, xb, w, w_up, rb)
        assert_bitwise(out[i], alone[0], f"skinny_gemm {shape}/{name} R={R} i={i}")


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_skinny_gemm_nan_propagates(dev):
    g = gen(dev, 4)
    x, w, _, _ = make_gemm(dev, 64, 576, "plain", g, M=2)
    x[1, 100] = float("nan")
    out = nan_like(dev, (2, 64))
    dev.ops.skinny_gemm(x, w, out)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_skinny_gemm_rejects_bad_shapes(dev):
    g = gen(dev, 5)
    x = randn(dev, 17, 64, g=g)
    w = randn(dev, 32, 64, g=g)
    with pytest.raises(RuntimeError, match="1..16 rows"):
        dev.ops.skinny_gemm(x, w, nan_like(dev, (17, 32)))
    with pytest.raises(RuntimeError, match="multiple of 8"):
        dev.ops.skinny_gemm(randn(dev, 2, 60, g=g), randn(dev, 32, 60, g=g), nan_like(dev, (2, 32)))


TC_CASES = [(17, 576, 576, "plain"), (100, 192 * 5, 576, "plain"), (257, 576, 1536, "residual"),
            (300, 1536, 576, "silu"), (2048, 4096, 4096, "plain"), (2048, 14336, 4096, "silu"),
            (1000, 4096, 14336, "residual"), (33, 13, 72, "plain"), (129, 70, 200, "silu"), (4, 100, 64, "plain")]


@pytest.mark.parametrize("dev,M,N,K,ep", on_devices(TC_CASES, lambda M, N, K, ep: M * N * K < 1e9), indirect=["dev"])
def test_gemm_tc(dev, M, N, K, ep):
    g = gen(dev, 6)
    x, w, w_up, residual = make_gemm(dev, N, K, ep, g, M=M)
    out = call_gemm(dev, dev.ops.gemm_tc, x, w, w_up, residual)
    assert_close_bf16(out, gemm_ref(x, w, residual, w_up), f"gemm_tc M={M} N={N} K={K} {ep}")
    again = call_gemm(dev, dev.ops.gemm_tc, x, w, w_up, residual)
    assert_bitwise(again, out, "gemm_tc is deterministic")


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_linear_dispatch(dev):
    g = gen(dev, 7)
    x, w, _, _ = make_gemm(dev, 576, 576, "plain", g, M=40)
    for M in (1, 16, 17, 40):
        out = nan_like(dev, (M, 576))
        dev.ops.linear(x[:M], w, out)
        expect = nan_like(dev, (M, 576))
        (dev.ops.skinny_gemm if M <= 16 else dev.ops.gemm_tc)(x[:M], w, expect)
        assert_bitwise(out, expect, f"linear M={M}")


# ---------------------------------------------------------------------------------------------------------------
# RoPE + KV append
# ---------------------------------------------------------------------------------------------------------------
def rope_tables(dev, hd, max_seq, theta, scaling=None):
    from adadecode.model.math import rope_inv_freq

    cfg = types.SimpleNamespace(rope_theta=theta, head_dim=hd, rope_scaling=scaling)
    inv = rope_inv_freq(cfg)
    freqs = torch.outer(torch.arange(max_seq, dtype=torch.float32), inv)
    return dev.put(freqs.cos().to(dev.torch)), dev.put(freqs.sin().to(dev.torch))


def rope_ref_bf16(x, cos, sin):
    """HF apply_rotary_pos_emb in bf16: x [R, nh, hd], cos/sin fp32 [R, hd/2] -> bf16 (cos/sin cast to bf16)."""
    c = torch.cat([cos, cos], -1).to(BF)[:, None, :]
    s = torch.cat([sin, sin], -1).to(BF)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * c + torch.cat((-x2, x1), dim=-1) * s


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


ROPE_CASES = [(shape, theta, scaling, fp) for shape, theta, scaling in (
    ("smol", 1e5, None), ("8b", 5e5, LLAMA3_SCALING), ("odd", 1e4, None), ("odd128", 1e4, LLAMA3_SCALING))
    for fp in (0, 1, 1000, 4080)]


@pytest.mark.parametrize("dev,shape,theta,scaling,first_pos", on_devices(ROPE_CASES, not_8b), indirect=["dev"])
def test_rope_append_kv(dev, shape, theta, scaling, first_pos):
    s = SHAPES[shape]
    H, Hkv, hd, max_seq = s["H"], s["Hkv"], s["hd"], 4096
    cos, sin = rope_tables(dev, hd, max_seq, theta, scaling)
    g = gen(dev, 8)
    R = 16
    qkv0 = randn(dev, R, (H + 2 * Hkv) * hd, g=g)
    kc, vc = nan_like(dev, (max_seq, Hkv, hd)), nan_like(dev, (max_seq, Hkv, hd))
    qkv = dev.put(qkv0.clone())
    fp = dev.put(torch.tensor([first_pos], device=dev.torch, dtype=torch.int32))
    dev.ops.rope_append_kv(qkv, kc, vc, cos, sin, fp, H, Hkv)
    pos = torch.arange(first_pos, first_pos + R, device=dev.torch)
    q, k, v = qkv0.split([H * hd, Hkv * hd, Hkv * hd], dim=1)
    q_ref = rope_ref_bf16(q.view(R, H, hd), cos[pos], sin[pos]).reshape(R, H * hd)
    k_ref = rope_ref_bf16(k.view(R, Hkv, hd), cos[pos], sin[pos])
    # exact: the kernel rounds exactly where torch's bf16 ops do
    assert_bitwise(qkv[:, :H * hd], q_ref, "rotated q")
    assert_bitwise(qkv[:, H * hd:], qkv0[:, H * hd:], "k/v parts of qkv untouched")
    valid = pos < max_seq
    assert_bitwise(kc[pos[valid]], k_ref[valid], "k cache")
    assert_bitwise(vc[pos[valid]], v.view(R, Hkv, hd)[valid], "v cache")
    # fp64 sanity of the table itself (catches a wrong table convention, which bitwise-vs-HF would not)
    qd = q.view(R, H, hd).double()
    c64 = torch.cat([cos[pos], cos[pos]], -1).double()[:, None]
    s64 = torch.cat([sin[pos], sin[pos]], -1).double()[:, None]
    x1, x2 = qd.chunk(2, -1)
    assert_close_bf16(qkv[:, :H * hd].view(R, H, hd), qd * c64 + torch.cat((-x2, x1), -1) * s64, "rope vs fp64",
                      rtol=3e-2, atol_frac=2e-2)
    untouched = torch.ones(max_seq, dtype=torch.bool, device=dev.torch)
    untouched[pos[valid]] = False
    assert torch.isnan(kc[untouched].float()).all() and torch.isnan(vc[untouched].float()).all(), \
        "rope_append_kv wrote outside its rows"


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_rope_out_of_range_position_is_nan_not_a_write(dev):
    H, Hkv, hd, max_seq = 9, 3, 64, 64
    cos, sin = rope_tables(dev, hd, max_seq, 1e4)
    g = gen(dev, 9)
    qkv = randn(dev, 4, (H + 2 * Hkv) * hd, g=g)
    kc, vc = nan_like(dev, (max_seq, Hkv, hd)), nan_like(dev, (max_seq, Hkv, hd))
    fp = dev.put(torch.tensor([62], device=dev.torch, dtype=torch.int32))
    dev.ops.rope_append_kv(qkv, kc, vc, cos, sin, fp, H, Hkv)
    assert torch.isfinite(qkv[:2, :H * hd].float()).all() and torch.isnan(qkv[2:, :H * hd].float()).all()
    assert torch.isfinite(kc[62:].float()).all() and torch.isnan(kc[:62].float()).all()


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------
def attention_ref(dev, q, kc, vc, first_pos, H, Hkv, hd):
    """fp64: q [R, H*hd] (bf16 values), cache [S, Hkv, hd]; row r sees 0..first_pos+r."""
    R = q.shape[0]
    end = first_pos + R
    G = H // Hkv
    k = kc[:end].double().repeat_interleave(G, dim=1)  # [T, H, hd]
    v = vc[:end].double().repeat_interleave(G, dim=1)
    qd = q.double().view(R, H, hd)
    scores = torch.einsum("rhd,thd->hrt", qd, k) / math.sqrt(hd)
    pos = torch.arange(first_pos, end, device=dev.torch)
    mask = torch.arange(end, device=dev.torch)[None, :] > pos[:, None]
    scores = scores.masked_fill(mask[None], float("-inf"))
    return torch.einsum("hrt,thd->rhd", scores.softmax(-1), v).reshape(R, H * hd)


def attention_workspace(dev, R, H, hd, max_ctx):
    """NaN partials (never read before written) behind the zero counters that attention.cuh requires."""
    ws = nan_like(dev, (dev.ops.attention_workspace_floats(R, H, hd, max_ctx),), torch.float32)
    ws[:dev.ops.attention_counters] = 0
    return ws


def attention_launch(dev, q, kc, vc, first_pos, H, max_ctx, single_launch, ws):
    """One call on a given workspace; on the emulated device also checks the number of kernels it launched and
    that it left the counters zero."""
    out = nan_like(dev, (q.shape[0], H * kc.shape[2]))
    fp = dev.put(torch.tensor([first_pos], device=dev.torch, dtype=torch.int32))
    before = dev.ops.stats()["launches"] if dev.emu else 0
    dev.ops.attention(q, kc, vc, fp, out, H, max_ctx, workspace=ws, single_launch=single_launch)
    if dev.emu:
        assert dev.ops.stats()["launches"] - before == (1 if single_launch else 2)
    counters = ws[:dev.ops.attention_counters].view(torch.int32)
    assert not counters.any(), f"attention left {counters.count_nonzero().item()} counters non-zero"
    return out


def run_attention(dev, q, kc, vc, first_pos, H, max_ctx):
    """The one-launch result, checked bitwise against the two-launch one."""
    R, hd = q.shape[0], kc.shape[2]
    two = attention_launch(dev, q, kc, vc, first_pos, H, max_ctx, False, attention_workspace(dev, R, H, hd, max_ctx))
    one = attention_launch(dev, q, kc, vc, first_pos, H, max_ctx, True, attention_workspace(dev, R, H, hd, max_ctx))
    assert_bitwise(one, two, f"attention first_pos={first_pos} R={R} max_ctx={max_ctx}: one launch vs two")
    return one


ATTN_CASES = [(shape, fp, R) for shape in ("smol", "8b", "odd", "odd128")
              for (fp, R) in ((0, 1), (0, 16), (5, 3), (120, 16), (127, 1), (128, 1), (300, 7), (1000, 16),
                              (4080, 16), (4095, 1))]


@pytest.mark.parametrize("dev,shape,first_pos,R", on_devices(ATTN_CASES, not_8b), indirect=["dev"])
def test_attention(dev, shape, first_pos, R):
    s = SHAPES[shape]
    H, Hkv, hd, max_seq = s["H"], s["Hkv"], s["hd"], 4096
    g = gen(dev, 10 + first_pos)
    kc, vc = randn(dev, max_seq, Hkv, hd, g=g), randn(dev, max_seq, Hkv, hd, g=g)
    end = first_pos + R
    kc[end:] = float("nan")  # entries past the last row are dead: they must never be read
    vc[end:] = float("nan")
    width = (H + 2 * Hkv) * hd
    qkv = randn(dev, R, width, g=g, scale=2.0)  # the q part of a fused qkv buffer, row stride `width`
    out = run_attention(dev, qkv, kc, vc, first_pos, H, max_seq)
    ref = attention_ref(dev, qkv[:, :H * hd], kc, vc, first_pos, H, Hkv, hd)
    assert_close_bf16(out, ref, f"attention {shape} first_pos={first_pos} R={R}")
    # a plain [R, H*hd] q buffer and a tight max_ctx give the same bits
    out2 = run_attention(dev, qkv[:, :H * hd].contiguous(), kc, vc, first_pos, H, end)
    assert_bitwise(out2, out, "attention: q stride / max_ctx must not change the result")
    # batch invariance: row i alone (first_pos + i, R = 1) vs in the batch
    for i in range(R):
        alone = run_attention(dev, dev.put(qkv[i:i + 1].contiguous()), kc, vc, first_pos + i, H, max_seq)
        assert_bitwise(alone[0], out[i], f"attention {shape} first_pos={first_pos} R={R} row {i}")


@pytest.mark.parametrize("dev,shape", on_devices(["smol", "8b"], not_8b), indirect=["dev"])
def test_attention_invariance_every_index(dev, shape):
    """Row at position p computed at every index i of launches of R = 1..16 rows."""
    s = SHAPES[shape]
    H, Hkv, hd, max_seq = s["H"], s["Hkv"], s["hd"], 1024
    g = gen(dev, 11)
    kc, vc = randn(dev, max_seq, Hkv, hd, g=g), randn(dev, max_seq, Hkv, hd, g=g)
    width = (H + 2 * Hkv) * hd
    p = 300
    q0 = randn(dev, 1, width, g=g, scale=2.0)
    alone = run_attention(dev, q0, kc, vc, p, H, max_seq)
    for R, i in dev.invariance_rows():
        qb = randn(dev, R, width, g=g, scale=2.0)
        qb[i] = q0[0]
        out = run_attention(dev, qb, kc, vc, p - i, H, max_seq)
        assert_bitwise(out[i], alone[0], f"attention {shape} R={R} i={i}")


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_attention_long_context_and_prefill_rows(dev):
    """Beyond 4K (an 8K cache: 64 chunks) and more than 16 rows in one launch (prefill-style row groups)."""
    s = SMOL
    H, Hkv, hd, max_seq = s["H"], s["Hkv"], s["hd"], 8192
    g = gen(dev, 12)
    kc, vc = randn(dev, max_seq, Hkv, hd, g=g), randn(dev, max_seq, Hkv, hd, g=g)
    width = (H + 2 * Hkv) * hd
    for first_pos, R in ((8000, 16), (0, 300), (7000, 40)):
        q = randn(dev, R, width, g=g, scale=2.0)
        out = run_attention(dev, q, kc, vc, first_pos, H, max_seq)
        ref = attention_ref(dev, q[:, :H * hd], kc, vc, first_pos, H, Hkv, hd)
        assert_close_bf16(out, ref, f"attention long first_pos={first_pos} R={R}")


@pytest.mark.parametrize("dev,shape", on_devices(["smol", "8b"], not_8b), indirect=["dev"])
def test_attention_at_128k_positions(dev, shape):
    """Llama-3.1's maximum position (131072): 1024 chunks per row, int64 offsets into a 128K-entry cache."""
    s = SHAPES[shape]
    H, Hkv, hd, max_seq = s["H"], s["Hkv"], s["hd"], 131072
    g = gen(dev, 18)
    kc, vc = randn(dev, max_seq, Hkv, hd, g=g), randn(dev, max_seq, Hkv, hd, g=g)
    width = (H + 2 * Hkv) * hd
    R = 4
    first_pos = max_seq - R
    q = randn(dev, R, width, g=g, scale=2.0)
    out = run_attention(dev, q, kc, vc, first_pos, H, max_seq)
    ref = attention_ref(dev, q[:, :H * hd], kc, vc, first_pos, H, Hkv, hd)
    assert_close_bf16(out, ref, f"attention {shape} at 128K")
    alone = run_attention(dev, dev.put(q[R - 1:].contiguous()), kc, vc, max_seq - 1, H, max_seq)
    assert_bitwise(alone[0], out[R - 1], "attention at 128K: last row alone")


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_attention_row_past_max_ctx_is_nan(dev):
    s = SMOL
    g = gen(dev, 13)
    kc, vc = randn(dev, 512, s["Hkv"], s["hd"], g=g), randn(dev, 512, s["Hkv"], s["hd"], g=g)
    q = randn(dev, 4, s["H"] * s["hd"], g=g)
    out = run_attention(dev, q, kc, vc, 254, s["H"], 256)  # rows at 254, 255 fit; 256, 257 do not
    assert torch.isfinite(out[:2].float()).all() and torch.isnan(out[2:].float()).all()
    out = run_attention(dev, q, kc, vc, 300, s["H"], 256)  # every row of the group past max_ctx
    assert torch.isnan(out.float()).all()


def attention_inputs(dev, shape, max_seq, R, seed):
    s = SHAPES[shape]
    H, Hkv, hd = s["H"], s["Hkv"], s["hd"]
    g = gen(dev, seed)
    kc, vc = randn(dev, max_seq, Hkv, hd, g=g), randn(dev, max_seq, Hkv, hd, g=g)
    q = randn(dev, R, (H + 2 * Hkv) * hd, g=g, scale=2.0)
    return q, kc, vc


@pytest.mark.parametrize("dev,shape,R", on_devices([(sh, R) for sh in ("smol", "8b", "odd128")
                                                     for R in (1, 2, 3, 5, 8, 16)], not_8b), indirect=["dev"])
def test_attention_one_launch_equals_two(dev, shape, R):
    """Contexts inside the first chunk, ending at and around the chunk boundaries (127, 128, 129 positions), the
    rows straddling a boundary, several chunks: one launch == two, bit for bit (run_attention checks it)."""
    H, max_seq = SHAPES[shape]["H"], 1024
    q, kc, vc = attention_inputs(dev, shape, max_seq, R, 14 + R)
    for first_pos in sorted({0, 40, 127 - R, 128 - R, 129 - R, 126, 127, 128, 700} - {-1}):
        out = run_attention(dev, q, kc, vc, first_pos, H, max_seq)
        assert torch.isfinite(out.float()).all(), f"attention {shape} R={R} first_pos={first_pos}"


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_attention_blocks_loop_over_chunks(dev):
    """max_ctx with more chunks than splits (S < chunks): a block computes several chunks; the bits never depend
    on S (a tight max_ctx gives another S) and match the reference."""
    s = SMOL
    H, Hkv, hd = s["H"], s["Hkv"], s["hd"]
    for first_pos, R, max_ctx in ((12000, 1, 16384), (4000, 40, 8192)):  # S = 85 < 94 live chunks; 28 < 32
        q, kc, vc = attention_inputs(dev, "smol", max_ctx, R, 15)
        out = run_attention(dev, q, kc, vc, first_pos, H, max_ctx)
        ref = attention_ref(dev, q[:, :H * hd], kc, vc, first_pos, H, Hkv, hd)
        assert_close_bf16(out, ref, f"attention first_pos={first_pos} R={R} max_ctx={max_ctx}")
        tight = run_attention(dev, q, kc, vc, first_pos, H, first_pos + R)
        assert_bitwise(tight, out, f"attention first_pos={first_pos} R={R}: max_ctx (so S) changed the bits")


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_attention_one_launch_reuses_its_workspace(dev):
    """Launches of different R and max_ctx in turn on one workspace (as the engine's decode and prefill calls):
    each leaves the counters zero for the next, so each is still right; a counter left non-zero would leave the
    next launch's rows unmerged (NaN)."""
    s = SMOL
    H, max_seq = s["H"], 2048
    ws = attention_workspace(dev, 40, H, s["hd"], max_seq)
    for first_pos, R, max_ctx, seed in ((100, 1, 2048, 16), (100, 1, 2048, 17), (1500, 40, 2048, 18),
                                        (129, 3, 256, 19), (1999, 5, 2048, 20)):
        q, kc, vc = attention_inputs(dev, "smol", max_seq, R, seed)
        once = attention_launch(dev, q, kc, vc, first_pos, H, max_ctx, True, ws)
        fresh = attention_launch(dev, q, kc, vc, first_pos, H, max_ctx, False,
                                 attention_workspace(dev, R, H, s["hd"], max_ctx))
        assert_bitwise(once, fresh, f"attention first_pos={first_pos} R={R} on a reused workspace")


# ---------------------------------------------------------------------------------------------------------------
# LM head + argmax + max prob
# ---------------------------------------------------------------------------------------------------------------
def run_lm_head(dev, x, w, subset=None, w_rest=None, round_bf16=False):
    R = x.shape[0]
    token = dev.put(torch.full((R,), -7777, device=dev.torch, dtype=torch.int32))
    prob = nan_like(dev, (R,), torch.float32)
    lse = nan_like(dev, (R,), torch.float32)
    n = w.shape[0] if subset is None else subset.numel()
    ws = nan_like(dev, (dev.ops.lm_head_workspace_floats(R, n),), torch.float32)
    dev.ops.lm_head_argmax(x, w, token, prob, lse=lse, vocab_subset=subset, w_rest=w_rest,
                                  round_bf16=round_bf16, workspace=ws)
    return token, prob, lse


def lm_head_ref(dev, x, w, subset=None, w_rest=None, round_bf16=False):
    ids = torch.arange(w.shape[0], device=dev.torch) if subset is None else subset.long()
    logits = x.double() @ w[ids].double().T
    extra = None if w_rest is None else (x.double() @ w_rest.double())
    if round_bf16:
        logits = logits.to(BF).double()
        extra = None if extra is None else extra.to(BF).double()
    full = logits if extra is None else torch.cat([logits, extra[:, None]], 1)
    lse = torch.logsumexp(full, -1)
    return logits, ids, lse


def check_lm_head(dev, x, w, subset=None, w_rest=None, round_bf16=False, what=""):
    token, prob, lse = run_lm_head(dev, x, w, subset, w_rest, round_bf16)
    logits, ids, lse_ref = lm_head_ref(dev, x, w, subset, w_rest, round_bf16)
    assert torch.isfinite(prob).all() and torch.isfinite(lse).all(), f"{what}: non-finite"
    # a one-id subset has no runner-up: its gap to the (absent) second is infinite
    top2 = torch.cat([logits, torch.full_like(logits[:, :1], -math.inf)], 1).topk(2, dim=-1).values
    tol = 1e-4 * logits.abs().max().item() + 1e-5
    for r in range(x.shape[0]):
        t = int(token[r])
        assert t in set(ids.tolist()), f"{what}: row {r} token {t} outside the vocabulary/subset"
        j = int((ids == t).nonzero()[0])
        assert logits[r, j] >= top2[r, 0] - tol, f"{what}: row {r} token {t} is not the argmax"
        if top2[r, 0] - top2[r, 1] > 2 * tol:
            assert j == int(logits[r].argmax()), f"{what}: row {r} wrong argmax"
        pr = math.exp(float(logits[r, j] - lse_ref[r]))
        assert abs(float(prob[r]) - pr) <= 1e-3 * pr + 1e-6, f"{what}: row {r} max_prob {float(prob[r])} vs {pr}"
        assert abs(float(lse[r]) - float(lse_ref[r])) <= 1e-3 * (1 + abs(float(lse_ref[r]))), f"{what}: row {r} lse"
    return token, prob, lse


@pytest.mark.parametrize("dev,shape,round_bf16", on_devices([(s, r) for s in ("smol", "8b", "odd") for r in (False, True)],
                                                            not_8b), indirect=["dev"])
def test_lm_head_full(dev, shape, round_bf16):
    s = SHAPES[shape]
    g = gen(dev, 14)
    w = randn(dev, dev.vocab(s), s["d"], g=g, scale=3 * s["d"] ** -0.5)
    x = randn(dev, 16, s["d"], g=g)
    for R in (1, 2, 5, 8, 16):
        check_lm_head(dev, x[:R], w, round_bf16=round_bf16, what=f"lm_head {shape} R={R}")
    # batch invariance, bitwise on all three outputs
    alone = run_lm_head(dev, x[:1], w, round_bf16=round_bf16)
    for R, i in dev.invariance_rows():
        xb = randn(dev, R, s["d"], g=g)
        xb[i] = x[0]
        got = run_lm_head(dev, xb, w, round_bf16=round_bf16)
        for a, b, name in zip(got, alone, ("token", "max_prob", "lse")):
            assert_bitwise(a[i:i + 1], b, f"lm_head {shape} {name} R={R} i={i}")


@pytest.mark.parametrize("dev,shape", on_devices(["smol", "8b"], not_8b), indirect=["dev"])
def test_lm_head_subset_and_rest(dev, shape):
    s = SHAPES[shape]
    g = gen(dev, 15)
    w = randn(dev, dev.vocab(s), s["d"], g=g, scale=3 * s["d"] ** -0.5)
    x = randn(dev, 16, s["d"], g=g)
    for K in (1, 63, 64, 65, 1000) if dev.emu else (1, 63, 64, 65, 4096, 10000):
        subset = torch.randperm(dev.vocab(s), device=dev.torch, generator=g)[:K].sort().values.to(torch.int32)
        subset = dev.put(subset)
        w_rest = randn(dev, s["d"], g=g, scale=3 * s["d"] ** -0.5)
        for R in (1, 7, 16):
            check_lm_head(dev, x[:R], w, subset, w_rest, what=f"lm_head subset K={K} R={R}")
            check_lm_head(dev, x[:R], w, subset, None, what=f"lm_head subset K={K} R={R} no rest")
        alone = run_lm_head(dev, x[:1], w, subset, w_rest)
        for R, i in dev.invariance_rows():
            xb = randn(dev, R, s["d"], g=g)
            xb[i] = x[0]
            got = run_lm_head(dev, xb, w, subset, w_rest)
            for a, b, name in zip(got, alone, ("token", "max_prob", "lse")):
                assert_bitwise(a[i:i + 1], b, f"lm_head subset {name} K={K} R={R} i={i}")


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_lm_head_ties_go_to_the_lowest_id(dev):
    d, V = 576, 49152
    g = gen(dev, 16)
    w = randn(dev, V, d, g=g, scale=0.1 * d ** -0.5)
    x = randn(dev, 4, d, g=g)
    hot = x[0].float() / x[0].float().norm() * 2.0
    for j in (40000, 7, 300, 49151):  # identical rows -> bitwise identical logits; winner must be 7
        w[j] = hot.to(BF)
    token, prob, _ = run_lm_head(dev, x, w)
    assert int(token[0]) == 7
    logits, _, lse = lm_head_ref(dev, x, w)
    assert abs(float(prob[0]) - math.exp(float(logits[0, 7] - lse[0]))) < 1e-3
    # the same through a subset that orders them 300 < 40000 < 49151 (7 excluded)
    subset = dev.put(torch.tensor([1, 300, 1000, 40000, 49151], device=dev.torch, dtype=torch.int32))
    token, _, _ = run_lm_head(dev, x, w, subset)
    assert int(token[0]) == 300
    # ties created by bf16 rounding of the logits
    token, _, _ = run_lm_head(dev, x, w, round_bf16=True)
    logits_bf = (x.double() @ w.double().T).to(BF).double()
    assert int(token[0]) == int(logits_bf[0].argmax())  # torch.argmax also returns the first maximum


@pytest.mark.parametrize("dev", BOTH, indirect=True)
def test_lm_head_nan_row_is_flagged(dev):
    d, V = 576, 1000
    g = gen(dev, 17)
    w = randn(dev, V, d, g=g, scale=d ** -0.5)
    x = randn(dev, 3, d, g=g)
    x[1, 5] = float("nan")
    token, prob, lse = run_lm_head(dev, x, w)
    assert int(token[1]) == -1 and math.isnan(float(prob[1])) and math.isnan(float(lse[1]))
    assert int(token[0]) >= 0 and math.isfinite(float(prob[0])) and int(token[2]) >= 0
