"""CudaEngine (issue 4): the engine contract on the CUDA kernels, against TorchEngine (the oracle).

GPU tests (marked `gpu`, skipped without one):
* greedy tokens of CudaEngine == TorchEngine (bf16 on the GPU, no reduced-precision GEMM reductions) over 20 prompts
  x 256 tokens of the default model, or every first divergence is a logit tie within bf16 rounding, judged on the
  decode-path logits of the fp32 model and of the engine itself (adadecode.testing.parity.fp32_tie_verdict, the
  criterion of the emulated-device tests too; its CPU unit test is tests/test_parity.py);
* run_layers in any split of rows and layers == one call, bitwise (hidden states, K/V cache, tokens), graphs on
  and off;
* truncate + re-run == never having run, bitwise;
* head / final against the reference math on the engine's own hidden states; graphs are cached and reused;
  an oversized KV cache is a MemoryError that names the sizes.
Without a GPU: CudaEngine's host-side contract checks (the same errors and messages as TorchEngine, over a fake
backend) and the clear errors of make_engine('cuda') / CudaEngine.
"""
from __future__ import annotations

import math

import pytest
import torch

from adadecode.decoding.driver import generate_adadecode
from adadecode.testing.parity import bf16_ulp, decode_path_logits, fp32_tie_verdict, oracle_matmul_precision
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.contract import EngineError
from adadecode.engines.cuda import MAX_ROWS, CudaEngine, check_supported, cuda_unavailable_reason
from adadecode.engines.head import Head
from adadecode.engines.select import auto_engine, make_engine
from adadecode.engines.torch import TorchEngine
from adadecode.model.math import rms_norm
from adadecode.heads.files import load_heads
from adadecode.model.config import LlamaConfig
from adadecode.model.loader import Model

from conftest import random_weights, tiny_hf_config

GPU_REASON = cuda_unavailable_reason()


