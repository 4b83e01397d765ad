"""The engine contract's host side (docs/design.md#contract), shared by every engine.

It keeps which rows are in flight (ring slot = pos % max_rows), at which depth, and how much of each
layer's KV cache is valid, and it refuses every call that breaks the contract before any compute
runs, with one set of messages for every engine. Subclasses compute through three hooks:

    _prefill(tokens)                              the prompt's forward; row n-1 ends at depth L
    _embed(pos, token, slot)                      start a row at depth 0
    _run_layers(first_pos, last_pos, l0, l1, slots)
"""
from __future__ import annotations

import torch

from ..model.config import LlamaConfig
from .sampling import sample


class EngineError(RuntimeError):
    """A call that breaks the engine contract (wrong depth, non-contiguous rows, dead cache entries...)."""


class EngineContract:
    cfg: LlamaConfig

    def _init_contract(self, cfg: LlamaConfig, max_seq: int | None, max_rows: int) -> None:
        self.cfg, self.n_layers = cfg, cfg.n_layers
        self.max_seq = min(cfg.max_position, 4096) if max_seq is None else int(max_seq)
        if not 1 <= self.max_seq <= cfg.max_position:
            raise ValueError(f"max_seq={self.max_seq} must be in 1..{cfg.max_position} (the model's max_position_embeddings)")
        self.max_rows = int(max_rows)
        self.kv_len = [0] * cfg.n_layers
        self.row_pos = [-1] * self.max_rows
        self.row_depth = [-1] * self.max_rows
        self.heads: list = []

    def _check_tokens(self, tokens) -> list[int]:
        tokens = [int(t) for t in tokens]
        bad = [t for t in tokens if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        return tokens

    def _set_row(self, pos: int, depth: int) -> int:
        slot = pos % self.max_rows
        self.row_pos[slot], self.row_depth[slot] = pos, depth
        return slot

    def _row_slot(self, pos: int, depth: int | None = None) -> int:
        slot = pos % self.max_rows
        if self.row_pos[slot] != pos:
            raise EngineError(f"row {pos} is not in flight (embed it first, or it was overwritten by row {self.row_pos[slot]})")
        if depth is not None and self.row_depth[slot] != depth:
            raise EngineError(f"row {pos} is at depth {self.row_depth[slot]}, expected {depth}")
        return slot

    def _checked_heads(self, heads) -> list[tuple]:
        """(layer, T, vocab, w_rest) of each head (adadecode.engines.head.Head) as the native engines take them:
        vocab an int64 CPU tensor of sorted unique ids or None, w_rest only with a vocabulary. The kernel engines'
        set_heads share these checks (TorchEngine computes the head's math itself)."""
        d, vocab = self.cfg.d, self.cfg.vocab_size
        out = []
        for i, h in enumerate(heads):
            if not 0 <= int(h.layer) <= self.n_layers:
                raise ValueError(f"head {i}: layer {h.layer} is outside 0..{self.n_layers}")
            if tuple(h.T.shape) != (d, d):
                raise ValueError(f"head {i}: T has shape {tuple(h.T.shape)}, expected ({d}, {d})")
            ids = None
            if h.vocab is not None:
                ids = h.vocab.detach().reshape(-1).to("cpu", torch.int64)
                if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab:
                    raise ValueError(f"head {i}: vocabulary subset must hold 1..{vocab} ids in 0..{vocab - 1}")
                if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
                    raise ValueError(f"head {i}: vocabulary subset must be sorted ascending without repeats")
            if h.w_rest is not None:
                if h.vocab is None:
                    raise ValueError(f"head {i}: w_rest is given without a vocabulary subset")
                if tuple(h.w_rest.shape) != (d,):
                    raise ValueError(f"head {i}: w_rest has shape {tuple(h.w_rest.shape)}, expected ({d},)")
            out.append((int(h.layer), h.T, ids, h.w_rest))
        return out

    def _rows(self, first_pos: int, last_pos: int, depth: int | None = None) -> list[int]:
        return [self._row_slot(p, depth) for p in range(first_pos, last_pos + 1)]

    def prefill(self, tokens) -> None:
        """Full forward over the prompt: fills every layer's KV for 0..n-1 and leaves row n-1 at depth L."""
        tokens = self._check_tokens(tokens)
        n = len(tokens)
        if n == 0:
            raise ValueError("empty prompt: prefill needs at least one token")
        if n > self.max_seq:
            raise ValueError(f"prompt of {n} tokens is longer than the context (max_seq={self.max_seq})")
        self.truncate(0)
        self._prefill(tokens)
        self.kv_len = [n] * self.n_layers
        self._set_row(n - 1, self.n_layers)

    def embed(self, pos: int, token: int) -> None:
        """Start row `pos` at depth 0 with the embedding of `token`."""
        (token,) = self._check_tokens([token])
        if not 0 <= pos < self.max_seq:
            raise ValueError(f"position {pos} is past the context (max_seq={self.max_seq})")
        self._embed(pos, token, pos % self.max_rows)
        self._set_row(pos, 0)

    def run_layers(self, first_pos: int, last_pos: int, l0: int, l1: int) -> None:
        """Layers [l0, l1) for the contiguous rows first_pos..last_pos, all at depth l0, causal into the cache."""
        if not 0 <= l0 < l1 <= self.n_layers:
            raise EngineError(f"layers [{l0}, {l1}) outside 0..{self.n_layers}")
        n = last_pos - first_pos + 1
        if not 1 <= n <= self.max_rows:
            raise EngineError(f"rows {first_pos}..{last_pos}: 1..{self.max_rows} rows per call")
        slots = self._rows(first_pos, last_pos, l0)
        for layer in range(l0, l1):
            if self.kv_len[layer] < first_pos:
                raise EngineError(f"layer {layer}: cache holds 0..{self.kv_len[layer] - 1}, row {first_pos} needs 0..{first_pos - 1}")
        self._run_layers(first_pos, last_pos, l0, l1, slots)
        for layer in range(l0, l1):
            self.kv_len[layer] = last_pos + 1  # entries past the last row were computed from a dead state
        for s in slots:
            self.row_depth[s] = l1

    def final(self, first_pos: int, last_pos: int, sampling=None) -> list[int]:
        """Tokens of rows at depth L: greedy (ties go to the lowest token id), or drawn by `sampling`
        (adadecode.engines.sampling.Sampling) with the noise of each drawn token's position, row + 1."""
        logits = self.final_logits(first_pos, last_pos)
        if sampling is None:
            return logits.argmax(dim=-1).tolist()
        return sample(logits, sampling, range(first_pos + 1, last_pos + 2)).tolist()

    def truncate(self, length: int) -> None:
        """Roll back: cache entries at positions >= length are dead, and so are rows there."""
        self.kv_len = [min(n, length) for n in self.kv_len]
        for s, p in enumerate(self.row_pos):
            if p >= length:
                self.row_pos[s], self.row_depth[s] = -1, -1
