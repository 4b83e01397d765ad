"""The tie criteria of the parity tests (adadecode.testing.parity), on the CPU: a rounding tie passes, a wrong
engine (a logit moved by more than rounding) fails, and the logits are judged on the decode path vanilla took;
fp32_tie_verdict (CudaEngine on a GPU or the emulated device vs TorchEngine bf16) likewise on an fp32 model."""
import pytest
import torch

from adadecode.decoding.vanilla import generate_vanilla
from adadecode.model.config import LlamaConfig
from adadecode.testing.parity import (ENGINE_TIE_ULPS, FP32_TIE_ULPS, bf16_tols, bf16_ulp, decode_path_logits,
                                       fp32_tie_verdict, tie_verdict)
from adadecode.engines.torch import TorchEngine

from conftest import random_weights, tiny_hf_config


def test_bf16_ulp():
    assert bf16_ulp(1.0) == 2 ** -7 and bf16_ulp(-3.0) == 2 ** -6 and bf16_ulp(20.0) == 2 ** -3
    x = torch.tensor(20.0, dtype=torch.bfloat16)
    assert float(torch.nextafter(x, torch.tensor(30.0, dtype=torch.bfloat16)) - x) == bf16_ulp(20.0)


@pytest.fixture(scope="module")
def bf16_rows():
    """A real bf16 reference: a tiny model in bf16, its logits along vanilla's decode path."""
    cfg = LlamaConfig.from_hf(tiny_hf_config())
    e = TorchEngine(cfg, random_weights(cfg, seed=3), dtype=torch.bfloat16, max_seq=48)
    prompt = [3, 9, 27, 4]
    tokens = generate_vanilla(e, prompt, 12).tokens
    logits = decode_path_logits(e, prompt, tokens[:-1])
    assert logits.argmax(-1).tolist() == tokens  # the rows are the state vanilla chose each token from
    return logits


def near_tie(logits: torch.Tensor, ulps_ref: int, ulps_got: int):
    """(ref, got, a, b): the reference's best `a` and a token `b` put `ulps_ref` bf16 steps below it; the engine's
    logits are the reference's with b raised to `ulps_got` steps above a (so the engine chose b)."""
    ref = logits.clone()
    a = int(ref.argmax())
    ulp = bf16_ulp(float(ref[a]))
    b = int(ref.argsort(descending=True)[1])
    ref[b] = ref[a] - ulps_ref * ulp
    got = ref.clone()
    got[b] = ref[a] + ulps_got * ulp
    return ref, got, a, b


def test_a_rounding_tie_passes(bf16_rows):
    for row in bf16_rows:
        tols = bf16_tols(row)
        for ulps_ref, ulps_got in [(0, 0), (1, 0), (0, 2), (1, 2)]:  # 2 on the engine's side: its final_logits
            ref, got, a, b = near_tie(row, ulps_ref, ulps_got)     # rounds a torch LM head (commit 185abed)
            ok, report = tie_verdict(ref, got, a, b, *tols)
            assert ok, report
        ok, _ = tie_verdict(row, row, int(row.argmax()), int(row.argmax()), *tols)  # same token: nothing to judge
        assert ok


def test_a_perturbed_logit_fails(bf16_rows):
    """A wrong engine: it chose b because b's logit moved by more than rounding (or b was never close)."""
    for row in bf16_rows:
        tols = bf16_tols(row)
        ref, got, a, b = near_tie(row, 1, 3)  # the engine's logit of b 3 steps above a: not rounding
        assert not tie_verdict(ref, got, a, b, *tols)[0]
        ref, got, a, b = near_tie(row, 2, 0)  # the reference had b 2 steps below a: not a tie there
        assert not tie_verdict(ref, got, a, b, *tols)[0]
        worst = int(row.argmin())  # an engine that picks the worst token, whatever its own logits say
        assert not tie_verdict(row, row, int(row.argmax()), worst, *tols)[0]



@pytest.fixture(scope="module")
def fp32_and_bf16_rows():
    """A tiny model's fp32 and bf16 logits along the bf16 engine's decode path, and that engine's tokens."""
    cfg = LlamaConfig.from_hf(tiny_hf_config())
    w = random_weights(cfg, seed=4)
    bf = TorchEngine(cfg, w, dtype=torch.bfloat16, max_seq=48)
    f32 = TorchEngine(cfg, w, dtype=torch.float32, max_seq=48)
    prompt = [5, 8, 13, 21]
    tokens = generate_vanilla(bf, prompt, 16).tokens
    return decode_path_logits(f32, prompt, tokens[:-1]), decode_path_logits(bf, prompt, tokens[:-1]), tokens


def test_fp32_criterion_passes_rounding_and_a_real_bf16_engine(fp32_and_bf16_rows):
    f32_rows, bf_rows, tokens = fp32_and_bf16_rows
    for f32, bf, t in zip(f32_rows, bf_rows, tokens):
        # a real bf16 engine against the fp32 model: its every choice is the fp32 choice or a tie there
        assert fp32_tie_verdict(f32, bf, int(f32.argmax()), t)[0]
        for ulps_f32, ulps_got in [(0, 0), (FP32_TIE_ULPS, 0), (0, ENGINE_TIE_ULPS), (FP32_TIE_ULPS, ENGINE_TIE_ULPS)]:
            ref, got, a, b = near_tie(f32, ulps_f32, ulps_got)
            ok, report = fp32_tie_verdict(ref, got, a, b)
            assert ok, report


def test_fp32_criterion_fails_a_perturbed_logit(fp32_and_bf16_rows):
    f32_rows, bf_rows, tokens = fp32_and_bf16_rows
    for f32, bf, t in zip(f32_rows, bf_rows, tokens):
        ref, got, a, b = near_tie(f32, 1, ENGINE_TIE_ULPS + 1)  # the engine raised b past a by more than rounding
        assert not fp32_tie_verdict(ref, got, a, b)[0]
        ref, got, a, b = near_tie(f32, FP32_TIE_ULPS + 1, 0)  # the fp32 model prefers a by more than bf16 error
        assert not fp32_tie_verdict(ref, got, a, b)[0]
        wrong = bf.clone()  # the bf16 engine with one logit pushed 8 steps up: it now picks that token
        b = int(f32.argsort(descending=True)[2])
        wrong[b] = bf.max() + 8 * bf16_ulp(float(bf.max()))
        ok, report = fp32_tie_verdict(f32, wrong, int(f32.argmax()), int(wrong.argmax()))
        assert int(wrong.argmax()) == b and not ok, report
