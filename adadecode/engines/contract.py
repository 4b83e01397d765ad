"""The engine contract's host side (docs/design.md#contract), shared by every engine.

It keeps which rows are in flight (ring slot = pos % max_rows), at which depth, and how much of each
layer's KV cache is valid, and it refuses every call that breaks the contract before any compute
runs, with one set of messages for every engine. Subclasses compute through these hooks:

    _prefill(tokens, start)                       the prompt's forward from position start (the cache holds
                                                  0..start-1); its last row ends at depth L
    _embed(pos, token, slot)                      start a row at depth 0
    _run_layers(first_pos, last_pos, l0, l1, slots)
    _run_batch(segments)                          several sequences' run_layers as one step (default: one by one)
    _select(seq)                                  the engine's own state of sequence `seq` becomes the current one

Sequences. An engine built with max_seqs = S holds S sequences, each with its own KV cache and rows in flight; a
row only ever reads its own sequence's cache. Every call acts on the selected sequence (`select(seq)`, 0 at
first); `sequence(seq)` is a view that selects it before each call, so one-sequence code (every decoding method)
runs unchanged on any of them. `run_batch` and `final_batch` take rows of several sequences in one step; each row's
bits are those it gets alone (the engines' batch invariance), which the tests check.
"""
from __future__ import annotations

import torch

from ..model.config import LlamaConfig
from .sampling import sample


class EngineError(RuntimeError):
    """A call that breaks the engine contract (wrong depth, non-contiguous rows, dead cache entries...)."""


class _SeqState:
    """One sequence's bookkeeping: the valid cache length per layer, and the position and depth of each ring slot."""

    __slots__ = ("kv_len", "row_pos", "row_depth")

    def __init__(self, n_layers: int, max_rows: int):
        self.kv_len = [0] * n_layers
        self.row_pos = [-1] * max_rows
        self.row_depth = [-1] * max_rows


def _selected(field: str):
    return property(lambda self: getattr(self._states[self.seq], field),
                    lambda self, value: setattr(self._states[self.seq], field, value))


