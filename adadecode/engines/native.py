"""NativeEngine: what the two native engines (CpuEngine, CudaEngine) share on top of EngineContract.

Both hand the compute to a binding's `Engine` (`self._eng`: adadecode_cpu.Engine, or adadecode_cuda.Engine /
adadecode_emu.Engine) with the same calls: prefill, embed, run_layers, run_batch, final_batch, set_heads, head, hidden,
kv. This class forwards the contract's compute hooks to it, builds the family arguments both bindings take
(`family_args`), checks a head's result, and keeps the heads; an engine says only where its tensors go
(`_head_tensors`) and how it reads tokens and logits back. The RoPE tables come from adadecode.model.math.rope_tables,
the same bits as TorchEngine's.

Sequences: every per-sequence call of the binding takes the sequence first, and this class passes the selected one
(`self.seq`); the binding's Engine holds each sequence's KV cache region and ring of rows (csrc/cpu/engine.h,
csrc/cuda/runtime/engine.h). `run_batch` is one binding call (one forward over the rows of every segment), and
`final_batch` one LM-head pass per group of items on distinct sequences (`_final_batch`: the engine's readback).
`prefill_chunk` is the engine's own prefill chunk (decoding/batch.py cuts a prompt into whole chunks of it).
"""
from __future__ import annotations

import math

import torch

from ..model.config import LlamaConfig
from ..model.weights import LlamaWeights
from .contract import EngineContract


def family_args(cfg: LlamaConfig, weights: LlamaWeights, convert) -> dict:
    """The family features of cfg (Qwen2's q/k/v biases, Qwen3's q/k head norms, a sliding window) as the native
    engines take them: flags, the window (0: full attention) and per layer [bqkv] + [q_norm, k_norm], each tensor
    through `convert`. A flag without its tensors is an error naming the layer and the field."""
    qkv_bias, qk_norm = bool(getattr(cfg, "qkv_bias", False)), bool(getattr(cfg, "qk_norm", False))
    extras = []
    for i, lw in enumerate(weights.layers if (qkv_bias or qk_norm) else []):
        x = []
        if qkv_bias:
            b = [getattr(lw, f, None) for f in ("bq", "bk", "bv")]
            if any(t is None for t in b):
                raise ValueError(f"layer {i}: qkv_bias is set but bq/bk/bv is missing")
            x.append(convert(torch.cat([t.reshape(-1) for t in b])))
        if qk_norm:
            for f in ("q_norm", "k_norm"):
                if getattr(lw, f, None) is None:
                    raise ValueError(f"layer {i}: qk_norm is set but {f} is missing")
                x.append(convert(getattr(lw, f)))
        extras.append(x)
    return dict(qkv_bias=qkv_bias, qk_norm=qk_norm, sliding_window=int(getattr(cfg, "sliding_window", None) or 0),
                extras=extras)


def model_dims(cfg: LlamaConfig) -> dict:
    """The model's sizes as both bindings take them (csrc/common/model_dims.h: ModelDims)."""
    return dict(n_layers=cfg.n_layers, d=cfg.d, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                ffn=cfg.ffn_dim, vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps))


def check_finite_logits(logits: torch.Tensor, first_pos: int, last_pos: int) -> torch.Tensor:
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"non-finite logits at rows {first_pos}..{last_pos}")
    return logits


class NativeEngine(EngineContract):
    """The contract over a binding's Engine (`self._eng`); subclasses set `_eng`, `device` and the readbacks."""

    dtype = torch.bfloat16
    device: torch.device
    prefill_chunk: int  # rows per prefill step of this engine (a prefill in pieces of whole chunks keeps its bits)
    _eng: object

    # ---- the contract's compute (checks and bookkeeping: EngineContract) -----------------------------------------
    def _prefill(self, tokens: list[int], start: int) -> None:
        self._eng.prefill(self.seq, tokens, start)

    def _embed(self, pos: int, token: int, slot: int) -> None:
        self._eng.embed(self.seq, pos, token)

    def _run_layers(self, first_pos: int, last_pos: int, l0: int, l1: int, slots: list[int]) -> None:
        self._eng.run_layers(self.seq, first_pos, last_pos, l0, l1)

    def _run_batch(self, segments) -> None:
        """One forward over the rows of every segment (the binding's run_batch: layer by layer, the rows of every
        segment that runs the layer together)."""
        self._eng.run_batch([seg for seg, _ in segments])

    def final_batch(self, items) -> list[list[int]]:
        """final of several sequences: items (seq, first_pos, last_pos, sampling or None), one token list per item,
        each item's rows in one LM-head pass with the others' (a group per run of items on distinct sequences). Every
        item is checked before any runs; a non-finite row raises FloatingPointError, as final does."""
        items = [(int(seq), int(first), int(last), sampling) for seq, first, last, sampling in items]
        keep = self.seq
        try:
            for seq, first, last, _ in items:
                self.select(seq)
                self._rows(first_pos=first, last_pos=last, depth=self.n_layers)
        finally:
            self.select(keep)
        out, group = [], []
        for item in items + [None]:  # the binding takes at most one item per sequence (its rows fit the workspace)
            if item is None or any(g[0] == item[0] for g in group):
                if group:
                    out += self._final_batch(group)
                group = []
            if item is not None:
                group.append(item)
        return out

    def _final_batch(self, items: list[tuple]) -> list[list[int]]:
        """The tokens of items (seq, first, last, sampling or None) on distinct sequences, checked: one binding call."""
        raise NotImplementedError

    @property
    def kv_bytes(self) -> int:
        return self._eng.kv_bytes

    # ---- heads ----------------------------------------------------------------------------------------------------
    def _head_tensors(self, layer: int, T: torch.Tensor, ids: torch.Tensor | None, w_rest: torch.Tensor | None):
        """One head's (layer, T, vocab, w_rest) as this engine's binding takes them."""
        raise NotImplementedError

    def set_heads(self, heads) -> None:
        """Intermediate heads (adadecode.engines.head.Head), indexed by `head_index` in `head()`."""
        heads = list(heads)
        self._eng.set_heads([self._head_tensors(*spec) for spec in self._checked_heads(heads)])
        self.heads = [h.to(self.device, torch.bfloat16) for h in heads]

    def _head_call(self, pos: int, head_index: int):
        """(the head, its index >= 0) for head(pos, head_index), after the contract's check that row `pos` is at
        that head's layer (a negative index counts from the end, as a list's)."""
        hd = self.heads[head_index]
        self._row_slot(pos, hd.layer)
        return hd, range(len(self.heads))[head_index]

    @staticmethod
    def _head_result(token: int, prob: float, pos: int, hd) -> tuple[int, float]:
        if not math.isfinite(prob) or token < 0:
            raise FloatingPointError(f"non-finite head logits at row {pos} (head at layer {hd.layer})")
        return int(token), float(prob)

    # ---- for tests ------------------------------------------------------------------------------------------------
    def hidden(self, pos: int) -> torch.Tensor:
        """The residual stream of row `pos` (a copy), for tests."""
        self._row_slot(pos)
        return self._eng.hidden(self.seq, pos)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V [kv_len, n_kv_heads, head_dim] of `layer` (its valid cache entries), for tests."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} outside 0..{self.n_layers - 1}")
        return self._eng.kv(self.seq, layer, self.kv_len[layer])
