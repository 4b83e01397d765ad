"""The fused decode kernels (issue 16) against the unfused launches they replace, bit for bit, on a GPU (`gpu`) and
on the emulated device (CI):

* skinny_gemm with the RMSNorm folded into its prologue (norm_weight) == add_rmsnorm into a buffer + skinny_gemm,
  for the plain, residual and silu-mul epilogues, every row bucket, rows read in place from a ring (ring_first);
* qkv_rope (norm -> QKV GEMM -> RoPE + K/V append, one launch) == add_rmsnorm + skinny_gemm + rope_append_kv: the
  rotated q, the whole K and V caches (untouched slots included), rows past max_seq (NaN q, no write);
* lm_head_argmax / lm_head_sample with the final norm folded in and ring rows == add_rmsnorm + the unfused head;
* each of them launched as a programmatic dependent (pdl=True) gives the same bits (emulated: the launches are
  counted, and every block must reach griddepcontrol.wait or the launch fails).
"""
from __future__ import annotations

import pytest
import torch

from test_kernels import (BF, SHAPES, assert_bitwise, dev, gen, nan_like, not_8b, on_devices,  # noqa: F401
                          randn, rope_tables)

EPS = 1e-5
SHAPE_NAMES = ["smol", "8b", "odd", "odd128"]


def normed(dev, h, g):
    """add_rmsnorm (no delta) of the rows h into a fresh buffer: the unfused input of the fused kernels."""
    xn = nan_like(dev, tuple(h.shape))
    dev.ops.add_rmsnorm(dev.put(h.clone()), None, g, xn, EPS)
    return xn


def ring_rows(h, first, R):
    return torch.stack([h[(first + r) % h.shape[0]] for r in range(R)])


def pdl_launches(dev):
    return dev.ops.stats()["pdl_launches"] if dev.emu else 0


@pytest.mark.parametrize("dev,shape,epilogue", on_devices([(s, e) for s in SHAPE_NAMES
                                                           for e in ("plain", "residual", "silu")], not_8b),
                         indirect=["dev"])
def test_skinny_gemm_with_the_norm_in_its_prologue(dev, shape, epilogue):
    s = SHAPES[shape]
    d, N = s["d"], s["ffn"] if epilogue == "silu" else s["d"]
    g = gen(dev, 31)
    h = randn(dev, 16, d, g=g, scale=3.0)
    gamma = (1 + 0.1 * randn(dev, d, g=g, dtype=torch.float32)).to(BF)
    w = randn(dev, N, d, g=g, scale=d ** -0.5)
    w_up = randn(dev, N, d, g=g, scale=d ** -0.5) if epilogue == "silu" else None
    residual = randn(dev, 16, N, g=g) if epilogue == "residual" else None
    xn = normed(dev, h, gamma)
    for R, pdl in ((1, False), (2, True), (3, False), (5, True), (8, False), (13, True), (16, False)):
        ref, out = nan_like(dev, (R, N)), nan_like(dev, (R, N))
        res = None if residual is None else residual[:R].contiguous()
        dev.ops.skinny_gemm(xn[:R].contiguous(), w, ref, residual=res, w_up=w_up)
        before = pdl_launches(dev)
        dev.ops.skinny_gemm(h[:R].contiguous(), w, out, residual=res, w_up=w_up, norm_weight=gamma, eps=EPS, pdl=pdl)
        assert torch.isfinite(out.float()).all(), f"{shape} {epilogue} R={R}: non-finite output of the fused norm"
        assert_bitwise(out, ref, f"{shape} {epilogue} R={R} fused norm")
        if dev.emu:
            assert pdl_launches(dev) - before == int(pdl)
    # rows read in place from a ring of 16 slots, wrapping past its end
    for first, R in ((13, 5), (0, 16), (15, 1)):
        ref, out = nan_like(dev, (R, N)), nan_like(dev, (R, N))
        res = None if residual is None else residual[:R].contiguous()
        dev.ops.skinny_gemm(dev.put(ring_rows(xn, first, R)), w, ref, residual=res, w_up=w_up)
        dev.ops.skinny_gemm(h, w, out, residual=res, w_up=w_up, norm_weight=gamma, eps=EPS, ring_first=first)
        assert_bitwise(out, ref, f"{shape} {epilogue} ring first={first} R={R}")


