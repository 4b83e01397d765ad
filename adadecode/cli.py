"""Command line: `python -m adadecode generate ...`."""
from __future__ import annotations

import argparse
import json
import sys


def _generate(args) -> int:
    from .decode import generate_vanilla
    from .engines import make_engine
    from .loader import load_model
    from .tokenizer import StreamDecoder

    model = load_model(args.model)
    tok = model.tokenizer
    if tok is None:
        raise SystemExit(f"error: {model.source} has no tokenizer.json; cannot encode a text prompt")
    prompt = tok.encode_chat(args.prompt) if args.chat else tok.encode(args.prompt)
    engine = make_engine(model, args.engine, device=args.device, dtype=args.dtype,
                         max_seq=args.max_seq or min(model.cfg.max_position, max(4096, len(prompt) + args.max_new_tokens)),
                         max_rows=max(16, args.max_pending + 1, args.k + 1))  # rows in flight: pending tokens + 1
    on_token = None
    if not args.json:
        stream = StreamDecoder(tok)

        def on_token(t: int) -> None:
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()

    extra = {"sampling": None if not args.temperature else
             {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}}
    if args.method == "vanilla":
        gen = generate_vanilla(engine, prompt, args.max_new_tokens, eos_ids=model.eos_ids, on_token=on_token,
                               **_sampling_options(args))
        gen.stats = {"tokens": len(gen.tokens), "early": 0, "accepted": 0, "rejected": 0, **gen.stats}
    else:
        gen, more = _generate_early_exit(args, model, engine, prompt, on_token)
        extra.update(more)
    if args.json:
        out = {"prompt_tokens": gen.prompt_tokens, "tokens": gen.tokens, "text": tok.decode(gen.tokens),
               "ms_per_token": gen.ms_per_token, "engine": engine.name, "method": args.method,
               "model": model.source, **extra, "stats": gen.stats}
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        line = f"[{len(gen.tokens)} tokens, {gen.ms_per_token:.2f} ms/token, engine {engine.name}, {args.method}"
        if args.method != "vanilla":
            st = gen.stats
            line += (f": {st['early']} early, {st['accepted']} accepted, {st['rejected']} rejected, "
                     f"{st['layer_steps']}/{st['vanilla_layer_steps']} layer steps")
        print(line + "]", file=sys.stderr)
    return 0


DEFAULT_GAMMA = 0.75  # adadecode's threshold when neither --gamma nor the heads file gives one


def _sampling_options(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}


def _generate_early_exit(args, model, engine, prompt, on_token):
    """AdaDecode or LayerSkip: load the heads (`adadecode.heads.load_heads`), run the driver."""
    from . import heads as heads_mod
    from .driver import generate_adadecode, generate_layerskip

    load_heads = getattr(heads_mod, "load_heads", None)
    if load_heads is None:
        raise RuntimeError(f"--method {args.method} needs heads, and this build has no heads loader "
                           f"(adadecode.heads.load_heads)")
    heads, meta = load_heads(args.heads, model)
    meta = meta or {}
    heads = list(heads)
    if not heads:
        raise ValueError(f"--heads {args.heads}: no heads in it")
    engine.set_heads(heads)
    layers = [h.layer for h in heads]
    if args.method == "adadecode":
        if args.gamma is not None:
            gamma = args.gamma
        else:
            gamma = meta.get("gamma", DEFAULT_GAMMA)
        if not isinstance(gamma, (int, float, list, tuple)):
            raise ValueError(f"--heads {args.heads}: recommended gamma {gamma!r} is not a number")
        gen = generate_adadecode(engine, prompt, args.max_new_tokens, gamma=gamma, eos_ids=model.eos_ids,
                                 max_pending=args.max_pending, on_token=on_token, head_guess=args.head_guess,
                                 **_sampling_options(args))
        return gen, {"heads": args.heads, "head_layers": layers, "gamma": gamma, "max_pending": args.max_pending}
    if args.head_layer is None:
        index = max(range(len(heads)), key=lambda i: layers[i])  # the deepest head: the most accurate drafts
    elif args.head_layer in layers:
        index = layers.index(args.head_layer)
    else:
        raise ValueError(f"--head-layer {args.head_layer}: the heads sit at layers {layers}")
    gen = generate_layerskip(engine, prompt, args.max_new_tokens, head_index=index, k=args.k,
                             eos_ids=model.eos_ids, on_token=on_token, head_guess=args.head_guess,
                             **_sampling_options(args))
    return gen, {"heads": args.heads, "head_layers": layers, "head_layer": layers[index], "k": args.k}



def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adadecode", description="Exact early-exit greedy decoding for Llama models")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generation from a prompt (greedy, or seeded sampling)")
    g.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--engine", default="auto", choices=["auto", "cuda", "emu", "torch"],
                   help="emu: the CUDA engine on the emulated device (CPU; slow, for tests)")
    g.add_argument("--device", default=None, help="torch engine: cpu or cuda (default: cuda where available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="torch engine precision")
    g.add_argument("--max-seq", type=int, default=None, help="KV cache length (default: enough for the request)")
    g.add_argument("--method", default="vanilla", choices=["vanilla", "adadecode", "layerskip"],
                   help="vanilla greedy, AdaDecode early exits, or the LayerSkip-style baseline (all exact)")
    g.add_argument("--heads", default="default",
                   help="adadecode/layerskip: a heads file, or 'default' / 'default:code' (the default model's shipped heads)")
    g.add_argument("--gamma", type=float, default=None,
                   help=f"adadecode: exit when a head's confidence > GAMMA (default: the heads file's, else {DEFAULT_GAMMA})")
    g.add_argument("--max-pending", type=int, default=5, help="adadecode: most early tokens awaiting verification")
    g.add_argument("--k", type=int, default=4, help="layerskip: tokens drafted per verification")
    g.add_argument("--head-layer", type=int, default=None,
                   help="layerskip: the layer of the drafting head (default: the deepest head)")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (0, the default: greedy); every method gives the same tokens for a seed")
    g.add_argument("--top-k", type=int, default=0, help="sampling: keep the K most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling: keep the smallest nucleus of mass >= P (1: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling: the seed (0..2**64-1); the text depends on it alone")
    g.add_argument("--head-guess", default="sample", choices=["sample", "argmax"],
                   help="sampling with heads: a head guesses its own seeded draw, or its argmax")
    from .train_heads import add_arguments as _train_heads_arguments
    _train_heads_arguments(sub.add_parser("train-heads", help="train intermediate heads on the model's own greedy continuations"))
    args = p.parse_args(argv)
    try:
        if args.command == "train-heads":
            from .train_heads import main as _train_heads_main
            return _train_heads_main(args)
        return _generate(args)
    except (ValueError, FileNotFoundError, RuntimeError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
