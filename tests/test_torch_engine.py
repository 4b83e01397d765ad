"""TorchEngine against transformers' LlamaForCausalLM, and what only TorchEngine has (one row at a time, ATen's vector
tails). The engine contract on every engine (truncate, splits, ties, AdaDecode == vanilla) is tests/test_engines.py."""
import pytest
import torch

from adadecode.testing.parity import decode_path_logits
from adadecode.engines.contract import EngineError
from adadecode.engines.torch import TorchEngine
from adadecode.model.config import LlamaConfig

from conftest import random_weights, tiny_hf_config

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
CONFIGS = {
    "gqa-untied": tiny_hf_config(),
    "gqa-tied": tiny_hf_config(tie_word_embeddings=True, num_key_value_heads=3),
    "mha-llama3-rope": tiny_hf_config(num_key_value_heads=6, rope_scaling=LLAMA3, rope_theta=500000.0),
    "mqa-headdim": tiny_hf_config(num_key_value_heads=1, head_dim=16, num_hidden_layers=3),
}


def hf_logits(hf_cfg: dict, cfg: LlamaConfig, weights, tokens) -> torch.Tensor:
    import transformers

    conf = transformers.LlamaConfig(**{k: v for k, v in hf_cfg.items() if k not in ("model_type", "architectures")})
    conf._attn_implementation = "eager"
    model = transformers.LlamaForCausalLM(conf).eval()
    missing, unexpected = model.load_state_dict(weights.to_hf_state(cfg), strict=False)
    assert not unexpected and all(m == "lm_head.weight" for m in missing)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    hf_cfg = CONFIGS[name]
    cfg = LlamaConfig.from_hf(hf_cfg)
    weights = random_weights(cfg, seed=hash(name) % 1000)
    tokens = torch.randint(0, cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf_cfg, cfg, weights, tokens)
    engine = TorchEngine(cfg, weights, max_seq=64)
    got = decode_path_logits(engine, tokens[:1], tokens[1:])  # one row at a time after the first token
    assert torch.isfinite(got).all()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 1e-5, f"{name}: relative error {rel:.2e} (decode path)"
    engine.prefill(tokens)
    last = engine.final_logits(len(tokens) - 1, len(tokens) - 1)
    assert ((last - ref[-1:]).norm() / ref[-1].norm()) < 1e-5, "prefill path"


# intermediate 80 leaves a vector-loop tail on one [1, 80] row under AVX-512 only; 88 under AVX2 and AVX-512 too
# (ATen runs the elements past the last full 2-vector block with the scalar function: other rounding in SiLU)
@pytest.mark.exactness
@pytest.mark.parametrize("intermediate", [80, 88])
def test_run_layers_in_pieces_is_bitwise_one_call(intermediate):
    cfg = LlamaConfig.from_hf(tiny_hf_config(intermediate_size=intermediate))
    weights = random_weights(cfg)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, cfg.vocab_size, (9,), generator=g).tolist()
    new = torch.randint(0, cfg.vocab_size, (5,), generator=g).tolist()
    L = cfg.n_layers

    def start():
        e = TorchEngine(cfg, weights, max_seq=32)
        e.prefill(prompt)
        for i, t in enumerate(new):
            e.embed(len(prompt) + i, t)
        return e

    first, last = len(prompt), len(prompt) + len(new) - 1
    whole = start()
    whole.run_layers(first, last, 0, L)
    ref = whole.final_logits(first, last)

    rows_split = start()  # rows split across calls: each chunk after the one before it, all layers
    for a, b in [(first, first + 1), (first + 2, first + 2), (first + 3, last)]:
        rows_split.run_layers(a, b, 0, L)
    assert torch.equal(rows_split.final_logits(first, last), ref)

    one_by_one = start()  # vanilla's shape: one row per call
    for p in range(first, last + 1):
        one_by_one.run_layers(p, p, 0, L)
    assert torch.equal(one_by_one.final_logits(first, last), ref)

    layers_split = start()  # layers split across calls, all rows each time
    for l0, l1 in [(0, 1), (1, 3), (3, L)]:
        layers_split.run_layers(first, last, l0, l1)
    assert torch.equal(layers_split.final_logits(first, last), ref)

    staircase = start()  # an AdaDecode-like schedule: deeper rows first, rows join at depth boundaries
    staircase.run_layers(first, first + 2, 0, 2)
    staircase.run_layers(first, first + 1, 2, 3)
    staircase.run_layers(first + 3, last, 0, 2)
    staircase.run_layers(first + 2, last, 2, 3)
    staircase.run_layers(first, last, 3, L)
    assert torch.equal(staircase.final_logits(first, last), ref)
    for layer in range(L):
        assert torch.equal(staircase.k_cache[layer][: last + 1], whole.k_cache[layer][: last + 1])
        assert torch.equal(staircase.v_cache[layer][: last + 1], whole.v_cache[layer][: last + 1])

    # and close to a batched full forward over the same tokens (prefill's path)
    full = TorchEngine(cfg, weights, max_seq=32)
    full.prefill(prompt + new)
    assert torch.allclose(full.final_logits(last, last), ref[-1:], rtol=1e-5, atol=1e-5)


def test_contract_violations_are_refused(tiny):
    cfg, weights = tiny
    e = TorchEngine(cfg, weights, max_seq=32, max_rows=4)
    e.prefill([1, 2, 3])
    e.embed(3, 4)
    with pytest.raises(EngineError, match="depth"):
        e.run_layers(3, 3, 1, 2)  # row 3 is at depth 0
    with pytest.raises(EngineError, match="not in flight"):
        e.run_layers(4, 4, 0, 1)
    with pytest.raises(EngineError, match="depth"):
        e.final(3, 3)  # not at depth L yet
    e.embed(5, 4)
    with pytest.raises(EngineError, match="cache holds"):
        e.run_layers(5, 5, 0, 1)  # position 4 was never computed
    with pytest.raises(EngineError, match="rows per call"):
        e.run_layers(3, 9, 0, 1)
    e.truncate(3)
    with pytest.raises(EngineError, match="not in flight"):
        e.run_layers(3, 3, 0, 1)


def test_identity_head_is_the_logit_lens(tiny):
    from adadecode.engines.head import Head
    from adadecode.model.math import rms_norm

    cfg, weights = tiny
    e = TorchEngine(cfg, weights, max_seq=32)
    e.set_heads([Head.identity(2, cfg.d)])
    e.prefill([3, 4, 5])
    e.embed(3, 6)
    e.run_layers(3, 3, 0, 2)
    token, conf = e.head(3, 0)
    lens = (rms_norm(e.hidden(3), weights.norm, cfg.rms_norm_eps) @ weights.lm_head.T).float()
    assert token == int(lens.argmax())
    assert conf == pytest.approx(float(torch.softmax(lens, -1).max()), rel=1e-6)
