"""Rows of several sequences in one step (decoding/batch.py, EngineContract.run_batch / final_batch): every request's
tokens are those it gets alone, whatever joins or leaves the batch and when.

* Hypothesis over arrival schedules: requests of every method (vanilla, AdaDecode with heads that exit, lookup,
  AdaDecode + context, LayerSkip), greedy and seeded, join at drawn steps on drawn sequences, some are cancelled
  mid-way, on every engine kind here; each finished one equals the same request alone on a fresh engine, token for
  token (and its cache ends as vanilla's does), and the engine saw batched calls with rows of several sequences.
* The contract: run_batch checks every segment before it runs any (one bad segment, nothing runs), one segment per
  sequence; sequence views are independent; a cancelled sequence is free and clean.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adadecode.decoding.batch import Batch
from adadecode.decoding.driver import adadecode_steps, layerskip_steps, lookup_steps
from adadecode.decoding.vanilla import generate_vanilla, vanilla_steps
from adadecode.engines.contract import EngineError
from adadecode.engines.cost import StepCost
from adadecode.engines.head import Head
from adadecode.engines.torch import TorchEngine

from test_driver import tiny_model

FREE = StepCost(layer=(0.0,) + (1.0,) * 16, final=(0.0,) + (1.0,) * 16, source="given")
KINDS = ["torch"]


def build(kind: str, cfg, w, **kw):
    return TorchEngine(cfg, w, max_seq=96, max_rows=10, **kw)


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


def solo(cfg, w, heads, r):
    """The request alone, on a fresh one-sequence engine."""
    e = build("torch", cfg, w)
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
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=st.lists(request, min_size=1, max_size=6), seqs=st.integers(1, 4), model_seed=st.integers(0, 2))
def test_every_request_gets_its_tokens_alone(kind, reqs, seqs, model_seed):
    cfg, w = tiny_model(4, model_seed)
    heads = [Head.identity(1, cfg.d), Head.identity(2, cfg.d)]
    engine = build(kind, cfg, w, max_seqs=seqs)
    engine.set_heads(heads)
    rec = Recording(engine)
    batch = Batch(engine)
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
        alone = solo(cfg, w, heads, r)
        assert got[i].tokens == alone.tokens, f"request {i} ({r['method']}): batched {got[i].tokens} alone {alone.tokens}"


@pytest.mark.exactness
def test_batched_calls_mix_sequences_and_keep_each_rows_bits():
    """Two vanilla requests side by side: their steps go to the engine together (one run_batch / final_batch with
    both sequences), and each sequence's hidden states and caches are those of the request alone."""
    cfg, w = tiny_model(4, 0)
    engine = build("torch", cfg, w, max_seqs=2)
    rec = Recording(engine)
    batch = Batch(engine)
    a = batch.add(0, vanilla_steps, [1, 2, 3, 4], 10)
    b = batch.add(1, vanilla_steps, [9, 8, 7], 12)
    batch.run()
    assert rec.mixed > 0
    for job, (prompt, n) in ((a, ([1, 2, 3, 4], 10)), (b, ([9, 8, 7], 12))):
        alone = build("torch", cfg, w)
        ref = generate_vanilla(alone, prompt, n)
        assert job.generation.tokens == ref.tokens
        view = engine.sequence(job.seq)
        for layer in range(cfg.n_layers):
            k1, v1 = view.kv(layer)
            k2, v2 = alone.kv(layer)
            assert torch.equal(k1, k2) and torch.equal(v1, v2)


def test_run_batch_checks_every_segment_before_running_any():
    cfg, w = tiny_model(4, 0)
    engine = build("torch", cfg, w, max_seqs=3)
    for s in range(3):
        v = engine.sequence(s)
        v.prefill([1, 2, 3])
        v.embed(3, 5)
    with pytest.raises(EngineError, match="one segment per sequence"):
        engine.run_batch([(0, 3, 3, 0, 1), (0, 3, 3, 1, 2)])
    with pytest.raises(EngineError, match="row 3 is at depth 0, expected 1"):
        engine.run_batch([(0, 3, 3, 0, 1), (1, 3, 3, 1, 2)])
    for s in range(3):  # nothing ran
        assert engine.sequence(s).row_depth[3 % engine.max_rows] == 0
    with pytest.raises(EngineError, match=r"sequence 3 outside 0..2"):
        engine.sequence(3)
    engine.select(1)
    engine.run_batch([(0, 3, 3, 0, 4), (2, 3, 3, 0, 2)])
    assert engine.seq == 1 and engine.sequence(2).kv_len == [4, 4, 3, 3]
    assert engine.sequence(1).kv_len == [3] * 4  # untouched


def test_cancel_frees_the_sequence():
    cfg, w = tiny_model(4, 0)
    engine = build("torch", cfg, w, max_seqs=2)
    batch = Batch(engine)
    batch.add(0, vanilla_steps, [1, 2, 3], 20)
    batch.step()
    batch.step()
    assert 0 not in batch.free_seqs()
    batch.cancel(0)
    assert batch.free_seqs() == [0, 1] and engine.sequence(0).kv_len == [0] * 4
    job = batch.add(0, vanilla_steps, [1, 2, 3], 5)
    batch.run()
    assert job.generation.tokens == generate_vanilla(build("torch", cfg, w), [1, 2, 3], 5).tokens


def test_a_bad_request_is_refused_before_it_joins():
    cfg, w = tiny_model(4, 0)
    engine = build("torch", cfg, w, max_seqs=2)
    batch = Batch(engine)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        batch.add(0, vanilla_steps, [1, 10**6], 5)
    assert batch.free_seqs() == [0, 1]
