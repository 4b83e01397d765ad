"""The gpt-fast-style baseline (static-shape decode step) decodes the same tokens as TorchEngine."""
import pytest
import torch

from adadecode.config import LlamaConfig
from adadecode.decode import generate_vanilla
from adadecode.graphed import GraphedDecoder
from adadecode.torch_engine import TorchEngine

from conftest import random_weights, tiny_hf_config


@pytest.mark.parametrize("over", [{}, {"tie_word_embeddings": True, "num_key_value_heads": 1}])
def test_static_step_matches_torch_engine(over):
    cfg = LlamaConfig.from_hf(tiny_hf_config(**over))
    weights = random_weights(cfg, seed=7)
    for prompt in ([3, 9, 27], [50, 1, 2, 4, 8, 16]):
        ref = generate_vanilla(TorchEngine(cfg, weights, max_seq=48), prompt, 24)
        got = GraphedDecoder(TorchEngine(cfg, weights, max_seq=48)).generate(prompt, 24)
        assert got.tokens == ref.tokens


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
