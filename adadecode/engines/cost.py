"""What a step of R rows costs on this engine and this machine, measured: the schedule's cost model.

A decoding method that runs guesses beside the frontier (AdaDecode's deferred rows, context chains) must know what
an extra row costs here: on a CPU a layer over 4 rows may cost 1.1x one row (AVX-512, weights the bound) or 1.6x
(AVX2, FMAs the bound); on TorchEngine, which runs rows one at a time, R rows cost R times one. No constant tuned on
one machine can say which, so the engine is timed: `step_cost(engine)` runs R = 1..max_rows rows through a few
layers (and the LM head once) on the engine itself, takes medians, and caches the result on the engine object and
on disk (keyed by the engine, its kernel path and threads, the model's shapes and the CPU), so a machine measures
once per engine and model. The figures are the fastest of several interleaved rounds: the decisions use ratios of
them (an extra row against a token), which a uniform slowdown by other processes leaves as they are.

It must run while the engine holds no sequence (it embeds rows at positions 0..R-1 and truncates to 0 after): the
drivers call it before their prefill.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
from pathlib import Path

from ..model.filesys import write_atomic

CACHE_VERSION = 2


@dataclasses.dataclass
class StepCost:
    """Seconds per decoder layer for R rows (layer[R], R = 1..len(layer) - 1; layer[0] unused) and seconds of the
    final LM head for R rows (final[R]), on one engine; R past the table costs as the last entry scaled by rows.

    `observe_*` lower an entry to a step actually timed (the drivers time their engine calls): another process only
    ever adds time, so the fastest time seen is the closest to the machine's own cost, and a calibration made while
    the machine was busy heals as the steps it prices run."""

    layer: tuple[float, ...]
    final: tuple[float, ...]
    source: str = "measured"  # "measured", "cache" or "given"

    def __post_init__(self):
        self.layer, self.final = list(self.layer), list(self.final)

    def layer_s(self, rows: int) -> float:
        return self._at(self.layer, rows)

    def final_s(self, rows: int) -> float:
        return self._at(self.final, rows)

    @staticmethod
    def _at(table, rows: int) -> float:
        top = len(table) - 1
        if rows > top:
            return table[top] * rows / top
        return max(table[1:rows + 1])  # a row more never costs less (an entry lowered by a timed step included)

    def observe_layers(self, rows: int, layers: int, seconds: float) -> None:
        if 1 <= rows < len(self.layer) and layers > 0 and self.source != "given":
            self.layer[rows] = min(self.layer[rows], seconds / layers)

    def observe_final(self, rows: int, seconds: float) -> None:
        if 1 <= rows < len(self.final) and self.source != "given":
            self.final[rows] = min(self.final[rows], seconds)

    def token_s(self, n_layers: int) -> float:
        """One vanilla decode step: every layer and the LM head over one row."""
        return n_layers * self.layer_s(1) + self.final_s(1)

    def relative(self) -> list[float]:
        """layer[R] / layer[1] for R = 1..: what the benchmarks print."""
        return [round(self.layer[r] / self.layer[1], 3) for r in range(1, len(self.layer))]


def _cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "adadecode" / "step-cost.json"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def cache_key(engine, max_r: int) -> str:
    cfg = engine.cfg
    parts = [engine.name, str(getattr(engine, "isa", "")), str(getattr(engine, "threads", "")),
             str(getattr(engine, "dtype", "")), str(getattr(engine, "device", "")), str(max_r), _cpu_model(),
             *(str(getattr(cfg, f, "")) for f in ("d", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim",
                                                   "vocab_size", "model_type"))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def _load(key: str) -> StepCost | None:
    try:
        entry = json.loads(_cache_path().read_text()).get(key)
        if entry and entry.get("version") == CACHE_VERSION:
            return StepCost(tuple(entry["layer"]), tuple(entry["final"]), "cache")
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass  # no cache, or an unreadable one: measure again
    return None


def _store(key: str, cost: StepCost) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                data = {}
        except (OSError, ValueError):
            data = {}
        data[key] = {"version": CACHE_VERSION, "layer": list(cost.layer), "final": list(cost.final)}
        write_atomic(path, json.dumps(data))
    except OSError:
        pass  # a read-only home: the engine object still holds the measurement


def measure(engine, max_r: int | None = None, layers: int = 4, reps: int = 7) -> StepCost:
    """Time `layers` decoder layers over R = 1..max_r rows at positions 0..R-1, and one full step of one row (every
    layer and the LM head). Rounds interleave the row counts, and each figure is the fastest of its `reps`: another
    process only ever adds time, so the minimum is the machine's own cost, whatever the load while it was measured
    (a median taken on a loaded 2-core machine was off by 2x). The LM head of R rows is taken to scale as a layer of R rows does (the same kind of kernel: a weight
    stream read once for every row)."""
    L = engine.n_layers
    max_r = min(engine.max_rows, engine.max_seq, 16) if max_r is None else max_r
    nl = min(layers, L)
    token = 1  # any id: the costs do not depend on it
    sync = getattr(engine, "synchronize", None) or (lambda: None)
    times: list[list[float]] = [[] for _ in range(max_r + 1)]
    full: list[float] = []
    engine.truncate(0)
    for _ in range(reps):
        for r in range(1, max_r + 1):
            for p in range(r):
                engine.embed(p, token)
            sync()
            t0 = time.perf_counter()
            engine.run_layers(0, r - 1, 0, nl)
            sync()
            times[r].append((time.perf_counter() - t0) / nl)
            engine.truncate(0)
        engine.embed(0, token)
        t0 = time.perf_counter()
        engine.run_layers(0, 0, 0, L)
        engine.final(0, 0)
        full.append(time.perf_counter() - t0)
        engine.truncate(0)
    layer = [0.0] + [min(t) for t in times[1:]]
    for r in range(2, len(layer)):  # noise must not make a row cheaper than none
        layer[r] = max(layer[r], layer[r - 1])
    final1 = max(min(full) - L * layer[1], 0.1 * layer[1])
    final = [0.0] + [final1 * layer[r] / layer[1] for r in range(1, len(layer))]
    return StepCost(tuple(layer), tuple(final))


def step_cost(engine, max_r: int | None = None) -> StepCost:
    """The engine's StepCost: held by the engine once measured, else from the disk cache, else measured now (the
    engine must hold no sequence: see the module docstring). ADADECODE_STEP_COST=measure skips the disk cache."""
    max_r = min(engine.max_rows, engine.max_seq, 16) if max_r is None else max_r
    held = getattr(engine, "_step_cost", None)
    if held is not None and len(held.layer) - 1 >= max_r:
        return held
    key = cache_key(engine, max_r)
    cost = None if os.environ.get("ADADECODE_STEP_COST") == "measure" else _load(key)
    if cost is None:
        cost = measure(engine, max_r)
        _store(key, cost)
    engine._step_cost = cost
    return cost
