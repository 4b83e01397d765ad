"""Guesses from the context (adadecode/decoding/context.py) in the AdaDecode schedule (driver.py): exactly vanilla's
tokens on the same engine whatever the chains and the heads say.

* NgramIndex against a rescan of the whole context (hypothesis): the latest earlier occurrence of the longest
  suffix, its continuation, incremental updates.
* ContextGuesser: drafts when rows are cheap and the guesses have been right, declines when rows cost what a token
  saves, fades back to trying.
* The schedule, on TorchEngine and CpuEngine with the engine checks of test_driver.py (contiguous rows, monotone
  depths, final over every row in flight, the cache holding exactly the verified prefix at every new start): scripted
  chains right, wrong and partly right, with EOS inside, reaching max_new_tokens and the engine's rows, after a
  head's exit and before one, greedy and sampled; the real lookup on contexts that repeat; chains longer than the
  engine's rows refused or cut; a cost model that says rows are dear leaves AdaDecode alone.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import event as _event
from hypothesis.errors import InvalidArgument
from hypothesis import strategies as st

from adadecode.decoding.context import ContextGuesser, NgramIndex
from adadecode.decoding.driver import generate_adadecode, generate_lookup
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.cost import StepCost, step_cost
from adadecode.engines.head import Head

from test_driver import CHECKED, ENGINES, cases, reference, scripted, tiny_model

FREE = StepCost(layer=(0.0,) + (1.0,) * 16, final=(0.0,) + (1.0,) * 16, source="given")  # an extra row costs nothing
DEAR = StepCost(layer=tuple(float(r) for r in range(17)), final=tuple(float(r) for r in range(17)), source="given")


# ---- the index ---------------------------------------------------------------------------------------------------
def rescan(tokens, tail, k, max_n):
    """The reference, by rescanning: for n = max_n..1, the latest occurrence of tail's last n tokens in `tokens`
    that a token follows, and its next k tokens (nothing asked: nothing found)."""
    if k <= 0:
        return [], 0
    for n in range(min(max_n, len(tail)), 0, -1):
        want = list(tail[len(tail) - n:])
        for end in range(len(tokens) - 1, n - 1, -1):  # tokens[end - n:end] == want, continuation tokens[end]
            if tokens[end - n:end] == want:
                return tokens[end:end + k], n
    return [], 0


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 5), max_size=60), tail=st.lists(st.integers(0, 5), max_size=5),
       k=st.integers(0, 7), max_n=st.integers(1, 4), cut=st.integers(0, 60))
def test_index_is_a_rescan_of_the_context(tokens, tail, k, max_n, cut):
    idx = NgramIndex(tokens[:cut], max_n=max_n)
    idx.extend(tokens[cut:])  # incremental == built at once
    assert idx.propose(tail, k) == rescan(tokens, tail, k, max_n)
    own = tokens[-max_n:]  # the context's own suffix is found earlier, never at the end itself
    got, n = idx.propose(own, k)
    assert (got, n) == rescan(tokens, own, k, max_n)


def test_index_checks_max_n():
    with pytest.raises(ValueError, match="max_n"):
        NgramIndex(max_n=0)


# ---- the guesser's decisions -----------------------------------------------------------------------------------------
def test_guesser_drafts_when_rows_are_cheap_and_declines_when_dear():
    free, dear = ContextGuesser(FREE, 4, max_chain=6), ContextGuesser(DEAR, 4, max_chain=6)
    ctx = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]
    for g in (free, dear):
        g.start(ctx)
    assert free.propose([1, 2, 3], 10, rows=1) == ([4, 5, 6, 7, 8, 1], 3)
    assert dear.propose([1, 2, 3], 10, rows=1) == ([], 0)  # a row costs a whole token: never pays at p <= 1
    assert free.propose([1, 2, 3], 2, rows=1) == ([4, 5], 3)  # room


def test_guesser_learns_and_fades():
    half = StepCost(layer=(0.0,) + tuple(1 + 0.3 * r for r in range(16)), final=(0.0,) + (1.0,) * 16)
    g = ContextGuesser(half, 4, max_chain=4)
    g.start([9, 1, 2, 9, 1, 2])
    assert g.propose([9, 1], 4, rows=1)[0]  # the prior: 0.5 each, worth at least one row
    for _ in range(30):
        g.record(("context", 2, 0), False)
    assert g.propose([9, 1], 4, rows=1) == ([], 0)  # wrong every time: declined
    for _ in range(200):  # each declined proposal fades the evidence, until trying pays again
        if g.propose([9, 1], 4, rows=1)[0]:
            break
    else:
        raise AssertionError("never tried again")
    assert g.declined > 0


def test_exit_over_a_chain_is_priced():
    """A head's exit while a chain is in flight: taken when the head and the chain are likely right and the layer is
    early (p * (L - d) against (1 - p) * d and the extra row), not when the chain or the head is doubtful."""
    cheap = StepCost(layer=(0.0,) + tuple(1 + 0.05 * r for r in range(16)), final=(0.0,) + (1.0,) * 16)
    g = ContextGuesser(cheap, 30, max_chain=6)
    chain = [("context", 3, j) for j in range(4)]
    for _ in range(40):
        g.record(8, True)  # a head's kind is its layer
        g.record(24, False)
        for k in chain:
            g.record(k, True)
    assert g.exit_pays(chain, 8, rows=5)       # a sure chain, a right head early: pays
    assert not g.exit_pays(chain, 24, rows=5)  # a head that is mostly wrong
    for _ in range(200):
        g.record(chain[2], False)              # the chain's third token is mostly wrong
    assert not g.exit_pays(chain, 8, rows=5)
    assert g.exit_pays([], 8, rows=1)          # nothing pending: the head's own rate decides
    dear = ContextGuesser(DEAR, 30)
    assert not dear.exit_pays([], 1, rows=1)    # a row costs a whole layer: an exit never pays


def test_combined_schedule_prices_exits_over_chains():
    """With the real guesser, an exit is asked for over a chain only where exit_pays says so, and the tokens are
    vanilla's either way."""
    cfg, w = tiny_model(4, 1)
    heads = [Head.identity(1, cfg.d), Head.identity(2, cfg.d)]
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    ref = ENGINES["torch"](cfg, w, max_seq=64)
    van = generate_vanilla(ref, prompt, 24)
    asked = []

    class Watching(ContextGuesser):
        def exit_pays(self, kinds, layer, rows):
            ok = super().exit_pays(kinds, layer, rows)
            asked.append(ok)
            return ok

    eng = CHECKED["torch"](cfg, w, max_seq=64, max_rows=16)
    g = Watching(FREE, cfg.n_layers, max_chain=4)
    gen = generate_adadecode(eng, prompt, 24, heads=heads, gamma=0.0, context=g)
    assert gen.tokens == van.tokens
    assert gen.stats["sources"]["context"]["guesses"] > 0 and asked


