"""Intermediate-layer heads (DESIGN.md §5).

A head at layer `layer` maps the residual stream h_l to next-token logits with the model's own final
norm and LM head E, through one trained d x d matrix T:

    logits = E[vocab] @ (T @ RMSNorm_final(h_l))          (vocab: all tokens, or a subset of K ids)
    rest   = w_rest . (T @ RMSNorm_final(h_l))            (restricted heads only: "any other token")

The head's token is the argmax over the real tokens (lowest id on ties) and its confidence that
token's probability under the softmax over [logits, rest]. T = identity is the "logit lens".
"""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Head:
    layer: int  # the head reads h after `layer` decoder layers (depth `layer`)
    T: torch.Tensor  # [d, d]
    vocab: torch.Tensor | None = None  # [K] int64 token ids, sorted ascending, or None for the full vocabulary
    w_rest: torch.Tensor | None = None  # [d], present exactly when vocab is

    @classmethod
    def identity(cls, layer: int, d: int, vocab: torch.Tensor | None = None) -> "Head":
        w_rest = None if vocab is None else torch.zeros(d)
        return cls(layer=layer, T=torch.eye(d), vocab=vocab, w_rest=w_rest)

    def to(self, device=None, dtype=None) -> "Head":
        mv = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
        vocab = None if self.vocab is None else self.vocab.to(device=device)
        return Head(layer=self.layer, T=mv(self.T), vocab=vocab, w_rest=mv(self.w_rest))

    def logits(self, x_normed: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
        """fp32 logits [R, K] (full: K = vocab) plus, for restricted heads, the rest logit as a last column."""
        z = x_normed @ self.T.T
        if self.vocab is None:
            return (z @ lm_head.T).float()
        real = z @ lm_head[self.vocab].T
        return torch.cat([real, (z @ self.w_rest)[:, None]], dim=-1).float()

    def probs(self, x_normed: torch.Tensor, lm_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities [R, K(+1)], the token id of each of the first K columns)."""
        p = torch.softmax(self.logits(x_normed, lm_head), dim=-1)
        ids = self.vocab if self.vocab is not None else torch.arange(lm_head.shape[0], device=lm_head.device)
        return p, ids
