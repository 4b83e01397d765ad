"""The engine contract (docs/design.md#contract), one suite over every engine that runs without a GPU: TorchEngine (the
oracle), CpuEngine (native kernels) and CudaEngine on the emulated device (the CUDA kernels on the CPU).

* greedy tokens of CpuEngine and CudaEngine(emu) == TorchEngine bf16's on tiny random models (GQA, MQA, tied and
  untied embeddings, head_dim 8, 64 and 128, Llama-3 RoPE; Qwen2 biases with a sliding window, Qwen3 q/k head norms
  with n_heads * head_dim != hidden_size, Mistral's window), and CpuEngine's on the default model, or each first
  divergence a bf16 logit tie (adadecode.testing.parity.fp32_tie_verdict, judged on the fp32 model's and the
  engine's own logits along the decode path);
* run_layers in any split of rows and layers == one call, bitwise; truncate + re-run == never having run;
* the contract's checks: every engine refuses the same calls with TorchEngine's exceptions and messages;
* AdaDecode and LayerSkip == vanilla decoding on the same engine, greedy and sampled, with heads that exit often;
* greedy ties go to the lowest token id; non-finite logits are an error, not a token.
Each engine's own tests: test_torch_engine.py (against transformers), test_cpu_engine.py (paths, threads, bit for
bit against the emulated engine), test_cuda_engine_emu.py (graphs, fused launches), test_driver.py (the drivers'
schedules under hypothesis, on torch and cpu).
"""
from __future__ import annotations

import pytest
import torch

from adadecode.decoding.driver import generate_adadecode, generate_layerskip
from adadecode.testing.parity import bf16_ulp, decode_path_logits, fp32_tie_verdict
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.cpu import CpuEngine
from adadecode.engines.cuda import CudaEngine, emu_unavailable_reason
from adadecode.engines.head import Head
from adadecode.engines.torch import TorchEngine
from adadecode.model.config import LlamaConfig

from conftest import ENGINE_MODELS, FAMILY_MODELS, engine_model, random_weights, tiny_hf_config
from test_cuda_engine import _assert_bitwise, _random_schedule, _start, _state, _violations

if emu_unavailable_reason() is not None:  # CI builds every engine: a missing one is an error, not a skip
    raise RuntimeError(emu_unavailable_reason())

KINDS = ["torch", "cpu", "emu"]
GREEDY_MODELS = ["gqa-untied", "mqa-tied", "hd128-llama3-rope", "hd8-gqa"] + FAMILY_MODELS

def build(kind: str, cfg, weights, **kw):
    """An engine of `kind`; kw: max_seq, max_rows. TorchEngine in bf16 (the oracle's precision for the others)."""
    if kind == "torch":
        return TorchEngine(cfg, weights, device="cpu", dtype=torch.bfloat16, **kw)
    if kind == "cpu":
        return CpuEngine(cfg, weights, threads=2, prefill_chunk=16, **kw)
    if cfg.head_dim not in (64, 128):
        pytest.skip("the CUDA engine takes head_dim 64 or 128")
    return CudaEngine(cfg, weights, device="emu", prefill_chunk=32, **kw)


def judge_divergence(engine, cfg, weights, prompt, got, want) -> tuple[bool, str]:
    """The first divergence of `engine`'s tokens from TorchEngine bf16's, judged by fp32_tie_verdict on the fp32
    model's and the engine's own logits along the decode path of want[:k]."""
    k = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
    f32 = TorchEngine(cfg, weights, device="cpu", dtype=torch.float32, max_seq=len(prompt) + len(want))
    lf = decode_path_logits(f32, prompt, want[:k])[-1].float()
    le = decode_path_logits(engine, prompt, want[:k])[-1].float()
    ok, r = fp32_tie_verdict(lf, le, want[k], got[k])
    ulp = bf16_ulp(float(lf.max()))
    return ok, (f"first divergence at token {k}: torch {want[k]} vs {engine.name} {got[k]}; fp32 gap "
                f"{r['ref_gap'] / ulp:.2f} bf16 ulps (tolerance {r['ref_tol'] / ulp:.2f}), the engine's own "
                f"{r['got_gap'] / ulp:.2f} (tolerance {r['got_tol'] / ulp:.2f})")


