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
    ("model_type", "mixtral", "model_type"),
    ("model_type", "mistral", "architectures"),  # a Mistral config that names LlamaForCausalLM
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


QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
QWEN3 = dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
MISTRAL = dict(model_type="mistral", architectures=["MistralForCausalLM"])


def test_families_load_with_their_features():
    q2 = LlamaConfig.from_hf(tiny_hf_config(**QWEN2))
    assert (q2.model_type, q2.qkv_bias, q2.qk_norm, q2.sliding_window) == ("qwen2", True, False, None)
    q3 = LlamaConfig.from_hf(tiny_hf_config(**QWEN3, head_dim=16))
    assert (q3.qkv_bias, q3.qk_norm, q3.head_dim, q3.n_heads * q3.head_dim, q3.d) == (False, True, 16, 96, 48)
    m = LlamaConfig.from_hf(tiny_hf_config(**MISTRAL, sliding_window=4096))
    assert (m.model_type, m.qkv_bias, m.qk_norm, m.sliding_window) == ("mistral", False, False, 4096)
    assert LlamaConfig.from_hf(tiny_hf_config(**MISTRAL, sliding_window=None)).sliding_window is None


def test_family_defaults_are_transformers():
    """Fields a family's config.json omits get that family's transformers default, not Llama's."""
    import transformers

    for over, theirs in ((QWEN3, transformers.Qwen3Config()), (MISTRAL, transformers.MistralConfig()),
                         (QWEN2, transformers.Qwen2Config())):
        cfg = tiny_hf_config(**over)
        for k in ("head_dim", "max_position_embeddings"):
            cfg.pop(k, None)
        ours = LlamaConfig.from_hf(cfg)
        assert ours.max_position == theirs.max_position_embeddings
        if over is QWEN3:  # Qwen3: head_dim 128 whatever hidden_size / heads is
            assert ours.head_dim == theirs.head_dim == 128


@pytest.mark.parametrize("over,window", [
    (dict(use_sliding_window=False, sliding_window=131072, max_window_layers=21), None),  # Qwen2.5's shipped configs
    (dict(use_sliding_window=True, sliding_window=32, max_window_layers=0), 32),
    (dict(use_sliding_window=True, sliding_window=32, max_window_layers=4), None),  # no layer >= 4 of 4
    (dict(use_sliding_window=True, sliding_window=32, layer_types=["sliding_attention"] * 4), 32),
    (dict(use_sliding_window=False, sliding_window=32, layer_types=["full_attention"] * 4), None),
])
@pytest.mark.parametrize("family", [QWEN2, QWEN3], ids=["qwen2", "qwen3"])
def test_qwen_window_applies_as_transformers_applies_it(family, over, window):
    import transformers

    cfg = tiny_hf_config(**family, **over)
    assert LlamaConfig.from_hf(cfg).sliding_window == window
    theirs = transformers.AutoConfig.for_model(**{k: v for k, v in cfg.items() if k != "architectures"})
    assert set(theirs.layer_types) == {"sliding_attention" if window else "full_attention"}


@pytest.mark.parametrize("cfg,words", [
    (tiny_hf_config(**QWEN2, use_sliding_window=True, sliding_window=32, max_window_layers=2),
     "'max_window_layers' puts a sliding window on 2 of 4 layers"),
    (tiny_hf_config(**QWEN3, use_sliding_window=True, sliding_window=32,
                    layer_types=["full_attention", "sliding_attention"] * 2), "'layer_types' puts a sliding window on 2"),
    (tiny_hf_config(**QWEN2, use_sliding_window=False, layer_types=["sliding_attention"] * 4),
     "'layer_types' names sliding_attention layers but no sliding_window"),
    (tiny_hf_config(**QWEN2, use_sliding_window=True, sliding_window=32, layer_types=["sliding_attention"] * 3),
     "'layer_types' names 3 layers; num_hidden_layers is 4"),
    (tiny_hf_config(**QWEN2, use_sliding_window=True, sliding_window=0, max_window_layers=0),
     "'sliding_window' is 0; expected a positive integer"),
    (tiny_hf_config(**MISTRAL, sliding_window=-4), "'sliding_window' is -4"),
    (tiny_hf_config(**QWEN2, use_sliding_window=True, sliding_window=32, max_window_layers=None),
     "'max_window_layers' is None; expected an integer >= 0"),
    (tiny_hf_config(**MISTRAL, sliding_window=32, layer_types=["sliding_attention", "full_attention"] * 2),
     "'layer_types' is .* \\(alternating layers"),
    (tiny_hf_config(sliding_window=4096), "'sliding_window' is 4096; model_type 'llama' has no sliding-window"),
    (tiny_hf_config(**QWEN3, attention_bias=True), "'attention_bias' is True; biases are not supported"),
    (tiny_hf_config(**QWEN2, mlp_bias=True), "'mlp_bias' is True; biases are not supported"),
    (tiny_hf_config(**MISTRAL, attention_bias=True), "'attention_bias' is True; biases are not supported"),
    (tiny_hf_config(**(QWEN3 | dict(architectures=["Qwen2ForCausalLM"]))), "'architectures' is \\['Qwen2ForCausalLM'\\]"),
    (tiny_hf_config(**QWEN3, head_dim=0), "'head_dim' is 0; expected an integer >= 1"),
    (tiny_hf_config(model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]), "'model_type' is 'qwen2_moe'"),
])
def test_family_features_we_do_not_run_are_refused_by_field(cfg, words):
    with pytest.raises(ConfigError, match="ckpt/config.json: field " + words):
        LlamaConfig.from_hf(cfg, source="ckpt/config.json")


@pytest.mark.parametrize("family", [QWEN2 | dict(use_sliding_window=True, sliding_window=24, max_window_layers=0),
                                    QWEN2, QWEN3 | dict(head_dim=16), MISTRAL | dict(sliding_window=24), MISTRAL],
                         ids=["qwen2-window", "qwen2", "qwen3", "mistral-window", "mistral"])
def test_family_hf_round_trip_and_fingerprint(family):
    cfg = LlamaConfig.from_hf(tiny_hf_config(**family))
    assert LlamaConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.to_hf()["architectures"] == family["architectures"]
    assert cfg.fingerprint_text() != LlamaConfig.from_hf(tiny_hf_config()).fingerprint_text()


def test_llama_fingerprint_text_is_as_before():
    """The family fields are left out at their Llama defaults: a Llama model's fingerprint (which shipped head
    files carry) is the one it had before the families existed."""
    text = LlamaConfig.from_hf(tiny_hf_config()).fingerprint_text()
    assert json.loads(text).keys() == {"d", "ffn_dim", "head_dim", "max_position", "n_heads", "n_kv_heads", "n_layers",
                                       "rms_norm_eps", "rope_scaling", "rope_theta", "tie_word_embeddings", "vocab_size"}
