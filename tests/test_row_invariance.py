"""Batch invariance at engine level (issue 32, item 2): a row computed alone equals the same row computed among R = 2..8
rows of one call, at every index among them, on every kernel path of this CPU and 1, 2 and 3 threads, for a model
of every family and the models whose reductions reach every loop (conftest.LOOP_MODELS): hidden states, K/V, the
LM head's logits and tokens over the R rows, and both heads' tokens and confidences on each row, bit for bit.

This is the property AdaDecode's exactness rests on (DESIGN.md §4): the rows of a run_layers call are whatever the
schedule put together (a verified row and its guesses), so a row's bits must not depend on the rows beside it.
What changes with R: the register tiles of the dot products (1, 2, 3, 4 and 8 rows, 1, 2 and 4 columns on each
path, kernels.inl: next_rows / cols_for), the attention's queries scored together and its row blocks, the LM head's
tiles, and the threads' shares of every job.
"""
from __future__ import annotations

import functools

import pytest
import torch

from adadecode.engines.cpu import CpuEngine, CpuWeights
from adadecode.engines.head import Head

from conftest import FAMILY_MODELS, engine_model

adadecode_cpu = pytest.importorskip("adadecode_cpu", reason="adadecode_cpu is not built (see README)")
ISAS = adadecode_cpu.isas()

pytestmark = pytest.mark.exactness

MODELS = ["loop-llama", "loop-qwen3", "gqa-untied", "hd8-gqa", *FAMILY_MODELS]
ROWS = 8  # rows n .. n + 7 after an n-token prompt
PROMPT = 21  # prefill chunks of 16 + 5 rows; the loop models (slow on the portable path) take 5 (prompt_of)


def prompt_of(name: str) -> int:
    return 5 if name.startswith("loop") else PROMPT


