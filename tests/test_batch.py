"""Rows of several sequences in one step (decoding/batch.py, EngineContract.run_batch / final_batch): every request's
tokens are those it gets alone, whatever joins or leaves the batch and when; and on the native engines every row's
bits are those it gets alone.

* Hypothesis over arrival schedules: requests of every method (vanilla, AdaDecode with heads that exit, lookup,
  AdaDecode + context, LayerSkip), greedy and seeded, join at drawn steps on drawn sequences, some are cancelled
  mid-way, on every engine kind here (TorchEngine, CpuEngine, CudaEngine on the emulated device; long prompts in
  prefill pieces of the engine's chunk); each finished one equals the same request alone on a fresh engine of its
  kind, token for token, and the engine saw batched calls with rows of several sequences.
* The native engines' scenario (`run_scenario`, used by tests/test_cpu_engine.py over every ISA x thread count x
  pool schedule and tests/test_cuda_engine_emu.py over the emulated device's block orders): three sequences through
  prefills in pieces, run_batch with segments of different rows and layer ranges, heads, final_batch greedy and
  sampled, truncate; each sequence's hidden states, K/V, logits, tokens and head outputs == the same calls alone on a
  one-sequence engine, bitwise.
* A sequence whose every cache entry is NaN leaves the others' bits alone (no row reads another sequence's cache).
* The contract: run_batch checks every segment before it runs any (one bad segment, nothing runs, on the native
  engines the state is untouched too), one segment per sequence; sequence views are independent; a cancelled
  sequence is free and clean; the KV memory counts every sequence.
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adadecode.decoding.batch import Batch
from adadecode.decoding.driver import adadecode_steps, layerskip_steps, lookup_steps
from adadecode.decoding.vanilla import generate_vanilla, vanilla_steps
from adadecode.engines.contract import EngineError
from adadecode.engines.cost import StepCost
from adadecode.engines.cpu import CpuEngine, CpuWeights
from adadecode.engines.head import Head
from adadecode.engines.sampling import make_sampling
from adadecode.engines.torch import TorchEngine

from conftest import engine_model
from test_cuda_engine import _assert_bitwise, _state
from test_driver import tiny_model

FREE = StepCost(layer=(0.0,) + (1.0,) * 16, final=(0.0,) + (1.0,) * 16, source="given")
KINDS = ["torch", "cpu", "emu"]
EXAMPLES = {"torch": 60, "cpu": 25, "emu": 6}  # the emulated device runs a step ~100x slower


@functools.lru_cache(maxsize=None)
def model(kind: str, seed: int):
    """(cfg, weights) of the kind's test model: the tiny 4-layer model (head_dim 8), or for the CUDA kernels (head_dim
    64 or 128) a 4-layer head_dim-64 one; the CPU engine's packed once."""
    cfg, w = engine_model("gqa-untied", seed) if kind == "emu" else tiny_model(4, seed)
    return cfg, (CpuWeights(cfg, w) if kind == "cpu" else w)


def build(kind: str, cfg, w, **kw):
    """An engine of `kind` for the tests here: max_seq 96, 10 rows per sequence; the native ones with a small prefill
    chunk (8 on the CPU, 16 on the emulated device: its skinny path), so prompts go in several pieces."""
    if kind == "torch":
        return TorchEngine(cfg, w, max_seq=96, max_rows=10, **kw)
    if kind == "cpu":
        return CpuEngine(cfg, w, max_seq=96, max_rows=10, threads=2, prefill_chunk=8, **kw)
    from adadecode.engines.cuda import CudaEngine

    return CudaEngine(cfg, w, max_seq=96, max_rows=10, device="emu", prefill_chunk=16, **kw)


def batch_of(engine) -> Batch:
    """A Batch that prefills in pieces of one engine chunk (the smallest it may take), where the engine has one."""
    return Batch(engine, prefill_piece=getattr(engine, "prefill_chunk", None))


