"""Loading checkpoints (HF directories, sharded safetensors, GGUF) and the errors bad files get."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from adadecode.model.config import ConfigError, LlamaConfig
from adadecode.model.loader import Model, load_model, write_hf_dir

from conftest import random_weights, tiny_hf_config


def make_dir(tmp_path, **over):
    cfg = LlamaConfig.from_hf(tiny_hf_config(**over))
    weights = random_weights(cfg)
    write_hf_dir(Model(cfg=cfg, weights=weights, tokenizer=None, source="test"), tmp_path)
    return cfg, weights


def assert_same_weights(a, b, cfg):
    sa, sb = a.to_hf_state(cfg), b.to_hf_state(cfg)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k].to(torch.bfloat16), sb[k].to(torch.bfloat16)), k


@pytest.mark.parametrize("tied", [False, True])
def test_hf_directory_round_trip(tmp_path, tied):
    cfg, weights = make_dir(tmp_path, tie_word_embeddings=tied)
    m = load_model(tmp_path)
    assert m.cfg == cfg and m.weights.embed.dtype == torch.bfloat16
    assert_same_weights(m.weights, weights, cfg)
    assert (m.weights.lm_head is m.weights.embed) == tied


def shard(tmp_path, cfg):
    """Split model.safetensors into two shards with an index, as HF does for large models."""
    from safetensors.torch import load_file

    state = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    parts = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in parts.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
        weight_map.update({k: file for k in keys})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_checkpoint_loads(tmp_path):
    cfg, weights = make_dir(tmp_path)
    shard(tmp_path, cfg)
    assert_same_weights(load_model(tmp_path).weights, weights, cfg)


def test_missing_shard_is_named(tmp_path):
    cfg, _ = make_dir(tmp_path)
    shard(tmp_path, cfg)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        load_model(tmp_path)


def test_truncated_safetensors_is_named(tmp_path):
    make_dir(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated"):
        load_model(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    from safetensors.torch import load_file

    make_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="model.layers.2.mlp.up_proj.weight"):
        load_model(tmp_path)


def test_wrong_shape_is_named(tmp_path):
    from safetensors.torch import load_file

    make_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.0.self_attn.k_proj.weight"] = state["model.layers.0.self_attn.k_proj.weight"][:-1].clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="k_proj.weight.*shape"):
        load_model(tmp_path)


def test_missing_weights_and_paths(tmp_path):
    make_dir(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model"):
        load_model(tmp_path / "nowhere")


def test_unsupported_architecture_refused_before_weights(tmp_path):
    make_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["sliding_window"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").unlink()  # never reached
    with pytest.raises(ConfigError, match="sliding_window"):
        load_model(tmp_path)


def write_tiny_gguf(path, cfg, weights):
    """A GGUF as llama.cpp's converter writes it: F32 tensors; for the llama architecture (Mistral too) Q/K rows
    permuted for interleaved RoPE, for qwen2/qwen3 not (llama.cpp runs them with NeoX RoPE); head_dim as
    key_length/value_length; a Mistral window as llama.attention.sliding_window."""
    import gguf

    arch = cfg.model_type if cfg.model_type in ("qwen2", "qwen3") else "llama"

    def permute(w, n_heads):  # HF rotate-half layout -> llama.cpp interleaved
        if arch != "llama":
            return w
        return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    wr = gguf.GGUFWriter(str(path), arch)
    if cfg.head_dim != cfg.d // cfg.n_heads:
        wr.add_key_length(cfg.head_dim)
        wr.add_value_length(cfg.head_dim)
    if cfg.sliding_window is not None:
        wr.add_sliding_window(cfg.sliding_window)
    wr.add_block_count(cfg.n_layers)
    wr.add_context_length(cfg.max_position)
    wr.add_embedding_length(cfg.d)
    wr.add_feed_forward_length(cfg.ffn_dim)
    wr.add_head_count(cfg.n_heads)
    wr.add_head_count_kv(cfg.n_kv_heads)
    wr.add_rope_freq_base(cfg.rope_theta)
    wr.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    wr.add_vocab_size(cfg.vocab_size)
    wr.add_tokenizer_model("gpt2")
    wr.add_tokenizer_pre("smollm")
    byte_tokens = [chr(c) for c in range(33, 33 + cfg.vocab_size - 3)]
    wr.add_token_list(["<unk>", "<s>", "</s>"] + byte_tokens)
    wr.add_token_types([3, 3, 3] + [1] * len(byte_tokens))
    wr.add_token_merges([])
    wr.add_bos_token_id(1)
    wr.add_eos_token_id(2)
    f = lambda t: t.float().numpy().astype(np.float32)
    wr.add_tensor("token_embd.weight", f(weights.embed))
    for i, lw in enumerate(weights.layers):
        wr.add_tensor(f"blk.{i}.attn_norm.weight", f(lw.attn_norm))
        wr.add_tensor(f"blk.{i}.attn_q.weight", f(permute(lw.wq, cfg.n_heads)))
        wr.add_tensor(f"blk.{i}.attn_k.weight", f(permute(lw.wk, cfg.n_kv_heads)))
        wr.add_tensor(f"blk.{i}.attn_v.weight", f(lw.wv))
        if cfg.qkv_bias:
            wr.add_tensor(f"blk.{i}.attn_q.bias", f(lw.bq))
            wr.add_tensor(f"blk.{i}.attn_k.bias", f(lw.bk))
            wr.add_tensor(f"blk.{i}.attn_v.bias", f(lw.bv))
        if cfg.qk_norm:
            wr.add_tensor(f"blk.{i}.attn_q_norm.weight", f(lw.q_norm))
            wr.add_tensor(f"blk.{i}.attn_k_norm.weight", f(lw.k_norm))
        wr.add_tensor(f"blk.{i}.attn_output.weight", f(lw.wo))
        wr.add_tensor(f"blk.{i}.ffn_norm.weight", f(lw.mlp_norm))
        wr.add_tensor(f"blk.{i}.ffn_gate.weight", f(lw.w_gate))
        wr.add_tensor(f"blk.{i}.ffn_up.weight", f(lw.w_up))
        wr.add_tensor(f"blk.{i}.ffn_down.weight", f(lw.w_down))
    wr.add_tensor("output_norm.weight", f(weights.norm))
    if not cfg.tie_word_embeddings:
        wr.add_tensor("output.weight", f(weights.lm_head))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_loads_to_hf_layout(tmp_path, tied):
    cfg = LlamaConfig.from_hf(tiny_hf_config(tie_word_embeddings=tied))
    weights = random_weights(cfg)
    write_tiny_gguf(tmp_path / "tiny.gguf", cfg, weights)
    m = load_model(tmp_path / "tiny.gguf")
    assert (m.cfg.d, m.cfg.n_kv_heads, m.cfg.tie_word_embeddings) == (cfg.d, cfg.n_kv_heads, tied)
    assert_same_weights(m.weights, weights, cfg)  # Q/K un-permuted back to HF's layout
    assert m.tokenizer.eos_id == 2 and m.tokenizer.encode("!#") == [3, 5]


def test_damaged_gguf_is_named(tmp_path):
    cfg = LlamaConfig.from_hf(tiny_hf_config())
    write_tiny_gguf(tmp_path / "tiny.gguf", cfg, random_weights(cfg))
    f = tmp_path / "tiny.gguf"
    f.write_bytes(f.read_bytes()[:2000])
    with pytest.raises(ValueError, match="tiny.gguf"):
        load_model(f)


def test_default_model_config(default_model):
    cfg = default_model.cfg
    assert (cfg.n_layers, cfg.d, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 1e5 and default_model.eos_ids == (2,)
    assert default_model.weights.lm_head is default_model.weights.embed


def test_default_tokenizer_matches_transformers_gguf_tokenizer(default_model):
    from transformers import AutoTokenizer

    from adadecode.model.loader import default_gguf_path

    path = default_gguf_path()
    ref = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok = default_model.tokenizer
    for text in ["Hello world!", "def f(x):\n    return x ** 2  # 12345", "  spaces\tand\nnewlines  ",
                 "Ünïcödé — ok? 3.14159", "<|im_start|>user\nHi<|im_end|>\n"]:
        assert tok.encode(text) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False), skip_special_tokens=True)
    messages = [{"role": "user", "content": "Reverse a string in Python."}]
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_default_gguf_path_override(tmp_path, monkeypatch):
    from adadecode.model.loader import default_gguf_path

    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    monkeypatch.setenv("ADADECODE_DEFAULT_GGUF", str(f))
    assert default_gguf_path() == f
    monkeypatch.setenv("ADADECODE_DEFAULT_GGUF", str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="ADADECODE_DEFAULT_GGUF"):
        default_gguf_path()
