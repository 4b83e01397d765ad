"""What a step of R rows costs relative to one row, measured on an engine (engines/cost.py: the schedule's cost model).

    python bench/step_cost.py [--model default|8b] [--engine auto|cpu|cuda|torch] [--threads N] [--max-rows 16]
                              [--out FILE] [--check]

The same measurement the context guesses' schedule prices its chains with (a few layers over R = 1..max_rows rows,
and the LM head, the fastest of interleaved rounds), printed and written as JSON with the run's facts. `--model 8b`
builds a Llama-3.1-8B shape with random bf16 weights on the GPU. Not a timed test.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="default (SmolLM2-135M) or 8b (random weights, GPU)")
    ap.add_argument("--engine", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-rows", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--check", action="store_true", help="check the arguments, say what would run, and exit")
    args = ap.parse_args(argv)
    if args.model not in ("default", "8b"):
        ap.error(f"--model {args.model}: default or 8b")
    if args.check:
        print(f"check: would measure the step cost of R = 1..{args.max_rows} rows on {args.model} ({args.engine})")
        return 0
    from common import llama31_8b, run_facts

    from adadecode.engines.cost import measure
    from adadecode.engines.options import EngineOptions
    from adadecode.engines.select import make_engine

    if args.model == "8b":
        import torch

        from adadecode.model.weights import LlamaWeights

        cfg = llama31_8b()
        model = type("M", (), {"cfg": cfg, "weights": LlamaWeights.random(cfg, device="cuda", dtype=torch.bfloat16)})()
        engine = make_engine(model, "cuda", max_seq=64, max_rows=args.max_rows)
    else:
        import adadecode

        model = adadecode.load_model("default")
        engine = make_engine(model, EngineOptions(engine=args.engine, threads=args.threads), max_seq=64,
                             max_rows=args.max_rows)
    cost = measure(engine, args.max_rows)
    L = engine.n_layers
    result = {**run_facts("bench/step_cost.py", argv), "model": args.model, "engine": engine.name,
              **({"threads": engine.threads, "isa": engine.isa} if engine.name == "cpu" else {}),
              "relative": cost.relative(), "layer_s": list(cost.layer[1:]), "final_s": list(cost.final[1:]),
              "token_s": cost.token_s(L), "final_over_layer": cost.final[1] / cost.layer[1]}
    print(f"{args.model} on {engine.name}: a layer over R rows / over 1, R = 1..{args.max_rows}: {cost.relative()}")
    print(f"one row: {1e3 * cost.layer[1]:.3f} ms per layer, LM head {1e3 * cost.final[1]:.3f} ms, "
          f"a whole step {1e3 * cost.token_s(L):.2f} ms")
    if args.out:
        from adadecode.model.filesys import write_atomic

        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
