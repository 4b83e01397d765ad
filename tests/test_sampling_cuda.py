"""The sampling epilogue of the LM-head kernel (adadecode_cuda.lm_head_sample) against the reference
(adadecode.sampling.sample): the same token, bit for bit, for the same logits, seed and position; and the CUDA
engine's sampled AdaDecode / LayerSkip equal to its sampled vanilla decoding.

The logits are made exact so that both sides see the same values: x[r] is a power of two times a one-hot vector,
so x[r] . W[j] = 2^e W[j, c] with no rounding in any summation order (the other columns of W are random and meet
zeros). The tests run wherever adadecode_cuda's kernels run: a GPU (marker `gpu`), and the emulated device once
its fixture is wired to this marker.
"""
from __future__ import annotations

import pytest
import torch

from adadecode.sampling import Sampling, sample

pytestmark = pytest.mark.gpu

adadecode_cuda = pytest.importorskip("adadecode_cuda", reason="adadecode_cuda is not built")

DEV = "cuda"
BF = torch.bfloat16


def exact_logits_problem(R: int, n: int, d: int, kind: str, seed: int):
    """(x [R, d], W [n, d]) in bf16 and the logits [R, n] (fp32) the kernel computes from them, exactly."""
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: ties at every threshold
        col = torch.randint(-6, 7, (n, R), generator=g).float() * 0.5
    else:
        col = torch.randn(n, R, generator=g) * 3
    w = torch.randn(n, d, generator=g)
    x = torch.zeros(R, d)
    logits = torch.empty(R, n)
    for r in range(R):
        c = (5 * r + 1) % d
        w[:, c] = col[:, r]
        x[r, c] = 2.0 ** (r % 3 - 1)
        logits[r] = w[:, c].to(BF).float() * x[r, c]
    return x.to(BF).to(DEV), w.to(BF).to(DEV), logits


def run_sample(x, w, s: Sampling, pos: int, subset=None, w_rest=None):
    R = x.shape[0]
    n = subset.numel() if subset is not None else w.shape[0]
    token = torch.full((R,), -7, dtype=torch.int32, device=DEV)
    prob = torch.full((R,), float("nan"), device=DEV)
    ws = torch.full((adadecode_cuda.lm_head_sample_workspace_floats(R, n),), float("nan"), device=DEV)
    adadecode_cuda.lm_head_sample(x, w, token, prob, s.seed, pos, s.inv_temperature, s.top_k, s.top_p,
                                  vocab_subset=subset, w_rest=w_rest, round_bf16=True, workspace=ws)
    torch.cuda.synchronize()
    return token.cpu(), prob.cpu()


SETTINGS = [Sampling(1.0), Sampling(0.7, seed=1), Sampling(0.3, top_k=1, seed=2), Sampling(1.0, top_k=5, seed=3),
            Sampling(2.5, top_k=50, top_p=0.9, seed=2**64 - 1), Sampling(1.0, top_p=0.5, seed=5),
            Sampling(0.8, top_p=1e-3, seed=6), Sampling(1.3, top_k=1000, top_p=0.95, seed=7)]


@pytest.mark.parametrize("n", [1, 7, 64, 1003, 49152, 128256])
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_epilogue_draws_the_reference_token(n, kind):
    d = 64
    for R in (1, 3, 16):
        x, w, logits = exact_logits_problem(R, n, d, kind, seed=n + R)
        for i, s in enumerate(SETTINGS + [Sampling(1.0, top_k=n - 1, seed=8), Sampling(1.0, top_k=n + 3, seed=9)]):
            pos = [0, 17, 131071][i % 3]  # row r draws position pos + r
            token, prob = run_sample(x, w, s, pos)
            ref = sample(logits, s, torch.arange(pos, pos + R))
            assert token.tolist() == ref.tolist(), f"n={n} {kind} R={R} {s} pos={pos}"
            # max_prob is lm_head_argmax's (the untempered logits), and each row is its own: batch invariance
            greedy_tok = torch.empty(R, dtype=torch.int32, device=DEV)
            greedy_prob = torch.empty(R, device=DEV)
            adadecode_cuda.lm_head_argmax(x, w, greedy_tok, greedy_prob, round_bf16=True)
            assert torch.equal(prob, greedy_prob.cpu())
            if R > 1:
                alone = run_sample(x[R - 1:], w, s, pos + R - 1)[0]
                assert alone.item() == token[-1].item()


def test_epilogue_with_a_vocabulary_subset_uses_global_ids():
    n_vocab, d = 5000, 64
    x, w, logits = exact_logits_problem(1, n_vocab, d, "randn", seed=3)
    subset = torch.arange(3, n_vocab, 7, dtype=torch.int32, device=DEV)
    w_rest = torch.randn(d).to(BF).to(DEV)
    for s in SETTINGS:
        token, _ = run_sample(x, w, s, 41, subset=subset, w_rest=w_rest)
        ids = subset.long().cpu()
        j = sample(logits[:, ids], s, [41], ids)
        assert token.item() == ids[j].item()


def test_epilogue_refuses_non_finite_tempered_logits():
    x, w, _ = exact_logits_problem(2, 64, 64, "randn", seed=1)
    w[5] = float("nan")
    token, _ = run_sample(x, w, Sampling(1.0), 0)
    assert token.tolist() == [-1, -1]


def test_cuda_engine_sampled_adadecode_equals_sampled_vanilla(default_model):
    from adadecode.cuda_engine import CudaEngine
    from adadecode.decode import generate_vanilla
    from adadecode.driver import generate_adadecode, generate_layerskip
    from adadecode.heads import load_heads

    m = default_model
    heads, meta = load_heads("default:code", m)
    eng = CudaEngine(m.cfg, m.weights, max_seq=512)
    eng.set_heads(heads)
    prompt = m.tokenizer.encode_chat("Write a Python function that checks whether a number is prime.")
    for kw in (dict(temperature=0.7, seed=1), dict(temperature=1.0, top_k=50, top_p=0.9, seed=2**40 + 3)):
        van = generate_vanilla(eng, prompt, 96, eos_ids=m.eos_ids, **kw)
        for guess in ("sample", "argmax"):
            gen = generate_adadecode(eng, prompt, 96, gamma=meta["gamma"], eos_ids=m.eos_ids, head_guess=guess, **kw)
            assert gen.tokens == van.tokens, (kw, guess)
        assert generate_layerskip(eng, prompt, 96, k=3, eos_ids=m.eos_ids, **kw).tokens == van.tokens