# ---- the schedule: scripted chains ------------------------------------------------------------------------------------
class ScriptedGuesser(ContextGuesser):
    """Chains from a script instead of the index: entries (kind, length, r): "right" (the vanilla continuation of the
    frontier), "wrong" (off from the start), "partly" (right for r % length tokens, then off), "eos" (the EOS token
    inside), "none"; over-long on purpose (the driver must cut to its room)."""

    def __init__(self, truth, eos_tok, entries, vocab, **kw):
        super().__init__(FREE, 2, **kw)
        self.truth, self.eos_tok, self.entries, self.vocab, self.calls = truth, eos_tok, entries, vocab, 0

    def exit_pays(self, kinds, layer, rows):
        return True  # every confident exit, on a chain's rows too: the schedule's every path (the rule: below)

    def propose(self, tail, room, *, rows, p_front=1.0):
        kind, length, r = self.entries[self.calls % len(self.entries)]
        self.calls += 1
        pos = len(self.index) + rows - 2  # the frontier (the index ends at row first); the chain starts at pos + 1
        right = [self.truth[p] if p < len(self.truth) else (r + p) % self.vocab for p in range(pos + 1, pos + 1 + length)]
        if kind == "none" or not right:
            return [], 0
        if kind == "wrong":
            chain = [(t + 1 + r) % self.vocab for t in right]
        elif kind == "partly":
            j = r % len(right)
            chain = right[:j] + [(t + 1) % self.vocab for t in right[j:]]
        elif kind == "eos":
            chain = right[:r % len(right)] + [self.eos_tok] + right
        else:
            chain = right
        return chain, 1 + r % 3


def event(what: str) -> None:
    try:
        _event(what)
    except InvalidArgument:  # run_chains outside a hypothesis test
        pass


chain_entry = st.tuples(st.sampled_from(["right", "right", "partly", "wrong", "eos", "none"]), st.integers(1, 12),
                        st.integers(0, 1000))


