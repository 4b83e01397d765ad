"""A gpt-fast-style baseline: the torch reference forward with a static-shape decode step, captured
in a CUDA graph on the GPU (run eagerly on the CPU).

The step reads the token and position from device tensors and attends over the whole static cache
with a mask, so one captured graph serves every position. It shares the weights, caches and RoPE
tables of a TorchEngine (TorchEngine.static_state: the one thing it takes beyond the engine contract), whose
batched `prefill` fills the cache first.

Cache entries past `pos` are dead or were never written (the cache is `torch.empty`): the step zeroes
their V before P.V, because a probability of 0 times a NaN or inf there is NaN (the K side is safe: the
mask overwrites those scores). It is not bitwise TorchEngine (softmax and P.V reduce over max_seq
entries, not pos+1): its logits (`self.logits`) agree within fp32/bf16 rounding.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch
import torch.nn.functional as F

from ..engines.torch import TorchEngine
from ..model.math import rms_norm, rotate_half
from .common import Generation, check_request


class GraphedDecoder:
    name = "torch-graph"

    def __init__(self, engine: TorchEngine):
        self.e = engine
        self.s = engine.static_state()
        dev = engine.device
        self.token = torch.zeros(1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(1, dtype=torch.long, device=dev)
        self.out = torch.zeros(1, dtype=torch.long, device=dev)
        self.logits = torch.zeros(1, engine.cfg.vocab_size, device=dev)  # fp32 logits of the last step
        self.graph = None
        self.positions = torch.arange(engine.max_seq, device=dev)

    def _step(self) -> None:
        e, s, cfg = self.e, self.s, self.e.cfg
        group = cfg.n_heads // cfg.n_kv_heads
        h = s.weights.embed[self.token]  # [1, d]
        cos, sin = s.cos[self.pos][:, None, :], s.sin[self.pos][:, None, :]
        dead = self.positions > self.pos  # [max_seq]: future, dead and unwritten entries
        mask = dead[None, None, :]
        for layer, lw in enumerate(s.weights.layers):
            x = rms_norm(h, lw.attn_norm, cfg.rms_norm_eps)
            q = (x @ lw.wq.T).view(1, cfg.n_heads, cfg.head_dim)
            k = (x @ lw.wk.T).view(1, cfg.n_kv_heads, cfg.head_dim)
            v = (x @ lw.wv.T).view(1, cfg.n_kv_heads, cfg.head_dim)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            s.k_cache[layer].index_copy_(0, self.pos, k)
            s.v_cache[layer].index_copy_(0, self.pos, v)
            kc = s.k_cache[layer].view(e.max_seq, cfg.n_kv_heads, 1, cfg.head_dim).expand(-1, -1, group, -1)
            live_v = s.v_cache[layer].masked_fill(dead[:, None, None], 0)  # 0 * NaN would be NaN (docstring)
            vc = live_v.view(e.max_seq, cfg.n_kv_heads, 1, cfg.head_dim).expand(-1, -1, group, -1)
            kc = kc.reshape(e.max_seq, cfg.n_heads, cfg.head_dim)
            vc = vc.reshape(e.max_seq, cfg.n_heads, cfg.head_dim)
            scores = torch.einsum("rhd,thd->hrt", q.float(), kc.float()) * cfg.head_dim ** -0.5  # fp32, as TorchEngine
            probs = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
            attn = torch.einsum("hrt,thd->rhd", probs, vc.float()).to(q.dtype).reshape(1, -1)
            h = h + attn @ lw.wo.T
            x = rms_norm(h, lw.mlp_norm, cfg.rms_norm_eps)
            h = h + (F.silu(x @ lw.w_gate.T) * (x @ lw.w_up.T)) @ lw.w_down.T
        self.logits.copy_(rms_norm(h, s.weights.norm, cfg.rms_norm_eps) @ s.weights.lm_head.T)
        self.out.copy_(self.logits.argmax(dim=-1))

    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the graph (allocator, cuBLAS handles)
                self._step()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._step()

    def step(self, pos: int, token: int) -> int:
        """Decode one token at `pos` (its input `token`); returns the greedy next token."""
        self.token.fill_(token)
        self.pos.fill_(pos)
        if self.e.device.type == "cuda":
            if self.graph is None:
                self._capture()
            self.graph.replay()
        else:
            self._step()
        return int(self.out.item())

    def generate(self, prompt_tokens: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = ()) -> Generation:
        prompt = check_request(self.e, prompt_tokens, max_new_tokens)
        eos = set(eos_ids)
        t0 = time.perf_counter()
        self.e.prefill(prompt)
        if self.graph is None and self.e.device.type == "cuda":
            self._capture()  # capture writes a dummy step at pos 0..: redo the prefill afterwards
            self.e.prefill(prompt)
        pos = len(prompt) - 1
        tokens = [self.e.final(pos, pos)[0]]
        t1 = time.perf_counter()
        while tokens[-1] not in eos and len(tokens) < max_new_tokens:
            pos += 1
            tokens.append(self.step(pos, tokens[-1]))
        t2 = time.perf_counter()
        n = len(tokens) - 1
        return Generation(prompt_tokens=prompt, tokens=tokens, seconds=t2 - t0, decode_seconds=t2 - t1,
                          stats={"layer_steps": n * self.e.n_layers, "vanilla_layer_steps": n * self.e.n_layers})
