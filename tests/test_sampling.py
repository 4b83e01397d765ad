"""Seeded sampling (adadecode/engines/sampling.py, docs/design.md#sampling): the generator, the rule, its distribution, and
AdaDecode / LayerSkip equal to vanilla sampling token for token on TorchEngine. The CUDA epilogue against this reference:
test_sampling_cuda.py."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adadecode.decoding.driver import generate_adadecode, generate_layerskip
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines import sampling as S
from adadecode.engines.head import Head
from adadecode.engines.sampling import Sampling, make_sampling, sample
from adadecode.engines.torch import TorchEngine

from test_driver import CheckedEngine, cases, check_stats, run_case, tiny_model


def ints(*v):
    return torch.tensor(v, dtype=torch.int64)


# ---- the generator -------------------------------------------------------------------------------------------
def test_philox_known_answers():
    """Random123's known-answer vectors for philox4x32_10."""
    M = S.M32
    for ctr, key, out in [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
                          ((M, M, M, M), (M, M), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
                          ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                           (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]:
        got = S.philox4x32_10(*(ints(c) for c in ctr), *key)
        assert [int(x) for x in got] == list(out)


def test_uniform_is_exact_and_keyed_by_seed_position_and_id():
    u = S.uniform(5, torch.arange(1000)[:, None], torch.arange(50)[None, :])
    k = (u.double() * 2**24 - 1) / 2
    assert torch.equal(k, k.round()) and 0 < u.min() and u.max() < 1  # (2k + 1) 2^-24 exactly
    assert len(set(u.flatten().tolist())) > 0.99 * u.numel()
    assert torch.equal(S.uniform(5, torch.tensor(7), torch.tensor(3)), u[7, 3])
    assert not torch.equal(S.uniform(6, torch.arange(1000)[:, None], torch.arange(50)[None, :]), u)
    assert not torch.equal(S.uniform(5 + 2**32, torch.arange(1000)[:, None], torch.arange(50)[None, :]), u)


def test_log_and_exp_are_accurate():
    x = torch.cat([torch.logspace(-7.3, 1.3, 20001), torch.tensor([1.0, 2.0, 0.5, 1 - 2**-24, 2**-24])]).float()
    ref = torch.log(x.double())
    assert ((S.log_f32(x).double() - ref).abs() <= 4e-7 * ref.abs().clamp(min=1) + 1e-7 * ref.abs()).all()
    d = torch.linspace(-17, 0, 20001).float()
    assert ((S.exp_f32(d).double() / torch.exp(d.double()) - 1).abs() < 2e-6).all()
    g = S.gumbel(3, torch.arange(200000), torch.tensor(1)).double()  # mean: Euler's gamma, variance pi^2/6
    assert abs(g.mean() - 0.5772156649) < 6 * math.sqrt(math.pi**2 / 6 / 2e5)
    assert abs(g.var() - math.pi**2 / 6) < 0.05


def test_noise_bounds_hold_for_every_possible_draw():
    """All 2^23 values of u: the Gumbel noise lies inside [GUMBEL_LO, GUMBEL_HI], which `sample` relies on to skip
    tokens that cannot win."""
    u = (torch.arange(2**23, dtype=torch.int64) * 2 + 1).to(torch.float32) * 2.0**-24
    g = -S.log_f32(-S.log_f32(u))
    assert torch.isfinite(g).all() and S.GUMBEL_LO < g.min() and g.max() < S.GUMBEL_HI
    assert -2.82 < g.min() < -2.80 and 16.6 < g.max() < 16.7


HOST_PROGRAM = r"""
#include <cstdio>
#include "cuda/kernels/sampling.cuh"
int main() {
  const unsigned long long seeds[] = {0ull, 5ull, 0xFFFFFFFFFFFFFFFFull, 1ull << 40};
  for (unsigned long long s : seeds)
    for (int pos = 0; pos < 40; pos += 3)
      for (int id = 0; id < 49152; id += 97) std::printf("%u\n", adadecode::rn::as_uint(adadecode::gumbel_noise(s, pos, id)));
  for (int i = 0; i <= 20000; ++i) std::printf("%llu\n", (unsigned long long)adadecode::top_p_weight(-17.f * i / 20000.f, 0.f));
}
"""


@pytest.mark.parametrize("flags", [["-O2", "-ffp-contract=off"], ["-O3", "-march=native", "-ffp-contract=fast"]])
def test_kernel_math_compiled_for_the_host_matches_the_reference(tmp_path, flags):
    """csrc/cuda/kernels/sampling.cuh (the device functions of the epilogue) built by the host compiler, even with FMA
    contraction allowed: Philox, the Gumbel noise and the top-p weights are this module's, bit for bit."""
    import shutil
    import subprocess
    from pathlib import Path

    import numpy as np

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    src = tmp_path / "host.cpp"
    src.write_text(HOST_PROGRAM)
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    subprocess.run([cxx, "-std=c++17", *flags, f"-I{csrc}", str(src), "-o", str(tmp_path / "host")], check=True)
    out = [int(v) for v in subprocess.run([str(tmp_path / "host")], capture_output=True, text=True, check=True).stdout.split()]
    noise = torch.cat([S.gumbel(s, torch.arange(0, 40, 3)[:, None], torch.arange(0, 49152, 97)[None, :]).flatten()
                       for s in (0, 5, 2**64 - 1, 2**40)])
    assert out[:noise.numel()] == (noise.view(torch.int32).to(torch.int64) & S.M32).tolist()
    d = torch.from_numpy(np.float32(-17.0) * np.arange(20001, dtype=np.float32) / np.float32(20000.0))
    assert out[noise.numel():] == S.top_p_weights(d[None], torch.ones(1, 20001, dtype=torch.bool))[0].tolist()


# ---- the rule ------------------------------------------------------------------------------------------------
def test_rule_basics():
    logits = torch.tensor([[0.5, 3.0, 3.0, -1.0, 2.0]])
    for seed in range(20):
        assert sample(logits, Sampling(1.0, top_k=1, seed=seed), [seed]).item() in (1, 2)  # the tie survives top-k
        assert sample(logits, Sampling(1.0, top_p=1e-9, seed=seed), [seed]).item() in (1, 2)
    near_greedy = [sample(logits, Sampling(1e-4, seed=s), [s]).item() for s in range(50)]
    assert set(near_greedy) == {1, 2}  # the tie is broken by the noise, nothing else gets through
    drawn = {sample(logits, Sampling(1.0, seed=s), [0]).item() for s in range(1000)}
    assert drawn == {0, 1, 2, 3, 4}
    # rows are independent of each other (batch invariance of the rule) and of their index in the call
    many = torch.randn(9, 40)
    pos = list(range(100, 109))
    s = Sampling(0.8, top_k=7, top_p=0.9, seed=11)
    assert sample(many, s, pos).tolist() == [sample(many[i:i + 1], s, [p]).item() for i, p in enumerate(pos)]
    with pytest.raises(FloatingPointError, match="non-finite"):
        sample(torch.tensor([[1e38, 0.0]]), Sampling(1e-3), [0])


def kept_by_definition(z: torch.Tensor, s: Sampling) -> set[int]:
    """The kept set straight from the definition in adadecode/engines/sampling.py (one row, brute force)."""
    zs = z.tolist()
    keep = set(range(len(zs)))
    if 0 < s.top_k < len(zs):
        kth = sorted(zs, reverse=True)[s.top_k - 1]
        keep = {j for j in keep if zs[j] >= kth}
    if s.top_p < 1:
        mask = torch.tensor([j in keep for j in range(len(zs))])[None]
        w = S.top_p_weights(z[None], mask)[0].tolist()
        target = math.ceil(float(sum(w)) * s.top_p)
        t = max(v for v in set(zs) if sum(w[j] for j in range(len(zs)) if zs[j] >= v) >= target)
        keep = {j for j in keep if zs[j] >= t}
    return keep


@settings(max_examples=150, deadline=None)
@given(logits=st.lists(st.integers(-12, 12), min_size=1, max_size=12), top_k=st.integers(0, 14),
       top_p=st.one_of(st.sampled_from([1.0, 0.5, 0.9, 1e-6]), st.floats(0.01, 1.0)),
       temperature=st.sampled_from([1.0, 0.7, 0.25, 3.0]))
def test_kept_set_matches_its_definition(logits, top_k, top_p, temperature):
    s = Sampling(temperature, top_k=top_k, top_p=top_p)
    z = torch.tensor(logits, dtype=torch.float32) * s.inv_temperature
    got = {j for j, k in enumerate(S.kept(z[None], s)[0].tolist()) if k}
    assert got == kept_by_definition(z, s)


def expected_probs(logits: list[float], s: Sampling) -> torch.Tensor:
    """float64 softmax(logits / T) restricted to top-k, then to the nucleus (the textbook definition)."""
    z = torch.tensor(logits, dtype=torch.float64) / s.temperature
    keep = torch.ones_like(z, dtype=torch.bool)
    if 0 < s.top_k < len(logits):
        keep = z >= torch.topk(z, s.top_k).values[-1]
    p = torch.softmax(z.masked_fill(~keep, -math.inf), dim=0)
    if s.top_p < 1:
        ps, order = torch.sort(p, descending=True)
        cum = ps.cumsum(0)
        i = int((cum < s.top_p - 1e-12).sum())
        keep &= z >= z[order[i]]
        p = torch.softmax(z.masked_fill(~keep, -math.inf), dim=0)
    return p


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    n = counts.sum().double()
    assert counts[probs == 0].sum() == 0, f"drew tokens of probability 0: {counts.tolist()}"
    live = probs > 0
    if live.sum() == 1:
        return 1.0
    expect = probs[live] * n
    stat = ((counts[live].double() - expect) ** 2 / expect).sum()
    df = int(live.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


LOGITS = [2.0, 1.2, 0.9, 0.0, -0.7, -2.5]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.6, 0, 1.0), (1.0, 3, 1.0),
                                                     (1.0, 0, 0.8), (0.7, 4, 0.9)])
