"""The AdaDecode driver's rules, each checked where it decides (issue 32): a head's answer makes an exit exactly when
its confidence exceeds that head's gamma (equal is not enough); every wrong guess is rejected wherever it sits among
the pending ones, and the cache is rolled back to exactly the verified prefix; exits fill the token budget and never
pass it. Scripted heads on TorchEngine with the schedule's invariants checked at every call (test_driver.checked)."""
from __future__ import annotations

import math

import pytest

from adadecode.decoding.driver import generate_adadecode
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.head import Head
from adadecode.engines.torch import TorchEngine

from test_driver import CheckedEngine, check_stats, oracle, tiny_model


def vanilla(cfg, w, prompt, M):
    return generate_vanilla(TorchEngine(cfg, w, max_seq=64), prompt, M)


def exits_after_heads(events) -> list[tuple[int, int, bool]]:
    """(row, head index, exited) of each head call: an exit embeds the guess at the next row right after it."""
    out = []
    for i, e in enumerate(events):
        if e[0] == "head":
            nxt = events[i + 1] if i + 1 < len(events) else None
            out.append((e[1], e[2], nxt is not None and nxt[0] == "embed" and nxt[1] == e[1] + 1))
    return out


def test_exits_exactly_when_confidence_exceeds_gamma():
    """Two heads with their own gammas answer, in turn, exactly gamma, the next float above and below it, the other
    head's gamma, 0 and 1: each call exits iff confidence > its own head's gamma."""
    cfg, w = tiny_model(4, 0)
    prompt, M = [5, 6], 40
    truth = prompt + vanilla(cfg, w, prompt, M).tokens
    gammas = [0.5, 0.25]
    menu = {hi: [g, math.nextafter(g, 1.0), math.nextafter(g, 0.0), gammas[1 - hi], 0.0, 1.0]
            for hi, g in enumerate(gammas)}
    answered = []

    def script(eng, pos, hi):
        conf = menu[hi][sum(1 for _, h, _ in answered if h == hi) % len(menu[hi])]
        answered.append((pos, hi, conf))
        return truth[pos + 1], conf

    eng = CheckedEngine(cfg, w, max_seq=64, script=script, max_flight=9)
    heads = [Head.identity(1, cfg.d), Head.identity(2, cfg.d)]
    gen = generate_adadecode(eng, prompt, M, gamma=gammas, max_pending=8, heads=heads)
    assert gen.tokens == truth[len(prompt):]
    calls = exits_after_heads(eng.events)
    assert len(calls) == len(answered)
    for (pos, hi, exited), (_, _, conf) in zip(calls, answered):
        assert exited == (conf > gammas[hi]), f"head {hi} at row {pos}: confidence {conf!r}, gamma {gammas[hi]!r}"
    for hi in (0, 1):  # every answer of the menu was given, by each head
        assert {c for _, h, c in answered if h == hi} == set(menu[hi]), hi
    check_stats(gen, eng, len(prompt), M, head_layers=[1, 2])


@pytest.mark.parametrize("P", [1, 3, 6])
def test_every_wrong_guess_is_rejected_and_the_cache_rolled_back(P):
    """A head that always exits, wrong at the 2nd, 5th, 6th, 9th, ... call (so a wrong guess sits first, last and in
    between among the pending ones): every verification that meets a wrong guess rejects it, replaces it by the
    final token, drops the later rows and truncates the cache to exactly the verified prefix; vanilla's tokens."""
    cfg, w = tiny_model(4, 0)
    prompt, M = [9, 8, 7], 30
    truth = prompt + vanilla(cfg, w, prompt, M).tokens
    calls = [0]

    def script(eng, pos, hi):
        calls[0] += 1
        right = truth[pos + 1]
        return ((right + 1) % cfg.vocab_size if calls[0] % 4 in (1, 2) else right), 1.0

    eng = CheckedEngine(cfg, w, max_seq=64, max_rows=P + 1, max_flight=P + 1, script=script)
    gen = generate_adadecode(eng, prompt, M, gamma=0.5, max_pending=P, heads=[Head.identity(2, cfg.d)])
    assert gen.tokens == truth[len(prompt):]
    ev = eng.events
    checked = 0
    for i, e in enumerate(ev):
        if e[0] == "final" and i > 1:  # a verification (events 0, 1: the prefill and its final)
            # rows first..last: rows first+1..last were started from guesses; the first wrong one is row q + 1
            first, last = e[1], e[2]
            wrong = [q for q in range(first, last) if truth[q + 1] != guess_at(ev[:i], q + 1)]
            if wrong:
                q = wrong[0]
                assert ev[i + 1] == ("truncate", q + 1), (e, ev[i + 1])
                if i + 2 < len(ev):
                    assert ev[i + 2] == ("embed", q + 1, truth[q + 1]), ev[i + 2]
                checked += 1
    assert checked == gen.stats["rejected"] > 0
    ref = TorchEngine(cfg, w, max_seq=64)
    generate_vanilla(ref, prompt, M)
    assert eng.kv_len == ref.kv_len
    check_stats(gen, eng, len(prompt), M, head_layers=[2])


def guess_at(events, pos: int) -> int:
    """The token embedded last at row `pos` in these events (the guess a final call then verifies)."""
    return [e[2] for e in events if e[0] == "embed" and e[1] == pos][-1]


@pytest.mark.parametrize("M", [3, 4, 5, 7, 9])
def test_exits_fill_the_budget_and_never_pass_it(M):
    """A head always right and always confident, max_pending large: the driver takes exactly the exits whose rows can
    still yield an output token (M - 2 of them: the prefill's token, the guesses, the frontier's token make M) and
    discards nothing."""
    cfg, w = tiny_model(4, 0)
    prompt = [4, 5]
    truth = prompt + vanilla(cfg, w, prompt, M).tokens
    eng = CheckedEngine(cfg, w, max_seq=64, script=oracle(truth + [0]), max_flight=9)
    gen = generate_adadecode(eng, prompt, M, gamma=0.0, max_pending=8, heads=[Head.identity(1, cfg.d)])
    assert gen.tokens == truth[len(prompt):]
    assert (gen.stats["early"], gen.stats["accepted"], gen.stats["discarded"]) == (M - 2, M - 2, 0)
    check_stats(gen, eng, len(prompt), M, head_layers=[1])
