"""Kernels and CUDA-graph nodes per decode token, per layer and in total, fused (issue 16) vs unfused, counted
on the emulated device (no GPU needed: the emulator runs the real launch sequence of csrc/cuda/runtime/engine.cu and
counts every launch, every programmatic dependent launch and every node a graph replay runs).

    python bench/launch_count.py [--shapes smollm2,8b] [--out bench/results/launch-count]

SmolLM2-135M-Instruct runs with its real weights (the default model); the Llama-3.1-8B shape with random weights
and 2 of its 32 layers (launches per layer do not depend on the layer count; the per-token totals scale them to
32). Per decode token of vanilla greedy decoding: embed (a copy), run_layers (a gather launch + one graph replay:
the layers, then a scatter), final (eager). A head evaluation (AdaDecode's early exit) is counted separately.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dataclasses  # noqa: E402

from adadecode.engines.cuda import CudaEngine  # noqa: E402
from adadecode.engines.head import Head  # noqa: E402
from adadecode.model.weights import LlamaWeights  # noqa: E402
from common import llama31_8b  # noqa: E402

def model(shape: str):
    if shape == "smollm2":
        from adadecode.model.loader import load_gguf_model, default_gguf_path
        m = load_gguf_model(default_gguf_path())
        return m.cfg, m.weights, m.cfg.n_layers
    full = llama31_8b()
    cfg = dataclasses.replace(full, n_layers=2)
    return cfg, LlamaWeights.random(cfg, seed=0, dtype=torch.bfloat16), full.n_layers


def delta(emu, before: dict) -> dict:
    now = emu.stats()
    return {k: now[k] - before[k] for k in ("launches", "pdl_launches", "graph_launches", "graph_kernels",
                                            "graph_copies")}


def count(shape: str) -> dict:
    import adadecode_emu as emu
    cfg, weights, full_layers = model(shape)
    L = cfg.n_layers
    out = {"shape": shape, "layers_run": L, "layers_full": full_layers}
    for fused in (False, True):
        e = CudaEngine(cfg, weights, max_seq=64, max_rows=8, device="emu", prefill_chunk=16)
        e.fused = fused
        e.set_heads([Head.identity(1, cfg.d)])
        prompt = list(range(10, 18))
        e.prefill(prompt)
        p = len(prompt)
        tok = e.final(p - 1, p - 1)[0]
        e.embed(p, tok)
        e.run_layers(p, p, 0, L)  # the first call captures the graph: count the replays that follow
        e.final(p, p)
        e.embed(p + 1, tok)
        t0 = time.time()
        b = emu.stats()
        e.run_layers(p + 1, p + 1, 0, L)
        layers = delta(emu, b)
        b = emu.stats()
        e.final(p + 1, p + 1)
        final = delta(emu, b)
        secs = time.time() - t0
        e.embed(p + 2, tok)
        e.run_layers(p + 2, p + 2, 0, 1)
        b = emu.stats()
        e.head(p + 2, 0)
        head = delta(emu, b)
        per_layer = (layers["graph_kernels"] - 1) / L  # minus the scatter that ends the graph
        eager_layers = layers["launches"] - layers["graph_kernels"]  # the gather launch
        kernels_token = eager_layers + 1 + per_layer * full_layers + final["launches"]
        nodes_token = 1 + per_layer * full_layers + layers["graph_copies"]  # graph: layers + scatter (+ copies)
        out["fused" if fused else "unfused"] = {
            "kernels_per_layer": per_layer, "kernels_final": final["launches"], "kernels_head": head["launches"],
            "eager_launches_per_token": eager_layers + 1 + final["launches"],  # gather + graph launch + final
            "graph_nodes_per_token": nodes_token, "kernels_per_token": kernels_token,
            "copies_per_token": 1 + 1,  # embed (device to device) + the final's read-back
            "pdl_launches_per_token": layers["pdl_launches"] / L * full_layers + final["pdl_launches"],
            "emulated_seconds_per_token": round(secs, 2)}
    return out


def table(rows: list[dict]) -> str:
    lines = ["| shape | path | kernels / layer | final step | head eval | kernels / token | graph nodes / token | "
             "PDL launches / token |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for path in ("unfused", "fused"):
            c = r[path]
            lines.append(f"| {r['shape']} ({r['layers_full']} layers) | {path} | {c['kernels_per_layer']:g} | "
                         f"{c['kernels_final']} | {c['kernels_head']} | {c['kernels_per_token']:g} | "
                         f"{c['graph_nodes_per_token']:g} | {c['pdl_launches_per_token']:g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="smollm2,8b")
    ap.add_argument("--out", default="bench/results/launch-count")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = [count(s) for s in a.shapes.split(",")]
    meta = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(["python bench/launch_count.py", *(argv or sys.argv[1:])]),
            "device": "emulated device (adadecode_emu: csrc/ on the CPU; counts, not times)"}
    md = report(meta, rows)
    print(md)
    from adadecode.model.filesys import write_atomic

    write_atomic(a.out + ".json", json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    write_atomic(a.out + ".md", md)
    return 0


def report(meta: dict, rows: list[dict]) -> str:
    return (f"# Launches per decode token, fused vs unfused\n\n`{meta['command']}`, {meta['date']}, "
            f"{meta['device']}.\n\n{table(rows)}\n\n{__doc__.split(chr(10) + chr(10), 1)[1]}")


if __name__ == "__main__":
    sys.exit(main())
