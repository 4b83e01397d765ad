"""AdaDecode and LayerSkip drivers (adadecode/decoding/driver.py) on TorchEngine and CpuEngine: exactly vanilla's
tokens on the same engine, whatever the heads say, with the schedule's invariants checked at every engine call and
the statistics adding up."""
from __future__ import annotations

import functools
import json

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from adadecode.decoding.driver import generate_adadecode, generate_layerskip
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.head import Head
from adadecode.engines.cpu import CpuEngine
from adadecode.engines.torch import TorchEngine
from adadecode.model.config import LlamaConfig

from conftest import random_weights, tiny_hf_config

torch.set_num_threads(1)  # tiny matrices: threads only cost time here


@functools.lru_cache(maxsize=None)
def tiny_model(n_layers: int = 4, seed: int = 0):
    cfg = LlamaConfig.from_hf(tiny_hf_config(num_hidden_layers=n_layers))
    return cfg, random_weights(cfg, seed=seed)


def checked(base):
    class CheckedEngine(base):
        """An engine that checks the driver's schedule at every call and can script the heads' answers.

        It tracks the rows in flight (embedded, not yet finalized nor truncated) and asserts: they are
        contiguous positions with depths non-increasing in position; `run_layers` runs exactly the rows at
        the frontier's depth (a suffix ending at the frontier), never past the next row's depth; `head` is
        asked on the frontier only; `final` covers every row in flight, all at depth L; a row started from a
        verified token finds the cache holding exactly 0..pos-1 at every layer.

        script(engine, pos, head_index) -> (token, confidence) replaces the heads' answers when given.
        """

        def __init__(self, *a, script=None, max_flight=None, **kw):
            super().__init__(*a, **kw)
            self.script, self.max_flight = script, max_flight
            self.flight: dict[int, int] = {}
            self.events: list[tuple] = []

        def _check(self):
            if not self.flight:
                return
            ps = sorted(self.flight)
            assert ps == list(range(ps[0], ps[-1] + 1)), f"rows in flight not contiguous: {ps}"
            ds = [self.flight[p] for p in ps]
            assert all(a >= b for a, b in zip(ds, ds[1:])), f"depths increase with position: {dict(zip(ps, ds))}"
            if self.max_flight is not None:
                assert len(ps) <= self.max_flight, f"{len(ps)} rows in flight, at most {self.max_flight} allowed"

        def prefill(self, tokens):
            super().prefill(tokens)
            self.flight = {len(tokens) - 1: self.n_layers}
            self.events = [("prefill", len(tokens))]  # one generation's events

        def embed(self, pos, token):
            if self.flight:
                assert pos == max(self.flight) + 1, f"embed at {pos}, frontier is {max(self.flight)}"
            else:  # a token verified: the cache holds exactly the verified prefix
                assert self.kv_len == [pos] * self.n_layers, f"embed at {pos} with cache lengths {self.kv_len}"
            super().embed(pos, token)
            self.flight[pos] = 0
            self.events.append(("embed", pos, int(token)))
            self._check()

        def run_layers(self, first, last, l0, l1):
            self._check()
            ps = sorted(self.flight)
            assert last == ps[-1], f"run_layers rows {first}..{last}: the frontier {ps[-1]} must be the last row"
            assert all(self.flight[p] == l0 for p in range(first, last + 1)), "rows not all at depth l0"
            if first > ps[0]:
                assert self.flight[first - 1] > l0, f"row {first - 1} is at depth {l0} too and was left out"
                assert l1 <= self.flight[first - 1], f"segment [{l0},{l1}) overtakes row {first - 1} at depth {self.flight[first - 1]}"
            super().run_layers(first, last, l0, l1)
            for p in range(first, last + 1):
                self.flight[p] = l1
            self.events.append(("run", first, last, l0, l1))
            self._check()

        def head(self, pos, head_index, **kw):
            assert pos == max(self.flight), f"head asked on row {pos}, the frontier is {max(self.flight)}"
            assert self.flight[pos] == self.heads[head_index].layer
            self.events.append(("head", pos, head_index))
            if self.script is None:
                return super().head(pos, head_index, **kw)
            self._row_slot(pos, self.heads[head_index].layer)  # the engine's own contract check
            tok, conf = self.script(self, pos, head_index)
            return int(tok), float(conf)

        def final(self, first, last, **kw):
            ps = sorted(self.flight)
            assert (first, last) == (ps[0], ps[-1]), f"final({first}, {last}) with rows {ps[0]}..{ps[-1]} in flight"
            assert all(self.flight[p] == self.n_layers for p in ps)
            out = super().final(first, last, **kw)
            self.flight = {}
            self.events.append(("final", first, last))
            return out

        def truncate(self, length):
            super().truncate(length)
            self.flight = {p: d for p, d in self.flight.items() if p < length}
            self.events.append(("truncate", length))

        def real_head(self, pos, head_index, **kw):
            """The engine's own head, past the script."""
            return base.head(self, pos, head_index, **kw)

    CheckedEngine.__name__ = f"Checked{base.__name__}"
    return CheckedEngine


