"""Issue 25's findings: each bad input is a ValueError naming the file, the field and the value, raised at load or
before the request waits for the engine; the CLI prints `error: ...` and exits 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import adadecode
from adadecode.model.config import ConfigError, LlamaConfig
from adadecode.model.loader import load_model, write_hf_dir
from conftest import tiny_chat_model, tiny_hf_config

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny chat model saved as an HF directory (config, safetensors, tokenizer files)."""
    path = tmp_path_factory.mktemp("ckpt")
    write_hf_dir(tiny_chat_model(seed=1), path)
    return path


def copy_of(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "m"
    out.mkdir()
    for f in ckpt.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def edit_json(path: Path, **over):
    cfg = json.loads(path.read_text())
    cfg.update(over)
    path.write_text(json.dumps(cfg))


# ---- finding 4 and 5: config types and ranges, each error naming file, field and value ----------------------------
@pytest.mark.parametrize("field,value", [
    ("num_key_value_heads", "3"), ("num_key_value_heads", 3.0), ("head_dim", "64"), ("head_dim", 8.0),
    ("eos_token_id", "x"), ("eos_token_id", ["a"]), ("bos_token_id", 1.5), ("rms_norm_eps", "abc"),
    ("rms_norm_eps", -1), ("rms_norm_eps", float("nan")), ("rms_norm_eps", 0), ("rope_theta", float("inf")),
    ("max_position_embeddings", "abc"), ("max_position_embeddings", 0), ("max_position_embeddings", -5),
    ("tie_word_embeddings", "false"), ("vocab_size", True), ("num_hidden_layers", 4.0), ("layer_types", 5),
    ("rope_scaling", "llama3"), ("num_attention_heads", None),
])
def test_config_field_types_and_ranges(field, value):
    with pytest.raises(ConfigError) as e:
        LlamaConfig.from_hf(tiny_hf_config(**{field: value}), source="ckpt/config.json")
    msg = str(e.value)
    assert "ckpt/config.json" in msg and field in msg and repr(value) in msg, msg


def test_a_config_that_is_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"config.json: is a JSON list"):
        load_model(tmp_path)


def test_null_fields_take_the_default():
    cfg = LlamaConfig.from_hf(tiny_hf_config(max_position_embeddings=None, rms_norm_eps=None, head_dim=None,
                                             tie_word_embeddings=None))
    assert (cfg.max_position, cfg.rms_norm_eps, cfg.head_dim, cfg.tie_word_embeddings) == (2048, 1e-6, 8, False)


@pytest.mark.parametrize("file,text,words", [
    ("generation_config.json", '{"eos_token_id": ["a"]}', "generation_config.json: field 'eos_token_id' is ['a']"),
    ("generation_config.json", "{oops", "generation_config.json: not valid JSON"),
    ("generation_config.json", "[2]", "generation_config.json: is a JSON list"),
    ("tokenizer_config.json", "[1]", "tokenizer_config.json: is a JSON list"),
    ("tokenizer_config.json", "{oops", "tokenizer_config.json: not valid JSON"),
    ("tokenizer_config.json", '{"eos_token": 5}', "tokenizer_config.json: 'eos_token' is 5"),
    ("tokenizer_config.json", '{"eos_token": "<nope>"}', "tokenizer_config.json: 'eos_token' is '<nope>'"),
    ("tokenizer_config.json", '{"add_bos_token": "yes"}', "tokenizer_config.json: 'add_bos_token' is 'yes'"),
    ("tokenizer_config.json", '{"chat_template": 7}', "tokenizer_config.json: 'chat_template' is 7"),
    ("tokenizer_config.json", '{"chat_template": [1]}', "tokenizer_config.json: 'chat_template' is a list"),
])
def test_generation_and_tokenizer_configs(ckpt, tmp_path, file, text, words):
    m = copy_of(ckpt, tmp_path)
    (m / file).write_text(text)
    with pytest.raises(ValueError) as e:
        load_model(m)
    assert words in str(e.value) and str(m) in str(e.value), str(e.value)


