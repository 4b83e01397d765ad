"""Record the engine calls of a real decoding run, and replay that schedule on another engine.

Trace replay lets a model too large for this machine (a Llama-3.1-8B shape with random weights) run
exactly the schedule that a real model's heads produced: the same exits, verifications and rollbacks,
with layer indices scaled to its depth. Timing the replay against a vanilla replay of the same token
count gives the realized speedup of that trace; its layer steps give the ideal one.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path


class RecordingEngine:
    """Wraps an engine; every contract call is forwarded and appended to `calls` as (name, args)."""

    CALLS = ("prefill", "embed", "run_layers", "head", "final", "truncate")

    def __init__(self, engine):
        self.engine = engine
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name):
        attr = getattr(self.engine, name)
        if name not in self.CALLS:
            return attr

        def call(*args, **kw):  # kw (sampling) shapes the answers, not the schedule: not recorded
            self.calls.append((name, tuple(list(a) if isinstance(a, (list, tuple)) else a for a in args)))
            return attr(*args, **kw)

        return call


@dataclasses.dataclass
class Trace:
    n_layers: int
    head_layers: list[int]  # layer of each head index used in `head` calls
    calls: list[tuple[str, tuple]]
    meta: dict = dataclasses.field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        from ..model.filesys import write_atomic

        write_atomic(path, json.dumps(dataclasses.asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        d = json.loads(Path(path).read_text())
        d["calls"] = [(name, tuple(args)) for name, args in d["calls"]]
        return cls(**d)

    @property
    def layer_steps(self) -> int:
        return sum(a[3] - a[2] for name, a in self.calls if name == "run_layers")

    def scaled(self, n_layers: int) -> "Trace":
        """The same schedule on a model of `n_layers`: layer l -> round(l * n_layers / L).

        Segment boundaries keep their order, and the first (0) and last (L) layers map to 0 and n_layers,
        so the scaled trace is a valid schedule: rows still meet at the same (scaled) depths.
        """
        def s(layer: int) -> int:
            return round(layer * n_layers / self.n_layers)

        calls = []
        for name, a in self.calls:
            if name == "run_layers":
                first, last, l0, l1 = a
                if s(l0) == s(l1):
                    continue  # a segment that rounds to nothing at this depth
                a = (first, last, s(l0), s(l1))
            calls.append((name, a))
        return Trace(n_layers=n_layers, head_layers=[s(layer) for layer in self.head_layers], calls=calls,
                     meta=dict(self.meta, scaled_from=self.n_layers))

    def vanilla(self) -> "Trace":
        """Vanilla decoding of the same number of output tokens: one full-depth row per token."""
        prefill = next(a for name, a in self.calls if name == "prefill")
        n_prompt, n_tokens = len(prefill[0]), self.meta["tokens"]
        calls = [("prefill", prefill), ("final", (n_prompt - 1, n_prompt - 1))]
        for pos in range(n_prompt, n_prompt + n_tokens - 1):
            calls += [("embed", (pos, 0)), ("run_layers", (pos, pos, 0, self.n_layers)), ("final", (pos, pos))]
        return Trace(n_layers=self.n_layers, head_layers=[], calls=calls, meta=dict(self.meta, method="vanilla"))


def replay(engine, trace: Trace, *, skip_prefill: bool = False) -> None:
    """Issue the trace's calls on `engine` (whose heads, if any, sit at trace.head_layers).

    Tokens fed to `embed` are the recorded ones; what the engine returns is ignored: the decisions
    are the trace's. With skip_prefill, a `prefill` call only has to have been made before.
    """
    for name, a in trace.calls:
        if name == "prefill":
            if not skip_prefill:
                engine.prefill(a[0])
        elif name == "embed":
            engine.embed(a[0], a[1] % engine.cfg.vocab_size)
        else:
            getattr(engine, name)(*a)
