"""Training intermediate heads (docs/design.md#heads) and choosing where to put them: the pipeline and the CLI.

`python -m adadecode train-heads` (or `train_pipeline()`) runs the steps, each in its own module:

1. **Data** (heads.data): the model's own greedy continuations of a prompt set, generated batched, with the
   hidden states at the candidate layers and the final distribution captured in the same pass.
2. **Train** (heads.train): the restricted vocabulary, then each head by forward KL(p_final || p_head).
3. **Evaluate** (heads.evaluate): on held-out prompts, per head and gamma, exit rate and early-token accuracy.
4. **Choose** (heads.schedule_sim): simulate AdaDecode's schedule over layer sets and gammas and recommend the best.
"""
from __future__ import annotations

import json
import time
from typing import Sequence

import torch

from ..engines.head import Head
from .data import Captured, make_data, merge_data
from .evaluate import exit_table, head_params, head_predictions, layer_params
from .schedule_sim import GAMMAS, recommend, tune_gammas
from .train import HeadData, build_vocab, heldout_kl, round_like_file, train_head


def split_prompts(n: int, heldout_frac: float, seed: int = 0) -> tuple[list[int], list[int]]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g).tolist()
    n_held = max(1, round(n * heldout_frac)) if n > 1 else 0
    return sorted(perm[n_held:]), sorted(perm[:n_held])


def train_pipeline(model, data: dict, layers: Sequence[int], *, vocab_k: int = 4096, heldout_frac: float = 0.2,
                   epochs: int = 4, lr: float = 1e-3, batch: int = 256, max_heads: int = 3, max_pending: int = 5,
                   gammas=GAMMAS, seed: int = 0, min_accuracy: float = 0.0, log=print, progress: bool = True,
                   per_head_gamma: bool = False) -> dict:
    """Train a head at each layer of `layers` on `data` (from make_data), evaluate on the held-out prompts,
    recommend a layer subset and gamma. Returns {'heads': {layer: Head}, 'results': JSON-able dict}."""
    cfg = model.cfg
    cap: Captured = data["cap"]
    missing = sorted(set(layers) - set(cap.layers))
    if missing:
        raise ValueError(f"the generated data holds no hidden states at layers {missing}")
    bad = [l for l in layers if not 1 <= l < cfg.n_layers]
    if bad:
        raise ValueError(f"head layers must be in 1..{cfg.n_layers - 1}, got {bad}")
    n_prompts = len(data["prompts"])
    if all(isinstance(p, dict) and p.get("split") in ("train", "val") for p in data["prompts"]):
        # split by construction (heads.recipe: by package / topic): validation prompts share no source with training
        held_ids = [i for i, p in enumerate(data["prompts"]) if p["split"] == "val"]
        train_ids = [i for i, p in enumerate(data["prompts"]) if p["split"] == "train"]
    else:
        train_ids, held_ids = split_prompts(n_prompts, heldout_frac, seed)
    made = (lambda ids: [i for i in ids if data["conts"][i] is not None])  # a partial cache lacks some prompts
    train_ids, held_ids = made(train_ids), made(held_ids)
    is_held = torch.zeros(n_prompts, dtype=torch.bool)
    is_held[held_ids] = True
    tr_rows = (~is_held[cap.seq]).nonzero().flatten()
    he_rows = is_held[cap.seq].nonzero().flatten()
    cap_tr, cap_he = cap.select(tr_rows), cap.select(he_rows)
    vocab = build_vocab([data["conts"][i] for i in train_ids], vocab_k, cfg.vocab_size)
    K = 0 if vocab is None else vocab.numel()
    cover = float(torch.isin(cap_he.y, vocab).float().mean()) if vocab is not None else 1.0
    log(f"{n_prompts} prompts ({len(train_ids)} train / {len(held_ids)} held out), {len(tr_rows)} / {len(he_rows)} "
        f"token rows; vocabulary: {'full' if vocab is None else f'{K} most frequent training tokens + rest'} "
        f"(covers {100 * cover:.1f}% of held-out greedy tokens)")
    lm_head = model.weights.lm_head.float()
    heads, per_head, per_layer_trace = {}, {}, {}
    t0 = time.time()
    for layer in sorted(layers):
        tr, he = HeadData(cap_tr, layer, vocab, cfg.vocab_size), HeadData(cap_he, layer, vocab, cfg.vocab_size)
        lens = Head.identity(layer, cfg.d, vocab)
        lens_kl = heldout_kl(lens, he, lm_head)
        head, hist = train_head(layer, tr, lm_head, vocab, epochs=epochs, lr=lr, batch=batch, seed=seed, heldout=he,
                                log=log, progress_desc=f"head @ layer {layer}" if progress else None)
        head = round_like_file(head)
        heads[layer] = head
        tok, conf = head_predictions(head, cap_he.x[layer], lm_head)
        correct = tok == cap_he.y
        ltok, lconf = head_predictions(lens, cap_he.x[layer], lm_head)
        per_layer_trace[layer] = (conf, correct)
        per_head[layer] = {"layer": layer, "heldout_kl": heldout_kl(head, he, lm_head), "identity_kl": lens_kl,
                           "top1_agreement": float(correct.float().mean()),
                           "identity_top1_agreement": float((ltok == cap_he.y).float().mean()),
                           "history": hist, "gammas": exit_table(conf, correct, gammas),
                           "identity_gammas": exit_table(lconf, ltok == cap_he.y, gammas)}
    train_s = time.time() - t0
    hc = head_params(cfg, K) / layer_params(cfg)
    best, sims = recommend(per_layer_trace, cap_he.seq, cfg.n_layers, gammas, max_heads, max_pending, hc, min_accuracy)
    shared_best = best
    if per_head_gamma:
        best = tune_gammas(per_layer_trace, cap_he.seq, cfg.n_layers, best, gammas, max_pending, hc, min_accuracy)
    results = {
        "model": model.source, "model_fingerprint": model.fingerprint, "n_layers": cfg.n_layers,
        "prompts": {"total": n_prompts, "train": len(train_ids), "heldout": len(held_ids),
                    "train_rows": len(tr_rows), "heldout_rows": len(he_rows)},
        "generation": {"max_new_tokens": data["key"]["max_new_tokens"], "seconds": data["seconds"],
                       "device": data.get("device"), "dtype": data.get("dtype")},
        "vocab_k": K, "heldout_vocab_coverage": cover,
        "training": {"epochs": epochs, "lr": lr, "batch": batch, "seed": seed, "seconds": train_s,
                     "loss": "forward KL(p_final || p_head) on the K tokens + rest (restricted) or the top-256 + tail (full)"},
        "head_cost_layers": hc, "max_pending": max_pending, "min_accuracy": min_accuracy,
        "per_head": [per_head[l] for l in sorted(per_head)],
        "recommended": best, "recommended_shared_gamma": shared_best,
        "simulations": sorted(sims, key=lambda r: -r["ideal_speedup"])[:40],
    }
    return {"heads": heads, "vocab": vocab, "results": results}


