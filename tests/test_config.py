"""LlamaConfig: plain Llama configs load; everything the engines do not implement is refused by name."""
import json

import pytest

from adadecode.model.config import ConfigError, LlamaConfig

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


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def v5_config(rope_parameters, **over) -> dict:
    """tiny_hf_config in transformers 5's layout: RoPE settings only inside `rope_parameters`."""
    cfg = tiny_hf_config(rope_parameters=rope_parameters, **over)
    del cfg["rope_theta"]
    return cfg


def test_both_rope_layouts_read_the_same():
    old = LlamaConfig.from_hf(tiny_hf_config(rope_theta=500000.0, rope_scaling=LLAMA3))
    new = LlamaConfig.from_hf(v5_config(LLAMA3 | {"rope_theta": 500000.0}))
    assert new == old and new.rope_theta == 500000.0 and new.rope_scaling["original_max_position_embeddings"] == 64
    plain = LlamaConfig.from_hf(v5_config({"rope_type": "default", "rope_theta": 100000.0}))
    assert plain == LlamaConfig.from_hf(tiny_hf_config(rope_theta=100000.0, rope_scaling=None))
    assert plain.rope_theta == 100000.0 and plain.rope_scaling is None
    legacy = LlamaConfig.from_hf(tiny_hf_config(rope_scaling={"type": "llama3"} | {k: v for k, v in LLAMA3.items()
                                                                                  if k != "rope_type"}))
    assert legacy.rope_scaling == LLAMA3  # `type`, the oldest spelling of `rope_type`


def test_no_rope_settings_get_transformers_default_theta():
    import transformers

    cfg = tiny_hf_config()
    del cfg["rope_theta"]
    ours = LlamaConfig.from_hf(cfg)
    theirs = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures")})
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"] == 10000.0 and ours.rope_scaling is None
    assert theirs.rope_parameters["rope_type"] == "default"
    # the same default inside rope_parameters: a type without a theta
    assert LlamaConfig.from_hf(v5_config({"rope_type": "default"})).rope_theta == 10000.0


@pytest.mark.parametrize("cfg,words", [
    (v5_config({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "'rope_parameters' has rope_type 'yarn'"),
    (v5_config({"rope_type": "dynamic", "factor": 2.0}), "'rope_parameters' has rope_type 'dynamic'"),
    (v5_config({"rope_type": "linear", "factor": 2.0}, rope_scaling={"type": "linear", "factor": 2.0}),
     "'rope_parameters' has rope_type 'linear'"),
    (v5_config({"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}),
     "'rope_parameters' of rope_type llama3 lacks"),
    (v5_config({"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}),
     "'rope_parameters' has partial_rotary_factor 0.5"),
    (tiny_hf_config(partial_rotary_factor=0.5), "'partial_rotary_factor' has partial_rotary_factor 0.5"),
    (v5_config({"rope_type": "default", "rope_theta": -1.0}), "'rope_parameters' has rope_theta -1.0"),
    (v5_config({"rope_type": "default", "rope_theta": "500000"}), "'rope_parameters' has rope_theta '500000'"),
    (v5_config(LLAMA3 | {"factor": None, "rope_theta": 5e5}), "'rope_parameters' has factor None"),
    (v5_config({"full_attention": {"rope_type": "default", "rope_theta": 1e4}}), "'rope_parameters' holds per-layer"),
    (v5_config([1, 2]), "'rope_parameters' is \\[1, 2\\]"),
    (tiny_hf_config(layer_types=["full_attention", "sliding_attention"] * 2), "'layer_types'"),
])
def test_bad_rope_settings_are_refused_by_field(cfg, words):
    with pytest.raises(ConfigError, match="ckpt/config.json: field " + words):
        LlamaConfig.from_hf(cfg, source="ckpt/config.json")


@pytest.mark.parametrize("cfg,words", [
    # transformers 5 would take rope_parameters' theta, transformers 4 the top-level one
    (tiny_hf_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
     "'rope_theta' says rope_theta = 10000.0 but 'rope_parameters' says 500000.0"),
    # transformers 5 would take rope_scaling over rope_parameters
    (v5_config(LLAMA3 | {"rope_theta": 5e5}, rope_scaling={"rope_type": "default"}),
     "'rope_scaling' says rope_type = 'default' but 'rope_parameters' says 'llama3'"),
    (v5_config(LLAMA3 | {"rope_theta": 5e5}, rope_scaling=LLAMA3 | {"factor": 32.0}),
     "'rope_scaling' says factor = 32.0 but 'rope_parameters' says 8.0"),
    (v5_config(LLAMA3 | {"rope_theta": 5e5}, original_max_position_embeddings=8192),
     "'original_max_position_embeddings' says original_max_position_embeddings = 8192 but 'rope_parameters' says 64"),
    (tiny_hf_config(rope_scaling=LLAMA3 | {"type": "linear"}), "'rope_scaling' has rope_type 'linear'"),
    (tiny_hf_config(rope_scaling=LLAMA3 | {"type": "default"}), "'rope_scaling' says rope_type = 'default' but"),
])
def test_disagreeing_layouts_are_refused(cfg, words):
    with pytest.raises(ConfigError, match="ckpt/config.json: field " + words):
        LlamaConfig.from_hf(cfg, source="ckpt/config.json")


def test_agreeing_layouts_load():
    both = tiny_hf_config(rope_theta=5e5, rope_scaling=LLAMA3, rope_parameters=LLAMA3 | {"rope_theta": 500000},
                          original_max_position_embeddings=64)
    assert LlamaConfig.from_hf(both) == LlamaConfig.from_hf(v5_config(LLAMA3 | {"rope_theta": 5e5}))
