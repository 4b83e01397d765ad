"""The sampling epilogue of the LM-head kernel (lm_head_sample) against the reference
(adadecode.engines.sampling.sample): the same token, bit for bit, for the same logits, seed and position; and the CUDA
engine's sampled AdaDecode / LayerSkip equal to its sampled vanilla decoding. On a GPU (adadecode_cuda, marked `gpu`) and on the emulated device
(adadecode_emu, the same csrc/ sources on the CPU: CI runs these).

The logits are made exact so that both sides see the same values: x[r] is a power of two times a one-hot vector,
so x[r] . W[j] = 2^e W[j, c] with no rounding in any summation order (the other columns of W are random and meet
zeros). Emulated, vocabularies go up to SmolLM2's 49152 with 1 and 3 rows (the 1..16-row sweep up to 1003), the
128256-token vocabulary stays on the GPU, and the engine test runs a tiny model instead of the default one.
"""
from __future__ import annotations

import pytest
import torch

from adadecode.engines.sampling import Sampling, sample

from test_kernels import dev, on_devices  # noqa: F401  (dev: the device fixture, cuda or emu)

BF = torch.bfloat16


def exact_logits_problem(dev, R: int, n: int, d: int, kind: str, seed: int):
    """(x [R, d], W [n, d]) in bf16 device memory and the logits [R, n] (fp32, CPU) the kernel computes from them,
    exactly."""
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
    return dev.put(x.to(BF).to(dev.torch)), dev.put(w.to(BF).to(dev.torch)), logits


def filled(dev, shape, value, dtype):
    return dev.put(torch.full(shape, value, dtype=dtype, device=dev.torch))


def run_sample(dev, x, w, s: Sampling, pos: int, subset=None, w_rest=None):
    R = x.shape[0]
    n = subset.numel() if subset is not None else w.shape[0]
    token = filled(dev, (R,), -7, torch.int32)
    prob = filled(dev, (R,), float("nan"), torch.float32)
    ws = filled(dev, (dev.ops.lm_head_sample_workspace_floats(R, n),), float("nan"), torch.float32)
    dev.ops.lm_head_sample(x, w, token, prob, s.seed, pos, s.inv_temperature, s.top_k, s.top_p,
                           vocab_subset=subset, w_rest=w_rest, round_bf16=True, workspace=ws)
    if not dev.emu:
        torch.cuda.synchronize()
    return token.cpu(), prob.cpu()


SETTINGS = [Sampling(1.0), Sampling(0.7, seed=1), Sampling(0.3, top_k=1, seed=2), Sampling(1.0, top_k=5, seed=3),
            Sampling(2.5, top_k=50, top_p=0.9, seed=2**64 - 1), Sampling(1.0, top_p=0.5, seed=5),
            Sampling(0.8, top_p=1e-3, seed=6), Sampling(1.3, top_k=1000, top_p=0.95, seed=7)]


EMU_ROWS = {49152: (1, 3)}  # emulated: the SmolLM2 vocabulary with a few rows only (a minute per row count)
ROWS = (1, 3, 16)


@pytest.mark.exactness  # bit for bit against the torch reference: under AVX2 too (make test)
@pytest.mark.parametrize("dev,n,kind", on_devices([(n, k) for n in (1, 7, 64, 1003, 49152, 128256)
                                                   for k in ("randn", "ties")], lambda n, k: n <= 49152),
                         indirect=["dev"])
def test_epilogue_draws_the_reference_token(dev, n, kind):
    d = 64
    for R in EMU_ROWS.get(n, ROWS) if dev.emu else ROWS:
        x, w, logits = exact_logits_problem(dev, R, n, d, kind, seed=n + R)
        greedy_tok = filled(dev, (R,), -7, torch.int32)
        greedy_prob = filled(dev, (R,), float("nan"), torch.float32)
        dev.ops.lm_head_argmax(x, w, greedy_tok, greedy_prob, round_bf16=True)
        for i, s in enumerate(SETTINGS + [Sampling(1.0, top_k=n - 1, seed=8), Sampling(1.0, top_k=n + 3, seed=9)]):
            pos = [0, 17, 131071][i % 3]  # row r draws position pos + r
            token, prob = run_sample(dev, x, w, s, pos)
            ref = sample(logits, s, torch.arange(pos, pos + R))
            assert token.tolist() == ref.tolist(), f"n={n} {kind} R={R} {s} pos={pos}"
            # max_prob is lm_head_argmax's (the untempered logits), and each row is its own: batch invariance
            assert torch.equal(prob, greedy_prob.cpu())
            if R > 1:
                alone = run_sample(dev, x[R - 1:], w, s, pos + R - 1)[0]
                assert alone.item() == token[-1].item()


