"""What every decoding method uses: the `Generation` it returns, `check_request` (the checks it makes before it
touches the cache), `final_call` (the contract's final, with the sampling argument only when sampling), and the
form every method takes: a steps function that checks its request and returns a schedule (a generator that yields
each engine call it needs as (name, args, kwargs), is sent the call's result, and returns the Generation), made into
the method's generate function by `runs`. One engine runs a schedule with `run_schedule`; decoding/batch.py runs
the schedules of several sequences together."""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Generator, Sequence

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


def final_call(first_pos: int, last_pos: int, sampling) -> tuple:
    """A schedule's final call, with the sampling argument only when sampling (greedy calls stay as the contract has
    them)."""
    return "final", (first_pos, last_pos), ({} if sampling is None else {"sampling": sampling})


Schedule = Generator[tuple, object, Generation]  # yields (name, args, kwargs), is sent each call's result


def run_schedule(engine, steps: Schedule) -> Generation:
    """Drive a schedule on `engine`, each call made as it comes; the schedule's Generation. On an engine that
    computes as it is called (not the CUDA engine, whose calls return before the GPU is done) and holds a measured
    step cost (engines/cost.py), each run_layers and final is timed and lowers the cost's entry for its rows."""
    cost = getattr(engine, "_step_cost", None)
    timed = cost is not None and getattr(engine, "name", "") in ("cpu", "torch")
    clock = time.perf_counter
    try:
        call = next(steps)
        while True:
            name, args, kwargs = call
            if timed and name in ("run_layers", "final"):
                t0 = clock()
                out = getattr(engine, name)(*args, **kwargs)
                dt = clock() - t0
                rows = args[1] - args[0] + 1
                if name == "run_layers":
                    cost.observe_layers(rows, args[3] - args[2], dt)
                else:
                    cost.observe_final(rows, dt)
                call = steps.send(out)
            else:
                call = steps.send(getattr(engine, name)(*args, **kwargs))
    except StopIteration as done:
        return done.value


def runs(steps_fn):
    """generate(engine, ...) -> Generation from steps(engine, ...) -> schedule: the same signature and checks, the
    schedule run on the engine. `generate.steps` is the steps function (what decoding/batch.py runs)."""
    @functools.wraps(steps_fn)
    def generate(engine, *args, **kwargs):
        return run_schedule(engine, steps_fn(engine, *args, **kwargs))

    generate.__name__ = generate.__qualname__ = "generate_" + steps_fn.__name__.removesuffix("_steps")
    generate.__annotations__ = {**steps_fn.__annotations__, "return": Generation}
    generate.steps = steps_fn
    return generate
