"""The model's math that every engine computes the same way: RoPE's frequencies and tables, RMSNorm, rotate-half.

TorchEngine (the oracle) runs these directly; the native engines take the RoPE tables from `rope_tables`, so the
cos/sin they read are the same fp32 bits TorchEngine takes cos/sin of (docs/design.md#model); the head-data
generator (heads/data.py) and the graphed baseline (decoding/graphed.py) use them too.
"""
from __future__ import annotations

import torch

from .config import LlamaConfig


def rope_inv_freq(cfg: LlamaConfig) -> torch.Tensor:
    """Inverse rotary frequencies in fp32, computed the way HF transformers computes them (Llama-3 scaling too)."""
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.int64).float() / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor, lo, hi, old = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_position_embeddings"]
    wavelen = 2 * torch.pi / inv
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return torch.where(medium, smoothed, scaled)


def rope_angles(cfg: LlamaConfig, max_seq: int) -> torch.Tensor:
    """fp32 angles [max_seq, head_dim]: position x inverse frequency, the half repeated (HF's layout)."""
    t = torch.arange(max_seq, dtype=torch.float32)
    freqs = torch.outer(t, rope_inv_freq(cfg))
    return torch.cat((freqs, freqs), dim=-1)


def rope_tables(cfg: LlamaConfig, max_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [max_seq, head_dim/2] as the native engines take them: the first half of TorchEngine's tables,
    before its cast to the engine's dtype (the same bits)."""
    emb = rope_angles(cfg, max_seq)
    half = cfg.head_dim // 2
    return emb.cos()[:, :half].contiguous(), emb.sin()[:, :half].contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in transformers' order: fp32 x * rsqrt(mean(x^2) + eps), rounded to x's dtype, times weight."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)
