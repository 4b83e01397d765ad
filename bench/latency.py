"""End-to-end decoding latency: AdaDecode against vanilla decoding and its peers, in one run.

    python bench/latency.py [--model default|PATH] [--heads default|FILE] [--prompts code|general|FILE]
                            [--n-prompts 8] [--max-new-tokens 256] [--methods a,b,...] [--no-replay]
                            [--temperatures 0.7,1.0] [--top-k 0] [--top-p 1.0] [--seed 0] [--unfused] [--check]

Methods, on the same prompts and model:
  hf-eager       transformers `generate`, eager attention (bf16 on the GPU, fp32 on the CPU)
  hf-lookup      transformers `generate` with prompt lookup (`prompt_lookup_num_tokens`, --hf-lookup tokens)
  hf-compile     transformers `generate` with a static cache under torch.compile (GPU only)
  torch-graph    gpt-fast style: the torch reference forward with its decode step in a CUDA graph
  llama.cpp      llama.cpp's server on the BF16 GGUF of the same weights, greedy (when `make bench-peers` has run)
  llama.cpp-lookup  the same with its n-gram lookup speculation (ngram-simple: 3-token match, drafts of --max-chain)
  vanilla        the engine (--engine: auto is CudaEngine where it can run, else CpuEngine), vanilla greedy decoding
  adadecode      the same engine, AdaDecode with the heads
  lookup         the same engine, guesses from the context alone (decoding/context.py), cost-gated
  adadecode+context  AdaDecode with the heads and the context's guesses in one schedule
  layerskip      the same engine, LayerSkip-style drafting from the deepest head
The peers' own exactness: `self_parity` is each lookup peer's tokens against its own plain greedy decoding
(hf-lookup against hf-eager, llama.cpp-lookup against llama.cpp); the engine's methods are compared with the engine's
vanilla (`parity`, which must be 100%).
Seeded sampling (--temperatures, each > 0; empty: none): vanilla, adadecode (heads guess their own draw),
adadecode-argmax (heads guess their argmax) and layerskip again at each temperature, as `method@T0.7`, compared
with vanilla sampling at that temperature and seed (parity must be 100% there too).
Per method: ms/token (median over prompts), tokens/s, speedup over the engine's vanilla, % of the
bandwidth floor (bytes read per token over a device copy measured in this run on a GPU, over a read of 1 GiB
on the CPU engine's threads), token parity with vanilla (AdaDecode and LayerSkip must be 100%: anything else is a
bug and fails the run), early-exit rate, acceptance, mean exit layer, ideal layer-step speedup, and realized/ideal
(the wall-clock speedup over the ideal one of the same run).

Trace replay (GPU): AdaDecode's recorded schedule of every prompt is replayed on a Llama-3.1-8B shape
with random weights (layers scaled to its depth) against a vanilla replay of the same token count;
the realized speedup is compared with the ideal layer-step speedup of the scaled trace.

Without a GPU the CPU engine runs (and says so); --engine torch runs the reference engine, whose numbers are not
representative of either product engine.
JSON and PNG plots go to bench/results/ with the device, versions, command and date.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import bytes_per_token, copy_bandwidth, llama31_8b, run_facts  # noqa: E402
from adadecode import DEFAULT_GAMMA, LLM  # noqa: E402
from adadecode.model.filesys import atomic_path, write_atomic  # noqa: E402
from adadecode.decoding.driver import generate_adadecode  # noqa: E402
from adadecode.testing.trace import RecordingEngine, Trace, replay  # noqa: E402
from adadecode.decoding.common import Generation  # noqa: E402
from adadecode.engines.cuda import cuda_unavailable_reason  # noqa: E402
from adadecode.engines.head import Head  # noqa: E402
from adadecode.engines.select import auto_engine, make_engine  # noqa: E402
from adadecode.heads import prompts as heads_prompts  # noqa: E402
from adadecode.heads.prompt_sets import load_prompts  # noqa: E402

ALL_METHODS = ["hf-eager", "hf-lookup", "hf-compile", "torch-graph", "llama.cpp", "llama.cpp-lookup", "vanilla",
               "adadecode", "lookup", "adadecode+context", "layerskip"]
EXACT = ("adadecode", "layerskip", "lookup", "adadecode+context")
PEER_OF = {"hf-lookup": "hf-eager", "llama.cpp-lookup": "llama.cpp"}  # a lookup peer and its own plain decoding
EVAL_SETS = {"humaneval": heads_prompts.humaneval, "general-heldout": heads_prompts.general_heldout,
             "code-edit": heads_prompts.code_edit, "grounded": heads_prompts.grounded}
DEFAULT_HEADS = {"code": "default:code", "humaneval": "default:code", "general": "default:general",
                 "general-heldout": "default:general", "code-edit": "default:code", "grounded": "default:general"}



def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ---- methods -----------------------------------------------------------------------------------------------------
class HFMethod:
    """transformers generate, timed as (time for N tokens - time for the first) / (N - 1)."""

    def __init__(self, model, compile_: bool, lookup: int = 0):
        from transformers import LlamaForCausalLM

        from adadecode.model.loader import default_model_dir

        src = model.source
        path = default_model_dir() if src.startswith("default") else Path(src)
        if not path.is_dir():
            raise RuntimeError(f"{src} is not an HF checkpoint directory")
        gpu = torch.cuda.is_available()
        if compile_ and not gpu:
            raise RuntimeError("static cache + torch.compile is only timed on the GPU")
        self.device = "cuda" if gpu else "cpu"
        self.hf = LlamaForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16 if gpu else torch.float32,
                                                   attn_implementation="eager").to(self.device).eval()
        self.kwargs = {"prompt_lookup_num_tokens": lookup} if lookup else {}
        if compile_:
            self.hf.forward = torch.compile(self.hf.forward, mode="reduce-overhead", fullgraph=True)
            self.kwargs = {"cache_implementation": "static"}
        self.eos = list(model.eos_ids)

    def __call__(self, prompt, n) -> Generation:
        ids = torch.tensor([prompt], device=self.device)
        common = dict(do_sample=False, eos_token_id=self.eos, pad_token_id=self.eos[0], **self.kwargs)
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            self.hf.generate(ids, max_new_tokens=1, **common)
            sync()
            t1 = time.perf_counter()
            out = self.hf.generate(ids, max_new_tokens=n, **common)
            sync()
            t2 = time.perf_counter()
        tokens = out[0, len(prompt):].tolist()
        return Generation(prompt_tokens=list(prompt), tokens=tokens, seconds=t2 - t1,
                          decode_seconds=max(t2 - t1 - (t1 - t0), 1e-9))


def summarize(name: str, gens: list[Generation], ref: list[Generation] | None, n_layers: int) -> dict:
    ms = [g.ms_per_token for g in gens if g.ms_per_token == g.ms_per_token]
    row = {"method": name, "ms_per_token": statistics.median(ms) if ms else float("nan"),
           "tokens": sum(len(g.tokens) for g in gens), "per_prompt_ms": ms}
    row["tokens_per_s"] = 1e3 / row["ms_per_token"] if ms else float("nan")
    if ref is not None:
        same = sum(g.tokens == r.tokens for g, r in zip(gens, ref))
        agree = sum(a == b for g, r in zip(gens, ref) for a, b in zip(g.tokens, r.tokens))
        row["parity_prompts"] = same / len(gens)
        row["parity_tokens"] = agree / max(1, sum(len(r.tokens) for r in ref))
    st = [g.stats for g in gens if "exit_layer_hist" in g.stats]  # the early-exit methods
    if st:
        toks, acc = sum(s["tokens"] for s in st), sum(s["accepted"] for s in st)
        verified = acc + sum(s["rejected"] for s in st)
        row["early_exit_rate"] = acc / max(1, toks)  # share of output tokens that came from an early exit
        row["early_per_token"] = sum(s["early"] for s in st) / max(1, toks)  # exits taken, wrong ones included
        row["acceptance"] = acc / max(1, verified)  # of the early tokens verified, the share confirmed
        hist: dict[int, int] = {}
        for s in st:
            for layer, c in s["exit_layer_hist"].items():
                hist[int(layer)] = hist.get(int(layer), 0) + c
        row["exit_layer_hist"] = dict(sorted(hist.items()))
        row["mean_exit_layer"] = sum(k * v for k, v in hist.items()) / max(1, sum(hist.values())) if hist else None
        row["ideal_layer_step_speedup"] = sum(s["vanilla_layer_steps"] for s in st) / max(1, sum(s["layer_steps"] for s in st))
        row["tokens_per_step"] = sum(s["tokens"] - 1 for s in st) / max(1, sum(s["verify_calls"] for s in st))
        for src in ("heads", "context"):
            got = [s["sources"][src] for s in st if "sources" in s]
            if got and any(g["guesses"] for g in got):
                g = {f: sum(x[f] for x in got) for f in ("guesses", "accepted", "rejected", "discarded")}
                row[f"{src}_guesses"] = g
                row[f"{src}_acceptance"] = g["accepted"] / max(1, g["accepted"] + g["rejected"])
        modeled = [s["modeled_speedup"] for s in st if "modeled_speedup" in s]
        if len(modeled) == len(st):  # the engine's measured step cost priced every step: the ideal in wall-clock terms
            row["ideal_speedup"] = statistics.median(modeled)
    return row


def random_8b_engine(max_seq: int, fused: bool = True):
    """A CudaEngine of the Llama-3.1-8B shape with random bf16 weights made on the GPU."""
    from adadecode.model.weights import LlamaWeights

    cfg = llama31_8b()
    weights = LlamaWeights.random(cfg, device="cuda", dtype=torch.bfloat16)
    engine = make_engine(type("M", (), {"cfg": cfg, "weights": weights})(), "cuda", max_seq=max_seq, max_rows=16)
    engine.fused = fused
    return engine, cfg


def trace_replay(traces: list[Trace], max_seq: int, fused: bool = True) -> dict:
    engine, cfg = random_8b_engine(max_seq, fused)
    rows = []
    for tr in traces:
        ada, van = tr.scaled(cfg.n_layers), tr.vanilla().scaled(cfg.n_layers)
        engine.set_heads([Head.identity(layer, cfg.d).to("cuda", torch.bfloat16) for layer in ada.head_layers])
        times = {}
        for name, t in (("vanilla", van), ("adadecode", ada), ("vanilla2", van), ("adadecode2", ada)):
            prefill = [c for c in t.calls if c[0] == "prefill"][0]
            engine.prefill(prefill[1][0])
            rest = Trace(t.n_layers, t.head_layers, [c for c in t.calls if c[0] != "prefill"], t.meta)
            sync()
            t0 = time.perf_counter()
            replay(engine, rest, skip_prefill=True)
            sync()
            times[name] = time.perf_counter() - t0
        realized = min(times["vanilla"], times["vanilla2"]) / min(times["adadecode"], times["adadecode2"])
        ideal = van.layer_steps / max(1, ada.layer_steps)
        rows.append({"ideal": ideal, "realized": realized, "ratio": realized / ideal})
    return {"shape": "Llama-3.1-8B (random bf16 weights)", "path": "fused" if fused else "unfused", "per_prompt": rows,
            "ideal_speedup": statistics.median(r["ideal"] for r in rows),
            "realized_speedup": statistics.median(r["realized"] for r in rows),
            "realized_over_ideal": statistics.median(r["ratio"] for r in rows)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["methods"] if r.get("speedup") == r.get("speedup") and "speedup" in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    ax.bar([r["method"] for r in rows], [r["speedup"] for r in rows], color="tab:blue")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylabel("speedup over engine vanilla (ms/token ratio)")
    ax.set_title(f"{result['model']}\n{result['device']}", fontsize=9)
    ax.tick_params(axis="x", rotation=30)
    ada = next((r for r in result["methods"] if r["method"] == "adadecode"), None)
    ax = axes[1]
    if ada and ada.get("exit_layer_hist"):
        h = ada["exit_layer_hist"]
        ax.bar([int(k) for k in h], list(h.values()), color="tab:green")
        ax.set_xlabel("exit layer")
        ax.set_ylabel("early exits")
        ax.set_title(f"AdaDecode exits: rate {ada['early_exit_rate']:.0%}, acceptance {ada['acceptance']:.0%}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def prompt_set(name: str, tok, meta: dict) -> list[list[int]]:
    """Token ids of a prompt set: 'humaneval' (plain completion, as HumanEval is), 'general-heldout' (hand-written
    chat prompts no head was trained on), 'code' / 'general' / a file (chat template)."""
    if name in EVAL_SETS:  # evaluation sets: never trained on
        return [heads_prompts.encode(tok, p) for p in EVAL_SETS[name]()]
    texts = load_prompts(name)
    training = meta.get("training") if isinstance(meta.get("training"), dict) else {}
    used = (training.get("prompts") or {}).get("total", 0)
    if f"'{name}'" in str(meta.get("description", "")) and used < len(texts):
        texts = texts[used:]  # the heads were trained on the first `used` prompts of this set: time the others
    return [tok.encode_chat(t) for t in texts]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--heads", default=None, help="head file or default[:code|:general] (default: matches --prompts)")
    p.add_argument("--prompts", default="code", help="humaneval, general-heldout (never trained on), code, general or a "
                                                    "file (JSON list / one prompt per line)")
    p.add_argument("--n-prompts", type=int, default=None, help="default: 8 on a GPU, 6 on the CPU engine, 2 on the torch engine")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 256 on a GPU, 64 on the CPU engine, 32 on the torch engine")
    p.add_argument("--methods", default=",".join(ALL_METHODS))
    p.add_argument("--gamma", type=float, default=None)
    p.add_argument("--max-pending", type=int, default=5)
    p.add_argument("--k", type=int, default=4, help="LayerSkip draft length")
    p.add_argument("--max-chain", type=int, default=8, help="context guesses: the longest chain (and llama.cpp's draft)")
    p.add_argument("--hf-lookup", type=int, default=10, help="hf-lookup: transformers' prompt_lookup_num_tokens")
    p.add_argument("--no-replay", action="store_true", help="skip the 8B-shape trace replay")
    p.add_argument("--temperatures", default="0.7,1.0", help="sampled runs beside greedy (comma list; '' for none)")
    p.add_argument("--top-k", type=int, default=0, help="sampled runs: top-k (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sampled runs: top-p (1: off)")
    p.add_argument("--seed", type=int, default=0, help="sampled runs: the seed")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--engine", default="auto", help="auto (cuda where it can run, else cpu), cuda, cpu, torch")
    p.add_argument("--threads", type=int, default=None, help="the CPU engine's threads (default: the cores)")
    p.add_argument("--unfused", action="store_true",
                   help="the CUDA engine's unfused decode path (9 launches per layer), here and in the trace replay")
    p.add_argument("--check", action="store_true",
                   help="check the arguments and the inputs (prompt set, heads), say what would run, and exit")
    args = p.parse_args(argv)
    from tqdm import tqdm

    gpu = torch.cuda.is_available()
    engine_name = auto_engine() if args.engine == "auto" else args.engine
    n_prompts = args.n_prompts or (8 if gpu and engine_name == "cuda" else 6 if engine_name == "cpu" else 2)
    max_new = args.max_new_tokens or (256 if gpu and engine_name == "cuda" else 64 if engine_name == "cpu" else 32)
    methods = [m for m in args.methods.split(",") if m]
    unknown = set(methods) - set(ALL_METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}")
    temps = [v for v in args.temperatures.split(",") if v.strip()]
    try:
        bad_t = [t for t in temps if not float(t) > 0]
    except ValueError:
        p.error(f"--temperatures takes comma-separated numbers, got {args.temperatures!r}")
    if bad_t:
        p.error(f"--temperatures: {bad_t} not > 0 (greedy always runs)")
    heads_spec = args.heads or DEFAULT_HEADS.get(args.prompts, "default")
    if args.check:
        n_set = len(EVAL_SETS[args.prompts]()) if args.prompts in EVAL_SETS else len(load_prompts(args.prompts))
        if not (heads_spec.startswith("default") or Path(heads_spec).is_file()):
            p.error(f"--heads {heads_spec}: no such head file")
        print(f"check: would decode {min(n_prompts, n_set)} of {n_set} '{args.prompts}' prompts x {max_new} tokens with "
              f"{methods} (+ {len(temps)} sampled temperatures), heads {heads_spec}, "
              f"{'unfused' if args.unfused else 'fused'} decode path, trace replay {'off' if args.no_replay else 'on'}; "
              f"results to {args.out}")
        return 0
    if not gpu:
        print(f"note: no GPU ({cuda_unavailable_reason()}); engine {engine_name} on the CPU"
              + (" (the reference engine: NOT representative of the product engines)" if engine_name == "torch"
                 else ""), file=sys.stderr)

    # the baselines read the model's torch weights: the CPU engine's packed copy does not replace them here
    llm = LLM(args.model, heads=heads_spec, max_rows=max(16, args.max_pending + 1, args.k + 1, args.max_chain + 1),
              engine=args.engine, threads=args.threads, release_weights=False)
    model, heads, meta = llm.model, llm.heads, llm.heads_meta
    gamma = args.gamma if args.gamma is not None else meta.get("gammas") or float(meta.get("gamma", DEFAULT_GAMMA))
    prompts = prompt_set(args.prompts, llm.tokenizer, meta)[:n_prompts]
    max_seq = max(len(x) for x in prompts) + max_new + 8
    engine = llm.engine
    eos = model.eos_ids
    if args.unfused:
        if not hasattr(engine, "fused"):
            p.error(f"--unfused needs the CUDA engine (this run's engine is {engine.name})")
        engine.fused = False

    # the API's generate, without text options: the driver runs with no per-token callback, as a bare call would
    runners = {
        "vanilla": lambda x, n: llm.generate(x, max_new_tokens=n, method="vanilla"),
        "adadecode": lambda x, n: llm.generate(x, max_new_tokens=n, method="adadecode", gamma=gamma,
                                               max_pending=args.max_pending),
        "layerskip": lambda x, n: llm.generate(x, max_new_tokens=n, method="layerskip", k=args.k),
        "lookup": lambda x, n: llm.generate(x, max_new_tokens=n, method="lookup", max_chain=args.max_chain),
        "adadecode+context": lambda x, n: llm.generate(x, max_new_tokens=n, method="adadecode", gamma=gamma,
                                                       max_pending=args.max_pending, context=True,
                                                       max_chain=args.max_chain),
    }
    from adadecode.engines.cost import step_cost

    cost = step_cost(engine)  # measured once (or from the cache) before any timing: every engine method is priced
    print(f"step cost of R rows over one (this engine, this machine): {cost.relative()[:8]} ({cost.source})",
          file=sys.stderr)
    sampled = []  # method@T rows: the exact methods again under seeded sampling
    for t in [float(v) for v in temps]:
        kw = dict(temperature=t, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        tag = f"@T{t:g}"
        runs = {"vanilla": lambda x, n, kw=kw: llm.generate(x, max_new_tokens=n, method="vanilla", **kw)}
        if "adadecode" in methods:
            for name, guess in (("adadecode", "sample"), ("adadecode-argmax", "argmax")):
                runs[name] = lambda x, n, kw=kw, guess=guess: llm.generate(
                    x, max_new_tokens=n, method="adadecode", gamma=gamma, max_pending=args.max_pending,
                    head_guess=guess, **kw)
        if "layerskip" in methods:
            runs["layerskip"] = lambda x, n, kw=kw: llm.generate(x, max_new_tokens=n, method="layerskip", k=args.k,
                                                                 **kw)
        for name, run in runs.items():
            runners[name + tag] = run
            sampled.append(name + tag)
    skipped = {}
    stack = contextlib.ExitStack()  # the peer servers, stopped at the end whatever happens
    for name, build in (("hf-eager", lambda: HFMethod(model, False)), ("hf-compile", lambda: HFMethod(model, True)),
                        ("hf-lookup", lambda: HFMethod(model, False, lookup=args.hf_lookup)),
                        ("llama.cpp", None), ("llama.cpp-lookup", None), ("torch-graph", None)):
        if name not in methods:
            continue
        try:
            if name.startswith("llama.cpp"):
                from llama_server import LlamaServer, peer_gguf

                gguf = peer_gguf("BF16")
                if gguf is None:
                    raise RuntimeError("no BF16 GGUF of the default model under .peers/: run `make bench-peers`")
                srv = stack.enter_context(LlamaServer(gguf, threads=getattr(engine, "threads", 1),
                                                      lookup=name.endswith("lookup"), draft=args.max_chain,
                                                      ctx=max_seq + 64))

                def run_server(x, n, srv=srv):
                    toks, ms, _ = srv.complete(x, n)
                    return Generation(prompt_tokens=list(x), tokens=toks, seconds=ms * len(toks) / 1e3,
                                      decode_seconds=ms * max(0, len(toks) - 1) / 1e3)

                runners[name] = run_server
            elif name == "torch-graph":
                from adadecode.decoding.graphed import GraphedDecoder
                from adadecode.engines.torch import TorchEngine

                dec = GraphedDecoder(TorchEngine(model.cfg, model.weights, device="cuda" if gpu else "cpu",
                                                 dtype=torch.bfloat16 if gpu else torch.float32, max_seq=max_seq))
                runners[name] = lambda x, n, d=dec: d.generate(x, n, eos_ids=eos)
            else:
                runners[name] = build()
        except Exception as e:  # a baseline that cannot run on the installed versions is reported, not fatal
            skipped[name] = f"{type(e).__name__}: {e}"
    order = [m for m in ["vanilla"] + methods + sampled if m in runners]
    order = sorted(order, key=lambda m: m not in PEER_OF.values())  # a lookup peer's own plain run comes first
    order = list(dict.fromkeys(order))

    gens: dict[str, list[Generation]] = {m: [] for m in order}
    traces: list[Trace] = []
    try:
        for m in order:  # warm-up: graphs, compilation, allocator
            try:
                runners[m](prompts[0], min(8, max_new))
            except Exception as e:
                if m.split("@")[0] in EXACT + ("vanilla", "adadecode-argmax"):
                    raise  # the product's own methods never fail quietly
                skipped[m] = f"{type(e).__name__}: {e}"
        order = [m for m in order if m not in skipped]
        bar = tqdm(total=len(order) * len(prompts), desc="decoding", file=sys.stderr)
        for x in prompts:  # the methods side by side on each prompt: a machine's slow spell touches all of them alike
            for m in order:
                if m in skipped:
                    continue
                try:
                    gens[m].append(runners[m](x, max_new))
                except Exception as e:
                    if m.split("@")[0] in EXACT + ("vanilla", "adadecode-argmax"):
                        raise
                    skipped[m] = f"{type(e).__name__}: {e}"
                bar.update(1)
        bar.close()
    finally:
        stack.close()
    order = [m for m in order if m not in skipped]
    if gpu and not args.no_replay and "adadecode" in order:
        for x in prompts:  # record each prompt's schedule (the decisions replayed on the 8B shape)
            rec = RecordingEngine(engine)
            g = generate_adadecode(rec, x, max_new, gamma=gamma, eos_ids=eos, max_pending=args.max_pending)
            traces.append(Trace(n_layers=model.cfg.n_layers, head_layers=[h.layer for h in heads], calls=rec.calls,
                                meta={"tokens": len(g.tokens)}))

    bw = copy_bandwidth() if engine.name == "cuda" else None
    if engine.name == "cpu":
        from adadecode.testing.probes import read_bandwidth

        bw = read_bandwidth(engine.threads)
    rows = []
    for m in order:
        base = "vanilla" + m[m.index("@"):] if "@" in m else "vanilla"  # the same temperature's vanilla
        ref = gens[base]
        row = summarize(m, gens[m], None if m == base else ref, model.cfg.n_layers)
        if m in PEER_OF and PEER_OF[m] in gens:  # the peer against its own plain greedy decoding
            own = gens[PEER_OF[m]]
            row["self_parity"] = sum(g.tokens == r.tokens for g, r in zip(gens[m], own)) / len(own)
            row["speedup_over_own"] = statistics.median(r.ms_per_token for r in own) / row["ms_per_token"]
        row["speedup"] = statistics.median(r.ms_per_token for r in ref) / row["ms_per_token"]
        ideal = row.get("ideal_speedup") or row.get("ideal_layer_step_speedup")
        if ideal:
            row["realized_over_ideal"] = row["speedup"] / ideal
        if bw:
            ctx = statistics.mean(len(x) + len(g.tokens) / 2 for x, g in zip(prompts, gens[m]))
            row["pct_bandwidth_floor"] = 100 * bytes_per_token(model.cfg, ctx) / bw / (row["ms_per_token"] / 1e3)
        rows.append(row)
    bugs = [r["method"] for r in rows
            if r["method"].split("@")[0] in EXACT + ("adadecode-argmax",) and r.get("parity_prompts") != 1.0]

    facts = run_facts("bench/latency.py", argv)
    result = {**facts, "representative": engine.name in ("cuda", "cpu"),
              "engine": engine.name, "path": "unfused" if args.unfused else "fused", "model": model.source, "heads": heads_spec, "head_layers": [h.layer for h in heads],
              "gamma": gamma, "max_pending": args.max_pending, "prompts": args.prompts, "n_prompts": len(prompts),
              "sampling": {"temperatures": args.temperatures, "top_k": args.top_k, "top_p": args.top_p,
                           "seed": args.seed},
              "max_new_tokens": max_new,
              ("copy_bandwidth_GBps" if engine.name == "cuda" else "read_bandwidth_GBps"): bw / 1e9 if bw else None,
              **({"threads": engine.threads, "isa": engine.isa} if engine.name == "cpu" else {}),
              "methods": rows, "skipped": skipped}
    result["versions"]["transformers"] = __import__("transformers").__version__
    if traces:
        try:
            result["trace_replay"] = trace_replay(traces, max_seq=max_seq, fused=not args.unfused)
        except Exception as e:
            result["trace_replay"] = {"error": f"{type(e).__name__}: {e}"}

    threads = f" ({engine.threads} threads, {engine.isa})" if engine.name == "cpu" else ""
    print(f"\n{result['model']} | {result['device']} | engine {engine.name}{threads} | heads {heads_spec} "
          f"{result['head_layers']} gamma {gamma} | {len(prompts)} prompts x {max_new} tokens ({args.prompts})")
    print(f"{'method':<22} {'ms/tok':>9} {'tok/s':>8} {'speedup':>8} {'%floor':>7} {'parity':>7} {'exit':>6} "
          f"{'accept':>7} {'exit L':>7} {'tok/st':>6} {'ideal':>6} {'real/id':>7} {'self':>5}")
    for r in rows:
        def f(key, fmt, scale=1.0):
            return fmt % (scale * r[key]) if r.get(key) is not None else "-"

        print(f"{r['method']:<22} {r['ms_per_token']:9.3f} {r['tokens_per_s']:8.1f} {r['speedup']:8.2f} "
              f"{f('pct_bandwidth_floor', '%.0f%%'):>7} {f('parity_prompts', '%.0f%%', 100):>7} "
              f"{f('early_exit_rate', '%.2f'):>6} {f('acceptance', '%.2f'):>7} {f('mean_exit_layer', '%.1f'):>7} "
              f"{f('tokens_per_step', '%.2f'):>6} {f('ideal_speedup', '%.2f') if r.get('ideal_speedup') else f('ideal_layer_step_speedup', '%.2f'):>6} "
              f"{f('realized_over_ideal', '%.2f'):>7} {f('self_parity', '%.0f%%', 100):>5}")
    for m, why in skipped.items():
        print(f"{m:<22} not run: {why}")
    if "trace_replay" in result:
        tr = result["trace_replay"]
        if "error" in tr:
            print(f"trace replay: failed: {tr['error']}")
        else:
            print(f"trace replay on {tr['shape']}: ideal {tr['ideal_speedup']:.2f}x, realized {tr['realized_speedup']:.2f}x "
                  f"({100 * tr['realized_over_ideal']:.0f}% of ideal; target >= 90%)")
    if engine.name == "torch":
        print("(the torch reference engine: not representative of the product engines)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    where = "gpu" if engine.name == "cuda" else "cpu" if engine.name == "cpu" else f"{engine.name}-{'gpu' if gpu else 'cpu'}"
    stem = out / (f"latency-{where}-{args.prompts if args.prompts in DEFAULT_HEADS else 'custom'}"
                  f"{'-unfused' if args.unfused else ''}-{facts['date'][:10]}")
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=2))
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json and .png")
    if bugs:
        print(f"BUG: {bugs} did not reproduce vanilla's tokens on every prompt", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
