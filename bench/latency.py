"""End-to-end decoding latency on one model: ms/token of vanilla greedy decoding per engine.

    python bench/latency.py [--model default|PATH] [--engine auto|cuda|torch] [--prompts N] [--max-new-tokens 64]

Without a GPU it runs the torch reference engine on the CPU and says so: those numbers are not
representative of the product. Results go to bench/results/latency-<date>.json with the device,
versions, command and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from adadecode.decode import generate_vanilla  # noqa: E402
from adadecode.engines import cuda_unavailable_reason, make_engine  # noqa: E402
from adadecode.loader import load_model  # noqa: E402

PROMPTS = [
    "Write a Python function that reverses a string.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about the sea.",
    "What are the three states of matter?",
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for writing clear emails.",
    "Write a SQL query that counts the rows of a table named users.",
    "Why is the sky blue?",
]


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--engine", default="auto", choices=["auto", "cuda", "torch"])
    p.add_argument("--prompts", type=int, default=4, help="how many of the built-in chat prompts")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)

    model = load_model(args.model)
    engine = make_engine(model, args.engine, max_seq=1024)
    gpu = torch.cuda.is_available()
    if not gpu:
        print(f"note: no GPU ({cuda_unavailable_reason()}); running the torch reference engine on the CPU. "
              f"These numbers are NOT representative of the CUDA engine.", file=sys.stderr)
    tok = model.tokenizer
    prompts = [tok.encode_chat(t) for t in PROMPTS[: args.prompts]]
    generate_vanilla(engine, prompts[0], 4, eos_ids=model.eos_ids)  # warm-up
    rows = []
    for text, ids in zip(PROMPTS, prompts):
        gen = generate_vanilla(engine, ids, args.max_new_tokens, eos_ids=model.eos_ids)
        rows.append({"prompt": text, "prompt_tokens": len(ids), "new_tokens": len(gen.tokens),
                     "ms_per_token": gen.ms_per_token})
        print(f"{gen.ms_per_token:9.2f} ms/token  {len(gen.tokens):4d} tokens  {text[:50]}")
    med = statistics.median(r["ms_per_token"] for r in rows)
    print(f"\nvanilla, engine {engine.name} ({getattr(engine, 'dtype', '')}), {device_name()}: "
          f"median {med:.2f} ms/token, {1e3 / med:.1f} tokens/s")

    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "date": now.isoformat(timespec="seconds"), "device": device_name(), "representative": gpu,
              "engine": engine.name, "dtype": str(getattr(engine, "dtype", "")), "model": model.source,
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()},
              "methods": {"vanilla": {"median_ms_per_token": med, "per_prompt": rows}}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = out / f"latency-{'gpu' if gpu else 'cpu'}-{now:%Y-%m-%d}.json"
    name.write_text(json.dumps(result, indent=2))
    print(f"wrote {name.relative_to(ROOT) if name.is_relative_to(ROOT) else name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