def run_chains(c, chains, *, kind="torch", method="adadecode", gamma=0.5, max_chain=8, **sampling):
    cfg, w, n, M, ref, vs, truth, eos_tok, van = reference(c, kind, sampling)
    P = c["max_pending"]
    max_rows = max(P, max_chain) + 1 if c["tight_rows"] else 16
    extra = {"threads": 2} if kind == "cpu" else {}
    eng = CHECKED[kind](cfg, w, max_seq=64, max_rows=max_rows, max_flight=max_rows,
                        script=scripted(truth, eos_tok, gamma, c["entries"]), **extra)
    guesser = ScriptedGuesser(truth, eos_tok, chains, cfg.vocab_size, max_chain=max_chain)
    seen = []
    if method == "adadecode":
        heads = [Head.identity(layer, cfg.d) for layer in c["head_layers"]]
        gen = generate_adadecode(eng, c["prompt"], M, gamma=gamma, eos_ids=[eos_tok], max_pending=P, heads=heads,
                                 on_token=seen.append, context=guesser, **sampling)
    else:
        gen = generate_lookup(eng, c["prompt"], M, eos_ids=[eos_tok], on_token=seen.append, context=guesser, **vs)
    assert gen.tokens == van.tokens and seen == van.tokens
    assert eng.kv_len == ref.kv_len  # the cache ends as vanilla's does
    check_chain_stats(gen, eng, n, M)
    s = gen.stats["sources"]["context"]
    event(f"context accepted {min(s['accepted'], 3)}+, rejected {min(s['rejected'], 2)}+")
    event(f"head exits {min(gen.stats['early'], 2)}+, max rows {max(gen.stats['rows_per_step'], default=0)}")
    return gen, eng


def check_chain_stats(gen, eng, n_prompt, max_new):
    s = gen.stats
    assert s["tokens"] == len(gen.tokens)
    assert s["guesses"] == s["accepted"] + s["rejected"] + s["discarded"]
    assert len(gen.tokens) == 1 + s["accepted"] + s["rejected"] + s["frontier_tokens"]
    src = s["sources"]
    assert src["heads"]["guesses"] == s["early"] == sum(s["exit_layer_hist"].values())
    for f in ("guesses", "accepted", "rejected", "discarded"):
        assert src["heads"][f] + src["context"][f] == s[f], f
    assert s["verify_calls"] == sum(e[0] == "final" for e in eng.events) - 1
    embeds = [e[1] for e in eng.events if e[0] == "embed"]
    assert all(p <= n_prompt + max_new - 2 for p in embeds)  # no row past what vanilla computes
    assert eng.flight == {}


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.exactness
@pytest.mark.parametrize("kind", ["torch", "cpu"])
@FAST
@given(c=cases(), chains=st.lists(chain_entry, min_size=1, max_size=12), max_chain=st.integers(1, 8),
       gamma=st.sampled_from([0.5, 0.0, 0.99]))
def test_heads_and_chains_equal_vanilla_whatever_they_say(kind, c, chains, max_chain, gamma):
    run_chains(c, chains, kind=kind, gamma=gamma, max_chain=max_chain)


@pytest.mark.exactness
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(), chains=st.lists(chain_entry, min_size=1, max_size=12), max_chain=st.integers(1, 8))
def test_chains_alone_equal_vanilla(c, chains, max_chain):
    run_chains(c, chains, method="lookup", max_chain=max_chain)