def test_seeded_sampling_follows_the_softmax(temperature, top_k, top_p):
    """Chi-square of 20000 draws over positions (one seed) and 1500 over seeds (one position) against the
    float64 distribution; p < 1e-6 would fail (a correct sampler does that once in a million runs, and these
    draws are fixed). The same draws against another temperature's distribution must fail: the test has power."""
    s = Sampling(temperature, top_k=top_k, top_p=top_p, seed=2024)
    probs = expected_probs(LOGITS, s)
    logits = torch.tensor([LOGITS], dtype=torch.float32)
    n = 20000
    by_pos = torch.bincount(sample(logits.expand(n, -1), s, torch.arange(n) + 7), minlength=len(LOGITS))
    assert chi2_pvalue(by_pos, probs) > 1e-6, (by_pos.tolist(), probs.tolist())
    by_seed = torch.zeros(len(LOGITS), dtype=torch.int64)
    for seed in range(1500):
        by_seed[sample(logits, Sampling(temperature, top_k, top_p, seed=seed * 7919 + 1), [3]).item()] += 1
    assert chi2_pvalue(by_seed, probs) > 1e-6, (by_seed.tolist(), probs.tolist())
    other = expected_probs(LOGITS, Sampling(temperature * 1.25, top_k=top_k, top_p=top_p))
    assert chi2_pvalue(by_pos, other.masked_fill(probs == 0, 0) / other.masked_fill(probs == 0, 0).sum()) < 1e-6