# ---- finding 3: non-finite weights refused at load, naming the tensor ------------------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_is_refused_at_load(ckpt, tmp_path, value):
    m = copy_of(ckpt, tmp_path)
    state = load_file(m / "model.safetensors")
    state["model.layers.2.input_layernorm.weight"][5] = value
    save_file(state, str(m / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.2.input_layernorm.weight' holds 1 non-finite"):
        load_model(m)


def test_fp32_weight_beyond_bf16_range_is_refused(ckpt, tmp_path):
    m = copy_of(ckpt, tmp_path)
    state = {k: v.float() for k, v in load_file(m / "model.safetensors").items()}
    state["model.norm.weight"][0] = 3.4e38  # finite in fp32, inf in bf16
    save_file(state, str(m / "model.safetensors"))
    with pytest.raises(ValueError, match="'model.norm.weight' holds 1 non-finite"):
        load_model(m)


# ---- finding 6: every tensor used exactly once, strict booleans ------------------------------------------------------
def test_a_config_one_layer_short_is_refused(ckpt, tmp_path):
    m = copy_of(ckpt, tmp_path)
    edit_json(m / "config.json", num_hidden_layers=3)
    with pytest.raises(ValueError, match=r"9 tensors config.json does not use \(model.layers.3.input_layernorm"):
        load_model(m)


def test_an_untied_checkpoint_read_as_tied_is_refused(ckpt, tmp_path):
    m = copy_of(ckpt, tmp_path)
    edit_json(m / "config.json", tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"1 tensors config.json does not use \(lm_head.weight\)"):
        load_model(m)
    edit_json(m / "config.json", tie_word_embeddings="false")
    with pytest.raises(ConfigError, match="'tie_word_embeddings' is 'false'"):
        load_model(m)


# ---- finding 7: shard names stay inside the checkpoint folder --------------------------------------------------------
@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x.safetensors", 5, ""])
def test_shard_names_stay_inside_the_folder(ckpt, tmp_path, name):
    m = copy_of(ckpt, tmp_path)
    state = load_file(m / "model.safetensors")
    weight_map = {k: "model.safetensors" for k in state}
    weight_map["model.norm.weight"] = name
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=r"model.safetensors.index.json: 'weight_map' names shard"):
        load_model(m)


def test_a_link_out_of_the_folder_is_refused(ckpt, tmp_path):
    m = copy_of(ckpt, tmp_path)
    (tmp_path / "elsewhere.safetensors").write_bytes((m / "model.safetensors").read_bytes())
    (m / "shard.safetensors").symlink_to(tmp_path / "elsewhere.safetensors")
    state = load_file(m / "model.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "shard.safetensors" for k in state}}))
    with pytest.raises(ValueError, match="outside the checkpoint folder"):
        load_model(m)


def test_a_shard_tensor_the_index_does_not_name_is_refused(ckpt, tmp_path):
    m = copy_of(ckpt, tmp_path)
    state = load_file(m / "model.safetensors")
    save_file({**state, "extra.weight": torch.zeros(2)}, str(m / "model.safetensors"))
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in state}}))
    with pytest.raises(ValueError, match=r"1 tensors config.json does not use \(extra.weight\)"):
        load_model(m)


# ---- GGUF: damaged metadata and non-finite tensors ---------------------------------------------------------------
def set_gguf_field(path: Path, key: str, value) -> None:
    """Overwrite a numeric metadata value in place (as gguf's gguf_set_metadata.py does)."""
    import gguf

    reader = gguf.GGUFReader(str(path), "r+")
    reader.fields[key].parts[-1][0] = value
    reader.data.flush()


@pytest.mark.parametrize("key,value", [("llama.attention.head_count", 0), ("llama.block_count", 0),
                                       ("llama.attention.layer_norm_rms_epsilon", float("nan")),
                                       ("llama.attention.layer_norm_rms_epsilon", -1.0),
                                       ("llama.rope.freq_base", float("inf"))])
def test_gguf_metadata_values_are_checked(tiny_gguf, tmp_path, key, value):
    f = tmp_path / "x.gguf"
    f.write_bytes(tiny_gguf.read_bytes())
    set_gguf_field(f, key, value)
    with pytest.raises(ConfigError, match=rf"x.gguf: GGUF field '{key}' is"):
        load_model(f)