# ---------------------------------------------------------------------------------------------------------------
# Without a GPU: the host-side contract over a fake backend, and the errors that say why the engine cannot run.
# ---------------------------------------------------------------------------------------------------------------
class FakeBackend:
    """Records the calls CudaEngine makes into adadecode_cuda.Engine; answers final/head with fixed values."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        def call(*args, **kw):
            self.calls.append((name, args, kw) if kw else (name, args))
            if name == "final":
                n = args[2] - args[1] + 1  # (seq, first, last)
                return [7] * n, [0.5] * n
            if name == "head":
                return 3, 0.25
            return None

        return call


def _violations(e):
    """The contract-violation scenario of test_torch_engine, as (exception type, message) per step."""
    out = []

    def attempt(f, *a):
        try:
            f(*a)
            out.append(None)
        except Exception as ex:  # noqa: BLE001 - the point is to compare them
            out.append((type(ex), str(ex)))

    attempt(e.prefill, [1, 2, 3])
    attempt(e.embed, 3, 4)
    attempt(e.run_layers, 3, 3, 1, 2)  # depth
    attempt(e.run_layers, 4, 4, 0, 1)  # not in flight
    attempt(e.final, 3, 3)  # not at depth L
    attempt(e.embed, 5, 4)
    attempt(e.run_layers, 5, 5, 0, 1)  # cache holds
    attempt(e.run_layers, 3, 9, 0, 1)  # rows per call
    attempt(e.run_layers, 3, 3, 0, 9)  # layers outside
    attempt(e.run_layers, 3, 3, 2, 2)  # empty layer range
    attempt(e.embed, 40, 1)  # past the context
    attempt(e.embed, 3, 10_000)  # outside the vocabulary
    attempt(e.prefill, [])  # empty prompt
    attempt(e.prefill, [1] * 33)  # longer than the context
    attempt(e.prefill, [1, -1])
    attempt(e.run_layers, 3, 3, 0, 4)  # fine: row 3 to depth L
    attempt(e.final, 3, 3)
    attempt(e.head, 3, 0)  # no heads: IndexError
    attempt(e.truncate, 3)
    attempt(e.run_layers, 3, 3, 0, 1)  # not in flight after truncate
    attempt(e.hidden, 3)
    return out


def test_contract_checks_are_torch_engines(tiny):
    cfg, weights = tiny
    ref = _violations(TorchEngine(cfg, weights, max_seq=32, max_rows=4))
    backend = FakeBackend()
    got = _violations(CudaEngine._with_backend(cfg, backend, max_seq=32, max_rows=4))
    assert got == ref
    assert sum(r is not None for r in ref) >= 14  # the scenario does exercise the checks
    # only calls that passed the checks reach the backend, with the contract's arguments
    names = [c for c in backend.calls if c[0] in ("prefill", "embed", "run_layers", "final")]
    assert names == [("prefill", (0, [1, 2, 3], 0)), ("embed", (0, 3, 4)), ("embed", (0, 5, 4)),
                     ("run_layers", (0, 3, 3, 0, 4)), ("final", (0, 3, 3))]


def test_head_checks(tiny):
    cfg, _ = tiny
    backend = FakeBackend()
    e = CudaEngine._with_backend(cfg, backend, max_seq=32, max_rows=4)
    with pytest.raises(ValueError, match="T has shape"):
        e.set_heads([Head(layer=1, T=torch.eye(cfg.d + 1))])
    with pytest.raises(ValueError, match="ids in 0.."):
        e.set_heads([Head(layer=1, T=torch.eye(cfg.d), vocab=torch.tensor([1, cfg.vocab_size]), w_rest=torch.zeros(cfg.d))])
    with pytest.raises(ValueError, match="sorted"):
        e.set_heads([Head(layer=1, T=torch.eye(cfg.d), vocab=torch.tensor([5, 1]), w_rest=torch.zeros(cfg.d))])
    with pytest.raises(ValueError, match="layer"):
        e.set_heads([Head.identity(cfg.n_layers + 1, cfg.d)])
    e.set_heads([Head.identity(2, cfg.d), Head.identity(1, cfg.d, vocab=torch.tensor([2, 5, 9]))])
    (name, (specs,)), = [c for c in backend.calls if c[0] == "set_heads"]
    assert [s[0] for s in specs] == [2, 1]
    assert specs[0][2] is None and specs[1][2].dtype == torch.int32 and specs[1][2].tolist() == [2, 5, 9]
    assert specs[0][1].dtype == torch.bfloat16 and specs[1][3].shape == (cfg.d,)
    e.prefill([1, 2])
    e.embed(2, 3)
    e.run_layers(2, 2, 0, 1)
    with pytest.raises(EngineError, match="depth 1, expected 2"):
        e.head(2, 0)
    assert e.head(2, 1) == (3, 0.25)
    assert e.head(2, -1) == (3, 0.25)
    assert backend.calls[-1] == ("head", (0, 2, 1))  # negative index resolved as a list does


def test_sampling_reaches_the_backend(tiny):
    """Greedy calls stay as they were; a Sampling goes to the kernel as (seed, fp32 1/T, top_k, top_p)."""
    from adadecode.engines.sampling import Sampling

    cfg, _ = tiny
    backend = FakeBackend()
    e = CudaEngine._with_backend(cfg, backend, max_seq=32, max_rows=4)
    e.set_heads([Head.identity(1, cfg.d)])
    e.prefill([1, 2])
    s = Sampling(0.7, top_k=5, top_p=0.9, seed=2**64 - 1)
    assert e.final(1, 1, sampling=s) == [7] and backend.calls[-1] == ("final", (0, 1, 1), {"sampling": (2**64 - 1, s.inv_temperature, 5, 0.9)})
    assert e.final(1, 1) == [7] and backend.calls[-1] == ("final", (0, 1, 1))
    e.embed(2, 3)
    e.run_layers(2, 2, 0, 1)
    assert e.head(2, 0, sampling=s) == (3, 0.25)
    assert backend.calls[-1] == ("head", (0, 2, 0), {"sampling": (2**64 - 1, s.inv_temperature, 5, 0.9)})


def test_final_refuses_non_finite(tiny):
    cfg, _ = tiny

    class NaNBackend(FakeBackend):
        def __getattr__(self, name):
            if name == "final":
                return lambda seq, a, b: ([-1] * (b - a + 1), [math.nan] * (b - a + 1))
            if name == "head":
                return lambda seq, pos, i: (-1, math.nan)
            return super().__getattr__(name)

    e = CudaEngine._with_backend(cfg, NaNBackend(), max_seq=32, max_rows=4)
    e.set_heads([Head.identity(cfg.n_layers, cfg.d)])
    e.prefill([1, 2, 3])
    with pytest.raises(FloatingPointError, match="non-finite logits at rows 2..2"):
        e.final(2, 2)
    with pytest.raises(FloatingPointError, match="non-finite head logits"):
        e.head(2, 0)


def test_unsupported_shapes_are_named(tiny):
    cfg, _ = tiny  # head_dim 8
    with pytest.raises(ValueError, match="head_dim 64 or 128"):
        check_supported(cfg, 16)
    cfg64 = LlamaConfig.from_hf(tiny_hf_config(hidden_size=128, num_attention_heads=2, num_key_value_heads=1))
    check_supported(cfg64, MAX_ROWS)
    with pytest.raises(ValueError, match="max_rows=17"):
        check_supported(cfg64, 17)


@pytest.mark.skipif(GPU_REASON is None, reason="the CUDA engine can run here")
def test_cuda_engine_without_gpu_is_a_clear_error(tiny):
    cfg, weights = tiny
    model = Model(cfg=cfg, weights=weights, tokenizer=None, source="tiny")
    with pytest.raises(RuntimeError, match="the CUDA engine cannot run: "):
        make_engine(model, "cuda")
    with pytest.raises(RuntimeError, match="the CUDA engine cannot run"):
        CudaEngine(cfg, weights)
    assert make_engine(model, "auto").name == auto_engine() == "cpu"  # the CPU engine builds wherever the package does


# ---------------------------------------------------------------------------------------------------------------
# On a GPU
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engines(default_model):
    if GPU_REASON is not None:
        pytest.skip(GPU_REASON)
    m = default_model
    cuda = CudaEngine(m.cfg, m.weights, max_seq=1024)
    ref = TorchEngine(m.cfg, m.weights, device="cuda", dtype=torch.bfloat16, max_seq=1024)
    with oracle_matmul_precision():  # no reduced-precision bf16 reductions in the oracle's (and LM head's) GEMMs
        yield cuda, ref


def chat_prompts(model, n: int) -> list[list[int]]:
    from adadecode.heads.prompt_sets import load_prompts

    texts = load_prompts("general")[: n // 2] + load_prompts("code")[: n - n // 2]
    return [model.tokenizer.encode_chat(t) for t in texts]


@pytest.mark.gpu
def test_greedy_tokens_match_torch_engine(default_model, engines):
    cuda, ref = engines
    prompts = chat_prompts(default_model, 20)
    assert len(prompts) == 20
    f32 = TorchEngine(default_model.cfg, default_model.weights, device="cuda", dtype=torch.float32, max_seq=1024)
    report, untied = [], []
    for i, prompt in enumerate(prompts):
        got = generate_vanilla(cuda, prompt, 256).tokens
        want = generate_vanilla(ref, prompt, 256).tokens
        assert len(got) == len(want) == 256
        if got == want:
            report.append(f"prompt {i:2d}: 256/256 tokens identical")
            continue
        k = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
        # the fp32 model's logits and the engine's own at the divergence, along the decode path (not a fresh prefill)
        f32_logits = decode_path_logits(f32, prompt, want[:k])[-1]
        got_logits = decode_path_logits(cuda, prompt, want[:k])[-1]
        ok, r = fp32_tie_verdict(f32_logits, got_logits, want[k], got[k])
        line = (f"prompt {i:2d}: first divergence at token {k}: torch {want[k]} vs cuda {got[k]}; fp32 logits "
                f"{r['ref_a']:.4f} vs {r['ref_b']:.4f} (gap {r['ref_gap']:.4g}, top-2 gap {r['ref_top2_gap']:.4g}, "
                f"tolerance {r['ref_tol']:.4g}); cuda engine's own gap {r['got_gap']:.4g} (tolerance {r['got_tol']:.4g})")
        report.append(line)
        if not ok:
            untied.append(line)
    print("\nCudaEngine vs TorchEngine (bf16, cuda), 20 prompts x 256 greedy tokens:\n" + "\n".join(report))
    assert not untied, "divergences that are not bf16 logit ties:\n" + "\n".join(untied)


def _start(e: CudaEngine, prompt: list[int], new: list[int]) -> tuple[int, int]:
    e.prefill(prompt)
    for i, t in enumerate(new):
        e.embed(len(prompt) + i, t)
    return len(prompt), len(prompt) + len(new) - 1


def _state(e: CudaEngine, first: int, last: int) -> dict:
    return {"hidden": torch.stack([e.hidden(p) for p in range(first, last + 1)]),
            "kv": [e.kv(layer) for layer in range(e.n_layers)]}


def _assert_bitwise(a: dict, b: dict, what: str) -> None:
    assert torch.equal(a["hidden"], b["hidden"]), f"{what}: hidden states differ"
    for layer, ((ka, va), (kb, vb)) in enumerate(zip(a["kv"], b["kv"])):
        assert ka.shape == kb.shape and torch.equal(ka, kb), f"{what}: K of layer {layer} differs"
        assert torch.equal(va, vb), f"{what}: V of layer {layer} differs"


def _random_schedule(g: torch.Generator, first: int, last: int, L: int) -> list[tuple[int, int, int, int]]:
    """A valid random split: layer ranges in order; within each, row blocks in order (or the transpose)."""
    def cuts(lo, hi, k):
        inner = sorted(set(torch.randint(lo + 1, hi, (k,), generator=g).tolist())) if hi - lo > 1 else []
        pts = [lo] + inner + [hi]
        return list(zip(pts[:-1], pts[1:]))

    layer_ranges = cuts(0, L, 3)
    row_blocks = [(a, b - 1) for a, b in cuts(first, last + 1, 3)]
    if torch.rand((), generator=g) < 0.5:
        return [(a, b, l0, l1) for l0, l1 in layer_ranges for a, b in row_blocks]
    return [(a, b, l0, l1) for a, b in row_blocks for l0, l1 in layer_ranges]


def _check_schedules(e: CudaEngine, prompt: list[int], new: list[int], schedules: dict, whole: dict,
                     whole_tokens: list[int], single_rows) -> None:
    """Each schedule of run_layers calls (with and without graphs) leaves the state and tokens of one whole call;
    a row's `final` alone (rows `single_rows`) equals its token in the batch."""
    first, last = len(prompt), len(prompt) + len(new) - 1
    for graphs in (True, False):
        e.use_graphs = graphs
        try:
            for name, schedule in schedules.items():
                _start(e, prompt, new)
                for a, b, l0, l1 in schedule:
                    e.run_layers(a, b, l0, l1)
                _assert_bitwise(_state(e, first, last), whole, f"{name} (graphs {graphs})")
                assert e.final(first, last) == whole_tokens
                for p in single_rows:
                    assert e.final(p, p) == [whole_tokens[p - first]]
        finally:
            e.use_graphs = True