# ---- options: checks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-0.1), "temperature must be >= 0"), (dict(temperature=float("nan")), "temperature must be finite"),
    (dict(temperature=float("inf")), "temperature must be finite"), (dict(temperature="1"), "temperature must be a number"),
    (dict(temperature=1e-39), "too small"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"), (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), "top_p must be finite"),
    (dict(top_k=-1), "top_k must be >= 0"), (dict(top_k=2.5), "top_k must be an integer"),
    (dict(top_k=True), "top_k must be an integer"),
    (dict(seed=1.5), "seed must be an integer"), (dict(seed="7"), "seed must be an integer"),
    (dict(seed=-1), r"seed must be an integer in 0..2\*\*64-1"), (dict(seed=2**64), r"0..2\*\*64-1"),
    (dict(seed=True), "seed must be an integer")])
def test_bad_options_are_clear_errors(kw, match):
    kw = {"temperature": 0.7, **kw}
    with pytest.raises(ValueError, match=match):
        make_sampling(**kw)
    cfg, w = tiny_model(2, 0)
    eng = TorchEngine(cfg, w, max_seq=16)
    for gen in (lambda: generate_vanilla(eng, [1], 3, **kw),
                lambda: generate_adadecode(eng, [1], 3, heads=[Head.identity(1, cfg.d)], **kw),
                lambda: generate_layerskip(eng, [1], 3, heads=[Head.identity(1, cfg.d)], **kw)):
        with pytest.raises(ValueError, match=match):
            gen()
    with pytest.raises(ValueError, match="head_guess"):
        generate_adadecode(eng, [1], 3, heads=[Head.identity(1, cfg.d)], head_guess="best")