class Recording:
    """Wraps an engine's batched calls to count the rows of several sequences that went in one call."""

    def __init__(self, engine):
        self.engine, self.mixed = engine, 0
        run_batch, final_batch = engine.run_batch, engine.final_batch

        def rb(segments):
            segments = list(segments)
            self.mixed += len({s[0] for s in segments}) > 1
            return run_batch(segments)

        def fb(items):
            items = list(items)
            self.mixed += len({i[0] for i in items}) > 1
            return final_batch(items)

        engine.run_batch, engine.final_batch = rb, fb


METHODS = {
    "vanilla": (vanilla_steps, {}),
    "adadecode": (adadecode_steps, dict(gamma=0.05, max_pending=3)),
    "lookup": (lookup_steps, dict(max_chain=4, step_cost=FREE)),
    "adadecode+context": (adadecode_steps, dict(gamma=0.2, max_pending=3, context=True, max_chain=5, step_cost=FREE)),
    "layerskip": (layerskip_steps, dict(k=3, head_index=0)),
}
request = st.fixed_dictionaries(dict(
    method=st.sampled_from(list(METHODS)),
    prompt=st.lists(st.integers(0, 96), min_size=1, max_size=20).map(lambda p: p + p[: len(p) // 2]),
    new=st.integers(1, 24), join=st.integers(0, 30), cancel_at=st.one_of(st.none(), st.integers(1, 40)),
    sampled=st.booleans(), seed=st.integers(0, 3), eos=st.one_of(st.none(), st.integers(0, 96))))


def solo(kind, cfg, w, heads, r):
    """The request alone, on a fresh one-sequence engine of its kind."""
    e = build(kind, cfg, w)
    e.set_heads(heads)
    fn, kw = METHODS[r["method"]]
    return _steps_run(e, fn, r, kw)


def _kwargs(r, kw):
    extra = dict(temperature=0.9, top_p=0.95, seed=r["seed"]) if r["sampled"] else {}
    return dict(kw, eos_ids=[] if r["eos"] is None else [r["eos"]], **extra)


def _steps_run(engine, fn, r, kw):
    from adadecode.decoding.common import run_schedule

    return run_schedule(engine, fn(engine, r["prompt"], r["new"], **_kwargs(r, kw)))


@pytest.mark.exactness
@pytest.mark.parametrize("kind", KINDS)
def test_every_request_gets_its_tokens_alone(kind):
    @settings(max_examples=EXAMPLES[kind], deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(reqs=st.lists(request, min_size=1, max_size=6), seqs=st.integers(1, 4), model_seed=st.integers(0, 2))
    def check(reqs, seqs, model_seed):
        arrivals(kind, reqs, seqs, model_seed)

    check()


def arrivals(kind, reqs, seqs, model_seed):
    cfg, w = model(kind, model_seed)
    heads = [Head.identity(1, cfg.d), Head.identity(2, cfg.d)]
    engine = build(kind, cfg, w, max_seqs=seqs)
    engine.set_heads(heads)
    rec = Recording(engine)
    batch = batch_of(engine)
    waiting = sorted(range(len(reqs)), key=lambda i: reqs[i]["join"])
    got, jobs, step, live = {}, {}, 0, {}
    while waiting or batch.busy:
        while waiting and reqs[waiting[0]]["join"] <= step and batch.free_seqs():
            i = waiting.pop(0)
            fn, kw = METHODS[reqs[i]["method"]]
            job = batch.add(batch.free_seqs()[0], fn, reqs[i]["prompt"], reqs[i]["new"], **_kwargs(reqs[i], kw))
            jobs[i], live[i] = job, step
        for i, job in list(jobs.items()):  # cancels between steps
            c = reqs[i]["cancel_at"]
            if c is not None and step - live[i] >= c and not job.done and job.seq in batch.jobs:
                batch.cancel(job.seq)
                got[i] = "cancelled"
                del jobs[i]
        for job in batch.step():
            i = next(k for k, j in jobs.items() if j is job)
            assert job.error is None, f"request {i}: {job.error!r}"
            got[i] = job.generation
            del jobs[i]
        step += 1
        assert step < 5000
    for i, r in enumerate(reqs):
        if got[i] == "cancelled":
            continue
        alone = solo(kind, cfg, w, heads, r)
        assert got[i].tokens == alone.tokens, f"request {i} ({r['method']}): batched {got[i].tokens} alone {alone.tokens}"


@pytest.mark.exactness
@pytest.mark.parametrize("kind", KINDS)
def test_batched_calls_mix_sequences_and_keep_each_rows_bits(kind):
    """Two vanilla requests side by side: their steps go to the engine together (one run_batch / final_batch with
    both sequences), and each sequence's hidden states and caches are those of the request alone."""
    cfg, w = model(kind, 0)
    engine = build(kind, cfg, w, max_seqs=2)
    rec = Recording(engine)
    batch = batch_of(engine)
    prompts = ([1, 2, 3, 4] * 5, [9, 8, 7])  # the first in pieces on the native engines
    a = batch.add(0, vanilla_steps, prompts[0], 10)
    b = batch.add(1, vanilla_steps, prompts[1], 12)
    batch.run()
    assert rec.mixed > 0
    for job, prompt, n in ((a, prompts[0], 10), (b, prompts[1], 12)):
        alone = build(kind, cfg, w)
        ref = generate_vanilla(alone, prompt, n)
        assert job.generation.tokens == ref.tokens
        view = engine.sequence(job.seq)
        for layer in range(cfg.n_layers):
            k1, v1 = view.kv(layer)
            k2, v2 = alone.kv(layer)
            assert torch.equal(k1, k2) and torch.equal(v1, v2)


def _prefilled(kind, n_seqs):
    cfg, w = model(kind, 0)
    engine = build(kind, cfg, w, max_seqs=n_seqs)
    for s in range(n_seqs):
        v = engine.sequence(s)
        v.prefill([1, 2, 3 + s])
        v.embed(3, 5)
    return cfg, engine


@pytest.mark.parametrize("kind", KINDS)
def test_run_batch_checks_every_segment_before_running_any(kind):
    cfg, engine = _prefilled(kind, 3)
    L = cfg.n_layers
    native = kind != "torch"
    before = [_state(engine.sequence(s), 3, 3) for s in range(3)] if native else None
    with pytest.raises(EngineError, match="one segment per sequence"):
        engine.run_batch([(0, 3, 3, 0, 1), (0, 3, 3, 1, 2)])
    with pytest.raises(EngineError, match="row 3 is at depth 0, expected 1"):
        engine.run_batch([(0, 3, 3, 0, 1), (1, 3, 3, 1, 2)])
    with pytest.raises(EngineError, match=r"layers \[0, 9\) outside"):
        engine.run_batch([(1, 3, 3, 0, 1), (2, 3, 3, 0, 9)])
    with pytest.raises(EngineError, match="row 4 is not in flight"):
        engine.run_batch([(2, 3, 4, 0, 1), (0, 3, 3, 0, 1)])
    with pytest.raises(EngineError, match=r"sequence 3 outside 0..2"):
        engine.run_batch([(0, 3, 3, 0, 1), (3, 3, 3, 0, 1)])
    for s in range(3):  # nothing ran
        assert engine.sequence(s).row_depth[3 % engine.max_rows] == 0
        if native:
            _assert_bitwise(_state(engine.sequence(s), 3, 3), before[s], f"sequence {s} after refused batches")
    with pytest.raises(EngineError, match=r"sequence 3 outside 0..2"):
        engine.sequence(3)
    with pytest.raises(EngineError, match="row 3 is at depth 0, expected 4"):  # final_batch: checked before any runs
        engine.final_batch([(0, 3, 3, None)])
    engine.select(1)
    engine.run_batch([(0, 3, 3, 0, L), (2, 3, 3, 0, 2)])
    assert engine.seq == 1 and engine.sequence(2).kv_len == [4, 4] + [3] * (L - 2)
    assert engine.sequence(1).kv_len == [3] * L  # untouched
    if native:  # the binding's own checks (what keeps memory in bounds): the same, and nothing runs either
        with pytest.raises(IndexError, match="two segments of sequence 1"):
            engine._eng.run_batch([(1, 3, 3, 0, 1), (1, 3, 3, 0, 1)])
        with pytest.raises(IndexError, match="sequence 5 outside 0..2"):
            engine._eng.run_batch([(1, 3, 3, 0, 1), (5, 3, 3, 0, 1)])
        with pytest.raises(IndexError, match="sequence 5 outside 0..2"):
            engine._eng.embed(5, 3, 1)
        _assert_bitwise(_state(engine.sequence(1), 3, 3), before[1], "sequence 1 after refused binding calls")


@pytest.mark.parametrize("kind", KINDS)
def test_cancel_frees_the_sequence(kind):
    cfg, w = model(kind, 0)
    engine = build(kind, cfg, w, max_seqs=2)
    batch = batch_of(engine)
    batch.add(0, vanilla_steps, [1, 2, 3], 20)
    batch.step()
    batch.step()
    assert 0 not in batch.free_seqs()
    batch.cancel(0)
    assert batch.free_seqs() == [0, 1] and engine.sequence(0).kv_len == [0] * cfg.n_layers
    job = batch.add(0, vanilla_steps, [1, 2, 3], 5)
    batch.run()
    assert job.generation.tokens == generate_vanilla(build(kind, cfg, w), [1, 2, 3], 5).tokens


def test_a_bad_request_is_refused_before_it_joins():
    cfg, w = tiny_model(4, 0)
    engine = build("torch", cfg, w, max_seqs=2)
    batch = Batch(engine)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        batch.add(0, vanilla_steps, [1, 10**6], 5)
    assert batch.free_seqs() == [0, 1]


# ---- the native engines: every row's bits those it gets alone ----------------------------------------------------
def scenario(cfg, heads, g: torch.Generator, pieces) -> list[tuple]:
    """The calls of three sequences, step by step: ("prefill", seq, tokens, piece sizes), ("embed", seq, pos, token),
    ("batch", segments), ("final", items), ("head", seq, pos, i, sampling), ("logits", seq, a, b), ("state", seq, a, b),
    ("truncate", seq, n). pieces(n) -> the piece sizes of an n-token prefill when batched (alone: one call).
    Sequence 2's prompt crosses the first 128-position attention chunk; segments of a step differ in rows and layer
    ranges, and some sequences sit a step out."""
    L, h1 = cfg.n_layers, heads[1].layer
    tok = lambda n: torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()  # noqa: E731
    prompts = [tok(37), tok(5), tok(131)]
    s1, s2 = make_sampling(temperature=0.9, top_p=0.9, seed=5), make_sampling(temperature=1.1, top_k=20, seed=7)
    ops = [("prefill", s, p, pieces(len(p))) for s, p in enumerate(prompts)]
    ops += [("embed", 0, p, t) for p, t in zip(range(37, 41), tok(4))]
    ops += [("embed", 1, p, t) for p, t in zip(range(5, 7), tok(2))] + [("embed", 2, 131, tok(1)[0])]
    ops += [("batch", [(0, 37, 40, 0, 1), (1, 5, 6, 0, h1), (2, 131, 131, 0, L)])]
    ops += [("head", 0, p, 0, None) for p in range(37, 41)] + [("head", 1, 5, 1, None), ("head", 1, 6, 1, s2)]
    ops += [("batch", [(1, 5, 6, h1, L), (0, 37, 40, 1, L)])]
    ops += [("state", 0, 37, 40), ("state", 1, 5, 6), ("state", 2, 131, 131)]
    ops += [("final", [(0, 37, 40, None), (1, 5, 6, s1), (2, 131, 131, None)])]
    ops += [("logits", 0, 37, 40), ("logits", 2, 131, 131)]
    ops += [("truncate", 0, 39)] + [("embed", 0, p, t) for p, t in zip((39, 40), tok(2))] + [("embed", 2, 132, tok(1)[0])]
    ops += [("batch", [(2, 132, 132, 0, 1), (0, 39, 40, 0, L)]), ("batch", [(2, 132, 132, 1, L)])]
    ops += [("final", [(2, 132, 132, s2), (0, 39, 40, None)]), ("state", 0, 39, 40), ("state", 2, 132, 132)]
    ops += [("embed", 1, 7, tok(1)[0]), ("embed", 0, 41, tok(1)[0])]
    ops += [("batch", [(0, 41, 41, 0, 2), (1, 7, 7, 0, 1)]), ("batch", [(1, 7, 7, 1, L), (0, 41, 41, 2, L)])]
    ops += [("final", [(1, 7, 7, None), (0, 41, 41, s1)]), ("state", 0, 41, 41), ("state", 1, 7, 7)]
    return ops


def run_scenario(engine, ops, seqs=None) -> dict:
    """The scenario's calls: on one engine of several sequences (seqs None: batched calls, prefills in pieces), or,
    with seqs = {seq: one-sequence engine}, each sequence's calls alone on its own engine (prefills in one call).
    -> {seq: [(what, result), ...]}."""
    out = {}
    view = (lambda s: seqs[s]) if seqs else engine.sequence
    rec = lambda s, what, value: out.setdefault(s, []).append((what, value))  # noqa: E731
    for op in ops:
        name, args = op[0], op[1:]
        if name == "prefill":
            s, tokens, pieces = args
            if seqs:
                view(s).prefill(tokens)
            else:
                start = 0
                for n in pieces:
                    view(s).prefill(tokens[start:start + n], start=start)
                    start += n
        elif name == "embed":
            view(args[0]).embed(*args[1:])
        elif name == "truncate":
            view(args[0]).truncate(args[1])
        elif name == "batch":
            if seqs:
                for s, *seg in args[0]:
                    view(s).run_layers(*seg)
            else:
                engine.run_batch(args[0])
        elif name == "final":
            got = engine.final_batch(args[0]) if not seqs else [view(s).final(a, b, sampling=smp)
                                                               for s, a, b, smp in args[0]]
            for (s, a, b, _), t in zip(args[0], got):
                rec(s, f"final {a}..{b}", t)
        elif name == "head":
            s, p, i, smp = args
            rec(s, f"head {i} at {p}", view(s).head(p, i, sampling=smp))
        elif name == "logits":
            s, a, b = args
            rec(s, f"logits {a}..{b}", view(s).final_logits(a, b))
        elif name == "state":
            s, a, b = args
            rec(s, f"state {a}..{b}", _state(view(s), a, b))
    return out


def assert_same_bits(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), what
    for s in want:
        assert [k for k, _ in got[s]] == [k for k, _ in want[s]], f"{what}: sequence {s} made other calls"
        for (k, a), (_, b) in zip(got[s], want[s]):
            where = f"{what}: sequence {s}, {k}"
            if k.startswith("state"):
                _assert_bitwise(a, b, where)
            elif k.startswith("logits"):
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), f"{where} differ"
            else:
                assert a == b, f"{where}: {a} vs {b}"


def alone(make, ops) -> dict:
    """The scenario with each sequence alone on a fresh one-sequence engine (make(max_seqs) builds one)."""
    seqs = {}
    for op in ops:
        s = op[1] if op[0] not in ("batch", "final") else None
        for t in ([s] if s is not None else [i[0] for i in op[1]]):
            if t not in seqs:
                seqs[t] = make(1)
    return run_scenario(None, ops, seqs)


def _without(op, seq):
    """op with sequence seq's part taken out (None when nothing is left)."""
    if op[0] in ("batch", "final"):
        rest = [i for i in op[1] if i[0] != seq]
        return (op[0], rest) if rest else None
    return None if op[1] == seq else op


@pytest.mark.exactness
@pytest.mark.parametrize("kind", ["cpu", "emu"])
def test_a_sequence_of_nans_leaves_the_others_alone(kind):
    """Sequence 1's every cache entry is NaN (its prompt is a token whose embedding is NaN: its K/V are NaN at every
    layer and position it holds, its rows NaN in every GEMM tile they share with the others): the other sequences'
    bits are those they get alone, in batches with it, and its own final is refused (FloatingPointError), in a batch
    or not."""
    import dataclasses

    cfg, w = engine_model("gqa-untied", 3) if kind == "emu" else tiny_model(4, 3)
    nan_token = 7
    w = dataclasses.replace(w, embed=w.embed.clone())  # untied: the LM head stays finite
    w.embed[nan_token] = float("nan")
    make = functools.partial(build, kind, cfg, w)
    g = torch.Generator().manual_seed(1)
    prompts = {0: torch.randint(10, 90, (20,), generator=g).tolist(), 1: [nan_token] * 90,
               2: torch.randint(10, 90, (9,), generator=g).tolist()}
    L = cfg.n_layers
    ops = [("prefill", s, p, [len(p)]) for s, p in prompts.items()]
    ops += [("embed", 0, 20, 11), ("embed", 0, 21, 12), ("embed", 1, 90, nan_token), ("embed", 2, 9, 13)]
    ops += [("batch", [(1, 90, 90, 0, L), (0, 20, 21, 0, 2), (2, 9, 9, 0, L)]), ("batch", [(0, 20, 21, 2, L)])]
    ops += [("state", 0, 20, 21), ("state", 2, 9, 9), ("final", [(0, 20, 21, None), (2, 9, 9, None)])]
    e = make(max_seqs=3)
    got = run_scenario(e, ops)
    k, v = e.sequence(1).kv(L - 1)
    assert k.isnan().all() and v.isnan().all() and e.sequence(1).hidden(90).isnan().all()  # the whole region
    want = alone(lambda n: make(max_seqs=n), [op for op in (_without(op, 1) for op in ops) if op])
    assert_same_bits(got, want, "beside a sequence of NaNs")
    with pytest.raises(FloatingPointError, match="non-finite logits at rows 90..90"):
        e.final_batch([(0, 20, 21, None), (1, 90, 90, None)])
    with pytest.raises(FloatingPointError, match="non-finite logits at rows 90..90"):
        e.sequence(1).final(90, 90)


@pytest.mark.parametrize("kind", ["cpu", "emu"])
def test_the_kv_memory_counts_every_sequence(kind):
    """kv_bytes is every sequence's region, and a cache that does not fit says how many sequences it holds."""
    from adadecode.engines.cuda import CudaEngine
    from adadecode.model.config import LlamaConfig

    from conftest import random_weights, tiny_hf_config

    cfg, w = model(kind, 0)
    one, three = build(kind, cfg, w), build(kind, cfg, w, max_seqs=3)
    assert three.kv_bytes == 3 * one.kv_bytes and (three.max_seqs, one.max_seqs) == (3, 1)
    shape = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64) if kind == "emu" else {}
    big = LlamaConfig.from_hf(tiny_hf_config(max_position_embeddings=1 << 16, **shape))
    make = CudaEngine if kind == "emu" else CpuEngine
    kw = dict(device="emu") if kind == "emu" else {}
    n = 1 << 16 if kind == "emu" else 10**6  # the CUDA binding takes at most 65536 sequences
    with pytest.raises(MemoryError, match=rf"KV cache of {n} sequences x max_seq=65536"):
        make(big, random_weights(big), max_seq=1 << 16, max_seqs=n, **kw)
