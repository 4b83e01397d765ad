"""Head design ablations: what helps an early head, with its cost counted in layer-equivalents.

    python bench/heads_ablation.py [--set code] [--layers 12,18] [--cache DIR] [--epochs 3]

Trains variants of one head at each given layer on the recipe's training split and measures them on its
validation split (held out by package / topic; never HumanEval): top-1 agreement with the final layer, the
vocabulary's coverage of the final greedy tokens, the exit rate at >= 90% early accuracy, and the single-head
simulated AdaDecode speedup (ideal and with the head's cost counted), with the exit rule "max probability >
gamma" (the engines' rule) or "margin (top1 - top2) > gamma". Writes bench/results/heads-ablations-<set>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adadecode.engines.head import Head  # noqa: E402
from adadecode.model.math import rms_norm  # noqa: E402
from adadecode.heads import recipe as heads_recipe  # noqa: E402
from adadecode.heads.data import merge_data  # noqa: E402
from adadecode.model.filesys import write_atomic  # noqa: E402
from adadecode.heads.evaluate import head_cost_layers, head_predictions  # noqa: E402
from adadecode.heads.schedule_sim import simulate_set, traces_of  # noqa: E402
from adadecode.heads.train import HeadData, build_vocab, heldout_kl, round_like_file, train_head  # noqa: E402
from adadecode.model.loader import load_model  # noqa: E402

FINE = tuple(round(0.3 + 0.025 * i, 3) for i in range(28)) + (0.99,)

VARIANTS = [  # name, vocab K, adapter rank, previous-token rank, share of training rows, epochs (None: --epochs)
    ("logit lens (T = I, untrained)", 2048, 0, 0, 1.0, 0),
    ("d x d, K=512", 512, 0, 0, 1.0, None),
    ("d x d, K=1024", 1024, 0, 0, 1.0, None),
    ("d x d, K=2048", 2048, 0, 0, 1.0, None),
    ("d x d, K=4096", 4096, 0, 0, 1.0, None),
    ("d x d, K=1024, 1/4 of the rows", 1024, 0, 0, 0.25, None),
    ("d x d, K=1024, 6 epochs", 1024, 0, 0, 1.0, 6),
    ("d x d + MLP adapter r=256, K=1024", 1024, 256, 0, 1.0, None),
    ("d x d + previous token r=128, K=1024", 1024, 0, 128, 1.0, None),
]


def exit_at(conf, correct, target=0.9):
    """(gamma, exit rate) of the lowest gamma on FINE whose early tokens are right >= target of the time."""
    for g in FINE:
        ex = conf > g
        if int(ex.sum()) and float(correct[ex].float().mean()) >= target:
            return g, float(ex.float().mean())
    return None, 0.0


def best_single(conf, correct, seq, layer, n_layers, cost):
    traces = traces_of({layer: (conf, correct)}, seq, [layer])
    rs = [simulate_set(traces, [layer], g, n_layers, 5, cost) for g in FINE]
    return max(rs, key=lambda r: r["speedup_with_head_cost"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--set", default="code", choices=("code", "general"))
    p.add_argument("--layers", default="12,18")
    p.add_argument("--cache", default=None)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--variants", default=None, help="comma-separated indices into VARIANTS (default: all)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model("default")
    cfg, lm = model.cfg, model.weights.lm_head.float()
    layers = [int(x) for x in args.layers.split(",")]
    data = merge_data([c.load(layers) for c in heads_recipe.cached(args.set, model, args.cache)])
    cap, prompts, conts = data["cap"], data["prompts"], data["conts"]
    is_val = torch.tensor([p.get("split") == "val" for p in prompts])
    tr, va = cap.select((~is_val[cap.seq]).nonzero().flatten()), cap.select(is_val[cap.seq].nonzero().flatten())
    fed = torch.tensor([conts[s][t] for s, t in zip(cap.seq.tolist(), cap.step.tolist())])
    prev_all = rms_norm(model.weights.embed[fed].float(), model.weights.norm.float(), cfg.rms_norm_eps)
    prev_tr, prev_va = prev_all[~is_val[cap.seq]], prev_all[is_val[cap.seq]]
    train_conts = [c for c, p in zip(conts, prompts) if c is not None and p.get("split") == "train"]
    print(f"{args.set}: {tr.y.numel()} training rows, {va.y.numel()} validation rows "
          f"({int(is_val.sum())} validation prompts)", flush=True)
    chosen = [VARIANTS[int(i)] for i in args.variants.split(",")] if args.variants else VARIANTS
    rows = []
    for layer in layers:
        for name, k, ar, pr, frac, ep in chosen:
            t0 = time.time()
            vocab = build_vocab(train_conts, k, cfg.vocab_size)
            n = int(frac * tr.y.numel())
            sub = tr.select(torch.randperm(tr.y.numel(), generator=torch.Generator().manual_seed(0))[:n].sort().values) \
                if frac < 1 else tr
            prev_sub = prev_tr if frac >= 1 else None
            hd_tr = HeadData(sub, layer, vocab, cfg.vocab_size, prev=prev_sub if pr else None)
            hd_va = HeadData(va, layer, vocab, cfg.vocab_size, prev=prev_va if pr else None)
            epochs = args.epochs if ep is None else ep
            if epochs:
                head, _ = train_head(layer, hd_tr, lm, vocab, epochs=epochs, batch=256, adapter_rank=ar, prev_rank=pr)
                head = round_like_file(head)
            else:
                head = Head.identity(layer, cfg.d, vocab)
            tok, conf, margin = head_predictions(head, va.x[layer], lm, prev=prev_va if pr else None, with_margin=True)
            correct = tok == va.y
            cost = head_cost_layers(cfg, head)
            g90, ex90 = exit_at(conf, correct)
            best = best_single(conf, correct, va.seq, layer, cfg.n_layers, cost)
            bm = best_single(margin, correct, va.seq, layer, cfg.n_layers, cost)
            row = {"layer": layer, "variant": name, "vocab_k": 0 if vocab is None else int(vocab.numel()),
                   "train_rows": n, "epochs": epochs, "cost_layers": cost,
                   "coverage": float(torch.isin(va.y, vocab).float().mean()) if vocab is not None else 1.0,
                   "heldout_kl": heldout_kl(head, hd_va, lm), "top1": float(correct.float().mean()),
                   "gamma_at_90": g90, "exit_at_90": ex90,
                   "best_maxprob": {k2: best[k2] for k2 in ("gamma", "ideal_speedup", "speedup_with_head_cost", "exit_rate", "early_accuracy")},
                   "best_margin": {k2: bm[k2] for k2 in ("gamma", "ideal_speedup", "speedup_with_head_cost", "exit_rate", "early_accuracy")},
                   "seconds": time.time() - t0}
            rows.append(row)
            print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"heads-ablations-{args.set}"
    write_atomic(stem.with_suffix(".json"), json.dumps({"set": args.set, "validation_rows": int(va.y.numel()),
                                                      "training_rows": int(tr.y.numel()), "rows": rows}, indent=1))
    lines = ["| layer | variant | cost (layers) | K coverage | top-1 | exits at >= 90% accepted | best single head: ideal / with cost "
             "(max prob) | same, margin rule |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b, m = r["best_maxprob"], r["best_margin"]
        lines.append(f"| {r['layer']} | {r['variant']} | {r['cost_layers']:.2f} | {100 * r['coverage']:.1f}% | {100 * r['top1']:.1f}% | "
                     f"{100 * r['exit_at_90']:.1f}% (gamma {r['gamma_at_90']}) | {b['ideal_speedup']:.3f}x / {b['speedup_with_head_cost']:.3f}x "
                     f"(gamma {b['gamma']}) | {m['ideal_speedup']:.3f}x / {m['speedup_with_head_cost']:.3f}x |")
    write_atomic(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
