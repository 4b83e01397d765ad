"""CudaEngine on the emulated device (device='emu': csrc/ compiled for the CPU by csrc/emu) against TorchEngine,
the oracle, on tiny random models: no GPU needed, CI runs these.

* greedy tokens of CudaEngine(emu) == TorchEngine (bf16, CPU), or the first divergence is a bf16 logit tie
  (adadecode.decoding.parity.fp32_tie_verdict: the fp32 model's and the engine's own logits on the decode path);
* run_layers in any split of rows and layers == one call, bitwise, graphs on and off; truncate + re-run == never
  having run; graph replays == eager launches;
* AdaDecode on CudaEngine(emu) == vanilla greedy on CudaEngine(emu), token for token;
* the C++ runtime's own errors (bad rows, head indices) reach Python as they do on a GPU.
Models: GQA with untied embeddings, MQA with tied ones, head_dim 128 with Llama-3 RoPE scaling; prompts longer
than 16 rows go through the tensor-core (wmma) prefill, in several chunks.
"""
from __future__ import annotations

import os

import pytest
import torch

from adadecode.decoding.driver import generate_adadecode
from adadecode.decoding.parity import bf16_ulp, decode_path_logits, fp32_tie_verdict
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.cuda import CudaEngine, emu_unavailable_reason
from adadecode.engines.head import Head
from adadecode.engines.sampling import make_sampling
from adadecode.engines.select import make_engine
from adadecode.engines.torch import TorchEngine
from adadecode.model.config import LlamaConfig
from adadecode.model.loader import Model

from conftest import random_weights, tiny_hf_config
from test_cuda_engine import _assert_bitwise, _check_schedules, _random_schedule, _start, _state

WHY = emu_unavailable_reason()
if WHY is not None:  # CI builds adadecode_emu on every machine: a missing one is an error, not a skip
    if os.environ.get("ADADECODE_BUILD_EMU") == "0":
        pytest.skip(WHY, allow_module_level=True)
    raise RuntimeError(WHY)
import adadecode_emu  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
MODELS = {
    "gqa-untied": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=256, vocab_size=512, num_hidden_layers=4),
    "mqa-tied": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=64, intermediate_size=200,
                     vocab_size=400, num_hidden_layers=3, tie_word_embeddings=True),
    "hd128-llama3-rope": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                              intermediate_size=344, vocab_size=512, num_hidden_layers=2, rope_theta=500000.0,
                              rope_scaling=LLAMA3, max_position_embeddings=512),
}


def tiny_model(name: str, seed: int = 0) -> tuple[LlamaConfig, object]:
    cfg = LlamaConfig.from_hf(tiny_hf_config(**MODELS[name]))
    return cfg, random_weights(cfg, seed=seed)


@pytest.fixture(scope="module", autouse=True)
def random_thread_order():
    """Threads of a block run in a seeded random order between synchronisation points (a missing barrier shows)."""
    old = adadecode_emu.schedule()
    adadecode_emu.set_schedule(os.environ.get("ADADECODE_EMU_ORDER", "random"), 11)
    yield
    adadecode_emu.set_schedule(old, 1)


def judge_divergence(emu, cfg, weights, prompt: list[int], got: list[int], want: list[int]) -> tuple[bool, str]:
    """The first divergence of emu's tokens `got` from TorchEngine bf16's `want`, judged by fp32_tie_verdict on the
    fp32 model's and emu's own logits along the decode path of want[:k]."""
    k = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
    f32 = TorchEngine(cfg, weights, device="cpu", dtype=torch.float32, max_seq=len(prompt) + len(want))
    lf = decode_path_logits(f32, prompt, want[:k])[-1].float()
    le = decode_path_logits(emu, prompt, want[:k])[-1].float()
    ok, r = fp32_tie_verdict(lf, le, want[k], got[k])
    ulp = bf16_ulp(float(lf.max()))
    return ok, (f"first divergence at token {k}: torch {want[k]} vs emu {got[k]}; fp32 gap {r['ref_gap'] / ulp:.2f} "
                f"bf16 ulps (tolerance {r['ref_tol'] / ulp:.2f}), emu's own {r['got_gap'] / ulp:.2f} "
                f"(tolerance {r['got_tol'] / ulp:.2f})")


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_tokens_match_torch_engine(name):
    cfg, weights = tiny_model(name)
    emu = CudaEngine(cfg, weights, max_seq=128, device="emu", prefill_chunk=32)
    ref = TorchEngine(cfg, weights, device="cpu", dtype=torch.bfloat16, max_seq=128)
    g = torch.Generator().manual_seed(1)
    lines, untied = [], []
    for n in (3, 17, 45):  # skinny-GEMM prefill; wmma prefill; wmma prefill in two chunks
        prompt = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
        got = generate_vanilla(emu, prompt, 24).tokens
        want = generate_vanilla(ref, prompt, 24).tokens
        if got == want:
            lines.append(f"prompt of {n}: 24/24 tokens identical")
            continue
        ok, line = judge_divergence(emu, cfg, weights, prompt, got, want)
        lines.append(f"prompt of {n}: {line}")
        if not ok:
            untied.append(lines[-1])
    print(f"\nCudaEngine(emu) vs TorchEngine (bf16, CPU), {name}:\n" + "\n".join(lines))
    assert not untied, "divergences that are not bf16 logit ties:\n" + "\n".join(untied)