ENGINES = {"torch": TorchEngine, "cpu": lambda *a, **kw: CpuEngine(*a, threads=2, **kw)}
CHECKED = {"torch": checked(TorchEngine), "cpu": checked(CpuEngine)}
CheckedEngine = CHECKED["torch"]


def check_stats(gen, eng: CheckedEngine, n_prompt: int, max_new: int, *, head_layers):
    s, L = gen.stats, eng.n_layers
    runs = [e for e in eng.events if e[0] == "run"]
    assert s["tokens"] == len(gen.tokens)
    assert s["early"] == s["accepted"] + s["rejected"] + s["discarded"]
    assert len(gen.tokens) == 1 + s["accepted"] + s["rejected"] + s["frontier_tokens"]
    assert sum(s["exit_layer_hist"].values()) == s["early"]
    assert set(s["exit_layer_hist"]) <= set(head_layers)
    assert sum(s["accepted_layer_hist"].values()) == s["accepted"]
    assert sum(s["rejected_layer_hist"].values()) == s["rejected"]
    assert all(s["accepted_layer_hist"].get(k, 0) + s["rejected_layer_hist"].get(k, 0) <= v
               for k, v in s["exit_layer_hist"].items())
    assert s["run_layers_calls"] == len(runs)
    assert s["layer_steps"] == sum(e[4] - e[3] for e in runs)
    assert s["row_layer_steps"] == sum((e[2] - e[1] + 1) * (e[4] - e[3]) for e in runs)
    assert sum(s["rows_per_step"].values()) == s["layer_steps"]
    assert sum(r * c for r, c in s["rows_per_step"].items()) == s["row_layer_steps"]
    assert s["head_calls"] == sum(e[0] == "head" for e in eng.events)
    assert s["verify_calls"] == sum(e[0] == "final" for e in eng.events) - 1
    assert s["vanilla_layer_steps"] == (len(gen.tokens) - 1) * L
    # every position a token is computed for is one vanilla computes too: nothing past the budget
    embeds = [e[1] for e in eng.events if e[0] == "embed"]
    assert all(p <= n_prompt + max_new - 2 for p in embeds)
    assert eng.flight == {}  # every row ended verified or rolled back


def scripted(truth, eos_tok, gamma, entries):
    """A head script: the i-th call answers from entries[i % len]: (kind, confident, u, r)."""
    calls = [0]

    def script(eng, pos, hi):
        kind, confident, u, r = entries[calls[0] % len(entries)]
        conf = gamma + (1 - gamma) * max(u, 1e-6) if confident else gamma * u  # u == 1: exactly gamma, no exit
        calls[0] += 1
        right = truth[pos + 1] if pos + 1 < len(truth) else r % eng.cfg.vocab_size
        if kind == "right":
            tok = right
        elif kind == "wrong":
            tok = (right + 1 + r) % eng.cfg.vocab_size
        elif kind == "eos":
            tok = eos_tok
        else:  # the real (identity) head
            tok = eng.real_head(pos, hi)[0]
        return tok, conf

    return script


