"""Evaluating heads on captured rows: a head's token and confidence as the engines compute them, exit rate and
early-token accuracy per gamma, its cost in layer-equivalents of weight reads, and a head set's simulated
AdaDecode schedule on a data set (`evaluate_set`)."""
from __future__ import annotations

import torch

from ..engines.head import Head
from ..model.config import LlamaConfig
from .schedule_sim import GAMMAS, simulate_set, traces_of



@torch.no_grad()
def head_predictions(head: Head, x: torch.Tensor, lm_head: torch.Tensor, batch: int = 2048, prev: torch.Tensor | None = None,
                     with_margin: bool = False):
    """(token [N], confidence [N]) exactly as TorchEngine.head picks them: argmax over the real tokens,
    confidence = its probability under the softmax over the head's outputs (rest included).
    with_margin: also the margin [N] (top probability minus the second, rest included), an alternative exit rule."""
    toks, confs, margins = [], [], []
    lm = lm_head.float()
    h = head.to(dtype=torch.float32)
    for b0 in range(0, x.shape[0], batch):
        p, ids = h.probs(x[b0:b0 + batch].float(), lm, None if prev is None else prev[b0:b0 + batch].float())
        c, i = p[:, :ids.numel()].max(-1)
        toks.append(ids[i])
        confs.append(c)
        if with_margin:
            top2 = p.topk(2, dim=-1).values
            margins.append(c - torch.where(top2[:, 0] > c, top2[:, 0], top2[:, 1]))
    out = (torch.cat(toks), torch.cat(confs))
    return out + (torch.cat(margins),) if with_margin else out


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


def head_cost_layers(cfg: LlamaConfig, head: Head) -> float:
    """One evaluation of `head` in layer-equivalents of weight reads (batch-1 decoding is bound by them)."""
    k = 0 if head.vocab is None else int(head.vocab.numel()) + 1
    extra = sum(t.numel() for t in (head.W1, head.W2, head.P1, head.P2) if t is not None)
    return (head_params(cfg, k) + extra) / layer_params(cfg)


def evaluate_set(heads: list[Head], gammas, data: dict, model, max_pending: int = 5) -> dict:
    """Early-exit rate, accuracy of early tokens, ideal and cost-counted layer-step speedup of `heads` at `gammas`
    (one, or one per head) on captured `data` (heads.data: 'cap', rows in (prompt, step) order)."""
    cap = data["cap"]
    lm = model.weights.lm_head.float()
    per_layer = {}
    for h in heads:
        tok, conf = head_predictions(h, cap.x[h.layer], lm)
        per_layer[h.layer] = (conf, tok == cap.y)
    layers = [h.layer for h in heads]
    cost = sum(head_cost_layers(model.cfg, h) for h in heads) / len(heads)
    g = list(gammas) if isinstance(gammas, (list, tuple)) else gammas
    r = simulate_set(traces_of(per_layer, cap.seq, layers), layers, g, model.cfg.n_layers, max_pending, cost)
    r["top1_agreement"] = {l: float(per_layer[l][1].float().mean()) for l in layers}
    r["rows"], r["prompts"] = int(cap.y.numel()), int(cap.seq.unique().numel())
    r["head_cost_layers"] = cost
    return r