def test_temperature_zero_is_greedy():
    cfg, w = tiny_model(3, 1)
    eng = TorchEngine(cfg, w, max_seq=48)
    greedy = generate_vanilla(eng, [3, 1, 4], 30).tokens
    assert make_sampling(0.0, top_k=3, top_p=0.5, seed=9) is None
    assert generate_vanilla(eng, [3, 1, 4], 30, temperature=0, top_k=3, top_p=0.5, seed=9).tokens == greedy
    drawn = {tuple(generate_vanilla(eng, [3, 1, 4], 30, temperature=1.0, seed=s).tokens) for s in range(4)}
    assert len(drawn) == 4 and tuple(greedy) not in drawn  # 30 draws from 97 tokens: seeds give other texts
    again = generate_vanilla(eng, [3, 1, 4], 30, temperature=1.0, seed=2).tokens
    assert again == generate_vanilla(eng, [3, 1, 4], 30, temperature=1.0, seed=2).tokens


# ---- AdaDecode and LayerSkip equal vanilla sampling ------------------------------------------------------------
options = st.fixed_dictionaries(dict(
    temperature=st.one_of(st.sampled_from([0.7, 1.0, 1.5, 0.2]), st.floats(0.05, 3.0)),
    top_k=st.sampled_from([0, 0, 1, 2, 5, 40]),
    top_p=st.one_of(st.sampled_from([1.0, 1.0, 0.9, 0.5]), st.floats(0.05, 1.0)),
    seed=st.one_of(st.integers(0, 5), st.integers(0, 2**64 - 1)),
    head_guess=st.sampled_from(["sample", "argmax"])))

SAMPLED = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("kind", ["torch", "cpu"])
@SAMPLED
@given(c=cases(), gamma=st.one_of(st.sampled_from([0.5, 0.0]), st.floats(0, 0.99)), opts=options)
def test_adadecode_sampling_equals_vanilla_sampling(kind, c, gamma, opts):
    run_case(c, "adadecode", gamma=gamma, kind=kind, **opts)


