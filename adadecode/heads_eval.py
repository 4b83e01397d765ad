"""Evaluating a head on captured rows: its token and confidence as the engines compute them, exit rate and
early-token accuracy per gamma, and its cost in layer-equivalents of weight reads."""
from __future__ import annotations

import torch

from .config import LlamaConfig
from .heads import Head

GAMMAS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@torch.no_grad()
def head_predictions(head: Head, x: torch.Tensor, lm_head: torch.Tensor, batch: int = 2048):
    """(token [N], confidence [N]) exactly as TorchEngine.head picks them: argmax over the real tokens,
    confidence = its probability under the softmax over the head's outputs (rest included)."""
    toks, confs = [], []
    lm = lm_head.float()
    h = head.to(dtype=torch.float32)
    for b0 in range(0, x.shape[0], batch):
        p, ids = h.probs(x[b0:b0 + batch].float(), lm)
        c, i = p[:, :ids.numel()].max(-1)
        toks.append(ids[i])
        confs.append(c)
    return torch.cat(toks), torch.cat(confs)


def exit_table(conf: torch.Tensor, correct: torch.Tensor, gammas=GAMMAS) -> list[dict]:
    out = []
    for g in gammas:
        ex = conf > g
        n_ex = int(ex.sum())
        out.append({"gamma": g, "exit_rate": n_ex / max(1, conf.numel()),
                    "accuracy": float(correct[ex].float().mean()) if n_ex else None,
                    "exits": n_ex, "tokens": conf.numel()})
    return out


def layer_params(cfg: LlamaConfig) -> int:
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    return 2 * cfg.d * q + 2 * cfg.d * kv + 3 * cfg.d * cfg.ffn_dim


def head_params(cfg: LlamaConfig, k: int) -> int:
    return cfg.d * cfg.d + (k if k else cfg.vocab_size) * cfg.d