def parse_layers(text: str) -> list[int]:
    out = set()
    for part in text.replace(" ", "").split(","):
        if not part:
            continue
        if "-" in part:
            a, b = part.split("-", 1)
            out.update(range(int(a), int(b) + 1))
        else:
            out.add(int(part))
    if not out:
        raise ValueError(f"--layers {text!r} names no layer")
    return sorted(out)


def format_report(res: dict) -> str:
    lines = []
    lines.append(f"held-out: {res['prompts']['heldout']} prompts, {res['prompts']['heldout_rows']} token rows; "
                 f"vocabulary K={res['vocab_k'] or 'full'} (covers {100 * res['heldout_vocab_coverage']:.1f}%)")
    gammas = [g["gamma"] for g in res["per_head"][0]["gammas"]]
    lines.append("layer  KL(identity->trained)  top1  " + "  ".join(f"g={g:<4} exit/acc" for g in gammas))
    for h in res["per_head"]:
        cells = "  ".join(f"{100 * g['exit_rate']:5.1f}%/{100 * g['accuracy']:5.1f}%" if g["exits"] else
                          f"{100 * g['exit_rate']:5.1f}%/  -   " for g in h["gammas"])
        lines.append(f"{h['layer']:5d}  {h['identity_kl']:7.3f} -> {h['heldout_kl']:6.3f}     {100 * h['top1_agreement']:5.1f}%  {cells}")
    b = res["recommended"]
    acc = "-" if b["early_accuracy"] is None else f"{100 * b['early_accuracy']:.1f}%"
    lines.append(f"recommended: layers {b['layers']}, gamma {b['gamma']}: simulated ideal layer-step speedup "
                 f"{b['ideal_speedup']:.3f}x (exit rate {100 * b['exit_rate']:.1f}%, early accuracy {acc}, {b['rollbacks_per_100_tokens']:.2f} "
                 f"rollbacks / 100 tokens; counting each head evaluation as {res['head_cost_layers']:.2f} layers: "
                 f"{b['speedup_with_head_cost']:.3f}x)")
    return "\n".join(lines)


