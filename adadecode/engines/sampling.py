"""Seeded sampling that stays exact (docs/design.md#sampling): temperature, top-k, top-p; the reference implementation.

The rule (one row of logits l[0..n), token ids id[j], the drawn token's position `pos`, Sampling s):

    z[j]  = fp32(l[j] * inv_t)                 inv_t = fp32(1 / s.temperature), rounded once on the host
    kept  = every j with z[j] >= the top_k-th largest z          (top_k = 0 or >= n: all; ties at it: all kept)
    m     = max z;  w[j] = floor(exp_f32(z[j] - m) * 2^24) for kept j with z[j] - m >= -17, else 0   (int64)
    if top_p < 1: target = ceil(double(sum w) * top_p);  t_p = the largest z value v with sum(w[z >= v]) >= target;
                  kept &= z >= t_p                       (the nucleus; ties at t_p: all kept)
    token = argmax over kept j of  z[j] + gumbel(seed, pos, id[j])      (ties: the lowest j)

Gumbel-max draws from softmax(z) restricted to `kept`, and the noise depends only on (seed, pos, token id), so an
early guess at position `pos` is accepted exactly when it is what vanilla sampling draws there: AdaDecode with a
seed outputs what vanilla sampling with that seed outputs, token for token (the driver verifies as under greedy).

Why the CUDA epilogue (csrc/cuda/kernels/lm_head.cu) and this module agree bit for bit, for the same logits:
* Noise: Philox-4x32-10 (Salmon et al. 2011; Random123's known-answer vectors are in the tests), counter
  (pos, id, 0, 0), key (seed & 0xffffffff, seed >> 32); word 0's top 23 bits k give u = (2k+1) * 2^-24 in (0, 1),
  exactly. Integer arithmetic only: here on int64 tensors (32x32-bit products split in 16-bit halves, no overflow).
* -log(-log(u)) and exp: libm's logf/expf (and SLEEF in torch, and the GPU's logf) differ in the last bits, so
  neither side calls them. `log_f32` and `exp_f32` below are fixed sequences of IEEE fp32 +, -, *, / (each
  correctly rounded on any CPU and GPU: torch runs them as separate elementwise ops, never fused; the kernel
  spells them __fadd_rn/__fmul_rn/__fdiv_rn so nvcc cannot contract them into FMAs) plus exact bit manipulation
  and floor; constants are given as fp32 bit patterns. Accurate to a few ulps, which the distribution cannot see.
  No subnormal is ever formed (u >= 2^-24, exp's argument is clamped at -17), so flush-to-zero modes do not matter.
* Top-p mass in integers (w fixed point, 2^-24 of the top token's weight): sums are exact in any order, so the
  kernel may reduce them in parallel. The threshold is a defined value (found here by a sort and a cumulative sum,
  in the kernel by a radix select over the fp32 bit patterns, no sort); comparing it is exact.
* The tempered logits are one fp32 multiply; `top_p * W` is one IEEE double multiply on both sides.
The tie rule everywhere is the lowest index, as in greedy decoding. A restricted head (a vocabulary subset) samples
its real tokens with their global ids as the noise key, so it shares the final layer's noise.

What holds where: torch on the CPU gives identical tokens with AVX-512, AVX2 and no vector unit (tested); torch on a
GPU runs the same correctly rounded elementwise ops (argued, not yet run). The kernel's device functions, compiled
for the host with the same operations, reproduced this module's noise and weights bit for bit; on a GPU and on the
emulated device (whose host compiler must not contract the spelled-out operations either) the epilogue is checked by
tests/test_sampling_cuda.py. u takes 2^23 values, 2^-24 away from 0 and 1 at the ends: the Gumbel noise lies in
[-2.82, 16.64] (`sample` uses the bound to noise only the tokens that can win; same argmax, less work).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import operator
import struct

import torch

from ..errors import BadOption

M32 = 0xFFFFFFFF
PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
WEIGHT_BITS = 24  # top-p weights: floor(p / p_max * 2^24)
GUMBEL_LO, GUMBEL_HI = -3.0, 17.0  # bounds of gumbel() (its values lie in [-2.82, 16.64]; tested)
EXP_CLAMP = -17.0  # exp(-17) * 2^24 < 1: below this a weight is 0 anyway


def f32(bits: int) -> float:
    """The fp32 value with these bits, as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<I", bits))[0]