def heads_of(name: str, cfg) -> list[Head]:
    """A head at the last layer but one with a perturbed T, a vocabulary over half the LM-head items and a rest
    logit; the small models add a logit-lens head at layer 1 (on the loop models a head is d x d + vocab x d of
    single-row work per call: one is enough there)."""
    g = torch.Generator().manual_seed(7)
    d = cfg.d
    vocab = torch.randperm(cfg.vocab_size, generator=g)[:cfg.vocab_size // 2].sort().values
    heads = [Head(layer=cfg.n_layers - 1, T=torch.eye(d) + 0.05 * torch.randn(d, d, generator=g), vocab=vocab,
                  w_rest=0.05 * torch.randn(d, generator=g))]
    return heads if name.startswith("loop") else [Head.identity(1, d)] + heads


def run_rows(e: CpuEngine, cfg, first: int, last: int) -> dict:
    """Rows first..last (already embedded, at depth 0) in one call per layer segment, stopping at each head's layer:
    every row's head answers, hidden state, K/V at its position, and the LM head's logits and tokens over the rows."""
    heads = e.heads
    stops = sorted({h.layer for h in heads} | {cfg.n_layers})
    got = {"heads": {}, "hidden": {}, "kv": {}}
    depth = 0
    for stop in stops:
        if stop > depth:
            e.run_layers(first, last, depth, stop)
            depth = stop
        for hi, h in enumerate(heads):
            if h.layer == depth:
                for p in range(first, last + 1):
                    token, conf = e.head(p, hi)
                    got["heads"][(hi, p)] = (token, torch.tensor(conf, dtype=torch.float32).view(torch.int32).item())
    for p in range(first, last + 1):
        got["hidden"][p] = e.hidden(p)
    for layer in range(cfg.n_layers):
        k, v = e.kv(layer)
        for p in range(first, last + 1):
            got["kv"][(layer, p)] = (k[p], v[p])
    got["logits"] = e.final_logits(first, last)
    got["tokens"] = e.final(first, last)
    return got


def restart(e: CpuEngine, n: int, tokens: list[int], first: int, last: int) -> None:
    """The cache back to rows 0..first-1 (rows n..first-1, if any, run one by one), rows first..last embedded."""
    e.truncate(n)
    for p in range(n, first):
        e.embed(p, tokens[p])
        e.run_layers(p, p, 0, e.n_layers)
        e.final(p, p)
    for p in range(first, last + 1):
        e.embed(p, tokens[p])


@functools.lru_cache(maxsize=None)
def model(name: str):
    cfg, w = engine_model(name, seed=21)
    g = torch.Generator().manual_seed(22)
    tokens = torch.randint(0, cfg.vocab_size, (prompt_of(name) + ROWS,), generator=g).tolist()
    return cfg, CpuWeights(cfg, w), tokens, heads_of(name, cfg)


@functools.lru_cache(maxsize=None)
def alone(name: str) -> dict:
    """Each of the rows n..n+7 computed alone (one row per call), on the portable path with one thread."""
    cfg, packed, tokens, heads = model(name)
    n = prompt_of(name)
    e = CpuEngine(cfg, packed, max_seq=n + ROWS + 4, max_rows=ROWS, threads=1, isa="portable", prefill_chunk=16)
    e.set_heads(heads)
    e.prefill(tokens[:n])
    ref = {"heads": {}, "hidden": {}, "kv": {}, "logits": {}, "tokens": {}}
    for p in range(n, n + ROWS):
        e.embed(p, tokens[p])
        got = run_rows(e, cfg, p, p)
        for key in ("heads", "hidden", "kv"):
            ref[key].update(got[key])
        ref["logits"][p] = got["logits"][0]
        ref["tokens"][p] = got["tokens"][0]
    return ref


def calls(name: str):
    """(first, last) of the multi-row calls: R = 2..8 rows from row n (row n + i at index i), and on the small models
    R = 2..7 rows ending at row n + 7 too (the rows before them decoded first): every row at several indices of
    several R. (The loop models' portable path is slow: its rows take the first set only.)"""
    n = prompt_of(name)
    first = [(n, n + R - 1) for R in range(2, ROWS + 1)]
    return first if name.startswith("loop") else first + [(n + ROWS - R, n + ROWS - 1) for R in range(2, ROWS)]


@pytest.mark.parametrize("name", MODELS)
def test_a_row_alone_is_the_same_row_among_others(name):
    cfg, packed, tokens, heads = model(name)
    ref = alone(name)
    n = prompt_of(name)
    for isa in ISAS:
        # 2 threads: every share under the other thread's index (the reversed test schedule of thread_pool.h), so
        # both threads' workspaces take part whatever the machine's load; 1 and 3: ADADECODE_CPU_SCHEDULE or natural
        for threads, schedule in ((1, None), (2, "reverse"), (3, None)):
            e = CpuEngine(cfg, packed, max_seq=n + ROWS + 4, max_rows=ROWS, threads=threads, isa=isa,
                          schedule=schedule, prefill_chunk=16)
            e.set_heads(heads)
            e.prefill(tokens[:n])
            for first, last in calls(name):
                what = f"{name}, {isa} x {threads} threads ({schedule or 'natural'} pool), rows {first}..{last}"
                restart(e, n, tokens, first, last)
                got = run_rows(e, cfg, first, last)
                for p in range(first, last + 1):
                    at = f"{what}: row {p} (index {p - first} of {last - first + 1})"
                    assert torch.equal(got["hidden"][p], ref["hidden"][p]), f"{at}: hidden state"
                    for layer in range(cfg.n_layers):
                        (k, v), (rk, rv) = got["kv"][(layer, p)], ref["kv"][(layer, p)]
                        assert torch.equal(k, rk) and torch.equal(v, rv), f"{at}: K/V of layer {layer}"
                    row = got["logits"][p - first]
                    assert torch.equal(row.view(torch.int32), ref["logits"][p].view(torch.int32)), f"{at}: logits"
                    assert got["tokens"][p - first] == ref["tokens"][p], f"{at}: token"
                    for hi in range(len(heads)):
                        assert got["heads"][(hi, p)] == ref["heads"][(hi, p)], f"{at}: head {hi}"
