"""Head files on prompts no head was trained on: HumanEval (plain completion) and the hand-written general set.

    python bench/heads_external.py [--cache DIR] [--runs default:code@humaneval,default:general@general-heldout,...]

Per run (a head file on a set): the early-exit rate, the share of early tokens accepted, and the ideal and
cost-counted layer-step speedup of AdaDecode's schedule (heads.schedule_sim, max 5 pending), simulated on the set's
captured greedy continuations (heads.recipe caches: the continuations vanilla greedy decoding produces, with the
hidden states the heads read). Also the heads' top-1 agreement with the final layer and what a perfect gate on the
same heads would give (exit exactly when right): the ceiling of the exit rule. The real driver, with parity, is
bench/latency.py --prompts humaneval|general-heldout. Writes bench/results/heads-external.{json,md,png}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adadecode.engines.head import Head  # noqa: E402
from adadecode.heads import recipe as heads_recipe  # noqa: E402
from adadecode.heads.data import merge_data  # noqa: E402
from adadecode.heads.evaluate import evaluate_set, head_predictions  # noqa: E402
from adadecode.heads.files import load_heads  # noqa: E402
from adadecode.model.filesys import atomic_path, write_atomic  # noqa: E402
from adadecode.heads.schedule_sim import simulate_set, traces_of  # noqa: E402
from adadecode.model.loader import load_model  # noqa: E402

DEFAULT_RUNS = "default:code@humaneval,default:general@general-heldout,default:general@humaneval,default:code@general-heldout"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default=None)
    p.add_argument("--runs", default=DEFAULT_RUNS, help="comma-separated HEADS@SET (SET: humaneval, general-heldout)")
    p.add_argument("--max-pending", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "heads-external"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model("default")
    lm = model.weights.lm_head.float()
    data_of = {}
    results = []
    for run in args.runs.split(","):
        spec, _, set_name = run.partition("@")
        heads, meta = load_heads(spec, model)
        if set_name not in data_of:
            data_of[set_name] = merge_data([c.load() for c in heads_recipe.cached(set_name, model, args.cache)])
        data = data_of[set_name]
        gammas = meta.get("gammas") or meta["gamma"]
        r = evaluate_set(heads, gammas, data, model, args.max_pending)
        cap = data["cap"]
        layers = [h.layer for h in heads]
        perfect = {}
        for h in heads:
            tok, _ = head_predictions(h, cap.x[h.layer], lm)
            ok = tok == cap.y
            perfect[h.layer] = (ok.float(), ok)
        r["perfect_gate_ideal_speedup"] = simulate_set(traces_of(perfect, cap.seq, layers), layers, 0.5,
                                                       model.cfg.n_layers, args.max_pending)["ideal_speedup"]
        lens = {}
        for l in cap.layers:
            tok, _ = head_predictions(Head.identity(l, model.cfg.d), cap.x[l], lm)
            lens[l] = float((tok == cap.y).float().mean())
        r.update(heads=spec, set=set_name, path=meta["path"], logit_lens_top1=lens)
        results.append(r)
        print(f"{spec} on {set_name}: {r['rows']} rows / {r['prompts']} prompts, layers {layers} gamma {gammas}: "
              f"early exits {100 * r['exit_rate']:.1f}%, accepted {100 * (r['early_accuracy'] or 0):.1f}%, ideal "
              f"{r['ideal_speedup']:.3f}x, with head cost {r['speedup_with_head_cost']:.3f}x, perfect gate "
              f"{r['perfect_gate_ideal_speedup']:.3f}x", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), json.dumps(results, indent=1, default=float))
    lines = ["| heads | set (never trained on) | tokens | layers | gamma | early exits | accepted | ideal speedup | "
             "with head cost | perfect gate (ceiling of these heads) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['heads']}` | {r['set']} | {r['rows']} | {r['layers']} | {r['gamma']} | {100 * r['exit_rate']:.1f}% | "
                     f"{100 * (r['early_accuracy'] or 0):.1f}% | {r['ideal_speedup']:.3f}x | {r['speedup_with_head_cost']:.3f}x | "
                     f"{r['perfect_gate_ideal_speedup']:.3f}x |")
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(results, out.with_suffix(".png"))
    return 0


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    names = [f"{r['heads']}\non {r['set']}" for r in results]
    x = range(len(results))
    ax.bar([i - 0.2 for i in x], [r["ideal_speedup"] for r in results], 0.4, label="ideal (layer steps)")
    ax.bar([i + 0.2 for i in x], [r["speedup_with_head_cost"] for r in results], 0.4, label="head evaluations counted")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(x), names, fontsize=8)
    ax.set_ylabel("simulated speedup over vanilla")
    ax.set_title("AdaDecode on prompts never trained on (SmolLM2-135M-Instruct)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
