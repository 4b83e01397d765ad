"""Training one head (docs/design.md#heads): the restricted vocabulary, the distillation target, and forward
KL(p_final || p_head) with the base model frozen, T from the identity, Adam with a cosine schedule.
Optional ablation parts (adadecode.engines.head.Head): an MLP adapter of rank `adapter_rank`, the previous token
(rank `prev_rank`)."""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

import torch

from ..engines.head import Head
from .data import Captured


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
    """Rows of one split for one layer; the loss target is made per minibatch (collapse_target).
    prev: [N, d] RMSNorm_final(embedding of the token fed at each row), for previous-token heads."""

    def __init__(self, cap: Captured, layer: int, vocab: torch.Tensor | None, vocab_size: int,
                 prev: torch.Tensor | None = None):
        self.x = cap.x[layer]
        self.y, self.top_p, self.top_i = cap.y, cap.top_p, cap.top_i
        self.vocab, self.vocab_size, self.prev = vocab, vocab_size, prev

    def __len__(self):
        return self.x.shape[0]

    def batch(self, rows):
        tp, ti = self.top_p[rows], self.top_i[rows]
        tgt = None if self.vocab is None else collapse_target(tp, ti, self.vocab, self.vocab_size)
        prev = None if self.prev is None else self.prev[rows].float()
        return self.x[rows].float(), tgt, tp, ti, prev


@torch.no_grad()
def heldout_kl(head: Head, data: HeadData, lm_head: torch.Tensor, batch: int = 2048) -> float:
    h = head.to(dtype=torch.float32)
    tot = 0.0
    for b0 in range(0, len(data), batch):
        x, tgt, tp, ti, prev = data.batch(slice(b0, b0 + batch))
        tot += float(_kl_rows(h.logits(x, lm_head, prev), tgt, tp, ti).sum())
    return tot / max(1, len(data))


def train_head(layer: int, train: HeadData, lm_head: torch.Tensor, vocab: torch.Tensor | None, *, epochs: int = 4,
               lr: float = 1e-3, batch: int = 256, seed: int = 0, heldout: HeadData | None = None, log=None,
               progress_desc: str | None = None, adapter_rank: int = 0, prev_rank: int = 0) -> tuple[Head, list[dict]]:
    """Forward KL from the final layer to the head, T from the identity, Adam with a cosine schedule.
    The base model is frozen (only the head's parts are parameters). Returns (head, per-epoch history).
    adapter_rank / prev_rank > 0 add the ablation parts (W2 / P2 start at zero, so training starts at T = I)."""
    d = train.x.shape[1]
    g = torch.Generator().manual_seed(seed)
    P = torch.nn.Parameter
    T = P(torch.eye(d))
    w_rest = None if vocab is None else P(torch.zeros(d))
    W1 = P(torch.randn(adapter_rank, d, generator=g) / d ** 0.5) if adapter_rank else None
    W2 = P(torch.zeros(d, adapter_rank)) if adapter_rank else None
    P1 = P(torch.randn(prev_rank, d, generator=g) / d ** 0.5) if prev_rank else None
    P2 = P(torch.zeros(d, prev_rank)) if prev_rank else None
    params = [p for p in (T, w_rest, W1, W2, P1, P2) if p is not None]
    opt = torch.optim.Adam(params, lr=lr)
    lm = lm_head.float()
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
        c = (lambda t: None if t is None else t.detach().clone())
        return Head(layer=layer, T=c(T), vocab=vocab, w_rest=c(w_rest), W1=c(W1), W2=c(W2), P1=c(P1), P2=c(P2))

    def live():
        return Head(layer=layer, T=T, vocab=vocab, w_rest=w_rest, W1=W1, W2=W2, P1=P1, P2=P2)

    if heldout is not None:
        hist.append({"epoch": 0, "heldout_kl": heldout_kl(snapshot(), heldout, lm_head)})
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g)
        tot = 0.0
        for b0 in range(0, n, batch):
            rows = perm[b0:b0 + batch]
            x, tgt, tp, ti, prev = train.batch(rows)
            loss = _kl_rows(live().logits(x, lm, prev), tgt, tp, ti).mean()
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
    return dataclasses.replace(head, T=head.T.half().float())
