"""The CPU engine beside its peers, in one run, on the same weights at the same precision: vanilla greedy decoding.

    python bench/cpu_engine.py [--threads 1,2] [--tokens 64] [--prompts 3] [--llama-bench PATH] [--gguf PATH]
                               [--peers llama.cpp,transformers,torch] [--layers] [--out bench/results]

Per thread count (each peer is told the same count):
  read bandwidth  a STREAM-like read of 1 GiB (adadecode.testing.probes.read_bandwidth): the ceiling, measured in this run
  cpu             CpuEngine (bf16 weights, fp32 accumulation), vanilla greedy decoding of chat prompts
  llama.cpp       llama-bench tg (decode) and pp (prefill) on a BF16 GGUF of the same weights (its requantisation of
                  the shipped Q4_1 GGUF: the values the project's loader holds, checked bit for bit here)
  transformers    LlamaForCausalLM.generate, greedy, bf16 and fp32 (the HF checkpoint the default model caches)
  torch           TorchEngine (the oracle), fp32 and bf16
ms/token (the median over prompts of decode time / tokens, prefill excluded), tokens/s, and the CPU engine's share
of the read bandwidth: the bytes a decode step must read (every weight once, the KV cache at the mean context) over
the bandwidth and the time. Prefill: tokens/s of one prompt of --prefill tokens, beside llama.cpp's pp of the same
length. --layers adds one layer's time for R = 1..8 rows (run_layers on the default model, the fused step).
--load adds the same decoding while other processes keep cores busy (a spinning process per core named: `--load
1,2`), CpuEngine beside TorchEngine bf16, each at 1 and 2 threads: the thread pool must not collapse there.

llama.cpp is not a dependency: `make bench-peers` builds llama-bench and llama-quantize from the llama-cpp-python
source package into .peers/ (about 15 minutes on 2 cores) and writes .peers/smollm2-BF16.gguf. Without it the
llama.cpp rows are skipped and the run says why. JSON, a Markdown table and a PNG go to --out, named by date.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import bytes_per_token, run_facts  # noqa: E402
from adadecode.model.filesys import atomic_path, write_atomic  # noqa: E402
from adadecode.decoding.vanilla import generate_vanilla  # noqa: E402
from adadecode.engines.cpu import CpuEngine, CpuWeights, cpu_unavailable_reason  # noqa: E402
from adadecode.testing.probes import fma_peak, read_bandwidth  # noqa: E402
from adadecode.engines.torch import TorchEngine  # noqa: E402
from adadecode.heads.prompt_sets import load_prompts  # noqa: E402
from adadecode.model.loader import default_model_dir, load_model  # noqa: E402

PEERS = ("llama.cpp", "transformers", "torch")
PEERS_DIR = ROOT / ".peers"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU"


def decode_ms(run, prompts, n) -> tuple[float, list[float]]:
    """Median ms/token of run(prompt, n) -> (seconds of decoding, tokens), one warm-up first."""
    run(prompts[0], min(n, 8))
    per = []
    for x in prompts:
        s, k = run(x, n)
        per.append(1e3 * s / max(1, k))
    return statistics.median(per), per


def engine_runner(engine):
    def run(prompt, n):
        g = generate_vanilla(engine, prompt, n, eos_ids=[])  # no EOS: every prompt runs n tokens
        return g.decode_seconds, len(g.tokens) - 1
    return run


def sampled_runner(engine, temperature):
    def run(prompt, n):
        g = generate_vanilla(engine, prompt, n, eos_ids=[], temperature=temperature, seed=1)
        return g.decode_seconds, len(g.tokens) - 1
    return run


def hf_runner(dtype, eos):
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(str(default_model_dir()), dtype=dtype, attn_implementation="eager").eval()

    def run(prompt, n):
        ids = torch.tensor([prompt])
        kw = dict(do_sample=False, eos_token_id=None, pad_token_id=eos, min_new_tokens=n)
        with torch.no_grad():
            t0 = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, **kw | {"min_new_tokens": 1})
            t1 = time.perf_counter()
            hf.generate(ids, max_new_tokens=n, **kw)
            t2 = time.perf_counter()
        return max(t2 - t1 - (t1 - t0), 1e-9), n - 1
    return run


def llama_bench(exe: Path, gguf: Path, threads: list[int], n: int, pp: int, reps: int) -> dict:
    """{threads: {"tg_ms": ..., "pp_tps": ...}} from llama-bench's JSON."""
    cmd = [str(exe), "-m", str(gguf), "-t", ",".join(map(str, threads)), "-p", str(pp), "-n", str(n),
           "-r", str(reps), "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {r.stderr[-500:]}")
    out: dict[int, dict] = {}
    for row in json.loads(r.stdout):
        t = int(row["n_threads"])
        tps = float(row["avg_ts"])
        if int(row.get("n_gen", 0)) > 0:
            out.setdefault(t, {})["tg_ms"] = 1e3 / tps
        else:
            out.setdefault(t, {})["pp_tps"] = tps
    return out