@pytest.fixture(scope="module")
def gqa():
    cfg, weights = tiny_model("gqa-untied", seed=2)
    return cfg, weights, CudaEngine(cfg, weights, max_seq=96, device="emu", prefill_chunk=16)


def test_run_layers_any_split_is_bitwise_one_call(gqa):
    cfg, _, e = gqa
    L = cfg.n_layers
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, cfg.vocab_size, (40,), generator=g).tolist()  # three prefill chunks of <= 16
    new = torch.randint(0, cfg.vocab_size, (16,), generator=g).tolist()
    first, last = _start(e, prompt, new)
    e.run_layers(first, last, 0, L)
    whole = _state(e, first, last)
    whole_tokens = e.final(first, last)
    schedules = {
        "rows split": [(first, first + 1, 0, L), (first + 2, first + 2, 0, L), (first + 3, last, 0, L)],
        "rows one by one": [(p, p, 0, L) for p in range(first, last + 1)],
        "layers split": [(first, last, 0, 1), (first, last, 1, 3), (first, last, 3, L)],
        "staircase": [(first, first + 2, 0, 2), (first, first + 1, 2, 3), (first + 3, last, 0, 2),
                      (first + 2, last, 2, 3), (first, last, 3, L)],
    }
    for k in range(2):
        schedules[f"random {k}"] = _random_schedule(g, first, last, L)
    _check_schedules(e, prompt, new, schedules, whole, whole_tokens, (first, first + 7, last))


def test_truncate_and_rerun_is_bitwise_never_having_run(gqa):
    cfg, weights, e = gqa
    L = cfg.n_layers
    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, cfg.vocab_size, (20,), generator=g).tolist()
    cont = torch.randint(0, cfg.vocab_size, (8,), generator=g).tolist()
    junk = torch.randint(0, cfg.vocab_size, (10,), generator=g).tolist()
    n = len(prompt)

    def decode(engine, start, tokens):
        for i, t in enumerate(tokens):
            engine.embed(start + i, t)
            engine.run_layers(start + i, start + i, 0, L)

    clean = CudaEngine(cfg, weights, max_seq=96, device="emu", prefill_chunk=16)
    clean.prefill(prompt)
    decode(clean, n, cont)
    ref = _state(clean, n, n + len(cont) - 1)
    ref_tokens = clean.final(n + len(cont) - 1, n + len(cont) - 1)

    e.prefill(prompt)
    decode(e, n, junk[:4])
    for i, t in enumerate(junk[4:]):  # several rows in flight, partial layers, then rolled back
        e.embed(n + 4 + i, t)
    e.run_layers(n + 4, n + 9, 0, 2)
    e.run_layers(n + 4, n + 6, 2, L)
    e.truncate(n)
    decode(e, n, cont)
    _assert_bitwise(_state(e, n, n + len(cont) - 1), ref, "truncate(n) + re-run")
    assert e.final(n + len(cont) - 1, n + len(cont) - 1) == ref_tokens


def test_graph_replays_equal_eager_launches(gqa):
    cfg, weights, _ = gqa
    e = CudaEngine(cfg, weights, max_seq=96, device="emu", prefill_chunk=16)
    prompt = list(range(10, 30))
    launches = adadecode_emu.stats()["graph_launches"]
    a = generate_vanilla(e, prompt, 12).tokens
    assert e.n_graphs == 1  # run_layers (1 row, all layers), captured once (final launches eagerly)
    assert adadecode_emu.stats()["graph_launches"] - launches >= 10  # replayed at new positions
    state_graphs = _state(e, len(prompt) + 8, len(prompt) + 10)
    e.use_graphs = False
    assert generate_vanilla(e, prompt, 12).tokens == a
    _assert_bitwise(_state(e, len(prompt) + 8, len(prompt) + 10), state_graphs, "eager vs graph replays")
    assert adadecode_emu.stats()["capture_violations"] == 0


def two_heads(cfg, g: torch.Generator) -> list[Head]:
    """A logit-lens head at layer 1 and a perturbed one at layer 2 with a restricted vocabulary + rest logit (the
    kernels' subset path)."""
    d = cfg.d
    vocab = torch.randperm(cfg.vocab_size, generator=g)[:100].sort().values
    return [Head.identity(1, d), Head(layer=2, T=torch.eye(d) + 0.05 * torch.randn(d, d, generator=g), vocab=vocab,
                                      w_rest=0.05 * torch.randn(d, generator=g))]


