"""The gpt-fast-style baseline (static-shape decode step) decodes what TorchEngine decodes.

It is not bitwise TorchEngine (its softmax and P.V reduce over the whole static cache), so the tests compare
logits within REL_TOL of the largest logit (fp32; measured: at most 3.4e-7 on these models, AVX2 and AVX-512), and
tokens only where the reference's top-2 gap exceeds that: a flip inside it would be rounding, not a bug.
"""
import pytest
import torch

from adadecode.decoding.graphed import GraphedDecoder
from adadecode.testing.parity import decode_path_logits, tie_verdict
from adadecode.decoding.vanilla import generate_vanilla
from adadecode.engines.torch import TorchEngine
from adadecode.model.config import LlamaConfig

from conftest import random_weights, tiny_hf_config

REL_TOL = 1e-5
OVERRIDES = [{}, {"tie_word_embeddings": True, "num_key_value_heads": 1}]


def forced_logits(dec: GraphedDecoder, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """The static step's logits after each of `tokens` (fed whatever it would have chosen), prompt prefilled."""
    dec.e.prefill(prompt)
    out = []
    for i, t in enumerate(tokens):
        dec.step(len(prompt) + i, t)
        out.append(dec.logits.clone())
    return torch.cat(out)


@pytest.mark.exactness
@pytest.mark.parametrize("over", OVERRIDES)
def test_static_step_matches_torch_engine(over):
    cfg = LlamaConfig.from_hf(tiny_hf_config(**over))
    weights = random_weights(cfg, seed=7)
    for prompt in ([3, 9, 27], [50, 1, 2, 4, 8, 16]):
        ref = generate_vanilla(TorchEngine(cfg, weights, max_seq=48), prompt, 24).tokens
        ref_logits = decode_path_logits(TorchEngine(cfg, weights, max_seq=48), prompt, ref[:-1])
        assert ref_logits.argmax(-1).tolist() == ref  # the decode path is what vanilla decoded from
        dec = GraphedDecoder(TorchEngine(cfg, weights, max_seq=48))
        got_logits = torch.cat([ref_logits[:1], forced_logits(dec, prompt, ref[:-1])])  # token 0 comes from prefill
        tol = REL_TOL * float(ref_logits.abs().max())
        assert float((got_logits - ref_logits).abs().max()) <= tol
        got = dec.generate(prompt, 24).tokens
        k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if k is not None:  # only at a tie within the tolerance; after it the two continue different sequences
            ok, report = tie_verdict(ref_logits[k], got_logits[k], ref[k], got[k], tol, tol)
            assert ok, report
        else:
            assert got == ref


@pytest.mark.exactness
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_static_step_ignores_dead_cache_entries(poison):
    """Entries past the position (never written, or rolled back) cannot reach the output: 0 * NaN is NaN."""
    cfg = LlamaConfig.from_hf(tiny_hf_config(**OVERRIDES[1]))
    weights = random_weights(cfg, seed=7)
    prompt, tokens = [3, 9, 27], [27, 5, 60, 1]
    clean = TorchEngine(cfg, weights, max_seq=48)
    for c in clean.k_cache + clean.v_cache:
        c.zero_()
    dirty = TorchEngine(cfg, weights, max_seq=48)
    for c in dirty.k_cache + dirty.v_cache:
        c.fill_(poison)
    want = forced_logits(GraphedDecoder(clean), prompt, tokens)
    got = forced_logits(GraphedDecoder(dirty), prompt, tokens)
    assert torch.isfinite(want).all()
    assert torch.equal(got, want)
    assert GraphedDecoder(dirty).generate(prompt, 8).tokens == GraphedDecoder(clean).generate(prompt, 8).tokens


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager(default_model):
    tok = default_model.tokenizer
    prompt = tok.encode_chat("Write a haiku about the sea.")
    ref = generate_vanilla(TorchEngine(default_model.cfg, default_model.weights, device="cuda", dtype=torch.bfloat16,
                                       max_seq=512), prompt, 64, eos_ids=default_model.eos_ids)
    dec = GraphedDecoder(TorchEngine(default_model.cfg, default_model.weights, device="cuda", dtype=torch.bfloat16,
                                     max_seq=512))
    got = dec.generate(prompt, 64, eos_ids=default_model.eos_ids)
    assert dec.graph is not None
    same = sum(a == b for a, b in zip(got.tokens, ref.tokens))
    assert got.tokens[:16] == ref.tokens[:16], f"{same} of {len(ref.tokens)} equal"