# one scripted head answer: (token kind, confident?, where in (gamma, 1] or [0, gamma] the confidence lies, r)
entry = st.tuples(st.sampled_from(["right", "wrong", "right", "eos", "head"]), st.sampled_from([True, True, False]),
                  st.one_of(st.sampled_from([0.0, 1.0]), st.floats(0, 1)), st.integers(0, 1000))


@st.composite
def cases(draw):
    L = draw(st.integers(2, 5))
    return dict(
        L=L, seed=draw(st.integers(0, 2)),
        head_layers=sorted(draw(st.sets(st.integers(0, L - 1), min_size=1, max_size=L))),
        prompt=draw(st.lists(st.integers(0, 96), min_size=1, max_size=6)),
        max_new=draw(st.integers(3, 20)),  # 1 and 2: test_budget_of_one_two_three_tokens
        max_pending=draw(st.integers(1, 8)),
        tight_rows=draw(st.booleans()),
        eos_at=draw(st.one_of(st.none(), st.integers(1, 19))),  # 0: test_early_eos_waits_for_verification
        entries=draw(st.lists(entry, min_size=1, max_size=24)),
    )


def reference(c, kind, sampling):
    """A case's model and its vanilla run on `kind`: (cfg, w, n, M, ref engine, vanilla's sampling args, truth:
    prompt + vanilla's continuation without EOS (what a "right" guess says), the EOS token placed in the middle,
    vanilla's Generation with that EOS)."""
    cfg, w = tiny_model(c["L"], c["seed"])
    n, M = len(c["prompt"]), c["max_new"]
    ref = ENGINES[kind](cfg, w, max_seq=64)
    vs = {k: v for k, v in sampling.items() if k != "head_guess"}
    truth = c["prompt"] + generate_vanilla(ref, c["prompt"], M, **vs).tokens
    eos_tok = truth[n + c["eos_at"]] if c["eos_at"] is not None and c["eos_at"] < M else 2
    van = generate_vanilla(ref, c["prompt"], M, eos_ids=[eos_tok], **vs)
    return cfg, w, n, M, ref, vs, truth, eos_tok, van


def run_case(c, method, gamma=0.5, head_index=None, kind="torch", **sampling):
    """sampling: temperature, top_k, top_p, seed, head_guess for the drivers (vanilla gets all but head_guess).
    kind: the engine, torch or cpu (vanilla decoding on the same kind is the reference)."""
    cfg, w, n, M, ref, vs, truth, eos_tok, van = reference(c, kind, sampling)
    P = c["max_pending"] if method == "adadecode" else c["k"]
    max_rows = P + 1 if c["tight_rows"] else 16
    extra = {"threads": 2} if kind == "cpu" else {}
    eng = CHECKED[kind](cfg, w, max_seq=64, max_rows=max_rows, max_flight=P + 1,
                        script=scripted(truth, eos_tok, gamma, c["entries"]), **extra)
    heads = [Head.identity(l, cfg.d) for l in c["head_layers"]]
    seen = []
    if method == "adadecode":
        gen = generate_adadecode(eng, c["prompt"], M, gamma=gamma, eos_ids=[eos_tok], max_pending=P, heads=heads,
                                 on_token=seen.append, **sampling)
        layers = c["head_layers"]
    else:
        gen = generate_layerskip(eng, c["prompt"], M, head_index=head_index, k=P, eos_ids=[eos_tok], heads=heads,
                                 on_token=seen.append, **sampling)
        layers = [c["head_layers"][head_index]]
    assert gen.tokens == van.tokens
    assert seen == van.tokens
    assert eng.kv_len == ref.kv_len  # the cache ends as vanilla's does
    check_stats(gen, eng, n, M, head_layers=layers)
    event(f"rollbacks: {min(gen.stats['rejected'], 2)}+, early exits: {min(gen.stats['early'], 3)}+")
    event(f"ended by EOS: {van.tokens[-1] == eos_tok}, max rows in one step: {max(gen.stats['rows_per_step'], default=0)}")
    return gen, eng


FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.exactness
@pytest.mark.parametrize("kind", ["torch", "cpu"])
@FAST
@given(c=cases(), gamma=st.one_of(st.sampled_from([0.5, 0.0, 0.99]), st.floats(0, 0.99)))
def test_adadecode_equals_vanilla_whatever_the_heads_say(kind, c, gamma):
    run_case(c, "adadecode", gamma=gamma, kind=kind)