@pytest.mark.gpu
def test_run_layers_any_split_is_bitwise_one_call(default_model, engines):
    cuda, _ = engines
    cfg = default_model.cfg
    L = cfg.n_layers
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, cfg.vocab_size, (300,), generator=g).tolist()  # > one prefill chunk, > one attn chunk
    new = torch.randint(0, cfg.vocab_size, (MAX_ROWS,), generator=g).tolist()

    first, last = _start(cuda, prompt, new)
    cuda.run_layers(first, last, 0, L)
    whole = _state(cuda, first, last)
    whole_tokens = cuda.final(first, last)

    schedules = {
        "rows split": [(first, first + 1, 0, L), (first + 2, first + 2, 0, L), (first + 3, last, 0, L)],
        "rows one by one": [(p, p, 0, L) for p in range(first, last + 1)],
        "layers split": [(first, last, 0, 1), (first, last, 1, 13), (first, last, 13, L)],
        "staircase": [(first, first + 2, 0, 12), (first, first + 1, 12, 20), (first + 3, last, 0, 12),
                      (first + 2, last, 12, 20), (first, last, 20, L)],
    }
    for k in range(6):
        schedules[f"random {k}"] = _random_schedule(g, first, last, L)
    _check_schedules(cuda, prompt, new, schedules, whole, whole_tokens, range(first, last + 1))