def same_weights(gguf: Path, model) -> bool:
    """The GGUF holds the default model's weights, bit for bit (as this project's loader reads both)."""
    other = load_model(str(gguf))
    a, b = model.weights.to_hf_state(model.cfg), other.weights.to_hf_state(other.cfg)
    return other.cfg == model.cfg and set(a) == set(b) and all(torch.equal(a[k].view(torch.int16), b[k].view(torch.int16)) for k in a)


def layer_flops_bytes(cfg, R: int, context: int) -> tuple[float, float]:
    """FLOPs and weight bytes of one decoder layer for R rows at about `context` positions: 2 per multiply-add of
    the projections and of attention (scores and P.V over the context), the bf16 weights read once."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    params = (q + 2 * kv) * cfg.d + cfg.d * q + 3 * cfg.ffn_dim * cfg.d
    attn = 2 * cfg.n_heads * cfg.head_dim * context
    return 2.0 * R * (params + attn), 2.0 * params


def prefill_flops(cfg, n: int) -> float:
    """FLOPs of a prefill of n tokens (the layers; prefill computes no logits): the projections and causal attention."""
    return sum(layer_flops_bytes(cfg, 1, p + 1)[0] for p in range(n)) * cfg.n_layers


def layer_times(model, packed, threads: int, prompt: list[int]) -> dict:
    """One decoder layer's time (median of 7, ms) for R = 1..8 rows on the default model."""
    e = CpuEngine(model.cfg, packed, max_seq=len(prompt) + 16, max_rows=8, threads=threads)
    e.prefill(prompt)
    n, L = len(prompt), model.cfg.n_layers
    out = {}
    for R in range(1, 9):
        ts = []
        for _ in range(7):
            e.truncate(n)
            for i in range(R):
                e.embed(n + i, 100 + i)
            t0 = time.perf_counter()
            e.run_layers(n, n + R - 1, 0, L)
            ts.append((time.perf_counter() - t0) / L)
        out[R] = 1e3 * statistics.median(ts)
    return out


class Load:
    """n processes that spin on a core each while the block runs (another job on a shared machine)."""

    def __init__(self, n: int):
        self.n, self.procs = n, []

    def __enter__(self):
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(self.n)]
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        for pr in self.procs:
            pr.kill()
        for pr in self.procs:
            pr.wait()


