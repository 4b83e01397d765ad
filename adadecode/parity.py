"""Comparing the greedy tokens of two engines that round differently (CudaEngine vs the TorchEngine oracle in bf16,
the graphed baseline vs TorchEngine): where the tokens differ, the logits must show a rounding tie.

decode_path_logits(engine, prompt, tokens)  fp32 logits [len(tokens) + 1, vocab]: after the prompt, then after each
    token, along vanilla decoding's path (prefill, then one row per token). A fresh prefill of the same context runs
    other GEMM shapes and can move a near-tie either way, so a divergence is judged on the state it came from.
tie_verdict(ref_logits, got_logits, a, b, ref_tol, got_tol)  the reference chose `a` and the engine `b` from these
    logits rows [vocab] at the same context: accepted when a == b, or when a and b are within ref_tol on the
    reference's logits and within got_tol on the engine's. A wrong engine, whose b is decidedly worse, fails.
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


@contextlib.contextmanager
def oracle_matmul_precision():
    """cuBLAS bf16 GEMMs without reduced-precision reductions (torch allows them by default): they add rounding
    points that TorchEngine's math and the CUDA kernels (fp32 accumulation, one rounding) do not have."""
    flag = torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = flag
