"""Command line: `python -m adadecode generate ...`, `serve ...` (an OpenAI-compatible server), `train-heads ...`."""
from __future__ import annotations

import argparse
import json
import sys

from .api import LLM, METHODS
from .decoding import methods
from .engines.options import ENGINES, EngineOptions


def _generate(args) -> int:
    method = methods.get(args.method)
    llm = LLM(args.model, heads=args.heads if method.needs_heads else None, engine=_engine_options(args),
              max_seq=args.max_seq, max_rows=_max_rows(args))
    on_text = None
    if not args.json:
        def on_text(delta) -> None:
            sys.stdout.write(delta.text)
            sys.stdout.flush()

    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed}
    if method.takes("head_guess"):
        sampling["head_guess"] = args.head_guess
    out = llm.generate(args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens, method=args.method,
                       on_text=on_text, **_method_options(args), **sampling)
    if args.json:
        print(json.dumps({"prompt_tokens": out.prompt_tokens, "tokens": out.tokens, "text": out.text,
                          "ms_per_token": out.ms_per_token, "engine": out.engine, "method": out.method,
                          "model": llm.model.source, **out.options,
                          "sampling": None if not args.temperature else
                          {k: sampling[k] for k in ("temperature", "top_k", "top_p", "seed")},
                          "stats": out.stats}))
    else:
        sys.stdout.write("\n")
        line = f"[{len(out.tokens)} tokens, {out.ms_per_token:.2f} ms/token, engine {out.engine}, {out.method}"
        if method.speculative:
            st = out.stats
            line += (f": {st['early']} early, {st['accepted']} accepted, {st['rejected']} rejected, "
                     f"{st['layer_steps']}/{st['vanilla_layer_steps']} layer steps")
            ctx = st.get("sources", {}).get("context")
            if ctx and ctx["guesses"]:
                line += f", context {ctx['accepted']}/{ctx['guesses']} guesses verified"
        print(line + "]", file=sys.stderr)
    return 0


def _method_options(args) -> dict:
    """The methods' options from their flags (every registered option has one: adadecode.decoding.methods)."""
    return {name: getattr(args, name) for name in methods.options()}


def _max_rows(args) -> int:
    """Rows in flight for every method at these flags (AdaDecode: max_pending + 1, LayerSkip: k + 1), at least 16."""
    return max(16, methods.rows_needed(_method_options(args)))


def _engine_options(args) -> EngineOptions:
    """The engine's options from the flags, checked once here (a bad value: `error: ...`, exit 2)."""
    return EngineOptions(engine=args.engine, device=args.device, dtype=args.dtype, threads=args.threads)


def _model_arguments(g, serve: bool) -> None:
    g.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF directory")
    g.add_argument("--engine", default="auto", choices=list(ENGINES),
                   help="auto: cuda where it can run, else cpu (native kernels); torch: the reference; emu: the CUDA "
                        "engine on the emulated device (slow)")
    g.add_argument("--threads", type=int, default=None,
                   help="cpu engine: threads (default: $ADADECODE_CPU_THREADS, else the cores this process may use)")
    g.add_argument("--device", default=None, help="torch engine: cpu or cuda (default: cuda where available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="torch engine precision")
    g.add_argument("--max-seq", type=int, default=None,
                   help="KV cache length (default: " + ("min(the model's context, 4096); longer requests are refused)"
                                                         if serve else "enough for the request)"))
    g.add_argument("--method", default=None if serve else "vanilla", choices=list(METHODS),
                   help="; ".join(f"{m}: {methods.get(m).doc}" for m in METHODS) + " (all exact)"
                        + ("; requests may override it (default: adadecode with --heads, else vanilla)" if serve else ""))
    with_heads = "/".join(m for m in METHODS if methods.get(m).needs_heads)
    g.add_argument("--heads", default=None if serve else "default",
                   help=f"{with_heads}: a heads file, or 'default' / 'default:code' (the default model's shipped heads)"
                        + ("; without it the server decodes vanilla only" if serve else ""))
    for o in methods.options().values():  # each method's options, as the registry declares them
        helptext = f"{'/'.join(methods.users(o.name))}: {o.doc}"
        if o.type is bool:  # --context / --no-context
            g.add_argument(o.flag, action=argparse.BooleanOptionalAction, default=o.default, help=helptext)
        else:
            g.add_argument(o.flag, type=o.type, default=o.default, help=helptext)


def _sampling_arguments(g) -> None:
    g.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (0, the default: greedy); every method gives the same tokens for a seed")
    g.add_argument("--top-k", type=int, default=0, help="sampling: keep the K most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sampling: keep the smallest nucleus of mass >= P (1: all)")
    g.add_argument("--seed", type=int, default=0, help="sampling: the seed (0..2**64-1); the text depends on it alone")
    g.add_argument("--head-guess", default="sample", choices=["sample", "argmax"],
                   help="sampling with heads: a head guesses its own seeded draw, or its argmax")


def _serve(args) -> int:
    from .server import main as serve_main

    from .model.loader import load_model

    model = load_model(args.model)  # a server's cache is fixed: requests that do not fit are refused, not grown for
    llm = LLM(model, heads=args.heads, engine=_engine_options(args), max_seq=args.max_seq or min(model.cfg.max_position, 4096),
              max_rows=_max_rows(args), release_weights=True,  # the server's model is its own: the CPU engine's packed copy is the only one
              max_seqs=args.max_seqs)
    return serve_main(args, llm)


def parser() -> argparse.ArgumentParser:
    """The command line's parser: generate, serve and train-heads, with every registered method's flags."""
    p = argparse.ArgumentParser(prog="adadecode", description="Exact early-exit greedy decoding for Llama models")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="generation from a prompt (greedy, or seeded sampling)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    _model_arguments(g, serve=False)
    _sampling_arguments(g)
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (completions, chat completions, streaming)")
    _model_arguments(s, serve=True)
    from .server import add_arguments as _serve_arguments
    _serve_arguments(s)
    from .heads.pipeline import add_arguments as _train_heads_arguments
    _train_heads_arguments(sub.add_parser("train-heads", help="train intermediate heads on the model's own greedy continuations"))
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "train-heads":
            from .heads.pipeline import main as _train_heads_main
            return _train_heads_main(args)
        if args.command == "serve":
            return _serve(args)
        return _generate(args)
    except (ValueError, FileNotFoundError, RuntimeError, MemoryError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