QKV_CASES = [(shape, fp) for shape in SHAPE_NAMES for fp in (0, 1000, 4090)]


@pytest.mark.parametrize("dev,shape,first_pos", on_devices(QKV_CASES, not_8b), indirect=["dev"])
def test_qkv_rope_is_norm_gemm_rope_append(dev, shape, first_pos):
    s = SHAPES[shape]
    d, H, Hkv, hd, max_seq = s["d"], s["H"], s["Hkv"], s["hd"], 4096
    qn, qkv_n = H * hd, (H + 2 * Hkv) * hd
    cos, sin = rope_tables(dev, hd, max_seq, 5e5)
    g = gen(dev, 32)
    h = randn(dev, 16, d, g=g, scale=2.0)
    gamma = (1 + 0.1 * randn(dev, d, g=g, dtype=torch.float32)).to(BF)
    wqkv = randn(dev, qkv_n, d, g=g, scale=d ** -0.5)
    fp = dev.put(torch.tensor([first_pos], device=dev.torch, dtype=torch.int32))
    xn = normed(dev, h, gamma)
    for R, norm, pdl in ((16, True, False), (5, True, True), (1, False, True), (3, False, False)):
        kc1, vc1 = nan_like(dev, (max_seq, Hkv, hd)), nan_like(dev, (max_seq, Hkv, hd))
        kc2, vc2 = nan_like(dev, (max_seq, Hkv, hd)), nan_like(dev, (max_seq, Hkv, hd))
        qkv1, qkv2 = nan_like(dev, (R, qkv_n)), nan_like(dev, (R, qkv_n))
        x_unfused = (xn if norm else h)[:R].contiguous()
        dev.ops.skinny_gemm(x_unfused, wqkv, qkv1)
        dev.ops.rope_append_kv(qkv1, kc1, vc1, cos, sin, fp, H, Hkv)
        dev.ops.qkv_rope(h[:R].contiguous(), wqkv, qkv2, kc2, vc2, cos, sin, fp, H, Hkv,
                         norm_weight=gamma if norm else None, eps=EPS, pdl=pdl)
        what = f"{shape} first_pos={first_pos} R={R} norm={norm}"
        assert_bitwise(qkv2[:, :qn], qkv1[:, :qn], f"{what}: rotated q")
        assert_bitwise(kc2, kc1, f"{what}: K cache")
        assert_bitwise(vc2, vc1, f"{what}: V cache")
        live = min(R, max_seq - first_pos)
        assert torch.isfinite(qkv2[:live, :qn].float()).all() and torch.isnan(qkv2[live:, :qn].float()).all()
        assert torch.isfinite(kc2[first_pos:first_pos + live].float()).all()
    # rows from a ring (the engine reads its ring slots in place)
    kc1, vc1, kc2, vc2 = (nan_like(dev, (max_seq, Hkv, hd)) for _ in range(4))
    qkv1, qkv2 = nan_like(dev, (4, qkv_n)), nan_like(dev, (4, qkv_n))
    dev.ops.skinny_gemm(dev.put(ring_rows(xn, 14, 4)), wqkv, qkv1)
    dev.ops.rope_append_kv(qkv1, kc1, vc1, cos, sin, fp, H, Hkv)
    dev.ops.qkv_rope(h, wqkv, qkv2, kc2, vc2, cos, sin, fp, H, Hkv, norm_weight=gamma, eps=EPS, ring_first=14)
    assert_bitwise(qkv2[:, :qn], qkv1[:, :qn], "ring: rotated q")
    assert_bitwise(kc2, kc1, "ring: K cache")
    assert_bitwise(vc2, vc1, "ring: V cache")


def _lm_head(dev, x, w, R, sample, **kw):
    token = dev.put(torch.full((R,), -7, dtype=torch.int32, device=dev.torch))
    prob, lse = nan_like(dev, (R,), torch.float32), nan_like(dev, (R,), torch.float32)
    if sample:
        dev.ops.lm_head_sample(x, w, token, prob, 1234, 40, 1 / 0.8, 50, 0.9, lse=lse, round_bf16=True, **kw)
    else:
        dev.ops.lm_head_argmax(x, w, token, prob, lse=lse, round_bf16=True, **kw)
    return token, prob, lse