def contended(model, packed, prompts, n, loads: list[int], threads: list[int]) -> dict:
    """ms/token of CpuEngine and TorchEngine bf16 at each thread count, with `load` spinning processes."""
    out = {}
    max_seq = max(map(len, prompts)) + n + 8
    for load in loads:
        for t in threads:
            torch.set_num_threads(t)
            cpu = CpuEngine(model.cfg, packed, max_seq=max_seq, threads=t)
            ref = TorchEngine(model.cfg, model.weights, dtype=torch.bfloat16, max_seq=max_seq)
            with Load(load):
                a, _ = decode_ms(engine_runner(cpu), prompts, n)
                b, _ = decode_ms(engine_runner(ref), prompts[:1], min(n, 16))
            out[f"load {load}, {t} threads"] = {"cpu (bf16)": a, "TorchEngine (bf16)": b}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = result["threads"]
    names = [k for k in result["rows"][str(threads[0])] if k != "read_GBps"]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / max(1, len(threads))
    for i, t in enumerate(threads):
        rows = result["rows"][str(t)]
        ax.bar([j + i * width for j in range(len(names))], [rows[n]["ms_per_token"] for n in names], width,
               label=f"{t} thread{'s' if t > 1 else ''}")
        floor = result["floor_ms"][str(t)]
        ax.axhline(floor, color=f"C{i}", ls=":", lw=1)
    ax.set_xticks([j + width * (len(threads) - 1) / 2 for j in range(len(names))], names, rotation=20, ha="right")
    ax.set_ylabel("ms / token (lower is better); dotted: byte floor")
    ax.set_title(f"{result['model']} on {result['cpu']}, {result['date'][:10]}")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    p.add_argument("--prompts", type=int, default=3, help="chat prompts (the general set)")
    p.add_argument("--prefill", type=int, default=128, help="prompt length of the prefill measurement")
    p.add_argument("--peers", default=",".join(PEERS))
    p.add_argument("--llama-bench", default=str(PEERS_DIR / "llama-bench"))
    p.add_argument("--gguf", default=str(PEERS_DIR / "smollm2-BF16.gguf"))
    p.add_argument("--layers", action="store_true", help="one layer's time for R = 1..8 rows")
    p.add_argument("--load", default="", help="spinning processes to run beside (comma list, e.g. 1,2; '' for none)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    why = cpu_unavailable_reason()
    if why:
        p.error(why)

    threads = [int(t) for t in args.threads.split(",") if t]
    peers = [x for x in args.peers.split(",") if x]
    model = load_model("default")
    packed = CpuWeights(model.cfg, model.weights)
    texts = load_prompts("general")[: args.prompts]
    prompts = [model.tokenizer.encode_chat(t) for t in texts]
    max_seq = max(map(len, prompts)) + args.tokens + 8
    ctx = statistics.mean(len(x) + args.tokens / 2 for x in prompts)
    need = bytes_per_token(model.cfg, ctx)
    long_prompt = (sum(prompts, []) * 8)[: args.prefill]
    facts = run_facts("bench/cpu_engine.py", argv)
    result = {**facts, "cpu": cpu_name(), "model": model.source, "threads": threads, "tokens": args.tokens,
              "prompts": len(prompts), "bytes_per_token": need, "rows": {}, "floor_ms": {}, "prefill": {},
              "skipped": {}, "isa": None, "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    llama = None
    if "llama.cpp" in peers:
        exe, gguf = Path(args.llama_bench), Path(args.gguf)
        if not exe.is_file() or not gguf.is_file():
            result["skipped"]["llama.cpp"] = f"{exe} or {gguf} missing (make bench-peers builds them)"
        elif not same_weights(gguf, model):
            result["skipped"]["llama.cpp"] = f"{gguf} does not hold the default model's weights"
        else:
            llama = llama_bench(exe, gguf, threads, args.tokens, args.prefill, reps=3)
            result["llama_cpp"] = {"gguf": str(gguf), "llama_bench": str(exe)}
    for t in threads:
        torch.set_num_threads(t)
        rows = {}
        bw = read_bandwidth(t)
        peak = fma_peak(t)
        result.setdefault("fma_peak_gflops", {})[str(t)] = peak / 1e9
        result["floor_ms"][str(t)] = 1e3 * need / bw
        eng = CpuEngine(model.cfg, packed, max_seq=max(max_seq, args.prefill + 1), threads=t)
        result["isa"] = eng.isa
        ms, per = decode_ms(engine_runner(eng), prompts, args.tokens)
        rows["cpu (bf16)"] = {"ms_per_token": ms, "per_prompt_ms": per,
                              "pct_read_bandwidth": 100 * result["floor_ms"][str(t)] / ms}
        pre = []
        for _ in range(3):
            t0 = time.perf_counter()
            eng.prefill(long_prompt)
            pre.append(len(long_prompt) / (time.perf_counter() - t0))
        result["prefill"].setdefault(str(t), {})["cpu (bf16)"] = max(pre)
        result.setdefault("prefill_pct_fma_peak", {})[str(t)] = (
            100 * max(pre) * prefill_flops(model.cfg, len(long_prompt)) / len(long_prompt) / peak)
        # seeded sampling (temperature 0.7, drawn in C++ after the LM head) against greedy, the same prompts
        ms_s, _ = decode_ms(sampled_runner(eng, 0.7), prompts, args.tokens)
        result.setdefault("sampled_ms_per_token", {})[str(t)] = {"temperature 0.7": ms_s, "greedy": ms,
                                                               "ratio": ms_s / ms}
        del eng
        if llama is not None and t in llama:
            rows["llama.cpp (BF16)"] = {"ms_per_token": llama[t]["tg_ms"]}
            result["prefill"][str(t)]["llama.cpp (BF16)"] = llama[t].get("pp_tps")
        if "transformers" in peers:
            for name, dt in (("transformers (bf16)", torch.bfloat16), ("transformers (fp32)", torch.float32)):
                try:
                    ms, per = decode_ms(hf_runner(dt, model.eos_ids[0]), prompts, args.tokens)
                    rows[name] = {"ms_per_token": ms, "per_prompt_ms": per}
                except Exception as e:  # a peer that cannot run is reported, not fatal
                    result["skipped"][name] = f"{type(e).__name__}: {e}"
        if "torch" in peers:
            for name, dt in (("TorchEngine (fp32)", torch.float32), ("TorchEngine (bf16)", torch.bfloat16)):
                ms, per = decode_ms(engine_runner(TorchEngine(model.cfg, model.weights, dtype=dt, max_seq=max_seq)),
                                    prompts, args.tokens)
                rows[name] = {"ms_per_token": ms, "per_prompt_ms": per}
        for r in rows.values():
            r["tokens_per_s"] = 1e3 / r["ms_per_token"]
        rows["read_GBps"] = bw / 1e9
        result["rows"][str(t)] = rows
    if args.layers:
        result["layer_ms"] = {str(t): layer_times(model, packed, t, prompts[0]) for t in threads}
    loads = [int(x) for x in args.load.split(",") if x]
    if loads:
        result["contended_ms_per_token"] = contended(model, packed, prompts, args.tokens, loads, threads)

    names = [k for k in result["rows"][str(threads[0])] if k != "read_GBps"]
    lines = [f"{result['model']} on {result['cpu']} ({result['isa']} kernels), {result['date'][:10]}; "
             f"{len(prompts)} chat prompts x {args.tokens} tokens, greedy; `{result['command']}`", "",
             f"Load average at the start (other processes on this machine): {result['load_average']}", "",
             "| system | " + " | ".join(f"{t} thread{'s' if t > 1 else ''} ms/token (tok/s)" for t in threads) + " |",
             "| --- | " + " | ".join("---" for _ in threads) + " |"]
    for n in names:
        cells = []
        for t in threads:
            r = result["rows"][str(t)].get(n)
            cells.append("-" if r is None else f"{r['ms_per_token']:.1f} ({r['tokens_per_s']:.1f})"
                         + (f", {r['pct_read_bandwidth']:.0f}% of read BW" if "pct_read_bandwidth" in r else ""))
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    lines.append("| read bandwidth (GB/s) / byte floor (ms/token) | " + " | ".join(
        f"{result['rows'][str(t)]['read_GBps']:.1f} / {result['floor_ms'][str(t)]:.1f}" for t in threads) + " |")
    lines += ["", f"Prefill of {len(long_prompt)} tokens (tokens/s): " + "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: " + ", ".join(f"{k} {v:.0f}" for k, v in result["prefill"][str(t)].items() if v)
        for t in threads)]
    lines += ["", "The same prefill against the FMA peak (fp32, this run's probe): " + "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: {result['prefill_pct_fma_peak'][str(t)]:.0f}% of "
        f"{result['fma_peak_gflops'][str(t)]:.0f} GFLOP/s" for t in threads)]
    lines += ["", "Seeded sampling (temperature 0.7) against greedy, ms/token: " + "; ".join(
        f"{t} thread{'s' if t > 1 else ''}: {v['temperature 0.7']:.2f} vs {v['greedy']:.2f} ({v['ratio']:.3f}x)"
        for t, v in ((t, result["sampled_ms_per_token"][str(t)]) for t in threads))]
    if args.layers:
        ctx = len(prompts[0])
        lines += ["", f"One layer for R rows at {ctx} positions (ms; GFLOP/s and % of the FMA peak; GB/s of weights "
                  "and % of the read bandwidth):"]
        for t in threads:
            lm = result["layer_ms"][str(t)]
            cells = []
            for r, v in lm.items():
                fl, by = layer_flops_bytes(model.cfg, r, ctx)
                cells.append(f"R={r} {v:.3f} ({fl / v / 1e6:.0f} GFLOP/s, "
                             f"{100 * fl / v / 1e6 / result['fma_peak_gflops'][str(t)]:.0f}%; {by / v / 1e6:.1f} GB/s, "
                             f"{100 * by / v / 1e6 / result['rows'][str(t)]['read_GBps']:.0f}%)")
            lines.append(f"* {t} thread{'s' if t > 1 else ''}: " + ", ".join(cells)
                         + f"; R=4 / R=1 {lm[4] / lm[1]:.2f}, R=8 / R=1 {lm[8] / lm[1]:.2f}")
    if loads:
        lines += ["", "Beside other processes that each keep a core busy (ms/token): " + "; ".join(
            f"{k}: " + ", ".join(f"{n} {v:.1f}" for n, v in row.items())
            for k, row in result["contended_ms_per_token"].items())]
    for k, v in result["skipped"].items():
        lines.append(f"\n{k}: not run ({v})")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"cpu-engine-{facts['date'][:10]}"
    write_atomic(stem.with_suffix(".json"), json.dumps(result, indent=2))
    write_atomic(stem.with_suffix(".md"), table + "\n")
    plot(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
