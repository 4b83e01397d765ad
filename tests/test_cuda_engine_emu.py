"""CudaEngine on the emulated device (device='emu': csrc/ compiled for the CPU by csrc/emu): what only this engine
has. The engine contract itself (greedy tokens against TorchEngine, run_layers splits, truncate, AdaDecode and
LayerSkip == vanilla) is the shared suite of tests/test_engines.py, which runs on this engine too.

* run_layers splits with graphs on and off; graph replays == eager launches;
* the C++ runtime's own errors (bad rows, head indices) reach Python as they do on a GPU;
* the default model's greedy tokens (a tie judged as in test_engines.py where they part);
* the fused decode path (5 launches per layer) == the unfused one, bit for bit.
Prompts longer than 16 rows go through the tensor-core (wmma) prefill, in several chunks.
"""
from __future__ import annotations

import os

import pytest
import torch

from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.cuda import CudaEngine, emu_unavailable_reason
from adadecode.engines.head import Head
from adadecode.engines.sampling import make_sampling
from adadecode.engines.select import make_engine
from adadecode.engines.torch import TorchEngine
from adadecode.model.loader import Model

from conftest import FAMILY_MODELS, engine_model
from test_cuda_engine import _assert_bitwise, _check_schedules, _random_schedule, _start, _state
from test_engines import judge_divergence, two_heads

WHY = emu_unavailable_reason()
if WHY is not None:  # CI builds adadecode_emu on every machine: a missing one is an error, not a skip
    if os.environ.get("ADADECODE_BUILD_EMU") == "0":
        pytest.skip(WHY, allow_module_level=True)
    raise RuntimeError(WHY)
import adadecode_emu  # noqa: E402

@pytest.fixture(scope="module", autouse=True)
def random_thread_order():
    """Threads of a block run in a seeded random order between synchronisation points (a missing barrier shows)."""
    old = adadecode_emu.schedule()
    adadecode_emu.set_schedule(os.environ.get("ADADECODE_EMU_ORDER", "random"), 11)
    yield
    adadecode_emu.set_schedule(old, 1)


@pytest.fixture(scope="module")
def gqa():
    cfg, weights = engine_model("gqa-untied", seed=2)
    return cfg, weights, CudaEngine(cfg, weights, max_seq=96, device="emu", prefill_chunk=16)


def test_run_layers_splits_with_and_without_graphs(gqa):
    """The shared suite (test_engines.py) runs the splits with graphs on; here graphs off too, and single rows."""
    cfg, _, e = gqa
    L = cfg.n_layers
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, cfg.vocab_size, (40,), generator=g).tolist()  # three prefill chunks of <= 16
    new = torch.randint(0, cfg.vocab_size, (16,), generator=g).tolist()
    first, last = _start(e, prompt, new)
    e.run_layers(first, last, 0, L)
    whole = _state(e, first, last)
    whole_tokens = e.final(first, last)
    schedules = {f"random {k}": _random_schedule(g, first, last, L) for k in range(2)}
    _check_schedules(e, prompt, new, schedules, whole, whole_tokens, (first, first + 7, last))


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


def test_make_engine_and_runtime_errors():
    cfg, weights = engine_model("mqa-tied")
    e = make_engine(Model(cfg=cfg, weights=weights, tokenizer=None, source="tiny"), "emu", max_seq=32, max_rows=4)
    assert isinstance(e, CudaEngine) and e.name == "emu" and e.device.type == "cpu"
    e.prefill([1, 2, 3])
    with pytest.raises(IndexError):  # rows past max_rows reach the C++ runtime's own check
        e._eng.run_layers(0, 2, 8, 0, 1)
    with pytest.raises(IndexError, match="head index"):
        e._eng.head(0, 2, 0)
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


@pytest.mark.parametrize("name", ["gqa-untied", "mqa-tied", "hd128-llama3-rope"] + FAMILY_MODELS)
def test_fused_engine_equals_unfused(name):
    """Issue 16: the fused decode path (5 launches per layer, final and heads reading the ring in place, PDL
    launches) leaves the same hidden states, K/V caches, tokens and head outputs as the unfused launches, bit for
    bit, through an AdaDecode-shaped schedule (several rows, split layer ranges) and vanilla decoding."""
    cfg, weights = engine_model(name, seed=5)
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


@pytest.mark.exactness
def test_sequences_in_one_step_keep_each_ones_bits():
    """tests/test_batch.py's scenario (three sequences: prefills in pieces of whole chunks, run_batch with segments of
    other rows and layer ranges, heads, final_batch greedy and sampled, truncate) on the emulated device, its threads
    in a random order: each sequence's hidden states, K/V, logits, tokens and head outputs == its calls alone on a
    one-sequence engine, bitwise (issue 36)."""
    from test_batch import alone, assert_same_bits, run_scenario, scenario

    cfg, weights = engine_model("gqa-untied", seed=4)
    g = torch.Generator().manual_seed(5)
    vocab = torch.randperm(cfg.vocab_size, generator=g)[:100].sort().values
    heads = [Head.identity(1, cfg.d), Head(layer=2, T=torch.eye(cfg.d) + 0.05 * torch.randn(cfg.d, cfg.d, generator=g),
                                           vocab=vocab, w_rest=0.05 * torch.randn(cfg.d, generator=g))]
    # every piece but the last a whole number of 16-row chunks: the chunks start where one call's do
    ops = scenario(cfg, heads, g, pieces=lambda n: [n] if n < 32 else [16 * (n // 32), n - 16 * (n // 32)])

    def make(max_seqs):
        e = CudaEngine(cfg, weights, max_seq=160, max_rows=8, device="emu", prefill_chunk=16, max_seqs=max_seqs)
        e.set_heads(heads)
        return e

    assert_same_bits(run_scenario(make(3), ops), alone(make, ops), "emulated device, 3 sequences")