@pytest.mark.parametrize("name", ["gqa-untied", "mqa-tied"])
def test_adadecode_equals_vanilla(name):
    cfg, weights = tiny_model(name, seed=3)
    e = CudaEngine(cfg, weights, max_seq=128, device="emu", prefill_chunk=32)
    g = torch.Generator().manual_seed(7)
    heads = two_heads(cfg, g)
    prompt = torch.randint(0, cfg.vocab_size, (19,), generator=g).tolist()
    want = generate_vanilla(e, prompt, 30).tokens
    for gamma in (0.0, 0.02):  # 0: every head exits on every token (most rollbacks); then only confident ones
        gen = generate_adadecode(e, prompt, 30, gamma=gamma, max_pending=5, heads=heads)
        assert gen.tokens == want, f"gamma {gamma}: AdaDecode differs from vanilla ({gen.stats})"
    assert gen.stats, "AdaDecode reported no statistics"


def test_make_engine_and_runtime_errors():
    cfg, weights = tiny_model("mqa-tied")
    e = make_engine(Model(cfg=cfg, weights=weights, tokenizer=None, source="tiny"), "emu", max_seq=32, max_rows=4)
    assert isinstance(e, CudaEngine) and e.name == "emu" and e.device.type == "cpu"
    e.prefill([1, 2, 3])
    with pytest.raises(IndexError):  # rows past max_rows reach the C++ runtime's own check
        e._eng.run_layers(2, 8, 0, 1)
    with pytest.raises(IndexError, match="head index"):
        e._eng.head(2, 0)
    assert e.final(2, 2) == generate_vanilla(e, [1, 2, 3], 1).tokens


def test_default_model_greedy_tokens(default_model):
    """SmolLM2-135M (30 layers, d 576, 9/3 heads, vocab 49152) through the emulated engine: a chat prompt, 4 tokens,
    equal to TorchEngine bf16's or diverging at a tie (fp32_tie_verdict; its docstring has this very case)."""
    m = default_model
    prompt = m.tokenizer.encode_chat("Write a haiku about the sea.")
    emu = CudaEngine(m.cfg, m.weights, max_seq=len(prompt) + 4, device="emu")
    ref = TorchEngine(m.cfg, m.weights, device="cpu", dtype=torch.bfloat16, max_seq=len(prompt) + 4)
    got, want = generate_vanilla(emu, prompt, 4).tokens, generate_vanilla(ref, prompt, 4).tokens
    if got != want:
        ok, line = judge_divergence(emu, m.cfg, m.weights, prompt, got, want)
        print(f"\ndefault model: {line}")
        assert ok, line


@pytest.mark.parametrize("name", list(MODELS))
def test_fused_engine_equals_unfused(name):
    """Issue 16: the fused decode path (5 launches per layer, final and heads reading the ring in place, PDL
    launches) leaves the same hidden states, K/V caches, tokens and head outputs as the unfused launches, bit for
    bit, through an AdaDecode-shaped schedule (several rows, split layer ranges) and vanilla decoding."""
    cfg, weights = tiny_model(name, seed=5)
    g = torch.Generator().manual_seed(11)
    heads = two_heads(cfg, g)
    prompt = torch.randint(0, cfg.vocab_size, (21,), generator=g).tolist()
    new = torch.randint(0, cfg.vocab_size, (6,), generator=g).tolist()
    schedule = _random_schedule(g, len(prompt), len(prompt) + len(new) - 1, cfg.n_layers)
    out = {}
    for fused in (True, False):
        e = CudaEngine(cfg, weights, max_seq=96, max_rows=8, device="emu", prefill_chunk=16)
        e.fused = fused
        assert e.pdl == fused  # the emulated device is an sm_90
        e.set_heads(heads)
        before = adadecode_emu.stats()
        first, last = _start(e, prompt, new)
        for a, b, l0, l1 in schedule:
            e.run_layers(a, b, l0, l1)
        launched = {k: adadecode_emu.stats()[k] - before[k] for k in ("launches", "pdl_launches")}
        out[fused] = dict(state=_state(e, first, last), tokens=e.final(first, last),
                          sampled=e.final(first, last, sampling=make_sampling(temperature=0.8, top_p=0.9, seed=3)),
                          launched=launched)
        _start(e, prompt, new)  # heads: each row at its head's depth, as the driver calls them
        e.run_layers(first, last, 0, 1)
        out[fused]["heads"] = [e.head(p, 0) for p in range(first, last + 1)]
        e.run_layers(first, last, 1, 2)
        out[fused]["heads"] += [e.head(p, 1) for p in range(first, last + 1)]
        out[fused]["vanilla"] = generate_vanilla(e, prompt, 10).tokens
    _assert_bitwise(out[True]["state"], out[False]["state"], "fused vs unfused run_layers")
    for key in ("tokens", "heads", "sampled", "vanilla"):
        assert out[True][key] == out[False][key], f"fused vs unfused: {key} differ"
    assert out[True]["launched"]["launches"] < out[False]["launched"]["launches"]
    assert out[True]["launched"]["pdl_launches"] > 0 and out[False]["launched"]["pdl_launches"] == 0
