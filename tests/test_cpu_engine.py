"""CpuEngine (adadecode_cpu) bit for bit: across its kernel paths and thread counts, and against CudaEngine on
the emulated device, whose kernels' reduction order it follows.

* every kernel path this CPU runs (AVX-512, AVX2, portable) x 1, 2 and 3 threads leaves the same hidden states,
  K/V caches, logits, head outputs and sampled tokens, through prefill in several chunks, a split run_layers
  schedule and a truncate;
* CpuEngine == CudaEngine(device="emu") bit for bit (hidden states, K/V, logits, tokens, head confidences) where
  both run the same kernels: decode rows, and prefill in chunks of at most 16 rows (the emulated engine's longer
  chunks go to its tensor-core GEMM, another order);
* prefill of n tokens == decoding them one by one;
* sizes, errors and the packed weights (held once).
The engine-contract suite shared with TorchEngine and the emulated engine is tests/test_engines.py.
"""
from __future__ import annotations

import os

import pytest
import torch

from adadecode.model.config import LlamaConfig
from adadecode.engines.cpu import CpuEngine, CpuWeights, cpu_unavailable_reason
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.head import Head
from adadecode.engines.sampling import make_sampling

from conftest import ENGINE_MODELS, FAMILY_MODELS, engine_model, random_weights, tiny_hf_config
from test_cuda_engine import _assert_bitwise, _random_schedule, _start, _state

if cpu_unavailable_reason() is not None:  # built wherever the package builds: missing is an error, not a skip
    raise RuntimeError(cpu_unavailable_reason())
import adadecode_cpu  # noqa: E402

ISAS = adadecode_cpu.isas()
def two_heads(cfg, g: torch.Generator) -> list[Head]:
    """A logit-lens head at layer 1 and a perturbed one at layer 2 with a restricted vocabulary and a rest logit."""
    d = cfg.d
    vocab = torch.randperm(cfg.vocab_size, generator=g)[:100].sort().values
    return [Head.identity(1, d), Head(layer=min(2, cfg.n_layers - 1), T=torch.eye(d) + 0.05 * torch.randn(d, d, generator=g),
                                      vocab=vocab, w_rest=0.05 * torch.randn(d, generator=g))]


def run_everything(e, cfg, heads, prompt, new, schedule) -> dict:
    """One engine through prefill, a split schedule of run_layers, final (greedy, logits, sampled), heads, truncate."""
    out = {}
    e.set_heads(heads)
    first, last = _start(e, prompt, new)
    for a, b, l0, l1 in schedule:
        e.run_layers(a, b, l0, l1)
    out["state"] = _state(e, first, last)
    out["logits"] = e.final_logits(first, last)
    out["tokens"] = e.final(first, last)
    out["sampled"] = e.final(first, last, sampling=make_sampling(temperature=0.9, top_p=0.9, seed=5))
    _start(e, prompt, new)
    e.run_layers(first, last, 0, 1)
    out["heads"] = [e.head(p, 0) for p in range(first, last + 1)]
    out["heads_sampled"] = [e.head(p, 0, sampling=make_sampling(temperature=1.0, seed=2)) for p in (first, last)]
    if heads[1].layer > 1:
        e.run_layers(first, last, 1, heads[1].layer)
    out["heads"] += [e.head(p, 1) for p in range(first, last + 1)]
    e.truncate(len(prompt) + 2)
    out["after_truncate"] = generate_vanilla(e, prompt + new[:2], 6).tokens
    return out


def assert_same(a: dict, b: dict, what: str, logits: bool = True) -> None:
    """logits=False: one side is CudaEngine, whose final_logits are torch's GEMM over its normed rows (a test
    aid), not its LM-head kernel's: its tokens and head outputs are the kernel's, and those are compared."""
    _assert_bitwise(a["state"], b["state"], what)
    if logits:
        assert torch.equal(a["logits"].view(torch.int32), b["logits"].view(torch.int32)), f"{what}: logits differ"
    for key in ("tokens", "sampled", "heads", "heads_sampled", "after_truncate"):
        assert a[key] == b[key], f"{what}: {key} differ: {a[key]} vs {b[key]}"


OVERSUBSCRIBED = pytest.mark.filterwarnings("ignore:CpuEngine. threads=.* usable cores")  # 3 threads on 2 cores: meant


@pytest.mark.exactness
@OVERSUBSCRIBED
@pytest.mark.parametrize("name", ["smollm-shape", "hd128-llama3-rope", "hd8-gqa", "qwen2-bias-window",
                                  "qwen3-qknorm-hd128"])