@pytest.mark.exactness
@pytest.mark.parametrize("dev", on_devices([()]), indirect=True)
def test_epilogue_with_a_vocabulary_subset_uses_global_ids(dev):
    n_vocab, d = 5000, 64
    x, w, logits = exact_logits_problem(dev, 1, n_vocab, d, "randn", seed=3)
    subset = dev.put(torch.arange(3, n_vocab, 7, dtype=torch.int32, device=dev.torch))
    w_rest = dev.put(torch.randn(d).to(BF).to(dev.torch))
    for s in SETTINGS:
        token, _ = run_sample(dev, x, w, s, 41, subset=subset, w_rest=w_rest)
        ids = subset.long().cpu()
        j = sample(logits[:, ids], s, [41], ids)
        assert token.item() == ids[j].item()


@pytest.mark.parametrize("dev", on_devices([()]), indirect=True)
def test_epilogue_refuses_non_finite_tempered_logits(dev):
    x, w, _ = exact_logits_problem(dev, 2, 64, 64, "randn", seed=1)
    w[5] = float("nan")
    token, _ = run_sample(dev, x, w, Sampling(1.0), 0)
    assert token.tolist() == [-1, -1]


@pytest.mark.parametrize("dev", [pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.default_model]),
                                 pytest.param("emu")], indirect=True)
def test_cuda_engine_sampled_adadecode_equals_sampled_vanilla(dev, request):
    """The default model with its code heads on a GPU; emulated, a tiny GQA model with a logit-lens head and a
    perturbed head over a vocabulary subset (the head draws through the subset path)."""
    from adadecode.decoding.driver import generate_adadecode, generate_layerskip
    from adadecode.decoding.vanilla import generate_vanilla
    from adadecode.engines.cuda import CudaEngine
    from adadecode.engines.head import Head
    from adadecode.heads.files import load_heads
    from adadecode.model.config import LlamaConfig

    from conftest import random_weights, tiny_hf_config

    if dev.emu:
        cfg = LlamaConfig.from_hf(tiny_hf_config(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                                                 head_dim=64, intermediate_size=256, vocab_size=512,
                                                 num_hidden_layers=4))
        g = torch.Generator().manual_seed(7)
        vocab = torch.randperm(cfg.vocab_size, generator=g)[:100].sort().values
        heads = [Head.identity(1, cfg.d), Head(layer=2, T=torch.eye(cfg.d) + 0.05 * torch.randn(cfg.d, cfg.d, generator=g),
                                               vocab=vocab, w_rest=0.05 * torch.randn(cfg.d, generator=g))]
        eng = CudaEngine(cfg, random_weights(cfg, seed=3), max_seq=128, device="emu", prefill_chunk=32)
        prompt, n_new, gammas, eos = torch.randint(0, cfg.vocab_size, (19,), generator=g).tolist(), 24, (0.0, 0.02), []
    else:
        m = request.getfixturevalue("default_model")
        heads, meta = load_heads("default:code", m)
        eng = CudaEngine(m.cfg, m.weights, max_seq=512)
        prompt = m.tokenizer.encode_chat("Write a Python function that checks whether a number is prime.")
        n_new, gammas, eos = 96, (meta["gamma"],), m.eos_ids
    eng.set_heads(heads)
    for kw in (dict(temperature=0.7, seed=1), dict(temperature=1.0, top_k=50, top_p=0.9, seed=2**40 + 3)):
        van = generate_vanilla(eng, prompt, n_new, eos_ids=eos, **kw)
        for gamma in gammas:  # gamma 0: every head exits on every token (the most rollbacks)
            for guess in ("sample", "argmax"):
                gen = generate_adadecode(eng, prompt, n_new, gamma=gamma, eos_ids=eos, head_guess=guess, **kw)
                assert gen.tokens == van.tokens, (kw, gamma, guess)
        assert generate_layerskip(eng, prompt, n_new, k=3, eos_ids=eos, **kw).tokens == van.tokens