@pytest.mark.exactness
@pytest.mark.parametrize("kind", ["torch", "cpu"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(), k=st.integers(1, 8), data=st.data())
def test_layerskip_equals_vanilla_whatever_the_head_says(kind, c, k, data):
    c["k"] = k
    hi = data.draw(st.integers(0, len(c["head_layers"]) - 1))
    gen, eng = run_case(c, "layerskip", head_index=hi, kind=kind)
    l, L = c["head_layers"][hi], c["L"]
    assert all(e[3] in (0, l) and e[4] in (l, L) for e in eng.events if e[0] == "run")
    assert gen.stats["head_calls"] == gen.stats["early"]  # it drafts whatever the confidence


@pytest.mark.parametrize("gamma", [0.0, 0.05, 0.2, 0.9])
def test_identity_heads_real_confidences(gamma):
    """The logit lens, unscripted: exits at whatever gamma lets through, still vanilla's tokens."""
    cfg, w = tiny_model(6, 1)
    ref = TorchEngine(cfg, w, max_seq=96)
    eng = CheckedEngine(cfg, w, max_seq=96, max_flight=6)
    for prompt in ([1], [5, 17, 3, 88], list(range(3, 40, 3))):
        van = generate_vanilla(ref, prompt, 20, eos_ids=[2])
        gen = generate_adadecode(eng, prompt, 20, gamma=gamma, eos_ids=[2],
                                 heads=[Head.identity(l, cfg.d) for l in (1, 3, 4)])
        assert gen.tokens == van.tokens
        check_stats(gen, eng, len(prompt), 20, head_layers=[1, 3, 4])
        if gamma == 0.0:
            assert gen.stats["early"] > 0


def oracle(truth, wrong_when=lambda eng, pos: False):
    def script(eng, pos, hi):
        right = truth[pos + 1]
        return ((right + 1) % eng.cfg.vocab_size if wrong_when(eng, pos) else right), 1.0
    return script


def test_oracle_heads_layer_steps_exact():
    """L=4, one head at layer 2, always right, max_pending 1: two tokens per [0,2) + [0,2) + [2,4) x2 rows."""
    cfg, w = tiny_model(4, 0)
    prompt, M = [3, 4, 5], 21
    ref = TorchEngine(cfg, w, max_seq=64)
    van = generate_vanilla(ref, prompt, M)
    eng = CheckedEngine(cfg, w, max_seq=64, script=oracle(prompt + van.tokens), max_flight=2)
    gen = generate_adadecode(eng, prompt, M, gamma=0.5, max_pending=1, heads=[Head.identity(2, cfg.d)])
    assert gen.tokens == van.tokens
    s = gen.stats
    assert (s["early"], s["accepted"], s["rejected"], s["discarded"]) == (10, 10, 0, 0)
    assert s["frontier_tokens"] == 10 and s["verify_calls"] == 10
    assert s["layer_steps"] == 10 * 6 and s["vanilla_layer_steps"] == 20 * 4
    assert s["rows_per_step"] == {1: 40, 2: 20}
    assert s["exit_layer_hist"] == {2: 10}
    runs = [e[3:] for e in eng.events if e[0] == "run"]
    assert runs[:3] == [(0, 2), (0, 2), (2, 4)]


def test_oracle_heads_deep_chain_segments():
    """Two heads (1, 3) of 5 layers, always right: rows join the batch at each depth boundary."""
    cfg, w = tiny_model(5, 2)
    prompt, M = [7], 30
    ref = TorchEngine(cfg, w, max_seq=64)
    van = generate_vanilla(ref, prompt, M)
    for P in range(1, 9):
        eng = CheckedEngine(cfg, w, max_seq=64, script=oracle(prompt + van.tokens), max_flight=P + 1)
        gen = generate_adadecode(eng, prompt, M, gamma=0.5, max_pending=P,
                                 heads=[Head.identity(1, cfg.d), Head.identity(3, cfg.d)])
        assert gen.tokens == van.tokens
        assert gen.stats["rejected"] == 0 and gen.stats["discarded"] == 0
        assert gen.stats["layer_steps"] < gen.stats["vanilla_layer_steps"]
        assert max(gen.stats["rows_per_step"]) == P + 1
        check_stats(gen, eng, 1, M, head_layers=[1, 3])


@pytest.mark.parametrize("P", range(1, 9))
def test_rollback_at_every_pending_position(P):
    """Always exit; the guess made with j guesses already pending is wrong: the rollback lands at first+j+1."""
    cfg, w = tiny_model(4, 0)
    prompt, M = [9, 8], 26
    ref = TorchEngine(cfg, w, max_seq=64)
    van = generate_vanilla(ref, prompt, M)
    truth = prompt + van.tokens
    for j in range(P):
        eng = CheckedEngine(cfg, w, max_seq=64, max_rows=P + 1, max_flight=P + 1,
                            script=oracle(truth, lambda e, pos: len(e.flight) - 1 == j))
        gen = generate_adadecode(eng, prompt, M, gamma=0.5, max_pending=P, heads=[Head.identity(2, cfg.d)])
        assert gen.tokens == van.tokens
        assert gen.stats["rejected"] > 0 and gen.stats["accepted"] >= j * gen.stats["rejected"]
        # each rollback: final over first..front, then truncate(first + j + 1), then a restart there
        ev = eng.events
        for i, e in enumerate(ev):
            if e[0] == "final" and e[1] != e[2] and ev[i + 1][0] == "truncate" and ev[i + 1][1] <= e[2]:
                assert ev[i + 1][1] == e[1] + j + 1
                assert ev[i + 2:i + 3] == [("embed", e[1] + j + 1, truth[e[1] + j + 1])]
        check_stats(gen, eng, len(prompt), M, head_layers=[2])


def test_early_eos_waits_for_verification():
    """Heads that always guess EOS confidently: nothing stops until the model itself says EOS."""
    cfg, w = tiny_model(4, 0)
    prompt, M = [11, 12], 25
    ref = TorchEngine(cfg, w, max_seq=64)
    truth = prompt + generate_vanilla(ref, prompt, M).tokens
    for eos in (2, truth[len(prompt) + 12], truth[len(prompt)]):  # never produced / in the middle / first
        van = generate_vanilla(ref, prompt, M, eos_ids=[eos])
        eng = CheckedEngine(cfg, w, max_seq=64, script=lambda e, pos, hi: (eos, 1.0))
        seen = []
        gen = generate_adadecode(eng, prompt, M, gamma=0.5, eos_ids=[eos], heads=[Head.identity(1, cfg.d)],
                                 on_token=seen.append)
        assert gen.tokens == seen == van.tokens
        assert gen.stats["early"] > 0 or len(van.tokens) == 1


def test_confidence_must_exceed_gamma():
    cfg, w = tiny_model(4, 0)
    prompt = [5, 6]
    ref = TorchEngine(cfg, w, max_seq=64)
    truth = prompt + generate_vanilla(ref, prompt, 10).tokens
    eng = CheckedEngine(cfg, w, max_seq=64, script=lambda e, pos, hi: (truth[pos + 1], 0.6))
    heads = [Head.identity(2, cfg.d)]
    assert generate_adadecode(eng, prompt, 10, gamma=0.6, heads=heads).stats["early"] == 0
    assert generate_adadecode(eng, prompt, 10, gamma=0.59, heads=heads).stats["early"] > 0
    # one gamma per head
    heads = [Head.identity(1, cfg.d), Head.identity(2, cfg.d)]
    gen = generate_adadecode(eng, prompt, 10, gamma=[0.7, 0.5], heads=heads)
    assert set(gen.stats["exit_layer_hist"]) == {2}


def test_budget_of_one_two_three_tokens():
    cfg, w = tiny_model(3, 0)
    for M in (1, 2, 3):
        ref = TorchEngine(cfg, w, max_seq=16)
        van = generate_vanilla(ref, [4], M)
        eng = CheckedEngine(cfg, w, max_seq=16, script=oracle([4] + van.tokens + [0]))
        gen = generate_adadecode(eng, [4], M, gamma=0.0, heads=[Head.identity(1, cfg.d)])
        assert gen.tokens == van.tokens
        assert gen.stats["early"] == (1 if M == 3 else 0)


def test_bad_arguments():
    cfg, w = tiny_model(4, 0)
    eng = TorchEngine(cfg, w, max_seq=32, max_rows=4)
    h = [Head.identity(1, cfg.d)]
    with pytest.raises(ValueError, match="max_rows=4"):
        generate_adadecode(eng, [1], 5, heads=h, max_pending=4)
    generate_adadecode(eng, [1], 5, heads=h, max_pending=3)
    with pytest.raises(ValueError, match="max_pending"):
        generate_adadecode(eng, [1], 5, heads=h, max_pending=0)
    with pytest.raises(ValueError, match="k=4"):
        generate_layerskip(eng, [1], 5, heads=h, k=4)
    eng = TorchEngine(cfg, w, max_seq=32)
    with pytest.raises(ValueError, match="layer 4"):
        generate_adadecode(eng, [1], 5, heads=[Head.identity(4, cfg.d)])
    with pytest.raises(ValueError, match="both at layer 1"):
        generate_adadecode(eng, [1], 5, heads=h + h)
    with pytest.raises(ValueError, match="gamma has 1 values for 2 heads"):
        generate_adadecode(eng, [1], 5, heads=h + [Head.identity(2, cfg.d)], gamma=[0.5])
    with pytest.raises(ValueError, match="head_index 3"):
        generate_layerskip(eng, [1], 5, heads=h, head_index=3)
    with pytest.raises(ValueError, match="context"):
        generate_adadecode(eng, [1] * 30, 5, heads=h)
    with pytest.raises(ValueError, match="no intermediate heads"):
        generate_adadecode(TorchEngine(cfg, w, max_seq=32), [1], 5)


# ---- CLI ----------------------------------------------------------------------------------------------------

def tiny_hf_dir(tmp_path):
    """An HF checkpoint directory of a tiny random model with a word-level tokenizer ('w0' .. 'w96')."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from adadecode.model.loader import Model, write_hf_dir
    from adadecode.model.tokenizer import Tokenizer

    cfg, w = tiny_model(4, 0)
    hf = HFTokenizer(models.WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = Tokenizer(hf.to_str(), {"eos_token": "w2"})
    write_hf_dir(Model(cfg=cfg, weights=w, tokenizer=tok, source="tiny"), tmp_path)
    return tmp_path


def test_cli_methods_agree(tmp_path, monkeypatch, capsys):
    import adadecode.heads.files
    from adadecode.cli import main

    d = tiny_hf_dir(tmp_path / "m")
    calls = []

    def load_heads(spec, model):
        calls.append(spec)
        return [Head.identity(1, model.cfg.d), Head.identity(3, model.cfg.d)], {"gamma": 0.01}

    monkeypatch.setattr(adadecode.heads.files, "load_heads", load_heads, raising=False)
    base = ["generate", "--model", str(d), "--prompt", "w5 w9 w13", "--max-new-tokens", "24", "--engine", "torch",
            "--device", "cpu", "--dtype", "fp32", "--json"]
    outs = {}
    for extra in ([], ["--method", "adadecode", "--heads", "x.safetensors"],
                  ["--method", "adadecode", "--gamma", "0.5", "--max-pending", "2"],
                  ["--method", "layerskip", "--k", "3"], ["--method", "layerskip", "--head-layer", "1"]):
        assert main(base + extra) == 0
        outs[" ".join(extra)] = json.loads(capsys.readouterr().out)
    van = outs[""]
    assert van["method"] == "vanilla"
    for key, o in outs.items():
        assert o["tokens"] == van["tokens"], key
        assert {"early", "accepted", "rejected", "layer_steps", "vanilla_layer_steps"} <= set(o["stats"]), key
    ada = outs["--method adadecode --heads x.safetensors"]
    assert ada["gamma"] == 0.01 and ada["max_pending"] == 5 and ada["stats"]["early"] > 0
    assert outs["--method adadecode --gamma 0.5 --max-pending 2"]["gamma"] == 0.5
    assert outs["--method layerskip --k 3"]["head_layer"] == 3
    assert outs["--method layerskip --head-layer 1"]["head_layer"] == 1
    assert calls == ["x.safetensors", "default", "default", "default"]
    # text mode streams the same text, and a missing head layer is a clear error
    assert main(base[:-1] + ["--method", "adadecode"]) == 0
    assert capsys.readouterr().out.strip() == van["text"].strip()
    assert main(base + ["--method", "layerskip", "--head-layer", "2"]) == 2
    assert "head_layer 2" in capsys.readouterr().err


def test_cli_with_a_head_file(tmp_path, capsys):
    """The real head-file path: save_heads (issue 5) -> --heads FILE -> the driver, restricted vocab included."""
    import adadecode.heads.files
    from adadecode.cli import main
    from adadecode.model.loader import load_model

    if not hasattr(adadecode.heads.files, "save_heads"):
        pytest.skip("adadecode.heads.files has no save_heads yet (issue 5: head files)")
    d = tiny_hf_dir(tmp_path / "m")
    model = load_model(d)
    heads = [Head.identity(1, model.cfg.d), Head.identity(2, model.cfg.d, vocab=torch.arange(0, 97, 2))]
    adadecode.heads.files.save_heads(tmp_path / "h.safetensors", heads, model, {"gamma": 0.02, "description": "test"})
    base = ["generate", "--model", str(d), "--prompt", "w7 w1", "--max-new-tokens", "20", "--engine", "torch",
            "--device", "cpu", "--dtype", "fp32", "--json"]
    assert main(base) == 0
    van = json.loads(capsys.readouterr().out)
    assert main(base + ["--method", "adadecode", "--heads", str(tmp_path / "h.safetensors")]) == 0
    ada = json.loads(capsys.readouterr().out)
    assert ada["tokens"] == van["tokens"] and ada["gamma"] == 0.02 and ada["head_layers"] == [1, 2]
    assert ada["stats"]["early"] > 0


# ---- the default model --------------------------------------------------------------------------------------

PROMPTS = ("The capital of France is", "Write a Python function that reverses a string.", "What is 2 + 2?")


def default_engine(model):
    return TorchEngine(model.cfg, model.weights, max_seq=256, dtype=torch.float32)


@pytest.mark.slow
def test_default_model_logit_lens_rollbacks(default_model):
    """Untrained (identity) heads on the real model are confidently wrong: rollbacks everywhere, same tokens."""
    m, eng = default_model, default_engine(default_model)
    prompt = m.tokenizer.encode_chat(PROMPTS[0])
    van = generate_vanilla(eng, prompt, 16, eos_ids=m.eos_ids)
    heads = [Head.identity(l, m.cfg.d) for l in (12, 20, 24)]
    gen = generate_adadecode(eng, prompt, 16, gamma=0.75, eos_ids=m.eos_ids, heads=heads)
    assert gen.tokens == van.tokens
    assert gen.stats["early"] > 0 and gen.stats["rejected"] > 0


@pytest.mark.slow
def test_default_model_with_default_heads(default_model):
    import adadecode.heads.files

    if not hasattr(adadecode.heads.files, "load_heads"):
        pytest.skip("adadecode.heads.files has no load_heads yet (issue 5: head files)")
    try:
        heads, meta = adadecode.heads.files.load_heads("default", default_model)
    except FileNotFoundError as e:
        pytest.skip(f"no default heads shipped yet: {e}")
    m, eng = default_model, default_engine(default_model)
    gamma = (meta or {}).get("gamma", 0.75)
    total_early = 0
    for text in PROMPTS:
        prompt = m.tokenizer.encode_chat(text)
        van = generate_vanilla(eng, prompt, 32, eos_ids=m.eos_ids)
        gen = generate_adadecode(eng, prompt, 32, gamma=gamma, eos_ids=m.eos_ids, heads=heads)
        assert gen.tokens == van.tokens, text
        total_early += gen.stats["early"]
        gen = generate_layerskip(eng, prompt, 32, eos_ids=m.eos_ids, heads=heads, k=3)
        assert gen.tokens == van.tokens, text
    assert total_early > 0