@pytest.mark.gpu
def test_truncate_and_rerun_is_bitwise_never_having_run(default_model, engines):
    cuda, _ = engines
    cfg = default_model.cfg
    L = cfg.n_layers
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (40,), generator=g).tolist()
    cont = torch.randint(0, cfg.vocab_size, (12,), generator=g).tolist()
    junk = torch.randint(0, cfg.vocab_size, (10,), generator=g).tolist()
    n = len(prompt)

    def decode(e, start, tokens):
        for i, t in enumerate(tokens):
            e.embed(start + i, t)
            e.run_layers(start + i, start + i, 0, L)

    # never having run: prompt, then the continuation one token at a time
    clean = CudaEngine(cfg, default_model.weights, max_seq=1024)
    clean.prefill(prompt)
    decode(clean, n, cont)
    ref = _state(clean, n, n + len(cont) - 1)
    ref_tokens = clean.final(n + len(cont) - 1, n + len(cont) - 1)

    e = cuda
    e.prefill(prompt)
    decode(e, n, junk[:4])  # a wrong continuation, vanilla...
    for i, t in enumerate(junk[4:]):  # ...and AdaDecode-like: several rows in flight, partial layers
        e.embed(n + 4 + i, t)
    e.run_layers(n + 4, n + 9, 0, 11)
    e.run_layers(n + 4, n + 6, 11, L)
    e.truncate(n)  # rolled back
    decode(e, n, cont)
    _assert_bitwise(_state(e, n, n + len(cont) - 1), ref, "truncate(n) + re-run")
    assert e.final(n + len(cont) - 1, n + len(cont) - 1) == ref_tokens

    # rolling back into the prompt: the decode path from there == an engine that prefilled the shorter prompt
    m = n - 5
    clean.prefill(prompt[:m])
    decode(clean, m, prompt[m:] + cont)
    ref2 = _state(clean, n, n + len(cont) - 1)  # the last 12 rows (at most max_rows are in flight), all K/V
    e.truncate(m)
    decode(e, m, prompt[m:] + cont)
    _assert_bitwise(_state(e, n, n + len(cont) - 1), ref2, "truncate into the prompt + re-run")


