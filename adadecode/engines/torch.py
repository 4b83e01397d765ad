"""TorchEngine: a textbook Llama forward in PyTorch behind the engine contract (docs/design.md#contract).

It is the oracle: CI runs the whole product on it, and the CUDA engine is compared against it.

State of each sequence (max_seqs of them; the selected one's in k_cache, v_cache, rows):
  k_cache[layer], v_cache[layer]  [max_seq, n_kv_heads, head_dim]   valid below kv_len[layer]
  rows                            [max_rows, d]  residual stream of the rows in flight, slot = pos % max_rows

Batch invariance (docs/design.md#invariance), by construction: `run_layers` runs each layer one row at a time, in
position order, so every op of the decode path sees tensors whose shapes depend on the row's position
only, never on how many rows share the call. Each row's K/V is in the cache before the next row of the
same call attends (causal, as the contract asks). Batching rows instead is not safe even for
elementwise ops: ATen's vectorized loops run the tail past the last full 2-vector block with the scalar
function, which can round differently (SiLU on [R, 80] differs from [1, 80] under AVX-512, not AVX2).
`prefill` stays batched for speed: its rows are the prompt, computed the same way by every decoding
method, and only its K/V and last row survive it, so every method starts from the same bits.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..model.config import LlamaConfig
from ..model.math import rms_norm, rope_angles, rotate_half
from ..model.weights import LlamaWeights
from .contract import EngineContract
from .sampling import sample


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x @ w^T (+ b). A Qwen2 bias goes into the GEMM (F.linear: addmm, the bias added before the product is
    rounded to the engine's dtype), as transformers' nn.Linear does; without one the Llama path's bits stay as they were."""
    return x @ w.T if b is None else F.linear(x, w, b)


class StaticState(NamedTuple):
    """What a static-shape decode step over a TorchEngine reads and writes in place (TorchEngine.static_state)."""

    weights: LlamaWeights  # in the engine's device and dtype
    cos: torch.Tensor  # [max_seq, head_dim]
    sin: torch.Tensor
    k_cache: list[torch.Tensor]  # per layer [max_seq, n_kv_heads, head_dim]
    v_cache: list[torch.Tensor]