def add_arguments(p) -> None:
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF directory")
    p.add_argument("--layers", required=True, help="candidate head layers, e.g. '18,20,22-26' (a head reads h after that many layers)")
    p.add_argument("--prompts", default="general", help="'code', 'general' (templated sets) or a file (JSON list or one prompt per line)")
    p.add_argument("--recipe", choices=("code", "general"), default=None,
                   help="train on the shipped heads' data recipe (adadecode/heads/recipe.py: real Python source / "
                        "model-written requests, split by construction) instead of --prompts; --data-cache is then "
                        "the cache directory (built or resumed first)")
    p.add_argument("--no-generate", action="store_true", help="--recipe: train on the shards already cached")
    p.add_argument("--per-head-gamma", action="store_true", help="tune one gamma per head of the recommended set")
    p.add_argument("--out", required=True, help="head file to write (safetensors), holding the recommended layer set")
    p.add_argument("--n-prompts", type=int, default=None, help="use the first N prompts of the set (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="greedy continuation length per prompt")
    p.add_argument("--heldout", type=float, default=0.2, help="fraction of prompts held out for evaluation")
    p.add_argument("--vocab", type=int, default=4096, help="restricted vocabulary size K (0 = full vocabulary)")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=256, help="training minibatch (token rows)")
    p.add_argument("--gen-batch", type=int, default=64, help="prompts per batched generation forward")
    p.add_argument("--max-heads", type=int, default=3, help="largest layer set the recommendation considers")
    p.add_argument("--max-pending", type=int, default=5, help="simulator: most early tokens awaiting verification")
    p.add_argument("--min-accuracy", type=float, default=0.0,
                   help="recommend only configurations whose held-out early tokens are right at least this often")
    p.add_argument("--gammas", default=",".join(str(g) for g in GAMMAS))
    p.add_argument("--no-chat", action="store_true", help="encode prompts as plain text (default: chat template)")
    p.add_argument("--data-cache", default=None, help="file to keep the generated data in (reused when it matches); "
                                                        "with --recipe a directory (default $ADADECODE_CACHE/heads-data)")
    p.add_argument("--results", default=None, help="also write the full results as JSON here")
    p.add_argument("--description", default=None, help="training-data description stored in the head file")
    p.add_argument("--device", default=None, help="torch device for generation (default: cuda where available)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)


def main(args) -> int:
    from ..model.loader import load_model
    from .files import save_heads
    from .prompt_sets import load_prompts

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model = load_model(args.model)
    layers = parse_layers(args.layers)
    bad = [l for l in layers if not 1 <= l < model.cfg.n_layers]
    if bad:
        raise ValueError(f"--layers: {bad} outside 1..{model.cfg.n_layers - 1} for {model.source}")
    gammas = tuple(float(g) for g in args.gammas.split(","))
    log = (lambda s: print(s, flush=True))
    if args.recipe:
        from . import recipe
        caches = (recipe.cached(args.recipe, model, args.data_cache) if args.no_generate else
                  recipe.build(args.recipe, model, args.data_cache, args.n_prompts, log=log))
        data = merge_data([c.load(layers) for c in caches])
        source = f"the '{args.recipe}' recipe (adadecode/heads/recipe.py)"
    else:
        texts = load_prompts(args.prompts)
        if args.n_prompts:
            texts = texts[:args.n_prompts]
        if len(texts) < 2:
            raise ValueError(f"--prompts {args.prompts}: need at least 2 prompts (training + held-out), got {len(texts)}")
        data = make_data(model, texts, layers, args.max_new_tokens, chat=not args.no_chat, batch_size=args.gen_batch,
                         device=args.device, cache_file=args.data_cache, log=log)
        source = f"'{args.prompts}' ({'chat template' if not args.no_chat else 'plain text'})"
    out = train_pipeline(model, data, layers, vocab_k=args.vocab, heldout_frac=args.heldout, epochs=args.epochs,
                         lr=args.lr, batch=args.batch, max_heads=args.max_heads, max_pending=args.max_pending,
                         gammas=gammas, seed=args.seed, min_accuracy=args.min_accuracy, log=log,
                         per_head_gamma=args.per_head_gamma)
    res = out["results"]
    best = res["recommended"]
    desc = args.description or (f"greedy continuations ({res['generation']['max_new_tokens']} new tokens) of "
                                f"{res['prompts']['train']} prompts from {source}; {res['prompts']['heldout']} prompts held out")
    res["command"] = "python -m adadecode train-heads " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("command", "func") and v not in (None, False))
    res["total_seconds"] = time.time() - t0
    res["description"] = desc
    shared = best["gamma"] if not isinstance(best["gamma"], list) else res["recommended_shared_gamma"]["gamma"]
    meta = {"gamma": shared, "description": desc,
            "training": {k: res[k] for k in ("prompts", "generation", "vocab_k", "training", "max_pending", "min_accuracy")},
            "heldout": {"recommended": best, "per_head": [{k: h[k] for k in ("layer", "heldout_kl", "top1_agreement", "gammas")}
                                                          for h in res["per_head"]]}}
    if isinstance(best["gamma"], list):
        meta["gammas"] = best["gamma"]
    save_heads(args.out, [out["heads"][l] for l in best["layers"]], model, meta)
    print(format_report(res))
    print(f"wrote {args.out} (layers {best['layers']}, gamma {best['gamma']}) in {res['total_seconds']:.0f} s")
    if args.results:
        from ..model.filesys import write_atomic

        write_atomic(args.results, json.dumps(res, indent=1, default=float))
    return 0