@pytest.mark.gpu
def test_final_and_heads_match_the_reference_math(default_model, engines):
    cuda, _ = engines
    m = default_model
    cfg, d = m.cfg, m.cfg.d
    g = torch.Generator().manual_seed(6)
    vocab = torch.randperm(cfg.vocab_size, generator=g)[:2000].sort().values
    heads = [Head.identity(10, d),
             Head(layer=20, T=torch.eye(d) + 0.02 * torch.randn(d, d, generator=g), vocab=vocab,
                  w_rest=0.05 * torch.randn(d, generator=g))]
    cuda.set_heads(heads)
    prompt = torch.randint(0, cfg.vocab_size, (50,), generator=g).tolist()
    cuda.prefill(prompt)
    norm = m.weights.norm.to("cuda", torch.bfloat16)
    lm_head = m.weights.lm_head.to("cuda", torch.bfloat16)
    pos = len(prompt)
    for step, t in enumerate(torch.randint(0, cfg.vocab_size, (6,), generator=g).tolist()):
        cuda.embed(pos, t)
        done = 0
        for i, hd in enumerate(heads):
            cuda.run_layers(pos, pos, done, hd.layer)
            done = hd.layer
            token, conf = cuda.head(pos, i)
            x = rms_norm(cuda.hidden(pos)[None], norm, cfg.rms_norm_eps)
            hdv = cuda.heads[i]
            probs, ids = hdv.probs(x, lm_head)
            logits = hdv.logits(x, lm_head)[0]
            j = int(probs[0, : len(ids)].argmax())
            if int(ids[j]) != token:  # only a near-tie may differ (z = T x is rounded to bf16 by both sides)
                mine = int((ids == token).nonzero()[0, 0])
                assert abs(float(logits[j] - logits[mine])) <= 2 * bf16_ulp(float(logits[j])) * 1.001
            assert conf == pytest.approx(float(probs[0, j]), abs=1e-2, rel=2e-2)
        cuda.run_layers(pos, pos, done, cfg.n_layers)
        (tok,) = cuda.final(pos, pos)
        logits = cuda.final_logits(pos, pos)[0]
        best = int(logits.argmax())
        # final_logits runs the LM head through torch (another fp32 summation order): each of the two logits may
        # round to the other bf16 neighbour, so a correct kernel's choice can be up to 2 ulps below torch's best
        assert tok == best or abs(float(logits[best] - logits[tok])) <= 2 * bf16_ulp(float(logits[best])) * 1.001
        pos += 1