def test_gguf_block_count_one_short_leaves_tensors_over(tiny_gguf, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(tiny_gguf.read_bytes())
    set_gguf_field(f, "llama.block_count", 3)
    with pytest.raises(ValueError, match=r"x.gguf: the GGUF holds 9 tensors its metadata does not use \(blk.3."):
        load_model(f)


def test_gguf_non_finite_tensor_is_refused_at_load(tiny_gguf, tmp_path):
    import gguf
    import numpy as np

    f = tmp_path / "x.gguf"
    f.write_bytes(tiny_gguf.read_bytes())
    reader = gguf.GGUFReader(str(f), "r+")
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_up.weight")
    t.data.reshape(-1)[7] = np.inf  # F32 here; a quantised tensor's inf block scale dequantises to infs the same way
    reader.data.flush()
    with pytest.raises(ValueError, match=r"x.gguf: tensor 'blk.1.ffn_up.weight' holds 1 non-finite"):
        load_model(f)


def test_gguf_inf_block_scale_is_refused(tiny_gguf, tmp_path):
    """A Q8_0 tensor whose first block's fp16 scale is inf (bytes 0x7c00)."""
    import gguf
    import numpy as np

    from test_loading import write_tiny_gguf

    from conftest import random_weights

    cfg = LlamaConfig.from_hf(tiny_hf_config(intermediate_size=64))  # Q8_0 needs rows of whole 32-blocks
    weights = random_weights(cfg)
    f = tmp_path / "q.gguf"
    add = gguf.GGUFWriter.add_tensor

    def add_q8(self, name, arr, *a, **k):
        if name == "blk.0.ffn_down.weight":
            q = gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0)
            q[0, :2] = np.frombuffer(np.float16(np.inf).tobytes(), np.uint8)
            return add(self, name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        return add(self, name, arr, *a, **k)

    gguf.GGUFWriter.add_tensor = add_q8
    try:
        write_tiny_gguf(f, cfg, weights)
    finally:
        gguf.GGUFWriter.add_tensor = add
    with pytest.raises(ValueError, match=r"q.gguf: tensor 'blk.0.ffn_down.weight' holds \d+ non-finite"):
        load_model(f)


# ---- head files -----------------------------------------------------------------------------------------------------
def test_head_file_layers_must_be_integers(tmp_path):
    from adadecode.engines.head import Head
    from adadecode.heads.files import HeadFileError, load_heads, save_heads

    model = tiny_chat_model(seed=0)
    path = tmp_path / "h.safetensors"
    save_heads(path, [Head.identity(1, model.cfg.d), Head.identity(2, model.cfg.d)], model,
               {"gamma": 0.5, "description": "t"})
    tensors, md = load_file(path), __import__("safetensors").safe_open(str(path), "pt").metadata()
    for layers, words in (([1.7, 2.7], r"'layers' is '\[1.7, 2.7\]'"), ([2, 1], "ascending"), ([1], "not among")):
        save_file(tensors, str(path), metadata={**md, "layers": json.dumps(layers)})
        with pytest.raises(HeadFileError, match=words):
            load_heads(path, model)
    save_file(tensors, str(path), metadata={**md, "gamma": "NaN"})
    with pytest.raises(HeadFileError, match="'gamma' is nan"):
        load_heads(path, model)


# ---- finding 1 and the minor ones: prompts and messages ----------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    return adadecode.LLM(tiny_chat_model(seed=0), engine="torch", device="cpu", dtype="fp32")


@pytest.mark.parametrize("call", [
    lambda llm: llm.generate("\ud800", max_new_tokens=2),
    lambda llm: llm.generate("ab\udcff\udcfecd", chat=True, max_new_tokens=2),
    lambda llm: llm.generate(messages=[{"role": "user", "content": "x\udfff"}], max_new_tokens=2),
    lambda llm: llm.stream("\ud800", max_new_tokens=2),
    lambda llm: llm.generate(messages=[{"role": "user\ud800", "content": "x"}], max_new_tokens=2),
])
def test_lone_surrogates_are_value_errors(llm, call):
    with pytest.raises(ValueError, match=r"is not valid Unicode text: '\\ud[89a-f].."):
        call(llm)


@pytest.mark.parametrize("messages,words", [
    ([], "messages must be a non-empty list"), ("hi", "messages must be a non-empty list"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string, got int"),
    ([{"content": "x"}], r"messages\[0\] must be an object with a string 'role'"), ([5], r"messages\[0\] must be"),
])
def test_bad_messages_are_value_errors(llm, messages, words):
    with pytest.raises(ValueError, match=words):
        llm.generate(messages=messages, max_new_tokens=2)


def test_cli_invalid_utf8_prompt_is_an_error_not_a_traceback(ckpt):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable.encode(), b"-m", b"adadecode", b"generate", b"--model", str(ckpt).encode(),
                        b"--engine", b"torch", b"--device", b"cpu", b"--max-new-tokens", b"2",
                        b"--prompt", b"ab\xff\xfecd"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: prompt is not valid Unicode text"), r.stderr
    assert "Traceback" not in r.stderr


def test_cli_non_finite_weights_are_an_error(ckpt, tmp_path):
    m = copy_of(ckpt, tmp_path)
    state = load_file(m / "model.safetensors")
    state["model.norm.weight"][0] = float("nan")
    save_file(state, str(m / "model.safetensors"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "adadecode", "generate", "--model", str(m), "--engine", "torch",
                        "--prompt", "hi", "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "error: " in r.stderr and "'model.norm.weight' holds 1 non-finite" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_a_tensor_in_two_shards_is_refused(ckpt, tmp_path):
    m = copy_of(ckpt, tmp_path)
    state = load_file(m / "model.safetensors")
    names = sorted(state)
    save_file({k: state[k] for k in names[:5]}, str(m / "a.safetensors"))
    save_file({k: state[k] for k in names[4:]}, str(m / "b.safetensors"))  # names[4] in both
    (m / "model.safetensors").unlink()
    weight_map = {k: "a.safetensors" if i < 5 else "b.safetensors" for i, k in enumerate(names)}
    (m / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=rf"1 tensors config.json does not use \({names[4]}\)"):
        load_model(m)


def test_default_checkpoint_with_a_layer_short_config_is_refused(default_model, tmp_path):
    """The finding as reported: num_hidden_layers 29 on the 30-layer default checkpoint loaded and generated other
    tokens."""
    from adadecode.model.loader import default_model_dir

    src = default_model_dir()
    for f in src.iterdir():
        (tmp_path / f.name).symlink_to(f)
    (tmp_path / "config.json").unlink()
    cfg = json.loads((src / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 29}))
    with pytest.raises(ValueError, match=r"9 tensors config.json does not use \(model.layers.29.input_layernorm"):
        load_model(tmp_path)


# ---- issue 35: counts and lengths in a GGUF checked against the bytes that remain ------------------------------------
def evil_gguf(path: Path, count: int = 2**40) -> Path:
    """The hostile run's file: a few hundred bytes, one metadata array of uint8 whose count is `count`."""
    import struct

    def string(s: str) -> bytes:
        return struct.pack("<Q", len(s)) + s.encode()

    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 2)
    raw += string("general.architecture") + struct.pack("<I", 8) + string("llama")
    raw += string("evil.bytes") + struct.pack("<IIQ", 9, 0, count) + bytes(200)
    path.write_bytes(raw)
    return path


def test_cli_refuses_a_gguf_array_longer_than_the_file_at_once(tmp_path):
    """Issue 35, as found: `generate --model FILE` on that file grew without bound (978 MB at 5 s, 6.2 GB at 75 s,
    never an error). Now: exit 2 naming the key, the file and the bytes that remain, within 60 s (the CLI's start
    included) and without the process passing 1.5 GB (polled; it is killed there, and the test fails)."""
    import time

    f = evil_gguf(tmp_path / "evil.gguf")
    assert f.stat().st_size < 400
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    p = subprocess.Popen([sys.executable, "-m", "adadecode", "generate", "--model", str(f), "--prompt", "hi",
                          "--engine", "torch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline, peak = time.monotonic() + 60, 0.0
    while p.poll() is None and time.monotonic() < deadline and peak < 1500:
        try:
            peak = max(peak, next(int(l.split()[1]) for l in open(f"/proc/{p.pid}/status") if l.startswith("VmRSS")) / 1024)
        except (OSError, StopIteration):
            pass
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    out, err = p.communicate()
    assert p.returncode == 2, (p.returncode, peak, err[-2000:])
    assert err.startswith(f"error: {f}: GGUF field 'evil.bytes', an array of 1099511627776 uint8, needs "
                          f"1099511627776 bytes, but only 200 remain in the file"), err
    assert peak < 1500


@pytest.mark.parametrize("label,width,value,words", [
    ("tensor count", 8, 2**40, r"the header's 16 metadata entries \(13 bytes each at least\) and 1099511627776 tensor "
                               r"infos \(24 bytes each at least\) needs \d+ bytes, but only \d+ remain"),
    ("metadata count", 8, 2**64 - 1, r"the header's 18446744073709551615 metadata entries .* needs \d+ bytes, but only "
                                     r"\d+ remain"),
    ("metadata entry 3 of", 8, 2**40, r"the key of metadata entry 3 of 16 \(after 'llama.context_length'\), a string "
                                      r"of 1099511627776 bytes, needs 1099511627776 bytes, but only \d+ remain"),
    ("'tokenizer.ggml.model'", 8, 2**63, r"GGUF field 'tokenizer.ggml.model', a string of 9223372036854775808 bytes, "
                                         r"needs 9223372036854775808 bytes, but only \d+ remain"),
    ("'tokenizer.ggml.tokens'", 8, 2**40, r"GGUF field 'tokenizer.ggml.tokens', an array of 1099511627776 strings "
                                          r"\(8 bytes each at least\), needs 8796093022208 bytes, but only \d+ remain"),
    ("'tokenizer.ggml.tokens'", 8, 2**24, r"GGUF field 'tokenizer.ggml.tokens', an array of 16777216 strings \(8 bytes "
                                          r"each at least\), needs 134217728 bytes, but only \d+ remain"),
    ("'tokenizer.ggml.tokens'[5]", 8, 2**40, r"GGUF field 'tokenizer.ggml.tokens'\[5\], a string of 1099511627776 "
                                             "bytes"),
    ("tensor 'blk.0.attn_q.weight'", 4, 2**31, "tensor 'blk.0.attn_q.weight' has 2147483648 dimensions"),
    ("tensor 'token_embd.weight'", 8, 2**40, r"tensor 'token_embd.weight' \(\d+ bytes at data offset \d+\) runs past "
                                             "the end"),
])
def test_gguf_counts_and_lengths_past_the_file_name_the_key(tiny_gguf, tmp_path, label, width, value, words):
    """Each count and length of a GGUF set far past the file's end: a ValueError naming the file and the key (or
    tensor), before anything of that size is allocated or read."""
    from conftest import PeakRSS, gguf_length_fields

    f = tmp_path / "x.gguf"
    f.write_bytes(tiny_gguf.read_bytes())
    offset = next(at for at, w, what, _ in gguf_length_fields(f) if what == label and w == width)
    raw = bytearray(f.read_bytes())
    raw[offset:offset + width] = value.to_bytes(width, "little")
    f.write_bytes(bytes(raw))
    with PeakRSS() as mem, pytest.raises(ValueError, match=rf"{f}: {words}"):
        load_model(f)
    assert mem.grown_mb is None or mem.grown_mb < 100, mem.grown_mb


def test_gguf_counts_that_fit_the_file_are_still_bounded(tiny_gguf, tmp_path):
    """Counts the file's bytes could hold but no real model has (a model's tensors: a few thousand; Llama-3's
    merges: 280147 strings) are refused before each entry costs a Python object: 65537 tensors in a file padded to
    hold their infos, an array of 2**24 + 1 uint8."""
    import struct

    f = tmp_path / "x.gguf"
    raw = bytearray(tiny_gguf.read_bytes()) + bytes(2 * 2**20)
    raw[8:16] = struct.pack("<Q", 65537)
    f.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=rf"{f}: the GGUF header counts 65537 tensors; at most 65536 are read"):
        load_model(f)
    g = evil_gguf(tmp_path / "big.gguf", count=2**24 + 1)
    with open(g, "ab") as out:
        out.write(bytes(2**24))
    with pytest.raises(ValueError, match=rf"{g}: GGUF field 'evil.bytes' is an array of 16777217 values; at most "
                                         "16777216 are read"):
        load_model(g)


# ---- issue 35: a model or heads path that is a directory, a FIFO or a device ---------------------------------------
@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_model_and_heads_paths_that_are_not_files_say_what_they_are(ckpt, tmp_path, kind):
    """They were reported as "no such file" (and a FIFO or /dev/zero must never be opened: the one blocks, the
    other never ends)."""
    from adadecode.heads.files import load_heads

    path = Path("/dev/zero") if kind == "device" else tmp_path / "x.gguf"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    what = {"directory": "a directory", "fifo": r"a FIFO \(named pipe\)", "device": "a character device"}[kind]
    as_model = "a directory without config.json" if kind == "directory" else f"is {what}, not a model"
    with pytest.raises((ValueError, FileNotFoundError), match=rf"{path}: {as_model}"):
        load_model(path)
    with pytest.raises(ValueError, match=rf"{path}: is {what}, not a head file"):
        load_heads(path, load_model(ckpt))
