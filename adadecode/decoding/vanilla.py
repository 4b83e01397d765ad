"""Vanilla decoding on any engine of the contract (DESIGN.md §3): greedy, or seeded sampling (§9).

One token = embed + run_layers over all layers for one row + final. It stops after an EOS token
(which is part of the output, as in HF `generate`) or after `max_new_tokens`. With temperature > 0 the token at
position p is drawn by adadecode.engines.sampling with randomness that depends only on (seed, p).

Every decoding method returns a `Generation` and checks its request with `check_request` before it touches the cache.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Sequence

from ..engines.sampling import make_sampling
from ..errors import CONTEXT_LENGTH_EXCEEDED, BadOption


@dataclasses.dataclass
class Generation:
    prompt_tokens: list[int]
    tokens: list[int]  # generated ids, EOS included when it ended the generation
    seconds: float  # wall time from the start of prefill to the last token
    decode_seconds: float  # wall time after the first token (what ms/token measures)
    stats: dict = dataclasses.field(default_factory=dict)

    @property
    def ms_per_token(self) -> float:
        n = len(self.tokens) - 1  # the first token comes from prefill
        return 1e3 * self.decode_seconds / n if n > 0 else float("nan")


def check_request(engine, prompt_tokens: Sequence[int], max_new_tokens: int) -> list[int]:
    """The checks every decoding method makes before it touches the cache."""
    prompt = [int(t) for t in prompt_tokens]
    if not prompt:
        raise BadOption("empty prompt: give at least one token", param="prompt")
    vocab = engine.cfg.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise BadOption(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="prompt")
    if max_new_tokens < 1:
        raise BadOption(f"max_new_tokens must be >= 1, got {max_new_tokens}", param="max_new_tokens")
    if len(prompt) + max_new_tokens > engine.max_seq:
        raise BadOption(f"prompt of {len(prompt)} tokens + max_new_tokens {max_new_tokens} is longer than the "
                        f"context (max_seq={engine.max_seq})", param="prompt", code=CONTEXT_LENGTH_EXCEEDED)
    return prompt


def final_tokens(engine, first_pos: int, last_pos: int, sampling) -> list[int]:
    """engine.final, with the sampling argument only when sampling (greedy calls stay as the contract has them)."""
    if sampling is None:
        return engine.final(first_pos, last_pos)
    return engine.final(first_pos, last_pos, sampling=sampling)


def generate_vanilla(engine, prompt_tokens: Sequence[int], max_new_tokens: int, eos_ids: Sequence[int] = (),
                     on_token: Callable[[int], None] | None = None, *, temperature: float = 0.0, top_k: int = 0,
                     top_p: float = 1.0, seed: int = 0) -> Generation:
    """temperature 0 (the default) is greedy; otherwise seeded sampling with top_k (0: off) and top_p (1: off)."""
    sampling = make_sampling(temperature, top_k, top_p, seed)
    prompt = check_request(engine, prompt_tokens, max_new_tokens)
    eos = set(eos_ids)
    L = engine.n_layers
    t0 = time.perf_counter()
    engine.prefill(prompt)
    pos = len(prompt) - 1
    token = final_tokens(engine, pos, pos, sampling)[0]
    tokens = [token]
    t1 = time.perf_counter()
    if on_token:
        on_token(token)
    while token not in eos and len(tokens) < max_new_tokens:
        pos += 1
        engine.embed(pos, token)
        engine.run_layers(pos, pos, 0, L)
        token = final_tokens(engine, pos, pos, sampling)[0]
        tokens.append(token)
        if on_token:
            on_token(token)
    t2 = time.perf_counter()
    return Generation(prompt_tokens=prompt, tokens=tokens, seconds=t2 - t0, decode_seconds=t2 - t1,
                      stats={"layer_steps": (len(tokens) - 1) * L, "vanilla_layer_steps": (len(tokens) - 1) * L})
