"""Training one head (DESIGN.md §5): the restricted vocabulary, the distillation target, and forward
KL(p_final || p_head) with the base model frozen, T from the identity, Adam with a cosine schedule."""
from __future__ import annotations

import math
from collections import Counter

import torch

from .heads import Head
from .heads_data import Captured


def build_vocab(conts: list[list[int]], k: int, vocab_size: int) -> torch.Tensor | None:
    """The k most frequent tokens of the continuations (ascending ids); None (full vocabulary) when k <= 0
    or k >= vocab_size. Ties in frequency go to the lower id, so the choice is deterministic."""
    if k <= 0 or k >= vocab_size:
        return None
    counts = Counter(t for c in conts for t in c)
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:k]
    return torch.tensor(sorted(ranked), dtype=torch.long)


def collapse_target(top_p: torch.Tensor, top_i: torch.Tensor, vocab: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Final-layer distribution on the head's outputs [N, K+1]: the K tokens and "rest" (everything else,
    including the tail beyond the stored top entries)."""
    K = vocab.numel()
    col = torch.full((vocab_size,), K, dtype=torch.long)
    col[vocab] = torch.arange(K)
    p = top_p.float()
    tgt = torch.zeros(p.shape[0], K + 1).scatter_add_(1, col[top_i], p)
    tgt[:, K] += (1 - p.sum(1)).clamp(min=0)
    return tgt


def _head_logits(x: torch.Tensor, T: torch.Tensor, E: torch.Tensor, w_rest: torch.Tensor | None) -> torch.Tensor:
    z = x @ T.T
    lg = z @ E.T
    return lg if w_rest is None else torch.cat([lg, (z @ w_rest)[:, None]], -1)


def _kl_rows(logits: torch.Tensor, tgt: torch.Tensor | None, top_p=None, top_i=None) -> torch.Tensor:
    """Per-row KL(p_final || p_head). Restricted: tgt [R, K+1]. Full vocabulary: the target is the stored
    top entries plus a tail bucket (the head's mass outside them)."""
    logq = torch.log_softmax(logits, -1)
    if tgt is not None:
        return (tgt * (torch.log(tgt.clamp(min=1e-30)) - logq)).sum(-1)
    p = top_p.float()
    tail = (1 - p.sum(1)).clamp(min=0)
    lq_top = logq.gather(1, top_i)
    lq_tail = torch.log((1 - lq_top.exp().sum(1)).clamp(min=1e-30))
    return (p * (torch.log(p.clamp(min=1e-30)) - lq_top)).sum(1) + tail * (torch.log(tail.clamp(min=1e-30)) - lq_tail)


class HeadData:
    """Rows of one split for one layer, with the targets the loss needs."""

    def __init__(self, cap: Captured, layer: int, vocab: torch.Tensor | None, vocab_size: int):
        self.x = cap.x[layer]
        self.y, self.top_p, self.top_i = cap.y, cap.top_p, cap.top_i
        self.tgt = None if vocab is None else collapse_target(cap.top_p, cap.top_i, vocab, vocab_size).half()

    def __len__(self):
        return self.x.shape[0]

    def batch(self, rows):
        tgt = None if self.tgt is None else self.tgt[rows].float()
        return self.x[rows].float(), tgt, self.top_p[rows], self.top_i[rows]


def _lm_rows(lm_head: torch.Tensor, vocab: torch.Tensor | None) -> torch.Tensor:
    return (lm_head if vocab is None else lm_head[vocab]).float()


@torch.no_grad()
def heldout_kl(head: Head, data: HeadData, lm_head: torch.Tensor, batch: int = 2048) -> float:
    E = _lm_rows(lm_head, head.vocab)
    tot = 0.0
    for b0 in range(0, len(data), batch):
        x, tgt, tp, ti = data.batch(slice(b0, b0 + batch))
        tot += float(_kl_rows(_head_logits(x, head.T.float(), E, head.w_rest), tgt, tp, ti).sum())
    return tot / max(1, len(data))


def train_head(layer: int, train: HeadData, lm_head: torch.Tensor, vocab: torch.Tensor | None, *, epochs: int = 4,
               lr: float = 1e-3, batch: int = 256, seed: int = 0, heldout: HeadData | None = None, log=None,
               progress_desc: str | None = None) -> tuple[Head, list[dict]]:
    """Forward KL from the final layer to the head, T from the identity, Adam with a cosine schedule.
    The base model is frozen (only T and w_rest are parameters). Returns (head, per-epoch history)."""
    d = train.x.shape[1]
    g = torch.Generator().manual_seed(seed)
    E = _lm_rows(lm_head, vocab)
    T = torch.nn.Parameter(torch.eye(d))
    w_rest = None if vocab is None else torch.nn.Parameter(torch.zeros(d))
    params = [T] + ([w_rest] if w_rest is not None else [])
    opt = torch.optim.Adam(params, lr=lr)
    n = len(train)
    steps_per_epoch = math.ceil(n / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(1.0, s / max(1, epochs * steps_per_epoch)))))
    hist = []
    bar = None
    if progress_desc:
        try:
            from tqdm import tqdm
            bar = tqdm(total=epochs * steps_per_epoch, desc=progress_desc, unit="step", leave=False)
        except ImportError:
            bar = None

    def snapshot():
        return Head(layer=layer, T=T.detach().clone(), vocab=vocab, w_rest=None if w_rest is None else w_rest.detach().clone())

    if heldout is not None:
        hist.append({"epoch": 0, "heldout_kl": heldout_kl(snapshot(), heldout, lm_head)})
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for b0 in range(0, n, batch):
            rows = perm[b0:b0 + batch]
            x, tgt, tp, ti = train.batch(rows)
            loss = _kl_rows(_head_logits(x, T, E, w_rest), tgt, tp, ti).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += float(loss.detach()) * len(rows)
            if bar is not None:
                bar.update(1)
        rec = {"epoch": ep + 1, "train_kl": tot / n}
        if heldout is not None:
            rec["heldout_kl"] = heldout_kl(snapshot(), heldout, lm_head)
        hist.append(rec)
        if log:
            log(f"  layer {layer} epoch {ep + 1}/{epochs}: " + ", ".join(f"{k} {v:.4f}" for k, v in rec.items() if k != "epoch"))
    if bar is not None:
        bar.close()
    return snapshot(), hist


def round_like_file(head: Head) -> Head:
    """The head as a head file stores it (T in fp16)."""
    return Head(layer=head.layer, T=head.T.half().float(), vocab=head.vocab, w_rest=head.w_rest)
