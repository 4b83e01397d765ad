"""Vanilla greedy decoding latency of the CUDA engine (issue 4): ms/token at contexts 128 and 2048 for

* SmolLM2-135M-Instruct, the default model (target <= 0.25 ms/token; HF transformers eager: about 91 ms on an H100);
* a Llama-3.1-8B shape with random bf16 weights generated on the GPU (d 4096, 32 layers, 32/8 heads, ffn 14336,
  vocab 128256; target >= 85% of the device-to-device copy bandwidth measured in the same run).

    python bench/engine_latency.py [--models smol,8b] [--contexts 128,2048] [--new-tokens 128] [--repeats 3]
                                   [--paths fused,unfused] [--check]

Each context runs on both decode paths of the engine (issue 16): `fused` (5 launches per layer, programmatic
dependent launches on sm_90) and `unfused` (9 per layer, the bitwise-identical reference): before and after.

ms/token is what `generate_vanilla` measures (wall time per token after the first, Python loop included: one
graph replay for the layers, one for the LM head, one small read-back per token). Bytes per token count what a
decode step must read at least: every weight once (the embedding: one row), the LM head, and the K/V cache of the
context; "% of copy bandwidth" = (bytes per token / time per token) / the measured copy bandwidth (read + write
bytes per second of a 1 GiB device-to-device copy). Writes bench/results/engine-latency-<date>.json with the device,
versions, command and date. Needs a CUDA GPU and adadecode_cuda.
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
sys.path.insert(0, str(ROOT / "bench"))

from adadecode.decoding.vanilla import generate_vanilla  # noqa: E402
from adadecode.model.filesys import write_atomic  # noqa: E402
from adadecode.engines.cuda import cuda_unavailable_reason  # noqa: E402
from adadecode.model.config import LlamaConfig  # noqa: E402
from adadecode.model.weights import LlamaWeights  # noqa: E402
from common import bytes_per_token, copy_bandwidth, llama31_8b  # noqa: E402

TARGETS = {"smol": {"ms_per_token_max": 0.25, "hf_eager_ms_per_token_h100": 91.0},
           "8b": {"pct_copy_bandwidth_min": 85.0, "hf_eager_ms_per_token_h100": 82.0}}


def run_model(name: str, cfg: LlamaConfig, weights: LlamaWeights, contexts: list[int], new_tokens: int,
              repeats: int, copy_bw: float, paths: list[str]) -> dict:
    from adadecode.engines.cuda import CudaEngine

    engine = CudaEngine(cfg, weights, max_seq=max(contexts) + new_tokens + 8)
    g = torch.Generator().manual_seed(0)
    out = {"config": {"d": cfg.d, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
                      "head_dim": cfg.head_dim, "ffn_dim": cfg.ffn_dim, "vocab_size": cfg.vocab_size},
           "kv_cache_bytes": engine.kv_bytes, "workspace_bytes": engine.workspace_bytes, "contexts": {}}
    for ctx in contexts:
        prompt = torch.randint(0, cfg.vocab_size, (ctx,), generator=g).tolist()
        for path in paths:
            engine.fused = path == "fused"
            generate_vanilla(engine, prompt, 8)  # warm-up: captures the graphs
            runs = [generate_vanilla(engine, prompt, new_tokens).ms_per_token for _ in range(repeats)]
            ms = statistics.median(runs)
            nbytes = bytes_per_token(cfg, ctx + new_tokens / 2)
            achieved = nbytes / (ms / 1e3)
            row = {"prompt_tokens": ctx, "new_tokens": new_tokens, "path": path, "pdl": engine.pdl,
                   "ms_per_token": ms, "ms_per_token_runs": runs, "bytes_per_token": nbytes,
                   "achieved_bytes_per_s": achieved, "pct_copy_bandwidth": 100 * achieved / copy_bw,
                   "floor_ms_per_token": 1e3 * nbytes / copy_bw}
            out["contexts"][f"{ctx}-{path}" if len(paths) > 1 else str(ctx)] = row
            print(f"{name:5s} context {ctx:5d} {path:8s}: {ms:8.4f} ms/token ({1e3 / ms:8.1f} tokens/s), "
                  f"{nbytes / 1e9:7.3f} GB/token, {achieved / 1e12:6.3f} TB/s = {row['pct_copy_bandwidth']:5.1f}% of "
                  f"copy bandwidth (floor {row['floor_ms_per_token']:.4f} ms)")
    out["n_graphs"] = engine.n_graphs
    del engine
    torch.cuda.empty_cache()
    return out


def result_name(models: list[str], date: str) -> str:
    """engine-latency-<models>-<date>.json: runs of other models on the same day keep their own files."""
    return f"engine-latency-{'-'.join(models)}-{date}.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smol,8b", help="comma-separated: smol (the default model), 8b")
    p.add_argument("--contexts", default="128,2048")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--paths", default="fused,unfused", help="decode paths: fused (default engine), unfused (before)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--check", action="store_true",
                   help="check the arguments and the inputs, say what would run, and exit (no GPU needed)")
    args = p.parse_args(argv)
    paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if not paths or set(paths) - {"fused", "unfused"}:
        p.error(f"--paths takes fused and/or unfused, got {args.paths!r}")
    try:
        contexts = [int(c) for c in args.contexts.split(",")]
    except ValueError:
        p.error(f"--contexts takes comma-separated token counts, got {args.contexts!r}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or set(models) - set(TARGETS):
        p.error(f"--models takes {sorted(TARGETS)}, got {args.models!r}")
    if min(contexts) < 1 or args.new_tokens < 2 or args.repeats < 1:
        p.error("--contexts, --new-tokens (>= 2) and --repeats must be positive")
    if args.check:
        if "smol" in models:
            from adadecode.model.loader import default_gguf_path

            print(f"check: the default model's GGUF is {default_gguf_path()}")
        print(f"check: would time {models} at contexts {contexts} x {args.new_tokens} new tokens, {args.repeats} "
              f"repeats, paths {paths}; results to {Path(args.out) / result_name(models, '<date>')}")
        return 0
    why = cuda_unavailable_reason()
    if why:
        print(f"engine_latency needs the CUDA engine: {why}", file=sys.stderr)
        return 2

    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_bw / 1e12:.3f} TB/s (read + write)")
    results = {}
    for name in models:
        if name == "smol":
            from adadecode.model.loader import load_model

            model = load_model("default")
            results[name] = run_model(name, model.cfg, model.weights, contexts, args.new_tokens, args.repeats, copy_bw, paths)
            results[name]["model"] = model.source
        elif name == "8b":
            cfg = llama31_8b()
            weights = LlamaWeights.random(cfg, device="cuda", dtype=torch.bfloat16)
            results[name] = run_model(name, cfg, weights, contexts, args.new_tokens, args.repeats, copy_bw, paths)
            results[name]["model"] = "Llama-3.1-8B shape, random bf16 weights"
            del weights
            torch.cuda.empty_cache()
        results[name]["targets"] = TARGETS[name]

    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
              "date": now.isoformat(timespec="seconds"), "device": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
                           "compute_capability": "{}.{}".format(*torch.cuda.get_device_capability())},
              "copy_bandwidth_bytes_per_s": copy_bw, "engine": "cuda", "method": "vanilla greedy",
              "models": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / result_name(models, f"{now:%Y-%m-%d}")
    write_atomic(path, json.dumps(result, indent=2))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
