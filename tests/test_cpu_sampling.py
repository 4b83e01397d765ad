"""The CPU engine's sampler (csrc/cpu/sampling.h: C++, no torch) against the reference rule
(adadecode.engines.sampling.sample): the same token, bit for bit, for the same logits, seed and position, over
seeds, temperatures, top-k / top-p at and past their edges, ties at every threshold (few distinct logit values),
positions up to 2^17, vocabulary subsets keyed by their global ids, and non-finite tempered logits."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adadecode.engines.sampling import Sampling, sample

adadecode_cpu = pytest.importorskip("adadecode_cpu", reason="adadecode_cpu is not built (see README)")

pytestmark = pytest.mark.exactness

SETTINGS = [Sampling(1.0), Sampling(0.7, seed=1), Sampling(0.3, top_k=1, seed=2), Sampling(1.0, top_k=5, seed=3),
            Sampling(2.5, top_k=50, top_p=0.9, seed=2**64 - 1), Sampling(1.0, top_p=0.5, seed=5),
            Sampling(0.8, top_p=1e-3, seed=6), Sampling(1.3, top_k=1000, top_p=0.95, seed=7),
            Sampling(0.05, seed=2**40), Sampling(7.0, top_p=0.999, seed=11), Sampling(1.0, top_k=2, top_p=0.3, seed=12)]


def logits_of(kind: str, R: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: ties at every threshold
        x = torch.randint(-6, 7, (R, n), generator=g).float() * 0.5
    elif kind == "peaked":  # one token far above the rest: few candidates
        x = torch.randn(R, n, generator=g)
        x[:, n // 3] += 40
    else:
        x = torch.randn(R, n, generator=g) * 3
    return x.to(torch.bfloat16).float()  # the engine's logits are bf16 values


def cpp(logits, s: Sampling, pos, ids=None) -> list[int]:
    return adadecode_cpu.testing.sample_rows(logits.contiguous(), ids, [int(p) for p in pos], s.seed, s.inv_temperature,
                                     s.top_k, s.top_p)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1003, 49152])
@pytest.mark.parametrize("kind", ["randn", "ties", "peaked"])
def test_cpp_sampler_draws_the_reference_token(n, kind):
    R = 3
    logits = logits_of(kind, R, n, seed=n)
    for i, s in enumerate(SETTINGS + [Sampling(1.0, top_k=max(1, n - 1), seed=8), Sampling(1.0, top_k=n + 3, seed=9),
                                      Sampling(1.0, top_k=n, top_p=0.7, seed=10)]):
        pos = [0, 17, 131071][i % 3] + torch.arange(R)
        assert cpp(logits, s, pos) == sample(logits, s, pos).tolist(), f"n={n} {kind} {s}"


def test_cpp_sampler_keys_a_subset_by_its_global_ids():
    g = torch.Generator().manual_seed(3)
    full = logits_of("randn", 1, 5000, seed=4)
    ids = torch.arange(3, 5000, 7, dtype=torch.int32)
    for s in SETTINGS:
        got = cpp(full[:, ids.long()], s, [41], ids)
        assert got == sample(full[:, ids.long()], s, [41], ids.long()).tolist(), s


def test_cpp_sampler_refuses_non_finite_tempered_logits():
    x = logits_of("randn", 2, 64, seed=1)
    x[0, 5] = float("nan")
    x[1, 9] = float("inf")
    assert cpp(x, Sampling(1.0), [0, 1]) == [-1, -1]
    big = torch.full((1, 8), 3e38)  # finite logits, infinite once tempered
    assert cpp(big, Sampling(0.1), [0]) == [-1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 300), temperature=st.floats(0.05, 5.0), top_k=st.integers(0, 320),
       top_p=st.floats(1e-4, 1.0), seed=st.integers(0, 2**64 - 1), pos=st.integers(0, 2**20),
       spread=st.sampled_from([0.5, 3.0, 30.0]), ties=st.booleans(), data=st.data())
def test_cpp_sampler_matches_the_reference_everywhere(n, temperature, top_k, top_p, seed, pos, spread, ties, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    x = torch.randn(1, n, generator=g) * spread
    if ties:
        x = (x * 2).round() / 2
    x = x.to(torch.bfloat16).float()
    s = Sampling(temperature, top_k=top_k, top_p=top_p, seed=seed)
    assert cpp(x, s, [pos]) == sample(x, s, [pos]).tolist()


def test_engine_draws_in_cpp_what_the_reference_draws_from_its_logits():
    """CpuEngine.final / head with sampling: the C++ draw right after the LM head (Engine::final_sample, head) is the
    reference's draw from the same bf16-rounded logits (final_logits, the head's logits), rows and heads alike, the
    full vocabulary and a head's subset keyed by global ids."""
    from adadecode.engines.cpu import CpuEngine
    from adadecode.engines.head import Head
    from adadecode.model.config import LlamaConfig

    from conftest import random_weights, tiny_hf_config

    cfg = LlamaConfig.from_hf(tiny_hf_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=32, intermediate_size=256, vocab_size=3000, num_hidden_layers=3))
    g = torch.Generator().manual_seed(1)
    vocab = torch.randperm(cfg.vocab_size, generator=g)[:400].sort().values
    heads = [Head.identity(1, cfg.d), Head(layer=2, T=torch.eye(cfg.d) + 0.05 * torch.randn(cfg.d, cfg.d, generator=g),
                                           vocab=vocab)]
    e = CpuEngine(cfg, random_weights(cfg, seed=3), max_seq=64, max_rows=8)
    e.set_heads(heads)
    prompt = torch.randint(0, cfg.vocab_size, (20,), generator=g).tolist()
    e.prefill(prompt)
    for i in range(5):
        e.embed(20 + i, prompt[i])
    e.run_layers(20, 24, 0, cfg.n_layers)
    logits = e.final_logits(20, 24)
    for s in SETTINGS:
        assert e.final(20, 24, sampling=s) == sample(logits, s, range(21, 26)).tolist(), s
    e.truncate(20)
    e.embed(20, prompt[3])
    e.run_layers(20, 20, 0, 1)
    for s in SETTINGS:
        tok, _ = e.head(20, 0, sampling=s)
        _, _, lg = e._eng.head(0, 20, 0, logits=True)
        assert tok == int(sample(lg[None], s, [21])[0]), s
    e.run_layers(20, 20, 1, 2)
    for s in SETTINGS:
        tok, _ = e.head(20, 1, sampling=s)
        _, _, lg = e._eng.head(0, 20, 1, logits=True)
        assert tok == int(vocab[sample(lg[None], s, [21], vocab)[0]]), s