def compare_greedy(engine, ref, cfg, weights, prompts, n_new) -> list[str]:
    """Greedy tokens of engine vs ref over prompts; the lines of divergences that are not ties (printed: all)."""
    lines, untied = [], []
    for i, prompt in enumerate(prompts):
        got = generate_vanilla(engine, prompt, n_new).tokens
        want = generate_vanilla(ref, prompt, n_new).tokens
        if got == want:
            lines.append(f"prompt {i} ({len(prompt)} tokens): {n_new}/{n_new} identical")
            continue
        ok, line = judge_divergence(engine, cfg, weights, prompt, got, want)
        lines.append(f"prompt {i} ({len(prompt)} tokens): {line}")
        if not ok:
            untied.append(lines[-1])
    print(f"\n{engine.name} vs TorchEngine (bf16):\n" + "\n".join(lines))
    return untied


@pytest.mark.parametrize("kind", ["cpu", "emu"])
@pytest.mark.parametrize("name", GREEDY_MODELS)
def test_greedy_tokens_match_the_oracle(kind, name):
    cfg, weights = engine_model(name)
    engine = build(kind, cfg, weights, max_seq=128)
    ref = TorchEngine(cfg, weights, device="cpu", dtype=torch.bfloat16, max_seq=128)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 17, 45)]
    untied = compare_greedy(engine, ref, cfg, weights, prompts, 24)
    assert not untied, "divergences that are not bf16 logit ties:\n" + "\n".join(untied)


def test_default_model_greedy_tokens_cpu(default_model):
    """SmolLM2-135M on CpuEngine: four chat prompts x 32 tokens against TorchEngine bf16 (ties judged as above)."""
    from adadecode.heads.prompt_sets import load_prompts

    m = default_model
    texts = load_prompts("general")[:2] + load_prompts("code")[:2]
    prompts = [m.tokenizer.encode_chat(t) for t in texts]
    engine = CpuEngine(m.cfg, m.weights, max_seq=256)
    ref = TorchEngine(m.cfg, m.weights, device="cpu", dtype=torch.bfloat16, max_seq=256)
    untied = compare_greedy(engine, ref, m.cfg, m.weights, prompts, 32)
    assert not untied, "divergences that are not bf16 logit ties:\n" + "\n".join(untied)


@pytest.fixture(scope="module", params=[(k, m) for m in ["gqa-untied"] + FAMILY_MODELS for k in KINDS],
                ids=lambda p: f"{p[0]}-{p[1]}")
def gqa(request):
    kind, name = request.param
    cfg, weights = engine_model(name, seed=2)
    return cfg, weights, build(kind, cfg, weights, max_seq=96), kind


@pytest.mark.exactness
def test_run_layers_any_split_is_bitwise_one_call(gqa):
    cfg, _, e, _ = gqa
    L = cfg.n_layers
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, cfg.vocab_size, (40,), generator=g).tolist()
    new = torch.randint(0, cfg.vocab_size, (16,), generator=g).tolist()
    first, last = _start(e, prompt, new)
    e.run_layers(first, last, 0, L)
    whole, whole_tokens = _state(e, first, last), e.final(first, last)
    schedules = {
        "rows split": [(first, first + 1, 0, L), (first + 2, first + 2, 0, L), (first + 3, last, 0, L)],
        "rows one by one": [(p, p, 0, L) for p in range(first, last + 1)],
        "layers split": [(first, last, 0, 1), (first, last, 1, L - 1), (first, last, L - 1, L)],
        "staircase": [(first, first + 2, 0, L - 2), (first, first + 1, L - 2, L - 1), (first + 3, last, 0, L - 2),
                      (first + 2, last, L - 2, L - 1), (first, last, L - 1, L)],
    }
    for k in range(2):
        schedules[f"random {k}"] = _random_schedule(g, first, last, L)
    for name, schedule in schedules.items():
        _start(e, prompt, new)
        for a, b, l0, l1 in schedule:
            e.run_layers(a, b, l0, l1)
        _assert_bitwise(_state(e, first, last), whole, name)
        assert e.final(first, last) == whole_tokens, name
        for p in (first, first + 7, last):  # a row's token alone == in the batch
            assert e.final(p, p) == [whole_tokens[p - first]]


