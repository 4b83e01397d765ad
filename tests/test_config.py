"""LlamaConfig: plain Llama configs load; everything the engines do not implement is refused by name."""
import json

import pytest

from adadecode.config import ConfigError, LlamaConfig

from conftest import tiny_hf_config


def test_plain_llama_loads():
    cfg = LlamaConfig.from_hf(tiny_hf_config())
    assert (cfg.d, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (48, 4, 6, 2, 8)
    assert cfg.eos_token_ids == (2,) and cfg.rope_scaling is None


def test_llama3_rope_scaling_is_kept():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig.from_hf(tiny_hf_config(rope_scaling=scaling, eos_token_id=[2, 5]))
    assert cfg.rope_scaling["factor"] == 8.0 and cfg.eos_token_ids == (2, 5)


@pytest.mark.parametrize("field,value,words", [
    ("model_type", "mistral", "model_type"),
    ("attention_bias", True, "attention_bias"),
    ("mlp_bias", True, "mlp_bias"),
    ("sliding_window", 4096, "sliding_window"),
    ("num_local_experts", 8, "num_local_experts"),
    ("hidden_act", "gelu", "hidden_act"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling"),
    ("num_key_value_heads", 4, "num_key_value_heads"),
    ("hidden_size", 0, "hidden_size"),
])
def test_unsupported_configs_are_refused_by_field(field, value, words):
    with pytest.raises(ConfigError, match=words):
        LlamaConfig.from_hf(tiny_hf_config(**{field: value}), source="ckpt/config.json")


def test_error_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_hf_config(model_type="mixtral")))
    with pytest.raises(ConfigError, match=str(tmp_path / "config.json")):
        LlamaConfig.from_file(tmp_path / "config.json")


def test_missing_and_broken_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        LlamaConfig.from_file(tmp_path / "config.json")


def test_hf_round_trip():
    cfg = LlamaConfig.from_hf(tiny_hf_config(tie_word_embeddings=True))
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
