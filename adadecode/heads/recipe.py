"""The data recipe of the shipped heads: which prompts, how many, which split, into which cache.

    python -m adadecode.heads.recipe code|general|humaneval|general-heldout [--cache DIR] [--n N]

builds (or resumes) the data cache of one set under DIR/<set> (default $ADADECODE_CACHE/heads-data or
~/.cache/adadecode/heads-data). Sets:

* code: documented functions of the installed Python source (heads.prompts.code_prompts), 3/4 plain completion
  prompts (imports + signature + docstring) and 1/4 chat requests; split by top-level package: packages whose
  name hashes to 0 mod 10 are the validation set (layers and gamma are chosen there, never on HumanEval).
* general: the model writes user requests itself (heads.prompts.instruction_requests: 3 of 6 styles per topic),
  its replies become chat prompts; a quarter of them get a second turn (the model's answer + a follow-up). Split by
  topic, as code by package. Built in chunks of 60 topics (--n topics), so a larger --n adds to the cache.
* humaneval, general-heldout: the evaluation sets (never trained on).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from . import prompts as hp
from .data import BatchedForward, ShardCache, generate_batched

LAYERS = (4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26)
SETS = {"code": 96, "general": 96, "humaneval": 64, "general-heldout": 64}  # max new tokens per set
MAX_PROMPT_TOKENS = 320
PARTS = {"code": ["code"], "humaneval": ["humaneval"], "general-heldout": ["general-heldout"]}  # cache directories
TOPIC_CHUNK = 60  # general: one pair of caches (single-, multi-turn) per 60 topics, so a larger --n adds chunks


def cache_root() -> Path:
    base = os.environ.get("ADADECODE_CACHE") or str(Path.home() / ".cache" / "adadecode")
    return Path(base) / "heads-data"


def _split(key: str) -> str:
    return "val" if hp._stable_hash(f"split:{key}") % 10 == 0 else "train"


def _with_ids(tok, prompts: list[dict]) -> list[dict]:
    out = []
    for p in prompts:
        ids = hp.encode(tok, p)
        if len(ids) <= MAX_PROMPT_TOKENS:
            out.append({**p, "ids": ids})
    return out


def code_set(model, n: int, log=print) -> list[dict]:
    he = [p["plain"] for p in hp.humaneval()]
    prompts = hp.dedup(hp.code_prompts(n, exclude=he, log=log))
    for p in prompts:
        p["split"] = _split(p["source"])
    return _with_ids(model.tokenizer, prompts)


def _complete_lines(path: Path) -> list:
    """The records of an append-only JSON-lines file. A run killed mid-append leaves a last line without its
    newline: it is cut off the file (rewritten atomically) so that the next appends start on a line of their own."""
    from ..model.filesys import write_atomic

    if not path.is_file():
        return []
    raw = path.read_bytes()
    whole = raw[:raw.rfind(b"\n") + 1]
    if len(whole) != len(raw):
        write_atomic(path, whole)
    return [json.loads(line) for line in whole.decode("utf-8").splitlines()]


def general_set(model, root: Path, topics: list[str], batch: int = 64, log=print) -> list[dict]:
    """Model-written requests about `topics` (resumable: requests.jsonl under `root`), as chat prompts."""
    tok = model.tokenizer
    reqs = hp.instruction_requests(topics)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "requests.jsonl"
    done = _complete_lines(path)
    fwd = BatchedForward(model.cfg, model.weights)
    t0, new_tokens = time.time(), 0
    with path.open("a") as f:
        for b0 in range(len(done), len(reqs), batch):
            chunk = reqs[b0:b0 + batch]
            outs, _ = generate_batched(fwd, [hp.encode(tok, r) for r in chunk], 48, model.eos_ids, batch_size=len(chunk))
            new_tokens += sum(len(o) for o in outs)
            for r, o in zip(chunk, outs):
                rec = {"topic": r["topic"], "reply": tok.decode(o)}
                f.write(json.dumps(rec) + "\n")
                done.append(rec)
            f.flush()
            log(f"requests {len(done)}/{len(reqs)} ({new_tokens / (time.time() - t0):.1f} tokens/s)")
    prompts = []
    for i, rec in enumerate(done):
        text = hp.clean_request(rec["reply"])
        if text is None:
            continue
        prompts.append({"chat": [{"role": "user", "content": text}], "topic": rec["topic"], "split": _split(rec["topic"])})
    prompts = hp.dedup(prompts)
    log(f"general: {len(done)} model-written requests, {len(prompts)} usable after cleaning and deduplication")
    return _with_ids(tok, prompts)


def multi_turn(model, prompts: list[dict], conts: list[list[int]], every: int = 4) -> list[dict]:
    """Second turns: every `every`-th single-turn prompt with the model's own answer and a follow-up question."""
    tok = model.tokenizer
    out = []
    for i in range(0, len(prompts), every):
        p, c = prompts[i], conts[i]
        if c is None or "chat" not in p:
            continue
        answer = tok.decode([t for t in c if t not in model.eos_ids]).strip()
        fu = hp.FOLLOW_UPS[hp._stable_hash(answer) % len(hp.FOLLOW_UPS)]
        out.append({"chat": p["chat"] + [{"role": "assistant", "content": answer}, {"role": "user", "content": fu}],
                    "topic": p.get("topic"), "split": p["split"]})
    return _with_ids(tok, out)


