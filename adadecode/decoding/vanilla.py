"""Vanilla decoding on any engine of the contract (docs/design.md#contract): greedy, or seeded sampling
(docs/design.md#sampling).

One token = embed + run_layers over all layers for one row + final. It stops after an EOS token
(which is part of the output, as in HF `generate`) or after `max_new_tokens`. With temperature > 0 the token at
position p is drawn by adadecode.engines.sampling with randomness that depends only on (seed, p).
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

from ..engines.sampling import make_sampling
from .common import Generation, Schedule, check_request, final_call, runs


def vanilla_steps(engine, prompt_tokens: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
                  on_token: Callable[[int], None] | None = None, *, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0, seed: int = 0) -> Schedule:
    """temperature 0 (the default) is greedy; otherwise seeded sampling with top_k (0: off) and top_p (1: off)."""
    sampling = make_sampling(temperature, top_k, top_p, seed)
    prompt = check_request(engine, prompt_tokens, max_new_tokens)
    return _vanilla(engine.n_layers, prompt, max_new_tokens, set(eos_ids), on_token, sampling)


def _vanilla(L: int, prompt: list[int], max_new_tokens: int, eos: set, on_token, sampling):
    t0 = time.perf_counter()
    yield "prefill", (prompt,), {}
    pos = len(prompt) - 1
    token = (yield final_call(pos, pos, sampling))[0]
    tokens = [token]
    t1 = time.perf_counter()
    if on_token:
        on_token(token)
    while token not in eos and len(tokens) < max_new_tokens:
        pos += 1
        yield "embed", (pos, token), {}
        yield "run_layers", (pos, pos, 0, L), {}
        token = (yield final_call(pos, pos, sampling))[0]
        tokens.append(token)
        if on_token:
            on_token(token)
    t2 = time.perf_counter()
    return Generation(prompt_tokens=prompt, tokens=tokens, seconds=t2 - t0, decode_seconds=t2 - t1,
                      stats={"layer_steps": (len(tokens) - 1) * L, "vanilla_layer_steps": (len(tokens) - 1) * L})


generate_vanilla = runs(vanilla_steps)
