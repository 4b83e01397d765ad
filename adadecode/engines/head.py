"""Head: an intermediate-layer head and its math (docs/design.md#heads).

It sits with the engines because it is what their head() computes: an engine takes Heads in set_heads, and
TorchEngine.head runs `probs` and `logits` below, the CUDA kernels the same from T, vocab and w_rest. Training,
head files and evaluation build on it from above (adadecode.heads).

A head at layer `layer` maps the residual stream h_l to next-token logits with the model's own final
norm and LM head E, through one trained d x d matrix T:

    z      = T @ x,   x = RMSNorm_final(h_l)
    logits = E[vocab] @ z                                 (vocab: all tokens, or a subset of K ids)
    rest   = w_rest . z                                   (restricted heads only: "any other token")

The head's token is the argmax over the real tokens (lowest id on ties) and its confidence that
token's probability under the softmax over [logits, rest]. T = identity is the "logit lens".

Two optional parts, measured as ablations (bench/results/heads-ablations.md) and not in the head file format:
an MLP adapter (z += W2 @ silu(W1 @ x), rank r) and the previous token as an input (z += P2 @ P1 @
RMSNorm_final(embed[token fed at this row])). The engines' head() computes only T, vocab and w_rest.
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
    W1: torch.Tensor | None = None  # [r, d] MLP adapter (ablation only)
    W2: torch.Tensor | None = None  # [d, r]
    P1: torch.Tensor | None = None  # [r, d] previous-token input (ablation only)
    P2: torch.Tensor | None = None  # [d, r]

    @classmethod
    def identity(cls, layer: int, d: int, vocab: torch.Tensor | None = None) -> "Head":
        w_rest = None if vocab is None else torch.zeros(d)
        return cls(layer=layer, T=torch.eye(d), vocab=vocab, w_rest=w_rest)

    def to(self, device=None, dtype=None) -> "Head":
        mv = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
        vocab = None if self.vocab is None else self.vocab.to(device=device)
        return Head(layer=self.layer, T=mv(self.T), vocab=vocab, w_rest=mv(self.w_rest), W1=mv(self.W1), W2=mv(self.W2),
                    P1=mv(self.P1), P2=mv(self.P2))

    @property
    def plain(self) -> bool:
        """Only T (+ vocab, w_rest): what head files store and the engines compute."""
        return self.W1 is None and self.P1 is None

    def logits(self, x_normed: torch.Tensor, lm_head: torch.Tensor, prev_normed: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 logits [R, K] (full: K = vocab) plus, for restricted heads, the rest logit as a last column.
        prev_normed [R, d]: RMSNorm_final(embedding of the token fed at each row), for heads with P1/P2."""
        z = x_normed @ self.T.T
        if self.W1 is not None:
            z = z + torch.nn.functional.silu(x_normed @ self.W1.T) @ self.W2.T
        if self.P1 is not None:
            if prev_normed is None:
                raise ValueError(f"head at layer {self.layer} reads the previous token: pass prev_normed")
            z = z + (prev_normed @ self.P1.T) @ self.P2.T
        if self.vocab is None:
            return (z @ lm_head.T).float()
        real = z @ lm_head[self.vocab].T
        return torch.cat([real, (z @ self.w_rest)[:, None]], dim=-1).float()

    def probs(self, x_normed: torch.Tensor, lm_head: torch.Tensor,
              prev_normed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities [R, K(+1)], the token id of each of the first K columns)."""
        p = torch.softmax(self.logits(x_normed, lm_head, prev_normed), dim=-1)
        ids = self.vocab if self.vocab is not None else torch.arange(lm_head.shape[0], device=lm_head.device)
        return p, ids