def cached(name: str, model, root: Path | None = None) -> list[ShardCache]:
    """The caches of set `name` that exist under `root` (no generation; partial caches are fine)."""
    root = Path(root or cache_root())
    subs = sorted(d.name for d in root.glob("general-t*")) if name == "general" else PARTS[name]
    out = [ShardCache(root / sub, model, LAYERS, SETS[name]) for sub in subs if (root / sub / "manifest.json").is_file()]
    if not out:
        raise FileNotFoundError(f"{root}: no cache of set {name!r} (build it: python -m adadecode.heads.recipe {name})")
    return out


def build(name: str, model, root: Path | None = None, n: int | None = None, log=print) -> list[ShardCache]:
    """Build (or resume) the caches of set `name`; returns them. general: per chunk of TOPIC_CHUNK topics, the
    single-turn cache general-tNNN and its multi-turn continuation general-tNNN-multiturn."""
    root = Path(root or cache_root())
    mnt = SETS[name]
    if name == "code":
        return [_build_one(root / "code", code_set(model, n or 1400, log=log), mnt, model, log)]
    if name == "humaneval":
        return [_build_one(root / name, _with_ids(model.tokenizer, [{**p, "split": "test"} for p in hp.humaneval()]), mnt, model, log)]
    if name == "general-heldout":
        return [_build_one(root / name, _with_ids(model.tokenizer, [{**p, "split": "test"} for p in hp.general_heldout()]), mnt,
                           model, log)]
    if name != "general":
        raise ValueError(f"unknown set {name!r}: choose from {sorted(SETS)}")
    topics, caches = hp.topics()[:n], []
    for a in range(0, len(topics), TOPIC_CHUNK):
        sub = f"general-t{a:03d}"
        c = _build_one(root / sub, general_set(model, root / sub, topics[a:a + TOPIC_CHUNK], log=log), mnt, model, log)
        d = c.load(layers=[])
        caches += [c, _build_one(root / f"{sub}-multiturn", multi_turn(model, d["prompts"], d["conts"]), mnt, model, log)]
    return caches


def _build_one(path: Path, prompts: list[dict], max_new_tokens: int, model, log) -> ShardCache:
    c = ShardCache(path, model, LAYERS, max_new_tokens)
    st = c.build(prompts, log=log)
    log(f"{path.name}: {len(prompts)} prompts; this run {st['tokens']} new tokens in {st['seconds']:.0f} s "
        f"({st['tokens_per_s']:.1f} tokens/s); cache {c.size_bytes() / 2**20:.0f} MiB")
    return c


def main(argv=None) -> int:
    from ..model.loader import load_model

    p = argparse.ArgumentParser(prog="python -m adadecode.heads.recipe", description=__doc__.split("\n\n")[0])
    p.add_argument("set", choices=sorted(SETS))
    p.add_argument("--cache", default=None, help="cache root (default: $ADADECODE_CACHE/heads-data)")
    p.add_argument("--n", type=int, default=None, help="code: prompts; general: topics (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: on a shared CPU, 2 threads contend and run ~20x slower)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model("default")
    build(args.set, model, args.cache, args.n, log=lambda s: print(time.strftime("%H:%M:%S"), s, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
