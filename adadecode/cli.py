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
                         max_seq=args.max_seq or min(model.cfg.max_position, max(4096, len(prompt) + args.max_new_tokens)))
    on_token = None
    if not args.json:
        stream = StreamDecoder(tok)

        def on_token(t: int) -> None:
            sys.stdout.write(stream.push(t))
            sys.stdout.flush()

    gen = generate_vanilla(engine, prompt, args.max_new_tokens, eos_ids=model.eos_ids, on_token=on_token)
    if args.json:
        out = {"prompt_tokens": gen.prompt_tokens, "tokens": gen.tokens, "text": tok.decode(gen.tokens),
               "ms_per_token": gen.ms_per_token, "engine": engine.name, "method": "vanilla",
               "model": model.source, "stats": gen.stats}
        print(json.dumps(out))
    else:
        sys.stdout.write("\n")
        print(f"[{len(gen.tokens)} tokens, {gen.ms_per_token:.2f} ms/token, engine {engine.name}]", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="adadecode", description="Exact early-exit greedy decoding for Llama models")
    sub = p.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="greedy generation from a prompt")
    g.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct), a .gguf file or an HF directory")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    g.add_argument("--engine", default="auto", choices=["auto", "cuda", "torch"])
    g.add_argument("--device", default=None, help="torch engine: cpu or cuda (default: cuda where available)")
    g.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="torch engine precision")
    g.add_argument("--max-seq", type=int, default=None, help="KV cache length (default: enough for the request)")
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