@pytest.mark.exactness
def test_truncate_and_rerun_is_bitwise_never_having_run(gqa):
    cfg, weights, e, kind = gqa
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

    clean = build(kind, cfg, weights, max_seq=96)
    clean.prefill(prompt)
    decode(clean, n, cont)
    ref, ref_tokens = _state(clean, n, n + len(cont) - 1), clean.final(n + len(cont) - 1, n + len(cont) - 1)
    e.prefill(prompt)
    decode(e, n, junk[:4])
    for i, t in enumerate(junk[4:]):  # several rows in flight, partial layers, then rolled back
        e.embed(n + 4 + i, t)
    mid = min(2, L - 1)
    e.run_layers(n + 4, n + 9, 0, mid)
    e.run_layers(n + 4, n + 6, mid, L)
    e.truncate(n)
    decode(e, n, cont)
    _assert_bitwise(_state(e, n, n + len(cont) - 1), ref, "truncate(n) + re-run")
    assert e.final(n + len(cont) - 1, n + len(cont) - 1) == ref_tokens


@pytest.mark.parametrize("kind", ["cpu", "emu"])
def test_contract_checks_are_torch_engines(kind):
    cfg = LlamaConfig.from_hf(tiny_hf_config(**{**ENGINE_MODELS["mqa-tied"], "num_hidden_layers": 4}))
    weights = random_weights(cfg)
    want = _violations(TorchEngine(cfg, weights, max_seq=32, max_rows=4))
    got = _violations(build(kind, cfg, weights, max_seq=32, max_rows=4))
    assert got == want


def two_heads(cfg, g: torch.Generator) -> list[Head]:
    """A logit-lens head at layer 1 and a perturbed one at layer 2 with a restricted vocabulary + rest logit."""
    d = cfg.d
    vocab = torch.randperm(cfg.vocab_size, generator=g)[:100].sort().values
    return [Head.identity(1, d), Head(layer=2, T=torch.eye(d) + 0.05 * torch.randn(d, d, generator=g), vocab=vocab,
                                      w_rest=0.05 * torch.randn(d, generator=g))]


@pytest.mark.exactness
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["gqa-untied", "mqa-tied"] + FAMILY_MODELS)
def test_adadecode_and_layerskip_equal_vanilla(kind, name):
    cfg, weights = engine_model(name, seed=3)
    e = build(kind, cfg, weights, max_seq=128)
    g = torch.Generator().manual_seed(7)
    heads = two_heads(cfg, g)
    prompt = torch.randint(0, cfg.vocab_size, (19,), generator=g).tolist()
    want = generate_vanilla(e, prompt, 30).tokens
    for gamma in (0.0, 0.02):  # 0: every head exits on every token (most rollbacks); then only confident ones
        gen = generate_adadecode(e, prompt, 30, gamma=gamma, max_pending=5, heads=heads)
        assert gen.tokens == want, f"gamma {gamma}: AdaDecode differs from vanilla ({gen.stats})"
        assert gen.stats["early"] > 0
    assert generate_layerskip(e, prompt, 30, k=3, heads=heads).tokens == want
    s = dict(temperature=0.8, top_p=0.95, seed=11)
    sampled = generate_vanilla(e, prompt, 30, **s).tokens
    assert generate_adadecode(e, prompt, 30, gamma=0.0, max_pending=4, heads=heads, **s).tokens == sampled
    assert generate_layerskip(e, prompt, 30, k=2, heads=heads, **s).tokens == sampled


@pytest.mark.parametrize("kind", KINDS)
def test_argmax_ties_go_to_the_lowest_id(kind):
    cfg = LlamaConfig.from_hf(tiny_hf_config(**ENGINE_MODELS["gqa-untied"]))
    w = random_weights(cfg)
    w.lm_head[:] = 0
    w.lm_head[7] = 0.5  # tokens 3 and 7 have equal logits: the sum of the normed row, times 0.5
    w.lm_head[3] = 0.5
    e = build(kind, cfg, w, max_seq=16)
    e.prefill([1, 2, 5])
    logits = e.final_logits(2, 2)[0]
    assert logits[3] == logits[7] and logits[3] != 0
    assert e.final(2, 2) == [3 if logits[3] > 0 else 0]  # else all the zero logits tie: token 0


@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_logits_are_an_error(kind):
    cfg, w = engine_model("gqa-untied", seed=8)
    w.layers[1].w_down[5, 3] = float("nan")
    e = build(kind, cfg, w, max_seq=16)
    e.prefill([1, 2, 5])
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        e.final(2, 2)