@pytest.mark.exactness
@pytest.mark.parametrize("kind", ["torch", "cpu"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(), chains=st.lists(chain_entry, min_size=1, max_size=12), seed=st.integers(0, 3),
       head_guess=st.sampled_from(["sample", "argmax"]))
def test_sampled_chains_equal_vanilla_sampling(kind, c, chains, seed, head_guess):
    run_chains(c, chains, kind=kind, temperature=0.9, top_p=0.95, seed=seed, head_guess=head_guess)


# ---- the real lookup ------------------------------------------------------------------------------------------------
@pytest.mark.exactness
@pytest.mark.parametrize("kind", ["torch", "cpu"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seg=st.lists(st.integers(0, 96), min_size=2, max_size=8), reps=st.integers(1, 4),
       lead=st.lists(st.integers(0, 96), max_size=4), M=st.integers(1, 30), seed=st.integers(0, 2),
       cheap=st.booleans(), eos_at=st.one_of(st.none(), st.integers(0, 29)))
def test_real_lookup_on_repeating_contexts(kind, seg, reps, lead, M, seed, cheap, eos_at):
    """Prompts that repeat a segment (so the index proposes), vanilla's own output fed back as context (so chains are
    right), on a measured or a free cost model."""
    cfg, w = tiny_model(4, seed)
    extra = {"threads": 2} if kind == "cpu" else {}
    ref = ENGINES[kind](cfg, w, max_seq=192)
    first = generate_vanilla(ref, lead + seg * reps, M).tokens
    prompt = lead + seg * reps + first + lead + seg * reps  # the continuation of this prompt's end is in it
    eos = [first[eos_at]] if eos_at is not None and eos_at < len(first) else []
    van = generate_vanilla(ref, prompt, M, eos_ids=eos)
    eng = CHECKED[kind](cfg, w, max_seq=192, max_rows=9, max_flight=9, **extra)
    heads = [Head.identity(1, cfg.d), Head.identity(3, cfg.d)]
    cost = FREE if cheap else None
    lk = generate_lookup(eng, prompt, M, eos_ids=eos, step_cost=cost)
    assert lk.tokens == van.tokens
    check_chain_stats(lk, eng, len(prompt), M)
    both = generate_adadecode(eng, prompt, M, eos_ids=eos, heads=heads, gamma=0.2, max_pending=3, context=True,
                              step_cost=cost)
    assert both.tokens == van.tokens
    check_chain_stats(both, eng, len(prompt), M)
    event(f"lookup verified {min(lk.stats['sources']['context']['accepted'], 4)}+ chain tokens")


def test_chains_longer_than_the_rows_are_refused_or_cut():
    cfg, w = tiny_model(4, 0)
    eng = ENGINES["torch"](cfg, w, max_seq=64, max_rows=4)
    with pytest.raises(ValueError, match=r"max_chain=8 needs 9 rows in flight, but the engine holds max_rows=4"):
        generate_lookup(eng, [1, 2, 3], 5, max_chain=8, step_cost=FREE)
    with pytest.raises(ValueError, match="max_chain must be an integer >= 1"):
        generate_lookup(eng, [1, 2, 3], 5, max_chain=0, step_cost=FREE)
    with pytest.raises(ValueError, match="context must be true, false or a ContextGuesser"):
        generate_adadecode(eng, [1, 2, 3], 5, heads=[Head.identity(1, cfg.d)], max_pending=2, context="yes")
    # a guesser that proposes more than the rows hold: cut to the rows (checked by the engine's max_flight)
    c = dict(L=4, seed=0, head_layers=[1], prompt=[1, 2, 3], max_new=20, max_pending=2, tight_rows=True,
             eos_at=None, entries=[("right", True, 0.5, 0)])
    gen, eng = run_chains(c, [("right", 12, 0)], max_chain=3)
    assert max(gen.stats["rows_per_step"]) <= 4


def test_dear_rows_leave_adadecode_as_it_is():
    """A cost model where an extra row costs a whole token: no chain is ever drafted, and the schedule is
    AdaDecode's own, call for call."""
    cfg, w = tiny_model(4, 1)
    heads = [Head.identity(1, cfg.d), Head.identity(2, cfg.d)]
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    runs = {}
    for ctx in (False, True):
        eng = CHECKED["torch"](cfg, w, max_seq=64, max_rows=16)
        gen = generate_adadecode(eng, prompt, 24, heads=heads, gamma=0.1, context=ctx, step_cost=DEAR)
        runs[ctx] = (gen.tokens, [e for e in eng.events])
        if ctx:
            assert gen.stats["sources"]["context"]["guesses"] == 0 and gen.stats["context"]["declined"] > 0
    assert runs[True] == runs[False]


def test_step_cost_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg, w = tiny_model(4, 0)
    eng = ENGINES["cpu"](cfg, w, max_seq=64, max_rows=6)
    c = step_cost(eng)
    assert c.source == "measured" and len(c.layer) == 7 and all(c.layer[r] >= c.layer[r - 1] > 0 for r in range(2, 7))
    assert step_cost(eng) is c  # held by the engine
    again = step_cost(ENGINES["cpu"](cfg, w, max_seq=64, max_rows=6))
    assert again.source == "cache" and again.layer == c.layer  # the same engine kind, shapes and CPU: from disk
    assert eng.kv_len == [0] * cfg.n_layers  # measuring leaves no sequence behind