@pytest.mark.parametrize("dev,shape,sample", on_devices([(s, smp) for s in ("smol", "8b", "odd") for smp in (False, True)],
                                                        not_8b), indirect=["dev"])
def test_lm_head_with_the_final_norm_folded_in(dev, shape, sample):
    s = SHAPES[shape]
    d = s["d"]
    g = gen(dev, 33)
    h = randn(dev, 16, d, g=g, scale=2.0)
    gamma = (1 + 0.1 * randn(dev, d, g=g, dtype=torch.float32)).to(BF)
    w = randn(dev, dev.vocab(s), d, g=g, scale=3 * d ** -0.5)
    xn = normed(dev, h, gamma)
    for first, R, pdl in ((-1, 1, False), (-1, 7, True), (-1, 16, False), (12, 6, True), (3, 1, False)):
        rows = (xn[:R] if first < 0 else ring_rows(xn, first, R)).contiguous()
        want = _lm_head(dev, dev.put(rows), w, R, sample)
        got = _lm_head(dev, h[:R].contiguous() if first < 0 else h, w, R, sample, norm_weight=gamma, eps=EPS,
                       ring_first=first, pdl=pdl)
        for a, b, name in zip(got, want, ("token", "max_prob", "lse")):
            assert_bitwise(a, b, f"{shape} sample={sample} first={first} R={R}: {name}")
        assert (got[0] >= 0).all()


@pytest.mark.parametrize("dev", on_devices([()]), indirect=True)
def test_fused_inputs_are_checked(dev):
    d = 64
    g = gen(dev, 34)
    h, w = randn(dev, 4, d, g=g), randn(dev, 32, d, g=g)
    token, prob = dev.put(torch.zeros(2, dtype=torch.int32, device=dev.torch)), nan_like(dev, (2,), torch.float32)
    with pytest.raises(RuntimeError, match="norm_weight must be"):
        dev.ops.skinny_gemm(h, w, nan_like(dev, (4, 32)), norm_weight=randn(dev, d + 8, g=g))
    with pytest.raises(RuntimeError, match="ring of 4 rows cannot hold 5"):
        dev.ops.skinny_gemm(h, w, nan_like(dev, (5, 32)), ring_first=1)
    with pytest.raises(RuntimeError, match="norm_weight and w_rest"):
        dev.ops.lm_head_argmax(h[:2].contiguous(), w, token, prob, w_rest=randn(dev, d, g=g),
                               norm_weight=randn(dev, d, g=g))


@pytest.mark.parametrize("dev,shape", on_devices(SHAPE_NAMES, not_8b), indirect=["dev"])
def test_attention_as_a_programmatic_dependent(dev, shape):
    """The one-launch attention of the fused layer, launched with PDL: the bits of the two-launch reference."""
    s = SHAPES[shape]
    H, Hkv, hd, max_seq = s["H"], s["Hkv"], s["hd"], 512
    g = gen(dev, 35)
    kc, vc = randn(dev, max_seq, Hkv, hd, g=g), randn(dev, max_seq, Hkv, hd, g=g)
    for first_pos, R in ((0, 1), (126, 5), (300, 16)):
        q = randn(dev, R, H * hd, g=g)
        fp = dev.put(torch.tensor([first_pos], device=dev.torch, dtype=torch.int32))
        outs = []
        for single, pdl in ((False, False), (True, True)):
            out = nan_like(dev, (R, H * hd))
            ws = dev.put(torch.zeros(dev.ops.attention_workspace_floats(R, H, hd, max_seq), device=dev.torch))
            before = pdl_launches(dev)
            dev.ops.attention(q, kc, vc, fp, out, H, max_seq, workspace=ws, single_launch=single, pdl=pdl)
            if dev.emu:
                assert pdl_launches(dev) - before == int(pdl)
            outs.append(out)
        assert torch.isfinite(outs[1].float()).all(), f"{shape}: non-finite attention output"
        assert_bitwise(outs[1], outs[0], f"{shape} first_pos={first_pos} R={R}: one PDL launch vs two launches")
