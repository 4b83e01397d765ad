"""The CPU kernels (csrc/cpu) one by one, on every vector path this CPU runs (AVX-512, AVX2, portable), against
references written here from the CUDA kernels' definitions:

* exp_fixed / exp2_fixed: each vector path equals the scalar sequence of csrc/common/fixed_math.h bit for bit
  (dense ranges, edges, NaN, infinities, subnormal results), and both are within 1 ulp of the true value;
* the dot products: the CUDA skinny GEMM's reduction order (chunk i of 8 elements on thread i % NT, an FMA chain
  per thread, the warp butterfly, warps in order), written in numpy, equals the kernels bit for bit for K with and
  without tail lanes, one to eight warps, any row count; a row's bits do not depend on the rows beside it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

adadecode_cpu = pytest.importorskip("adadecode_cpu", reason="adadecode_cpu is not built (see README)")
ISAS = adadecode_cpu.isas()

pytestmark = pytest.mark.exactness


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def exp_inputs() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    edges = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 88.72, 88.7228, 88.8, 88.81,
             -87.3, -103.0, -103.01, -126.0, -126.01, -125.5, 127.4999, 127.5, 127.99999, 128.0, -0.5, 0.5, 1.5, 2.5]
    return torch.cat([torch.tensor(edges), torch.randn(200_000, generator=g) * 40,
                      torch.linspace(-140, 140, 300_001), (torch.rand(100_000, generator=g) - 0.5)])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("base2", [False, True], ids=["exp", "exp2"])
def test_vector_exp_is_the_scalar_sequence(isa, base2):
    x = exp_inputs()
    got, want = adadecode_cpu.testing.fixed_exp(x, isa, base2), adadecode_cpu.testing.fixed_exp_scalar(x, base2)
    same = bits(got) == bits(want)
    assert bool(same.all()), f"{isa}: {int((~same).sum())} of {x.numel()} differ, e.g. x={x[~same][:4].tolist()}"


@pytest.mark.parametrize("base2", [False, True], ids=["exp", "exp2"])
def test_fixed_exp_within_one_ulp(base2):
    lo, hi = (-125.9, 127.9) if base2 else (-87.3, 88.7)  # results in the normal range
    x = torch.cat([torch.linspace(lo, hi, 1_000_001), torch.rand(200_000) - 0.5])
    got = adadecode_cpu.testing.fixed_exp_scalar(x, base2).double()
    ref = (torch.exp2 if base2 else torch.exp)(x.double())
    ulp = torch.pow(2.0, torch.floor(torch.log2(ref)) - 23)
    err = ((got - ref).abs() / ulp).max().item()
    assert err < 1.0, f"max error {err:.3f} ulp"
    y = adadecode_cpu.testing.fixed_exp_scalar(torch.tensor([float("nan"), float("inf"), -float("inf"), 200.0, -200.0]), base2)
    assert torch.isnan(y[0]) and y[1] == float("inf") and y[2] == 0 and y[3] == float("inf") and y[4] == 0


def skinny_lanes(K: int) -> int:
    return min(8, max(1, (K // 8 + 127) // 128)) * 32


def cuda_order_dot(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """out[r, n] = x[r] . w[n] in the CUDA skinny GEMM's order (csrc/cuda/kernels/skinny_core.cuh), fp32 throughout.
    x and w hold bf16 values, so every product is exact in fp32 and each FMA is one rounded add."""
    R, K = x.shape
    N = w.shape[0]
    NT = skinny_lanes(K)
    out = np.empty((R, N), np.float32)
    for r in range(R):
        prod = (w * x[r]).astype(np.float32)  # [N, K], exact
        acc = np.zeros((N, NT), np.float32)
        for i in range(K // 8):
            for e in range(8):
                acc[:, i % NT] = acc[:, i % NT] + prod[:, 8 * i + e]
        total = None
        for wp in range(NT // 32):
            v = acc[:, 32 * wp:32 * wp + 32].copy()
            for o in (16, 8, 4, 2, 1):
                v = (v + v[:, np.arange(32) ^ o]).astype(np.float32)
            total = v[:, 0] if total is None else (total + v[:, 0]).astype(np.float32)
        out[r] = total
    return out


def bf16_values(shape, g) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("K", [8, 64, 72, 200, 576, 1024, 1536, 2056, 4096])
def test_dot_is_the_cuda_order(isa, K):
    """K = 8: one tail lane; 72 (SmolLM2's d / 8 = 72 chunks on 32 lanes): 8 tail lanes; 1536: 2 warps, no tail;
    2056: 3 warps with a tail; 4096: 4 warps."""
    g = torch.Generator().manual_seed(K)
    R, N = 3, 7
    x, w = bf16_values((R, K), g), bf16_values((N, K), g)
    got = adadecode_cpu.testing.lane_dot(x.float(), w, isa)
    want = torch.from_numpy(cuda_order_dot(x.float().numpy(), w.float().numpy()))
    assert torch.equal(bits(got), bits(want)), f"max |diff| {(got - want).abs().max().item()}"


@pytest.mark.parametrize("isa", ISAS)
def test_dot_rows_are_batch_invariant(isa):
    """A row's products are the same bits alone or among R = 2..16 rows, at any index (the register tiles of
    1, 2, 3, 4 and 8 rows and 1, 2 and 4 columns, and every split of R into them, all take part)."""
    g = torch.Generator().manual_seed(3)
    K, N = 576, 13
    x, w = bf16_values((16, K), g).float(), bf16_values((N, K), g)
    alone = torch.cat([adadecode_cpu.testing.lane_dot(x[r:r + 1], w, isa) for r in range(16)])
    for R in (2, 3, 4, 5, 6, 7, 8, 13, 16):
        together = adadecode_cpu.testing.lane_dot(x[:R], w, isa)
        assert torch.equal(bits(together), bits(alone[:R])), f"R = {R}"
    one_col = torch.cat([adadecode_cpu.testing.lane_dot(x, w[n:n + 1], isa) for n in range(N)], dim=1)
    assert torch.equal(bits(one_col), bits(alone))


def test_every_path_gives_the_same_bits():
    g = torch.Generator().manual_seed(4)
    x, w = bf16_values((5, 1536), g).float(), bf16_values((9, 1536), g)
    outs = {isa: adadecode_cpu.testing.lane_dot(x, w, isa) for isa in ISAS}
    for isa, o in outs.items():
        assert torch.equal(bits(o), bits(outs["portable"])), isa


def test_unknown_or_unsupported_path_is_named():
    with pytest.raises(ValueError, match="unknown kernels 'sse9'; the kernel paths are avx512bf16, avx512, avx2, neon, portable"):
        adadecode_cpu.testing.lane_dot(torch.zeros(1, 8), torch.zeros(1, 8, dtype=torch.bfloat16), "sse9")


def cpu_flags() -> set[str]:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def test_the_bf16_dot_path_is_offered_where_the_cpu_has_the_instruction():
    """dispatch.cpp offers avx512bf16 where the CPU has AVX512_BF16 and vdpbf16ps passes its self-test (two IEEE
    FMAs per lane, high halves first): on such a CPU the path must be there, or that CPU family computes otherwise."""
    flags = cpu_flags()
    if not {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= flags:
        pytest.skip("this CPU has no AVX512_BF16")
    assert "avx512bf16" in ISAS, "vdpbf16ps failed the self-test on this CPU (dispatch.cpp): it is not the FMA chain"


def scaled_bf16(shape, g, exp: int) -> torch.Tensor:
    return (torch.randn(shape, generator=g) * 2.0 ** exp).to(torch.bfloat16)


@pytest.mark.skipif("avx512bf16" not in ISAS, reason="no bf16 dot-product path on this CPU")
@pytest.mark.parametrize("wexp,xexp,fallback", [
    (0, 0, False),        # real-model ranges: the instruction
    (-60, -20, False),    # Ew_lo + Ex_lo well above 142
    (-64, -50, True),     # products near 2^-126: partial sums could be subnormal, the FMA chains instead
    (-118, 0, True),      # tiny weights
    (-128, 0, True),      # subnormal weights
    (0, -130, True),      # subnormal activations
    (60, 60, True),       # products near the top of the range: the rule's overflow bound
])
def test_bf16_dot_path_keeps_the_fma_bits_on_adversarial_values(wexp, xexp, fallback):
    """The avx512bf16 path's exactness rule (kernels.inl): it takes vdpbf16ps only where the instruction's flushes
    cannot happen and gives the FMA chains' bits everywhere: tiny, subnormal and huge values across the rule's
    edges, against the avx512 FMA path and the portable path (std::fmaf), and the rule's choice is checked."""
    g = torch.Generator().manual_seed(wexp * 7 + xexp)
    K, R, N = 576, 5, 11
    x, w = scaled_bf16((R, K), g, xexp).float(), scaled_bf16((N, K), g, wexp)
    if xexp < -126:  # make sure some values are subnormal bf16 (the normal draw has many tiny ones too)
        assert bool(((x != 0) & (x.abs() < 2.0 ** -126)).any())
    before = adadecode_cpu.testing.bf16_dot_fallbacks()
    got = adadecode_cpu.testing.lane_dot(x, w, "avx512bf16")
    took_fallback = adadecode_cpu.testing.bf16_dot_fallbacks() > before
    assert took_fallback == fallback
    for isa in [i for i in ISAS if i != "avx512bf16"]:
        assert torch.equal(bits(got), bits(adadecode_cpu.testing.lane_dot(x, w, isa))), isa