@pytest.mark.parametrize("kind", ["torch", "cpu"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=cases(), k=st.integers(1, 8), opts=options, data=st.data())
def test_layerskip_sampling_equals_vanilla_sampling(kind, c, k, opts, data):
    c["k"] = k
    run_case(c, "layerskip", head_index=data.draw(st.integers(0, len(c["head_layers"]) - 1)), kind=kind, **opts)


@pytest.mark.parametrize("head_guess", ["sample", "argmax"])
@pytest.mark.parametrize("restricted", [False, True])
def test_real_heads_guess_under_sampling(head_guess, restricted):
    """Unscripted identity heads (full and restricted vocabularies), always exiting: the engine's own head
    draws or argmaxes, and the output is vanilla sampling's for several seeds."""
    cfg, w = tiny_model(6, 1)
    ref = TorchEngine(cfg, w, max_seq=96)
    eng = CheckedEngine(cfg, w, max_seq=96, max_flight=6)
    vocab = torch.arange(0, cfg.vocab_size, 3) if restricted else None
    heads = [Head.identity(layer, cfg.d, vocab=vocab) for layer in (2, 4, 5)]
    accepted = 0
    for seed, prompt in enumerate(([1], [5, 17, 3, 88], list(range(3, 40, 3)))):
        kw = dict(temperature=0.8, top_k=20, top_p=0.95, seed=seed)
        van = generate_vanilla(ref, prompt, 24, eos_ids=[2], **kw)
        gen = generate_adadecode(eng, prompt, 24, gamma=0.0, eos_ids=[2], heads=heads, head_guess=head_guess, **kw)
        assert gen.tokens == van.tokens
        assert gen.stats["sampling"]["head_guess"] == head_guess
        check_stats(gen, eng, len(prompt), 24, head_layers=[2, 4, 5])
        accepted += gen.stats["accepted"]
    assert accepted > 0


def test_head_sample_shares_the_final_noise():
    """A head whose logits are the final layer's (identity head at the last layer's depth is not allowed, so
    compare through the rule): the head's draw of row p uses the noise of position p + 1, as final's does."""
    cfg, w = tiny_model(3, 0)
    eng = TorchEngine(cfg, w, max_seq=32)
    eng.set_heads([Head.identity(2, cfg.d)])
    eng.prefill([4, 5, 6])
    eng.embed(3, 7)
    eng.run_layers(3, 3, 0, 2)
    s = Sampling(0.9, top_k=10, seed=77)
    tok, _ = eng.head(3, 0, sampling=s)
    from adadecode.model.math import rms_norm

    x = rms_norm(eng.hidden(3)[None], eng.w.norm, cfg.rms_norm_eps)
    assert tok == sample(x @ eng.w.lm_head.T, s, [4]).item()


# ---- CLI -----------------------------------------------------------------------------------------------------
def test_cli_sampling_flags(tmp_path, monkeypatch, capsys):
    import json

    import adadecode.heads.files
    from adadecode.cli import main
    from test_driver import tiny_hf_dir

    d = tiny_hf_dir(tmp_path / "m")
    monkeypatch.setattr(adadecode.heads.files, "load_heads",
                        lambda spec, model: ([Head.identity(1, model.cfg.d), Head.identity(3, model.cfg.d)],
                                             {"gamma": 0.01}), raising=False)
    base = ["generate", "--model", str(d), "--prompt", "w5 w9 w13", "--max-new-tokens", "24", "--engine", "torch",
            "--device", "cpu", "--dtype", "fp32", "--json"]
    samp = ["--temperature", "0.9", "--top-k", "30", "--top-p", "0.95", "--seed", str(2**63 + 5)]
    outs = []
    for extra in ([], ["--method", "adadecode"], ["--method", "adadecode", "--head-guess", "argmax"],
                  ["--method", "layerskip", "--k", "3"]):
        assert main(base + samp + extra) == 0
        outs.append(json.loads(capsys.readouterr().out))
    assert all(o["tokens"] == outs[0]["tokens"] for o in outs)
    assert outs[0]["sampling"] == {"temperature": 0.9, "top_k": 30, "top_p": 0.95, "seed": 2**63 + 5}
    assert outs[1]["stats"]["early"] > 0 and outs[1]["stats"]["sampling"]["head_guess"] == "sample"
    assert main(base) == 0
    greedy = json.loads(capsys.readouterr().out)
    assert greedy["sampling"] is None and greedy["tokens"] != outs[0]["tokens"]
    for bad, msg in ((["--temperature", "-1"], "temperature must be >= 0"), (["--top-p", "0", "--temperature", "1"],
                     "top_p must be in (0, 1]"), (["--top-k", "-2", "--temperature", "1"], "top_k must be >= 0"),
                     (["--seed", "-3", "--temperature", "1"], "seed must be an integer in 0..2**64-1")):
        assert main(base + bad) == 2
        assert msg in capsys.readouterr().err


# ---- the default model ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_default_model_sampled_adadecode_equals_sampled_vanilla(default_model):
    """The shipped code heads under sampling, both guess rules, top-k/top-p on and off: vanilla's tokens."""
    from adadecode.heads.files import load_heads

    m = default_model
    heads, meta = load_heads("default:code", m)
    eng = TorchEngine(m.cfg, m.weights, max_seq=256)
    prompt = m.tokenizer.encode_chat("Write a Python function that returns the n-th Fibonacci number.")
    early = 0
    for kw, guess in ((dict(temperature=0.7, seed=3), "sample"), (dict(temperature=1.0, top_k=40, top_p=0.9, seed=4),
                                                                   "argmax")):
        van = generate_vanilla(eng, prompt, 24, eos_ids=m.eos_ids, **kw)
        gen = generate_adadecode(eng, prompt, 24, gamma=0.5, eos_ids=m.eos_ids, heads=heads, head_guess=guess, **kw)
        assert gen.tokens == van.tokens, kw
        early += gen.stats["early"]
    assert early > 0
