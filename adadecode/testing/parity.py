"""Comparing the greedy tokens of two engines that round differently (CudaEngine vs the TorchEngine oracle in bf16,
the graphed baseline vs TorchEngine): where the tokens differ, the logits must show a rounding tie.

decode_path_logits(engine, prompt, tokens)  fp32 logits [len(tokens) + 1, vocab]: after the prompt, then after each
    token, along vanilla decoding's path (prefill, then one row per token). A fresh prefill of the same context runs
    other GEMM shapes and can move a near-tie either way, so a divergence is judged on the state it came from.
tie_verdict(ref_logits, got_logits, a, b, ref_tol, got_tol)  the reference chose `a` and the engine `b` from these
    logits rows [vocab] at the same context: accepted when a == b, or when a and b are within ref_tol on the
    reference's logits and within got_tol on the engine's. A wrong engine, whose b is decidedly worse, fails.
fp32_tie_verdict(f32_logits, got_logits, a, b)  the criterion for two bf16 engines (CudaEngine on a GPU or the
    emulated device vs TorchEngine bf16): tie_verdict judged on the fp32 model's logits (FP32_TIE_ULPS) and the
    engine's own (ENGINE_TIE_ULPS). Its docstring says why.
"""
from __future__ import annotations

import contextlib
import math

import torch


def bf16_ulp(x: float) -> float:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - 7)


def bf16_tols(ref_logits: torch.Tensor, ref_ulps: float = 1, got_ulps: float = 2) -> tuple[float, float]:
    """(ref_tol, got_tol) in bf16 steps at the reference's top logit. The defaults fit CudaEngine vs TorchEngine:
    the oracle's bf16 logits of a tie are at most one step apart; the engine's choice comes from its fp32 kernel
    while its `final_logits` rounds a torch LM head (another summation order), so each of the two logits may land
    on the other bf16 neighbour: 2 steps."""
    ulp = bf16_ulp(float(ref_logits.max())) * 1.001  # the two logits may sit across a binade boundary
    return ref_ulps * ulp, got_ulps * ulp


def decode_path_logits(engine, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    engine.prefill(prompt)
    pos = len(prompt) - 1
    out = [engine.final_logits(pos, pos)]
    for t in tokens:
        pos += 1
        engine.embed(pos, t)
        engine.run_layers(pos, pos, 0, engine.n_layers)
        out.append(engine.final_logits(pos, pos))
    return torch.cat(out)


def tie_verdict(ref_logits: torch.Tensor, got_logits: torch.Tensor, a: int, b: int,
                ref_tol: float, got_tol: float) -> tuple[bool, dict]:
    ref_gap = float(ref_logits[a] - ref_logits[b])  # >= 0: the reference chose a from these logits
    got_gap = float(got_logits[b] - got_logits[a])  # the engine chose b; its logits may put a up to got_tol above
    top = torch.topk(ref_logits.float(), 2).values
    report = {"a": a, "b": b, "ref_a": float(ref_logits[a]), "ref_b": float(ref_logits[b]), "ref_gap": ref_gap,
              "got_gap": got_gap, "ref_top2_gap": float(top[0] - top[1]), "ref_tol": ref_tol, "got_tol": got_tol}
    ok = a == b or (abs(ref_gap) <= ref_tol and abs(got_gap) <= got_tol)
    return ok, report


FP32_TIE_ULPS = 3  # bf16 steps between a and b on the fp32 model's logits: both bf16 engines' errors together
ENGINE_TIE_ULPS = 2  # bf16 steps on the engine's own logits: its final_logits rounds a torch LM head (bf16_tols)


def fp32_tie_verdict(f32_logits: torch.Tensor, got_logits: torch.Tensor, a: int, b: int,
                     f32_ulps: float = FP32_TIE_ULPS, got_ulps: float = ENGINE_TIE_ULPS) -> tuple[bool, dict]:
    """A bf16 oracle (TorchEngine) chose `a`, a bf16 engine `b`, after the same tokens. `f32_logits`: the fp32 model
    (TorchEngine fp32 on the same bf16 weights) at that context, along the decode path (decode_path_logits);
    `got_logits`: the engine's own. Accepted when a == b, or a and b are within `f32_ulps` bf16 steps (at the top
    logit) on the fp32 model and within `got_ulps` on the engine: b was a near tie of the model itself, and the
    engine picked its own best up to rounding.

    Why two bf16 engines differ by a few ulps at the final logits: each rounds its activations to bf16 (8
    significant bits, a relative error up to 2^-9 per rounding) at different points: TorchEngine after every torch
    op (projections, attention output, each residual add, norm output, gate and up), the CUDA kernels once per fused
    op (residual add + norm, SwiGLU, GEMM epilogues), and every dot product sums in another order. Each rounding
    is a small perturbation of the hidden state; 30 layers carry and mix them, and the logits (dot products of the
    final hidden state with vocabulary rows) end up a few bf16 steps apart between the engines, in either
    direction (SmolLM2-135M: TorchEngine bf16 is as far from its own fp32 run as from the CUDA engine).

    Why fp32 is the sound reference: neither bf16 engine is closer to the model than the other, so judging the
    engine against the bf16 oracle's logits charges the oracle's own rounding to the engine (SmolLM2-135M, "Write a
    haiku about the sea.", 2nd token: two tokens 2.04 steps apart on the fp32 model are 4 apart in TorchEngine bf16
    and tied in the emulated CUDA engine, which chose the other one). The fp32 model computes the function
    both approximate with errors about 2^16 times smaller; a and b within the two engines' combined bf16 error
    there is a tie that rounding may break either way. A wrong kernel moves a logit by far more than a few
    steps: the fp32 gap, or the engine's own, exposes it."""
    return tie_verdict(f32_logits, got_logits, a, b, *bf16_tols(f32_logits, f32_ulps, got_ulps))


@contextlib.contextmanager
def oracle_matmul_precision():
    """cuBLAS GEMMs at the oracles' own precision: bf16 without reduced-precision reductions (torch allows them by
    default: they add rounding points that TorchEngine's math and the CUDA kernels, fp32 accumulation and one
    rounding, do not have), and fp32 without TF32 (the fp32 model of fp32_tie_verdict must be fp32)."""
    m = torch.backends.cuda.matmul
    flags = m.allow_bf16_reduced_precision_reduction, m.allow_tf32
    m.allow_bf16_reduced_precision_reduction, m.allow_tf32 = False, False
    try:
        yield
    finally:
        m.allow_bf16_reduced_precision_reduction, m.allow_tf32 = flags