# fp32 constants by their bits (the kernel uses the same bit patterns)
LN2, SQRT2, LOG2E = f32(0x3F317218), f32(0x3FB504F3), f32(0x3FB8AA3B)
LOG_C = [f32(b) for b in (0x3E3A2E8C, 0x3E638E39, 0x3E924925, 0x3ECCCCCD, 0x3F2AAAAB)]  # 2/11, 2/9, 2/7, 2/5, 2/3
EXP_C = [f32(b) for b in (0x39500D01, 0x3AB60B61, 0x3C088889, 0x3D2AAAAB, 0x3E2AAAAB)]  # 1/5040 .. 1/6


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Seeded sampling settings (temperature > 0). Build with `make_sampling`, which checks them."""
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def inv_temperature(self) -> float:
        """fp32(1 / temperature) as a Python float (both implementations multiply by exactly this)."""
        return struct.unpack("<f", struct.pack("<f", 1.0 / self.temperature))[0]


def make_sampling(temperature=0.0, top_k=0, top_p=1.0, seed=0) -> Sampling | None:
    """Checked settings; None for temperature 0 (greedy, whatever top_k / top_p say)."""
    def real(name, v):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise BadOption(f"{name} must be a number, got {v!r}", param=name)
        v = float(v)
        if not math.isfinite(v):
            raise BadOption(f"{name} must be finite, got {v!r}", param=name)
        return v

    def integer(name, v):
        if isinstance(v, bool):
            raise BadOption(f"{name} must be an integer, got {v!r}", param=name)
        try:
            return operator.index(v)
        except TypeError:
            raise BadOption(f"{name} must be an integer, got {v!r}", param=name) from None

    temperature = real("temperature", temperature)
    if temperature < 0:
        raise BadOption(f"temperature must be >= 0 (0 is greedy), got {temperature!r}", param="temperature")
    top_p = real("top_p", top_p)
    if not 0 < top_p <= 1:
        raise BadOption(f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
    top_k = integer("top_k", top_k)
    if top_k < 0:
        raise BadOption(f"top_k must be >= 0 (0 keeps every token), got {top_k!r}", param="top_k")
    seed = integer("seed", seed)
    if not 0 <= seed < 2**64:
        raise BadOption(f"seed must be an integer in 0..2**64-1, got {seed!r}", param="seed")
    if temperature == 0:
        return None
    s = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    try:
        s.inv_temperature
    except OverflowError:
        raise BadOption(f"temperature {temperature!r} is too small: 1/temperature overflows fp32",
                        param="temperature") from None
    return s


# ---- Philox-4x32-10 on int64 tensors (values in 0..2^32-1) ------------------------------------------------------
def _mulhilo(a: torch.Tensor, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * c, a < 2^32 (tensor), c < 2^32: partial products stay below 2^49."""
    t1, t2 = a * (c & 0xFFFF), a * (c >> 16)
    mid = t1 + ((t2 & 0xFFFF) << 16)
    return (t2 >> 16) + (mid >> 32), mid & M32


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """The four output words of Philox-4x32-10 for counters (c0..c3, int64 tensors) and key (k0, k1)."""
    for r in range(10):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & M32, (k1 + PHILOX_W1) & M32
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def uniform(seed: int, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """u(seed, pos, id) = (2k + 1) * 2^-24 in (0, 1), fp32, k = the top 23 bits of Philox word 0; broadcasts."""
    pos, ids = torch.broadcast_tensors(pos.to(torch.int64), ids.to(torch.int64))
    zero = torch.zeros_like(pos)
    x = philox4x32_10(pos & M32, ids & M32, zero, zero, seed & M32, (seed >> 32) & M32)[0]
    return ((x >> 9) * 2 + 1).to(torch.float32) * f32(0x33800000)  # 2^-24


def log_f32(x: torch.Tensor) -> torch.Tensor:
    """Natural log of positive normal fp32 values from IEEE +, -, *, / only (the kernel's device_log_f32)."""
    bits = x.view(torch.int32).to(torch.int64)
    e = (bits >> 23) - 127
    m = ((bits & 0x7FFFFF) | 0x3F800000).to(torch.int32).view(torch.float32)  # x = m * 2^e, m in [1, 2)
    big = m > SQRT2
    m = torch.where(big, m * 0.5, m)  # m in (sqrt(1/2), sqrt(2)]
    e = e + big.to(torch.int64)
    f = m - 1.0
    s = f / (f + 2.0)  # log(m) = 2 atanh(s) = s (2 + 2/3 s^2 + 2/5 s^4 + ...), |s| < 0.172
    s2 = s * s
    p = torch.full_like(s, LOG_C[0])
    for c in LOG_C[1:] + [2.0]:
        p = p * s2 + c
    return e.to(torch.float32) * LN2 + s * p


def gumbel(seed: int, pos: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """-log(-log(u)): standard Gumbel noise of (seed, pos, id), fp32, in [-2.8, 16.7]."""
    return -log_f32(-log_f32(uniform(seed, pos, ids)))


def exp_f32(d: torch.Tensor) -> torch.Tensor:
    """exp(d) for -17 <= d <= 0 from IEEE +, -, * and floor (the kernel's device_exp_f32), fp32."""
    t = d * LOG2E
    n = torch.floor(t)
    x = (t - n - 0.5) * LN2  # exp(d) = 2^n * sqrt(2) * e^x, |x| <= ln2 / 2
    p = torch.full_like(x, EXP_C[0])
    for c in EXP_C[1:] + [0.5, 1.0, 1.0]:
        p = p * x + c
    scale = ((n.to(torch.int32) + 127) << 23).view(torch.float32)  # 2^n, n >= -25
    return p * SQRT2 * scale


def top_p_weights(z: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """int64 weights floor(exp(z - max z) * 2^24) of the kept entries (0 elsewhere and below exp(-17))."""
    d = z - z.max(dim=-1, keepdim=True).values
    live = keep & (d >= EXP_CLAMP)
    w = torch.floor(exp_f32(torch.where(live, d, torch.zeros_like(d))) * float(2**WEIGHT_BITS)).to(torch.int64)
    return torch.where(live, w, torch.zeros_like(w))


def kept(z: torch.Tensor, s: Sampling) -> torch.Tensor:
    """[R, n] bool: the tokens top-k then top-p keep (thresholds found by sorting: the kernel selects by radix)."""
    n = z.shape[-1]
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < s.top_k < n:
        keep = z >= torch.topk(z, s.top_k, dim=-1).values[:, -1:]
    if s.top_p < 1:
        w = top_p_weights(z, keep)
        # the threshold is the value of a token of positive weight (the cumulative mass only grows there): sort those
        live = w > 0
        zs, order = torch.topk(torch.where(live, z, -math.inf), int(live.sum(-1).max()), dim=-1)
        cum = torch.gather(w, -1, order).cumsum(-1)
        target = torch.tensor([[math.ceil(float(W) * s.top_p)] for W in cum[:, -1].tolist()], device=z.device)
        i = torch.searchsorted(cum, target)  # the first sorted index whose cumulative mass reaches the target
        keep = keep & (z >= torch.gather(zs, -1, i))
    return keep


def sample(logits: torch.Tensor, s: Sampling, pos, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Indices j drawn by the rule above from logits [R, n] (fp32) at positions pos [R] (the drawn tokens' own
    positions). ids [n]: the token id of each column (default 0..n-1). -> int64 [R]."""
    logits = logits.float()
    if logits.dim() == 1:
        logits = logits[None]
    R, n = logits.shape
    pos = torch.as_tensor(pos, device=logits.device).reshape(-1, 1).expand(R, 1)
    if ids is None:
        ids = torch.arange(n, device=logits.device)
    z = logits * s.inv_temperature
    if not torch.isfinite(z).all():
        raise FloatingPointError(f"non-finite tempered logits (temperature {s.temperature})")
    # Only tokens that can win get noise: the noise lies in [GUMBEL_LO, GUMBEL_HI], so a token with
    # fl(z + GUMBEL_HI) < fl(max z + GUMBEL_LO) scores strictly below the top token, whatever the draws (rounding is
    # monotone). The top token is always kept. Same argmax as noising every token, a fraction of the Philox work.
    zmax = z.max(dim=-1, keepdim=True).values
    cand = kept(z, s) & (z + GUMBEL_HI >= zmax + GUMBEL_LO)
    r, j = cand.nonzero(as_tuple=True)
    y = torch.full_like(z, -math.inf)
    y[r, j] = z[r, j] + gumbel(s.seed, pos[r, 0], ids.to(logits.device)[j])
    return y.argmax(dim=-1)  # ties: the first maximum, the lowest index
