"""Many requests at once: throughput and per-request latency at 1, 2, 4, 8 concurrent requests, each answer checked
against the same request alone (issue 36's benchmark; never a timed test).

    python bench/batch.py [--engine cpu] [--threads 2] [--concurrency 1,2,4,8] [--methods vanilla,adadecode]
                          [--prompts general-heldout] [--max-new-tokens 64] [--peers llama.cpp] [--out bench/results]

The engine's side is `adadecode.LLM(max_seqs=N)`, the batching path the server takes (`serve --max-seqs N`): N
client threads each send one request at the same moment; a step runs the rows of every active request together
(decoding/batch.py). The peer is llama.cpp's server (`make bench-peers`) with N parallel slots on the BF16 GGUF of
the same weights, N HTTP clients at once. Per concurrency and method: tokens/s over all requests (generated tokens
/ wall time from the first request sent to the last answer), the median per-request ms/token after the first
token, and `identical`: how many answers equal the same request alone (greedy: the engine's own solo answer for
the engine, llama.cpp's own one-slot answer for llama.cpp). Prompts never trained on.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import run_facts  # noqa: E402


def concurrently(fn, items) -> tuple[list, float]:
    """fn(item) for every item, each on its own thread, released together; (results in order, wall seconds)."""
    out, errors = [None] * len(items), []
    go = threading.Barrier(len(items) + 1)

    def work(i, item):
        go.wait()
        try:
            out[i] = fn(item)
        except BaseException as e:  # noqa: BLE001 (raised below)
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, x)) for i, x in enumerate(items)]
    for t in threads:
        t.start()
    go.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return out, wall


def row(system, method, n, results, wall, solo):
    tokens = sum(len(toks) for toks, _ in results)
    return {"system": system, "method": method, "concurrency": n, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "ms_per_token_median": round(statistics.median(ms for _, ms in results), 2),
            "identical": sum(toks == s for (toks, _), s in zip(results, solo)), "requests": n}


def engine_rows(args, prompts, facts) -> list[dict]:
    from adadecode import LLM
    from adadecode.model.loader import load_model

    model = load_model(args.model)
    heads = "default:general" if args.prompts == "general-heldout" else "default:code"
    rows = []
    for method in args.methods:
        opts = dict(max_new_tokens=args.max_new_tokens, method=method)
        if method == "adadecode+context":
            opts.update(method="adadecode", context=True)
        solo_llm = LLM(model, heads=heads, engine=args.engine, threads=args.threads, release_weights=False)
        solo = [solo_llm.generate(p, **opts).tokens for p in prompts[:max(args.concurrency)]]
        for n in args.concurrency:
            llm = LLM(model, heads=heads, engine=args.engine, threads=args.threads, release_weights=False,
                      max_seqs=n, max_seq=args.max_seq)
            llm.generate(prompts[0], **{**opts, "max_new_tokens": 2})  # build the engine and its step cost first

            def ask(p, llm=llm):
                c = llm.generate(p, **opts)
                return c.tokens, c.ms_per_token

            results, wall = concurrently(ask, prompts[:n])
            r = row(f"adadecode ({args.engine})", method, n, results, wall, solo[:n])
            rows.append(r)
            print(json.dumps(r), flush=True)
            del llm
        del solo_llm
    return rows


def llama_rows(args, prompts, facts) -> list[dict]:
    from llama_server import LlamaServer, peer_gguf

    gguf = peer_gguf("BF16")
    if gguf is None:
        print("llama.cpp: no .peers/smollm2-BF16.gguf (make bench-peers): skipped", flush=True)
        return []
    ids = prompts
    with LlamaServer(gguf, threads=args.threads, parallel=1) as srv:
        solo = [srv.complete(i, args.max_new_tokens)[0] for i in ids[:max(args.concurrency)]]
    rows = []
    for n in args.concurrency:
        with LlamaServer(gguf, threads=args.threads, parallel=n) as srv:
            srv.complete(ids[0], 2)
            results, wall = concurrently(lambda i, srv=srv: srv.complete(i, args.max_new_tokens)[:2], ids[:n])
        r = row("llama.cpp server (BF16)", "greedy", n, results, wall, solo[:n])
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--engine", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--methods", default="vanilla,adadecode")
    p.add_argument("--prompts", default="general-heldout", help="general-heldout, humaneval, code-edit, grounded")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-seq", type=int, default=2048)
    p.add_argument("--peers", default="llama.cpp", help="llama.cpp or '' for none")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.methods = [m for m in args.methods.split(",") if m]
    from adadecode.heads import prompts as heads_prompts
    from adadecode.model.filesys import write_atomic

    sets = {"humaneval": heads_prompts.humaneval, "general-heldout": heads_prompts.general_heldout,
            "code-edit": heads_prompts.code_edit, "grounded": heads_prompts.grounded}
    from adadecode.model.loader import load_model

    tok = load_model(args.model).tokenizer
    prompts = [heads_prompts.encode(tok, t) for t in sets[args.prompts]()][:max(args.concurrency)]
    if len(prompts) < max(args.concurrency):
        raise SystemExit(f"--prompts {args.prompts} has {len(prompts)} prompts, fewer than {max(args.concurrency)}")
    facts = run_facts("bench/batch.py", argv)
    rows = engine_rows(args, prompts, facts)
    if args.peers == "llama.cpp":
        rows += llama_rows(args, prompts, facts)
    lines = [f"| system | method | concurrent | tokens/s | x one | ms/token (median) | identical to alone |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    one = {}
    for r in rows:
        key = (r["system"], r["method"])
        one.setdefault(key, r["tokens_per_s"] if r["concurrency"] == 1 else None)
        base = one.get(key)
        lines.append(f"| {r['system']} | {r['method']} | {r['concurrency']} | {r['tokens_per_s']} | "
                     f"{r['tokens_per_s'] / base:.2f} | {r['ms_per_token_median']} | "
                     f"{r['identical']}/{r['requests']} |" if base else "")
    table = "\n".join(x for x in lines if x)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"batch-{args.engine}-{args.prompts}-{args.threads}t-{time.strftime('%Y-%m-%d')}"
    write_atomic(out / f"{stem}.json", json.dumps({**facts, "rows": rows},
                                                  indent=1))
    write_atomic(out / f"{stem}.md", f"`{facts['command']}` ({facts['device']}, "
                                     f"{time.strftime('%Y-%m-%d')})\n\n{table}\n")
    print(f"wrote {out / stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