class TorchEngine(EngineContract):
    name = "torch"

    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, max_seq: int | None = None, max_rows: int = 16,
                 max_seqs: int = 1):
        self._init_contract(cfg, max_seq, max_rows, max_seqs)
        self.device, self.dtype = torch.device(device), dtype
        self.w = weights.to(device=self.device, dtype=dtype)
        shape = (self.max_seq, cfg.n_kv_heads, cfg.head_dim)
        try:  # per sequence: K and V of every layer, and the rows in flight
            self._seq_tensors = [([torch.empty(shape, device=self.device, dtype=dtype) for _ in range(cfg.n_layers)],
                                  [torch.empty(shape, device=self.device, dtype=dtype) for _ in range(cfg.n_layers)],
                                  torch.zeros(self.max_rows, cfg.d, device=self.device, dtype=dtype))
                                 for _ in range(self.max_seqs)]
        except (torch.OutOfMemoryError, RuntimeError) as e:
            gib = 2 * self.max_seqs * cfg.n_layers * self.max_seq * cfg.n_kv_heads * cfg.head_dim * dtype.itemsize / 2**30
            seqs = "" if self.max_seqs == 1 else f"{self.max_seqs} sequences x "
            raise MemoryError(f"KV cache of {seqs}max_seq={self.max_seq} x {cfg.n_layers} layers x "
                              f"{cfg.n_kv_heads} kv heads x head_dim {cfg.head_dim} ({gib:.2f} GiB, {dtype}) does not "
                              f"fit on {self.device}: {e}") from None
        self.k_cache, self.v_cache, self.rows = self._seq_tensors[0]
        emb = rope_angles(cfg, self.max_seq)
        self.cos = emb.cos().to(self.device, dtype)
        self.sin = emb.sin().to(self.device, dtype)

    # ---- the forward pass -------------------------------------------------------------------------------------
    def _attend(self, q: torch.Tensor, layer: int, pos: torch.Tensor) -> torch.Tensor:
        """q [R, n_heads, head_dim] at positions `pos` against the cache, causal: row p sees keys 0..p, or with a
        sliding window W only max(0, p - W + 1)..p. -> [R, n_heads*head_dim]"""
        cfg = self.cfg
        end = int(pos[-1]) + 1
        W = cfg.sliding_window
        # keys no row of the call can see are not read at all (a decode row at p reads W keys, not p + 1)
        start = 0 if W is None else max(0, int(pos[0]) - W + 1)
        k = self.k_cache[layer][start:end].repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)  # [T, n_heads, hd]
        v = self.v_cache[layer][start:end].repeat_interleave(cfg.n_heads // cfg.n_kv_heads, dim=1)
        # fp32 scores, softmax and P.V, rounded to the engine's dtype once (as SDPA/flash kernels and the CUDA
        # engine's attention do; HF eager would round scores and probabilities to bf16 along the way)
        scores = torch.einsum("rhd,thd->hrt", q.float(), k.float()) * cfg.head_dim ** -0.5
        kpos, qpos = torch.arange(start, end, device=self.device)[None, :], pos[:, None].to(self.device)
        mask = kpos > qpos  # [R, T]
        if W is not None:
            mask |= kpos < qpos - W + 1
        probs = torch.softmax(scores.masked_fill(mask[None], float("-inf")), dim=-1)
        return torch.einsum("hrt,thd->rhd", probs, v.float()).to(q.dtype).reshape(len(pos), -1)

    def _layer(self, layer: int, h: torch.Tensor, pos0: int) -> torch.Tensor:
        """One decoder layer over the rows h [R, d] at positions pos0..pos0+R-1; writes their K/V to the cache."""
        cfg, lw = self.cfg, self.w.layers[layer]
        R = h.shape[0]
        pos = torch.arange(pos0, pos0 + R)
        x = rms_norm(h, lw.attn_norm, cfg.rms_norm_eps)
        q = linear(x, lw.wq, lw.bq).view(R, cfg.n_heads, cfg.head_dim)
        k = linear(x, lw.wk, lw.bk).view(R, cfg.n_kv_heads, cfg.head_dim)
        v = linear(x, lw.wv, lw.bv).view(R, cfg.n_kv_heads, cfg.head_dim)
        if cfg.qk_norm:  # Qwen3: each head RMS-normalised over head_dim, before RoPE
            q = rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
        cos, sin = self.cos[pos0:pos0 + R, None, :], self.sin[pos0:pos0 + R, None, :]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        self.k_cache[layer][pos0:pos0 + R] = k
        self.v_cache[layer][pos0:pos0 + R] = v
        h = h + self._attend(q, layer, pos) @ lw.wo.T
        x = rms_norm(h, lw.mlp_norm, cfg.rms_norm_eps)
        return h + (F.silu(x @ lw.w_gate.T) * (x @ lw.w_up.T)) @ lw.w_down.T

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        x = rms_norm(h, self.w.norm, self.cfg.rms_norm_eps)
        return (x @ self.w.lm_head.T).float()

    # ---- the contract's compute (checks and bookkeeping: EngineContract) -----------------------------------------
    def _select(self, seq: int) -> None:
        self.k_cache, self.v_cache, self.rows = self._seq_tensors[seq]

    def _prefill(self, tokens: list[int], start: int) -> None:
        h = self.w.embed[torch.tensor(tokens, device=self.device)]
        for layer in range(self.n_layers):
            h = self._layer(layer, h, start)
        self.rows[(start + len(tokens) - 1) % self.max_rows] = h[-1]

    def _embed(self, pos: int, token: int, slot: int) -> None:
        self.rows[slot] = self.w.embed[token]

    def _run_layers(self, first_pos: int, last_pos: int, l0: int, l1: int, slots: list[int]) -> None:
        for layer in range(l0, l1):  # a whole layer one row at a time, in position order (module docstring)
            for pos, s in zip(range(first_pos, last_pos + 1), slots):
                self.rows[s] = self._layer(layer, self.rows[s][None], pos)[0]

    def final_logits(self, first_pos: int, last_pos: int) -> torch.Tensor:
        """fp32 logits [rows, vocab] of rows at depth L (final norm + LM head)."""
        slots = self._rows(first_pos, last_pos, self.n_layers)
        logits = torch.cat([self._logits(self.rows[s][None]) for s in slots])
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"non-finite logits at rows {first_pos}..{last_pos}")
        return logits

    def set_heads(self, heads) -> None:
        """Intermediate heads (adadecode.engines.head.Head), indexed by `head_index` in `head()`."""
        self.heads = [h.to(self.device, self.dtype) for h in heads]

    def head(self, pos: int, head_index: int, sampling=None) -> tuple[int, float]:
        """(token, confidence) of head `head_index` on row `pos`, which must be at that head's layer.

        confidence: the head's largest probability; token: its argmax, or with `sampling` its own draw (over its
        real tokens, with the noise of position pos + 1 that the final layer's draw uses too)."""
        hd = self.heads[head_index]
        slot = self._row_slot(pos, hd.layer)
        x = rms_norm(self.rows[slot][None], self.w.norm, self.cfg.rms_norm_eps)
        probs, token_ids = hd.probs(x, self.w.lm_head)
        if not torch.isfinite(probs).all():
            raise FloatingPointError(f"non-finite head logits at row {pos} (head at layer {hd.layer})")
        i = int(probs[0, : len(token_ids)].argmax())
        if sampling is None:
            return int(token_ids[i]), float(probs[0, i])
        logits = hd.logits(x, self.w.lm_head)[:, : len(token_ids)]  # again: only sampling pays for it
        j = int(sample(logits, sampling, [pos + 1], token_ids)[0])
        return int(token_ids[j]), float(probs[0, i])

    def static_state(self) -> StaticState:
        """The weights, RoPE tables and KV caches of this engine, shared (not copied), for a step of static shapes
        that one CUDA graph can replay at every position (the graphed baseline, decoding/graphed.py). The contract's
        calls fill the caches (prefill) and read them; such a step writes a position's K/V as run_layers would."""
        return StaticState(self.w, self.cos, self.sin, self.k_cache, self.v_cache)

    def hidden(self, pos: int) -> torch.Tensor:
        """The residual stream of row `pos` (a copy), for tests."""
        return self.rows[self._row_slot(pos)].clone()

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V [kv_len, n_kv_heads, head_dim] of `layer` (its valid cache entries), for tests."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} outside 0..{self.n_layers - 1}")
        n = self.kv_len[layer]
        return self.k_cache[layer][:n].clone(), self.v_cache[layer][:n].clone()