def test_every_path_and_thread_count_gives_the_same_bits(name):
    cfg, weights = engine_model(name, seed=1)
    g = torch.Generator().manual_seed(2)
    heads = two_heads(cfg, g)
    prompt = torch.randint(0, cfg.vocab_size, (37,), generator=g).tolist()  # three prefill chunks of 16
    new = torch.randint(0, cfg.vocab_size, (7,), generator=g).tolist()
    schedule = _random_schedule(g, len(prompt), len(prompt) + len(new) - 1, cfg.n_layers)
    packed = CpuWeights(cfg, weights)
    ref = None
    for isa in ISAS[::-1]:  # portable first: the reference
        for threads in (1, 2, 3):
            e = CpuEngine(cfg, packed, max_seq=160, max_rows=8, threads=threads, isa=isa, prefill_chunk=16)
            assert (e.isa, e.threads) == (isa, threads)
            got = run_everything(e, cfg, heads, prompt, new, schedule)
            if ref is None:
                ref = got
            else:
                assert_same(got, ref, f"{isa} x {threads} threads vs portable x 1")


@pytest.mark.exactness
@OVERSUBSCRIBED
@pytest.mark.parametrize("name", ["hd8-gqa", "qwen2-bias-window"])
def test_sequences_in_one_step_keep_each_ones_bits_on_every_path(name):
    """tests/test_batch.py's scenario (three sequences: prefills in pieces, run_batch with segments of other rows and
    layer ranges, heads, final_batch greedy and sampled, truncate) on every kernel path x 1, 2 (shuffled pool) and 3
    threads: each sequence's hidden states, K/V, logits, tokens and head outputs == its calls alone on a one-sequence
    engine (portable, 1 thread), bitwise."""
    from test_batch import alone, assert_same_bits, run_scenario, scenario

    cfg, weights = engine_model(name, seed=4)
    g = torch.Generator().manual_seed(5)
    heads = two_heads(cfg, g)
    ops = scenario(cfg, heads, g, pieces=lambda n: [n // 3, n // 3 + 1, n - 2 * (n // 3) - 1])
    packed = CpuWeights(cfg, weights)

    def make(max_seqs, isa=ISAS[-1], threads=1, schedule=None):
        e = CpuEngine(cfg, packed, max_seq=160, max_rows=8, threads=threads, isa=isa, prefill_chunk=16,
                      schedule=schedule, max_seqs=max_seqs)
        e.set_heads(heads)
        return e

    want = alone(make, ops)
    for isa in ISAS[::-1]:
        for threads, schedule in ((1, None), (2, "shuffle:1"), (3, None)):
            got = run_scenario(make(3, isa, threads, schedule), ops)
            assert_same_bits(got, want, f"{isa} x {threads} threads ({schedule or 'natural'})")


@pytest.mark.exactness
@pytest.mark.parametrize("name", list(ENGINE_MODELS))
def test_matches_the_emulated_cuda_engine_bit_for_bit(name):
    from adadecode.engines.cuda import CudaEngine

    cfg, weights = engine_model(name, seed=3)
    if cfg.head_dim not in (64, 128):
        pytest.skip("the CUDA engine takes head_dim 64 or 128")
    g = torch.Generator().manual_seed(4)
    heads = two_heads(cfg, g)
    prompt = torch.randint(0, cfg.vocab_size, (21,), generator=g).tolist()  # prefill chunks of 16 + 5 on both
    new = torch.randint(0, cfg.vocab_size, (5,), generator=g).tolist()
    schedule = _random_schedule(g, len(prompt), len(prompt) + len(new) - 1, cfg.n_layers)
    cpu = CpuEngine(cfg, weights, max_seq=160, max_rows=8, threads=2, prefill_chunk=16)
    emu = CudaEngine(cfg, weights, max_seq=160, max_rows=8, device="emu", prefill_chunk=16)
    assert_same(run_everything(cpu, cfg, heads, prompt, new, schedule),
                run_everything(emu, cfg, heads, prompt, new, schedule), "CpuEngine vs CudaEngine(emu)", logits=False)


@pytest.mark.exactness
def test_default_model_matches_the_emulated_cuda_engine(default_model):
    """SmolLM2-135M: a 12-token prompt (one prefill chunk on both), two decode steps and two rows at once: hidden
    states, K/V and tokens bit for bit."""
    from adadecode.engines.cuda import CudaEngine

    m = default_model
    prompt = m.tokenizer.encode("The capital of France is")[:12]
    out = {}
    for name, e in (("cpu", CpuEngine(m.cfg, m.weights, max_seq=32, max_rows=4)),
                    ("emu", CudaEngine(m.cfg, m.weights, max_seq=32, max_rows=4, device="emu"))):
        toks = generate_vanilla(e, prompt, 2).tokens
        first, last = _start(e, prompt, toks)
        e.run_layers(first, last, 0, m.cfg.n_layers)
        out[name] = dict(tokens=toks + e.final(first, last), state=_state(e, first, last))
    _assert_bitwise(out["cpu"]["state"], out["emu"]["state"], "default model, cpu vs emu")
    assert out["cpu"]["tokens"] == out["emu"]["tokens"]


@pytest.mark.exactness
@pytest.mark.parametrize("name", ["mistral-window", "qwen3-qknorm-hd128"])
def test_family_long_context_matches_the_emulated_cuda_engine(name):
    """Past the first 128-position attention chunk: a window of 20 at position 170 leaves chunk 0 out of every row
    (no partial, not merged), and a multi-row decode call straddles the window's start; Qwen3's head norms through
    11 prefill chunks. CpuEngine == CudaEngine(emu) on hidden states, K/V and tokens, and prefill == one by one."""
    from adadecode.engines.cuda import CudaEngine

    cfg, weights = engine_model(name, seed=9)
    g = torch.Generator().manual_seed(10)
    prompt = torch.randint(0, cfg.vocab_size, (170,), generator=g).tolist()
    new = torch.randint(0, cfg.vocab_size, (4,), generator=g).tolist()
    out = {}
    for kind in ("cpu", "emu"):
        e = (CpuEngine(cfg, weights, max_seq=192, max_rows=8, threads=2, prefill_chunk=16) if kind == "cpu" else
             CudaEngine(cfg, weights, max_seq=192, max_rows=8, device="emu", prefill_chunk=16))
        first, last = _start(e, prompt, new)
        e.run_layers(first, first, 0, cfg.n_layers)
        e.run_layers(first + 1, last, 0, cfg.n_layers)
        out[kind] = dict(state=_state(e, first, last), tokens=e.final(first, last))
    _assert_bitwise(out["cpu"]["state"], out["emu"]["state"], f"{name}: cpu vs emu past 128 positions")
    assert out["cpu"]["tokens"] == out["emu"]["tokens"]
    steps = CpuEngine(cfg, weights, max_seq=192, threads=1, prefill_chunk=1)  # each prompt row alone
    _start(steps, prompt, new)
    steps.run_layers(len(prompt), len(prompt) + len(new) - 1, 0, cfg.n_layers)
    _assert_bitwise(_state(steps, len(prompt), len(prompt) + len(new) - 1), out["cpu"]["state"],
                    f"{name}: prefill in chunks of 16 vs of 1")


@pytest.mark.exactness
def test_prefill_is_decoding_one_by_one():
    cfg, weights = engine_model("gqa-untied", seed=5)
    prompt = torch.randint(0, cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(6)).tolist()
    whole = CpuEngine(cfg, weights, max_seq=64, prefill_chunk=64)
    whole.prefill(prompt)
    steps = CpuEngine(cfg, weights, max_seq=64, prefill_chunk=7)
    steps.prefill(prompt[:1])
    for p, t in enumerate(prompt[1:], start=1):
        steps.embed(p, t)
        steps.run_layers(p, p, 0, cfg.n_layers)
    n = len(prompt)
    _assert_bitwise(_state(whole, n - 1, n - 1), _state(steps, n - 1, n - 1), "prefill vs one by one")


def test_weights_are_packed_once_and_shared(default_model):
    m = default_model
    packed = CpuWeights(m.cfg, m.weights)
    n_bytes = sum(t.numel() * 2 for name, t in m.weights.to_hf_state(m.cfg).items())
    assert packed.bytes == n_bytes  # every weight once (tied embeddings: the LM head's rows serve the lookup)
    a = CpuEngine(m.cfg, packed, max_seq=64)
    b = CpuEngine(m.cfg, packed, max_seq=128, threads=1)
    prompt = m.tokenizer.encode("Once upon a time")
    assert generate_vanilla(a, prompt, 4).tokens == generate_vanilla(b, prompt, 4).tokens
    assert a.kv_bytes == 2 * m.cfg.n_layers * 64 * m.cfg.n_kv_heads * m.cfg.head_dim * 2


def test_errors_name_what_is_wrong(tiny):
    cfg, weights = tiny
    with pytest.raises(ValueError, match=r"unknown kernels 'sse9'; the kernel paths are avx512bf16, avx512, avx2, neon, portable"):
        CpuEngine(cfg, weights, max_seq=16, isa="sse9")
    with pytest.raises(ValueError, match="threads"):
        CpuEngine(cfg, weights, max_seq=16, threads=0)
    with pytest.raises(ValueError, match="max_rows"):
        CpuEngine(cfg, weights, max_seq=16, max_rows=0)
    big = LlamaConfig.from_hf(tiny_hf_config(max_position_embeddings=1 << 30))
    with pytest.raises(MemoryError, match="KV cache of max_seq=1073741824"):
        CpuEngine(big, random_weights(big), max_seq=1 << 30)
    e = CpuEngine(cfg, weights, max_seq=16)
    with pytest.raises(IndexError):  # past max_rows: the runtime's own bounds check
        e._eng.run_layers(0, 0, 20, 0, 1)
    with pytest.raises(IndexError, match="head index"):
        e._eng.head(0, 0, 0)


@pytest.mark.parametrize("kind", ["cpu", "emu"])
def test_family_weights_that_are_missing_are_named(kind):
    """A config that says qkv_bias / qk_norm with a layer that lacks the tensors: a ValueError naming the layer and
    the field, from both native engines (they share engines.native.family_args), before any native state is built."""
    from adadecode.engines.cuda import CudaEngine

    make = (lambda c, w: CpuEngine(c, w, max_seq=16)) if kind == "cpu" else (
        lambda c, w: CudaEngine(c, w, max_seq=16, device="emu"))
    cfg, w = engine_model("qwen2-bias-window")
    w.layers[1].bk = None
    with pytest.raises(ValueError, match="layer 1: qkv_bias is set but bq/bk/bv is missing"):
        make(cfg, w)
    cfg, w = engine_model("qwen3-qknorm-hd128")
    w.layers[2].k_norm = None
    with pytest.raises(ValueError, match="layer 2: qk_norm is set but k_norm is missing"):
        make(cfg, w)


@OVERSUBSCRIBED
def test_thread_count_from_the_environment(tiny, monkeypatch):
    cfg, weights = tiny
    monkeypatch.setenv("ADADECODE_CPU_THREADS", "3")
    assert CpuEngine(cfg, weights, max_seq=16).threads == 3
    monkeypatch.setenv("ADADECODE_CPU_THREADS", "x")
    with pytest.raises(ValueError, match="ADADECODE_CPU_THREADS"):
        CpuEngine(cfg, weights, max_seq=16)
    monkeypatch.delenv("ADADECODE_CPU_THREADS")
    assert CpuEngine(cfg, weights, max_seq=16).threads == len(os.sched_getaffinity(0))


def test_an_unknown_isa_variable_is_named_unknown(tiny, monkeypatch):
    """ADADECODE_CPU_ISA=bogus was reported as kernels that "do not run on this CPU" (issue 35): a typo reads as a
    missing CPU feature. Unknown names are said to be unknown, with the names there are."""
    cfg, weights = tiny
    monkeypatch.setenv("ADADECODE_CPU_ISA", "bogus")
    with pytest.raises(ValueError, match=r"unknown kernels 'bogus' \(ADADECODE_CPU_ISA\); the kernel paths are "
                                         r"avx512bf16, avx512, avx2, neon, portable \(this CPU runs: .*portable\)"):
        CpuEngine(cfg, weights, max_seq=16)
    monkeypatch.setenv("ADADECODE_CPU_ISA", "portable")
    assert CpuEngine(cfg, weights, max_seq=16, threads=1).isa == "portable"


def test_more_threads_than_cores_warns_once_per_engine(tiny, monkeypatch):
    """64 threads on 2 cores ran 6.5-7.5x slower than 2 with no word (issue 35): the engine says so when it is built,
    and runs as asked; threads within the cores say nothing."""
    import warnings

    from adadecode.engines import cpu as cpu_mod

    cfg, weights = tiny
    monkeypatch.setattr(cpu_mod, "usable_cores", lambda: 2)
    with pytest.warns(RuntimeWarning, match=r"threads=5 on 2 usable cores.*use threads <= 2") as caught:
        e = CpuEngine(cfg, weights, max_seq=16, threads=5)
    assert len(caught) == 1 and e.threads == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CpuEngine(cfg, weights, max_seq=16, threads=2)