class EngineContract:
    cfg: LlamaConfig
    kv_len = _selected("kv_len")  # of the selected sequence
    row_pos = _selected("row_pos")
    row_depth = _selected("row_depth")

    def _init_contract(self, cfg: LlamaConfig, max_seq: int | None, max_rows: int, max_seqs: int = 1) -> None:
        self.cfg, self.n_layers = cfg, cfg.n_layers
        self.max_seq = min(cfg.max_position, 4096) if max_seq is None else int(max_seq)
        if not 1 <= self.max_seq <= cfg.max_position:
            raise ValueError(f"max_seq={self.max_seq} must be in 1..{cfg.max_position} (the model's max_position_embeddings)")
        self.max_rows = int(max_rows)
        if isinstance(max_seqs, bool) or not isinstance(max_seqs, int) or max_seqs < 1:
            raise ValueError(f"max_seqs must be an integer >= 1, got {max_seqs!r}")
        self.max_seqs = max_seqs
        self._states = [_SeqState(cfg.n_layers, self.max_rows) for _ in range(max_seqs)]
        self.seq = 0
        self.heads: list = []

    # ---- sequences ----------------------------------------------------------------------------------------------
    def select(self, seq: int) -> None:
        """Make sequence `seq` the one every call acts on."""
        if seq != self.seq:
            if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < self.max_seqs:
                raise EngineError(f"sequence {seq!r} outside 0..{self.max_seqs - 1}")
            self._select(seq)
            self.seq = seq

    def _select(self, seq: int) -> None:
        """The engine's own per-sequence state follows the selection (TorchEngine: its caches and rows)."""

    def sequence(self, seq: int) -> "SequenceView":
        """A view of this engine that acts on sequence `seq`: the one-sequence contract, for any method."""
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < self.max_seqs:
            raise EngineError(f"sequence {seq!r} outside 0..{self.max_seqs - 1}")
        return SequenceView(self, seq)

    def run_batch(self, segments) -> None:
        """run_layers of several sequences as one step: segments (seq, first_pos, last_pos, l0, l1), at most one per
        sequence; each row's bits are those of its own run_layers alone. The selection is left as it was."""
        segments = [tuple(int(v) for v in s) for s in segments]
        seqs = [s[0] for s in segments]
        if len(set(seqs)) != len(seqs):
            raise EngineError(f"run_batch: one segment per sequence, got sequences {seqs}")
        keep = self.seq
        try:
            slots = []
            for seq, first, last, l0, l1 in segments:  # every segment checked before any runs
                self.select(seq)
                slots.append(self._check_run(first, last, l0, l1))
            self._run_batch([(seg, sl) for seg, sl in zip(segments, slots)])
            for (seq, first, last, l0, l1), sl in zip(segments, slots):
                self.select(seq)
                self._ran(first, last, l0, l1, sl)
        finally:
            self.select(keep)

    def _run_batch(self, segments) -> None:
        """((seq, first, last, l0, l1), slots) per segment, checked; default: each on its own (engines whose rows are
        computed one at a time, TorchEngine, lose nothing by it)."""
        for (seq, first, last, l0, l1), slots in segments:
            self.select(seq)
            self._run_layers(first, last, l0, l1, slots)

    def final_batch(self, items) -> list[list[int]]:
        """final of several sequences: items (seq, first_pos, last_pos, sampling or None), one token list per item.
        Default: one final per item (an engine whose LM head takes rows of several sequences at once overrides it)."""
        keep = self.seq
        try:
            out = []
            for seq, first, last, sampling in items:
                self.select(int(seq))
                out.append(self.final(first, last) if sampling is None else self.final(first, last, sampling=sampling))
            return out
        finally:
            self.select(keep)

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

    def prefill(self, tokens, start: int = 0) -> None:
        """Full forward over the prompt: fills every layer's KV for 0..n-1 and leaves row n-1 at depth L. With
        start > 0, `tokens` continue a prompt whose first `start` tokens are in the cache (a prefill in pieces, as a
        server interleaves a long prompt with other requests' steps): positions start..start+n-1."""
        tokens = self._check_tokens(tokens)
        n = len(tokens)
        if n == 0:
            raise ValueError("empty prompt: prefill needs at least one token")
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"prefill start must be an integer >= 0, got {start!r}")
        if start + n > self.max_seq:
            raise ValueError(f"prompt of {start + n} tokens is longer than the context (max_seq={self.max_seq})")
        if start and self.kv_len != [start] * self.n_layers:
            raise EngineError(f"prefill from {start}: the cache must hold exactly 0..{start - 1} at every layer, it "
                              f"holds {sorted(set(self.kv_len))}")
        self.truncate(start)
        self._prefill(tokens, start)
        self.kv_len = [start + n] * self.n_layers
        self._set_row(start + n - 1, self.n_layers)

    def embed(self, pos: int, token: int) -> None:
        """Start row `pos` at depth 0 with the embedding of `token`."""
        (token,) = self._check_tokens([token])
        if not 0 <= pos < self.max_seq:
            raise ValueError(f"position {pos} is past the context (max_seq={self.max_seq})")
        self._embed(pos, token, pos % self.max_rows)
        self._set_row(pos, 0)

    def run_layers(self, first_pos: int, last_pos: int, l0: int, l1: int) -> None:
        """Layers [l0, l1) for the contiguous rows first_pos..last_pos, all at depth l0, causal into the cache."""
        slots = self._check_run(first_pos, last_pos, l0, l1)
        self._run_layers(first_pos, last_pos, l0, l1, slots)
        self._ran(first_pos, last_pos, l0, l1, slots)

    def _check_run(self, first_pos: int, last_pos: int, l0: int, l1: int) -> list[int]:
        if not 0 <= l0 < l1 <= self.n_layers:
            raise EngineError(f"layers [{l0}, {l1}) outside 0..{self.n_layers}")
        n = last_pos - first_pos + 1
        if not 1 <= n <= self.max_rows:
            raise EngineError(f"rows {first_pos}..{last_pos}: 1..{self.max_rows} rows per call")
        slots = self._rows(first_pos, last_pos, l0)
        for layer in range(l0, l1):
            if self.kv_len[layer] < first_pos:
                raise EngineError(f"layer {layer}: cache holds 0..{self.kv_len[layer] - 1}, row {first_pos} needs 0..{first_pos - 1}")
        return slots

    def _ran(self, first_pos: int, last_pos: int, l0: int, l1: int, slots: list[int]) -> None:
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


class SequenceView:
    """An engine seen as the one sequence `seq` (EngineContract.sequence): every attribute read and call selects it
    first, so a decoding method (or a test) written for one sequence runs on any sequence of a shared engine."""

    def __init__(self, engine: EngineContract, seq: int):
        object.__setattr__(self, "_engine", engine)
        object.__setattr__(self, "_seq", seq)

    def __getattr__(self, name):
        e, seq = self._engine, self._seq
        e.select(seq)
        value = getattr(e, name)
        if callable(value) and getattr(value, "__self__", None) is e:  # a method: it selects when it is called
            def call(*args, **kwargs):
                e.select(seq)
                return value(*args, **kwargs)
            return call
        return value

    def __setattr__(self, name, value):
        e = self._engine
        e.select(self._seq)
        setattr(e, name, value)
