"""CudaEngine on a GPU against TorchEngine on random weights at the shapes that matter: SmolLM2-135M's (all 30 layers)
and Llama-3.1-8B's (d 4096, 32/8 heads, head_dim 128, ffn 14336, vocab 128256, Llama-3 RoPE scaling; 4 of its 32
layers: every layer has the same shapes, and 4 random layers keep the oracle's fp32 copy small). No real weights
needed: the GPU lease runs these in its first call, before the default model has arrived (bench/gpu_lease.py).

* greedy tokens == TorchEngine (bf16 on the GPU, no reduced-precision GEMM reductions), or the first divergence is a
  bf16 logit tie (adadecode.parity.fp32_tie_verdict on the fp32 model's and the engine's own decode-path logits),
  for prompts of 3 rows (skinny-GEMM prefill), 40 (tensor-core prefill) and 300 (two prefill chunks, three
  attention chunks);
* run_layers in random splits of rows and layers == one call, bitwise, with graphs on and off (graph replays ==
  eager launches);
* the fused decode path == the unfused one, bitwise (states, tokens, vanilla and AdaDecode decoding with heads that
  exit on every token), and AdaDecode == vanilla.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from adadecode.model.config import LlamaConfig
from adadecode.engines.cuda import MAX_ROWS, CudaEngine
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.decoding.driver import generate_adadecode
from adadecode.engines.cuda import cuda_unavailable_reason
from adadecode.engines.head import Head
from adadecode.testing.parity import bf16_ulp, decode_path_logits, fp32_tie_verdict, oracle_matmul_precision
from adadecode.engines.torch import TorchEngine
from adadecode.model.weights import LlamaWeights

from test_cuda_engine import _assert_bitwise, _check_schedules, _random_schedule, _start, _state

SMOL_HF = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576,
           "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "intermediate_size": 1536,
           "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
           "tie_word_embeddings": True, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
L8B_HF = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256, "hidden_size": 4096,
          "num_hidden_layers": 4, "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
          "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
          "tie_word_embeddings": False, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}}
SHAPES = {"smollm2-shape": SMOL_HF, "llama-8b-shape-4-layers": L8B_HF}
MAX_SEQ = 512


@pytest.fixture(scope="module", params=list(SHAPES))
def model(request):
    why = cuda_unavailable_reason()
    if why:
        pytest.skip(why)
    cfg = LlamaConfig.from_hf(SHAPES[request.param], source=request.param)
    weights = LlamaWeights.random(cfg, seed=1, device="cuda", dtype=torch.bfloat16)
    with oracle_matmul_precision():  # the oracle's GEMMs without reduced-precision bf16 reductions or TF32
        yield request.param, cfg, weights


@pytest.mark.gpu
def test_greedy_tokens_match_torch_engine(model):
    name, cfg, weights = model
    cuda = CudaEngine(cfg, weights, max_seq=MAX_SEQ)
    ref = TorchEngine(cfg, weights, device="cuda", dtype=torch.bfloat16, max_seq=MAX_SEQ)
    f32 = TorchEngine(cfg, weights, device="cuda", dtype=torch.float32, max_seq=MAX_SEQ)
    g = torch.Generator().manual_seed(2)
    lines, untied = [], []
    for n in (3, 40, 300):
        prompt = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
        got = generate_vanilla(cuda, prompt, 32).tokens
        want = generate_vanilla(ref, prompt, 32).tokens
        if got == want:
            lines.append(f"prompt of {n}: 32/32 tokens identical")
            continue
        k = next(j for j, (a, b) in enumerate(zip(got, want)) if a != b)
        lf = decode_path_logits(f32, prompt, want[:k])[-1].float()
        le = decode_path_logits(cuda, prompt, want[:k])[-1].float()
        ok, r = fp32_tie_verdict(lf, le, want[k], got[k])
        ulp = bf16_ulp(float(lf.max()))
        lines.append(f"prompt of {n}: first divergence at token {k}: torch {want[k]} vs cuda {got[k]}; fp32 gap "
                     f"{r['ref_gap'] / ulp:.2f} bf16 ulps (tolerance {r['ref_tol'] / ulp:.2f}), the engine's own "
                     f"{r['got_gap'] / ulp:.2f} (tolerance {r['got_tol'] / ulp:.2f})")
        if not ok:
            untied.append(lines[-1])
    print(f"\nCudaEngine vs TorchEngine (bf16, cuda), random weights, {name}:\n" + "\n".join(lines))
    assert not untied, "divergences that are not bf16 logit ties:\n" + "\n".join(untied)


@pytest.mark.gpu
def test_run_layers_any_split_is_bitwise_one_call(model):
    """Random splits of 16 rows over the layers (graphs on and off) leave the state and tokens of one call."""
    name, cfg, weights = model
    cuda = CudaEngine(cfg, weights, max_seq=MAX_SEQ)
    L = cfg.n_layers
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, cfg.vocab_size, (300,), generator=g).tolist()
    new = torch.randint(0, cfg.vocab_size, (MAX_ROWS,), generator=g).tolist()
    first, last = _start(cuda, prompt, new)
    cuda.run_layers(first, last, 0, L)
    whole, whole_tokens = _state(cuda, first, last), cuda.final(first, last)
    schedules = {"rows one by one": [(p, p, 0, L) for p in range(first, last + 1)],
                 "layers one by one": [(first, last, l, l + 1) for l in range(L)]}
    for k in range(4):
        schedules[f"random {k}"] = _random_schedule(g, first, last, L)
    _check_schedules(cuda, prompt, new, schedules, whole, whole_tokens, (first, first + 7, last))


@pytest.mark.gpu
def test_fused_path_is_bitwise_the_unfused_one(model):
    name, cfg, weights = model
    L = cfg.n_layers
    g = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, cfg.vocab_size, (300,), generator=g).tolist()
    new = torch.randint(0, cfg.vocab_size, (MAX_ROWS,), generator=g).tolist()
    chat = torch.randint(0, cfg.vocab_size, (20,), generator=g).tolist()
    mid = max(1, L // 2)
    heads = [Head.identity(mid, cfg.d), Head(layer=L - 1, T=torch.eye(cfg.d) + 0.02 * torch.randn(cfg.d, cfg.d, generator=g),
                                             vocab=torch.randperm(cfg.vocab_size, generator=g)[:1000].sort().values,
                                             w_rest=0.05 * torch.randn(cfg.d, generator=g))]
    out = {}
    for fused in (True, False):
        e = CudaEngine(cfg, weights, max_seq=MAX_SEQ)
        e.fused = fused
        first, last = _start(e, prompt, new)
        sched = _random_schedule(torch.Generator().manual_seed(9), first, last, L)
        for a, b, l0, l1 in sched:
            e.run_layers(a, b, l0, l1)
        e.set_heads(heads)
        out[fused] = dict(state=_state(e, first, last), tokens=e.final(first, last),
                          vanilla=generate_vanilla(e, chat, 32).tokens,
                          adadecode=generate_adadecode(e, chat, 32, gamma=0.0, max_pending=5, heads=heads).tokens)
        del e
    _assert_bitwise(out[True]["state"], out[False]["state"], f"{name}: fused vs unfused")
    for key in ("tokens", "vanilla", "adadecode"):
        assert out[True][key] == out[False][key], f"{name}: fused vs unfused: {key} differ"
    assert out[True]["adadecode"] == out[True]["vanilla"], f"{name}: AdaDecode (gamma 0) != vanilla"


def test_eight_b_shape_is_the_benchmarks_shape():
    """The 8B shape here is bench/common.py's Llama-3.1-8B but for its depth and EOS ids (runs without a GPU)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    from common import llama31_8b

    mine = LlamaConfig.from_hf(L8B_HF)
    bench = dataclasses.replace(llama31_8b(), n_layers=4, eos_token_ids=mine.eos_token_ids)
    assert bench == mine