@pytest.mark.gpu
def test_vanilla_decoding_replays_cached_graphs(default_model):
    if GPU_REASON is not None:
        pytest.skip(GPU_REASON)
    m = default_model
    e = make_engine(m, "cuda", max_seq=256)
    assert isinstance(e, CudaEngine) and e.name == "cuda" and e.dtype == torch.bfloat16
    prompt = m.tokenizer.encode_chat("Write a haiku about the sea.")
    a = generate_vanilla(e, prompt, 24).tokens
    assert e.n_graphs == 1  # run_layers (1 row, all layers), captured once (final launches eagerly)
    b = generate_vanilla(e, prompt, 24).tokens
    assert a == b and e.n_graphs == 1
    e.use_graphs = False
    assert generate_vanilla(e, prompt, 24).tokens == a  # eager launches: the same bits


@pytest.mark.gpu
def test_kv_cache_that_does_not_fit_is_a_memory_error():
    if GPU_REASON is not None:
        pytest.skip(GPU_REASON)
    # 128 KV heads x head_dim 64 x 8 layers: 256 KiB of cache per position
    cfg = LlamaConfig.from_hf(tiny_hf_config(hidden_size=256, num_attention_heads=128, num_key_value_heads=128,
                                             head_dim=64, intermediate_size=512, vocab_size=512,
                                             num_hidden_layers=8, max_position_embeddings=2 ** 22))
    free, _ = torch.cuda.mem_get_info()
    per_pos = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2
    max_seq = min(cfg.max_position, int(1.5 * free / per_pos))
    with pytest.raises(MemoryError, match=rf"KV cache of max_seq={max_seq} x 8 layers x 128 kv heads x head_dim 64"):
        CudaEngine(cfg, random_weights(cfg), max_seq=max_seq, max_rows=4)
    # and the device is usable afterwards
    small = CudaEngine(cfg, random_weights(cfg), max_seq=64, max_rows=4)
    small.prefill([1, 2, 3])
    assert len(small.final(2, 2)) == 1


@pytest.mark.gpu
def test_fused_path_is_bitwise_the_unfused_one(default_model):
    """Issue 16 on real hardware (the emulated device cannot model inter-block races, fences or PDL overlap): the
    fused path (5 launches per layer, the one-launch attention's last-block merge, PDL on sm_90) leaves the same
    hidden states, K/V caches and tokens as the unfused launches, over a context past several attention chunks,
    AdaDecode-shaped schedules, and vanilla and AdaDecode decoding with the shipped heads."""
    if GPU_REASON is not None:
        pytest.skip(GPU_REASON)
    m = default_model
    cfg, L = m.cfg, m.cfg.n_layers
    g = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, cfg.vocab_size, (700,), generator=g).tolist()
    new = torch.randint(0, cfg.vocab_size, (MAX_ROWS,), generator=g).tolist()
    chat = m.tokenizer.encode_chat("Explain what a mortgage is in simple terms.")
    heads, meta = load_heads("default", m)
    out = {}
    for fused in (True, False):
        e = CudaEngine(cfg, m.weights, max_seq=1024)
        e.fused = fused
        first, last = _start(e, prompt, new)
        for a, b, l0, l1 in [(first, first + 2, 0, 12), (first, first + 1, 12, 20), (first + 3, last, 0, 12),
                             (first + 2, last, 12, 20), (first, last, 20, L)]:
            e.run_layers(a, b, l0, l1)
        out[fused] = dict(state=_state(e, first, last), tokens=e.final(first, last),
                          vanilla=generate_vanilla(e, chat, 64).tokens,
                          adadecode=generate_adadecode(e, chat, 64, gamma=meta.get("gammas") or meta["gamma"],
                                                       max_pending=5, heads=heads).tokens, pdl=e.pdl)
        del e
    assert out[True]["pdl"] == (torch.cuda.get_device_capability()[0] >= 9) and not out[False]["pdl"]
    _assert_bitwise(out[True]["state"], out[False]["state"], "fused vs unfused")
    for key in ("tokens", "vanilla", "adadecode"):
        assert out[True][key] == out[False][key], f"fused vs unfused: {key} differ"
    assert out[True]["adadecode"] == out[True]["vanilla"]
