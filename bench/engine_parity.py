"""Greedy tokens of two engines on the same prompts, every first divergence judged as a bf16 logit tie or not.

    python bench/engine_parity.py [--engines cuda,cpu] [--model default] [--prompts humaneval] [--n-prompts 8]
                                  [--max-new-tokens 128] [--out bench/results] [--check]

Vanilla greedy decoding of each prompt on engine A and engine B (the default: the CUDA engine and the native CPU
engine, `engine="cpu"`). Where the tokens differ, the first divergence is judged by adadecode.testing.parity's
fp32_tie_verdict, the criterion of the engine tests: on the fp32 model (TorchEngine fp32 on the same bf16 weights)
and on engine B's own logits along A's decode path, the two tokens must be within a few bf16 steps of each other.
Anything else is a bug and fails the run (exit 1). Writes bench/results/engine-parity-<A>-<B>-<date>.json.

--check: the arguments, the prompt set and whether both engines exist in this checkout (exit 3 when one does not:
the GPU lease's cpu-engine-parity step is then skipped, bench/gpu_lease.py), without loading the model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import run_facts  # noqa: E402
from adadecode.model.filesys import write_atomic  # noqa: E402

NOT_HERE = 3  # exit code of --check when an engine is not in this checkout


def engine_known(name: str) -> str | None:
    """None when `name` is an engine of this checkout (whether or not it can run on this machine), else why not."""
    from adadecode.model.config import LlamaConfig
    from adadecode.engines.select import make_engine
    from adadecode.model.loader import Model
    from adadecode.model.weights import LlamaWeights

    cfg = LlamaConfig.from_hf({"model_type": "llama", "vocab_size": 64, "hidden_size": 128, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 64,
                               "intermediate_size": 64, "rms_norm_eps": 1e-5, "max_position_embeddings": 32},
                              source="engine probe")
    try:
        make_engine(Model(cfg=cfg, weights=LlamaWeights.random(cfg), tokenizer=None, source="probe"), name,
                    max_seq=8, max_rows=1)
    except ValueError as e:  # make_engine's "engine must be ..." names the engines it knows
        return str(e)
    except Exception:  # noqa: BLE001 - known, but it cannot run here (no GPU, not built): the lease machine decides
        return None
    return None


def prompts_of(name: str, tok) -> list[list[int]]:
    from adadecode.heads import prompts as heads_prompts
    from adadecode.heads.prompt_sets import load_prompts

    if name == "humaneval":
        return [heads_prompts.encode(tok, p) for p in heads_prompts.humaneval()]
    if name == "general-heldout":
        return [heads_prompts.encode(tok, p) for p in heads_prompts.general_heldout()]
    return [tok.encode_chat(t) for t in load_prompts(name)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="cuda,cpu", help="A,B: the reference engine and the one compared with it")
    p.add_argument("--model", default="default")
    p.add_argument("--prompts", default="humaneval", help="humaneval, general-heldout, code, general or a file")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--check", action="store_true", help="check the arguments and the engines, and exit")
    args = p.parse_args(argv)
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    if len(names) != 2:
        p.error(f"--engines takes two engines A,B, got {args.engines!r}")
    if args.n_prompts < 1 or args.max_new_tokens < 1:
        p.error("--n-prompts and --max-new-tokens must be positive")
    missing = {n: why for n in names if (why := engine_known(n))}
    if args.check:
        if missing:
            print("check: not in this checkout: " + "; ".join(f"{n} ({w})" for n, w in missing.items()))
            return NOT_HERE
        if args.prompts in ("humaneval", "general-heldout"):
            from adadecode.heads import prompts as heads_prompts

            n_set = len(heads_prompts.humaneval() if args.prompts == "humaneval" else heads_prompts.general_heldout())
        else:
            from adadecode.heads.prompt_sets import load_prompts

            n_set = len(load_prompts(args.prompts))
        print(f"check: would compare {names[0]} with {names[1]} on {min(args.n_prompts, n_set)} of {n_set} "
              f"'{args.prompts}' prompts x {args.max_new_tokens} greedy tokens; results to {args.out}")
        return 0
    if missing:
        p.error("; ".join(f"engine {n}: {w}" for n, w in missing.items()))

    import adadecode
    from adadecode.decoding.vanilla import generate_vanilla
    from adadecode.engines.select import make_engine
    from adadecode.testing.parity import bf16_ulp, decode_path_logits, fp32_tie_verdict, oracle_matmul_precision
    from adadecode.engines.torch import TorchEngine

    model = adadecode.load_model(args.model)
    prompts = prompts_of(args.prompts, model.tokenizer)[: args.n_prompts]
    max_seq = max(len(x) for x in prompts) + args.max_new_tokens + 8
    a, b = (make_engine(model, n, max_seq=max_seq) for n in names)
    rows, bad = [], []
    with oracle_matmul_precision():
        f32 = None
        for i, prompt in enumerate(prompts):
            ta = generate_vanilla(a, prompt, args.max_new_tokens, eos_ids=model.eos_ids)
            tb = generate_vanilla(b, prompt, args.max_new_tokens, eos_ids=model.eos_ids)
            row = {"prompt": i, "tokens": len(ta.tokens), "identical": ta.tokens == tb.tokens,
                   "ms_per_token": {names[0]: ta.ms_per_token, names[1]: tb.ms_per_token}}
            if not row["identical"]:
                k = next((j for j, (x, y) in enumerate(zip(ta.tokens, tb.tokens)) if x != y),
                         min(len(ta.tokens), len(tb.tokens)))
                row["first_divergence"] = k
                if k < min(len(ta.tokens), len(tb.tokens)):
                    if f32 is None:
                        dev = "cuda" if torch.cuda.is_available() else "cpu"
                        f32 = TorchEngine(model.cfg, model.weights, device=dev, dtype=torch.float32, max_seq=max_seq)
                    lf = decode_path_logits(f32, prompt, ta.tokens[:k])[-1].float().cpu()
                    lb = decode_path_logits(b, prompt, ta.tokens[:k])[-1].float().cpu()
                    ok, r = fp32_tie_verdict(lf, lb, ta.tokens[k], tb.tokens[k])
                    ulp = bf16_ulp(float(lf.max()))
                    row.update(tie=ok, fp32_gap_ulps=r["ref_gap"] / ulp, own_gap_ulps=r["got_gap"] / ulp)
                else:  # one ended (EOS) where the other went on: a divergence at the EOS token itself
                    row["tie"] = False
                if not row["tie"]:
                    bad.append(i)
            rows.append(row)
            print(f"prompt {i:2d}: {'identical' if row['identical'] else 'first divergence at ' + str(row['first_divergence'])}"
                  + ("" if row["identical"] else f" ({'a bf16 tie' if row['tie'] else 'NOT a tie'})"))
    facts = run_facts("bench/engine_parity.py", argv)
    result = {**facts, "engines": names, "model": model.source, "prompts": args.prompts, "n_prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "identical_prompts": sum(r["identical"] for r in rows),
              "untied_divergences": bad, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"engine-parity-{names[0]}-{names[1]}-{facts['date'][:10]}.json"
    write_atomic(path, json.dumps(result, indent=2))
    print(f"{result['identical_prompts']}/{len(rows)} prompts identical, {len(bad)} divergences that are not ties; "
          f"wrote {path}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
