"""Read a llama, qwen2 or qwen3 GGUF file (via the `gguf` package): config, weights dequantised to bf16, and the tokenizer.

llama.cpp's converter stores a llama GGUF's Q and K projections with their rows permuted for its interleaved
RoPE; they are permuted back to the HF (rotate-half) layout here, so every engine sees HF-layout weights.
qwen2/qwen3 GGUFs are not permuted (llama.cpp runs them with NeoX-style RoPE, HF's layout). Mistral converts to
the llama architecture; a `llama.attention.sliding_window` there makes it a Mistral with that window.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, LlamaConfig
from .weights import LAYER_HF_NAMES, check_finite, layer_shapes

GGUF_LAYER_NAMES = {  # our short name -> GGUF name inside "blk.{layer}."
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight", "wv": "attn_v.weight",
    "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight", "w_gate": "ffn_gate.weight",
    "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    "bq": "attn_q.bias", "bk": "attn_k.bias", "bv": "attn_v.bias",
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
}
# general.architecture -> our model_type (a llama GGUF with a sliding window: "mistral", below)
GGUF_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _reader(path: Path):
    import gguf

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on damaged files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def _field(reader, key: str, path: Path, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise ConfigError(f"{path}: GGUF metadata lacks '{key}'")
    return _contents(f, key, path)


def _contents(f, key: str, path: Path):
    try:
        return f.contents()
    except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:  # a damaged string or array
        raise ConfigError(f"{path}: GGUF field '{key}' is unreadable ({type(e).__name__}: {e})") from None


def _number(reader, key: str, path: Path, default=None, kind=int):
    """A numeric GGUF field, type- and range-checked here so the error names the GGUF key, not the HF field it
    becomes (a 0 head count would otherwise be a ZeroDivisionError computing head_dim)."""
    v = _field(reader, key, path, default)
    ok = (isinstance(v, (int, np.integer)) and not isinstance(v, bool)) if kind is int else \
        (isinstance(v, (int, float, np.number)) and not isinstance(v, bool) and np.isfinite(v))
    if not ok or (kind is int and v < 1 and default != -1) or (kind is float and not v > 0):
        raise ConfigError(f"{path}: GGUF field '{key}' is {v!r}; expected a positive "
                          f"{'integer' if kind is int else 'finite number'}")
    return kind(v)


def gguf_config(reader, path: Path) -> LlamaConfig:
    arch = _field(reader, "general.architecture", path)
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"{path}: GGUF field 'general.architecture' is {arch!r}; supported: "
                          f"{', '.join(map(repr, GGUF_ARCHS))}")
    key = lambda k: f"{arch}.{k}"  # noqa: E731  the keys are named after the architecture
    if reader.fields.get(key("expert_count")) is not None and _field(reader, key("expert_count"), path):
        raise ConfigError(f"{path}: GGUF field '{key('expert_count')}' is set; mixture-of-experts models are not supported")
    if reader.fields.get(key("attention.sliding_window_pattern")) is not None:
        raise ConfigError(f"{path}: GGUF field '{key('attention.sliding_window_pattern')}' is set; a sliding window on "
                          "some layers only is not supported")
    names = {t.name for t in reader.tensors}
    n_layers = _number(reader, key("block_count"), path)
    d = _number(reader, key("embedding_length"), path)
    n_heads = _number(reader, key("attention.head_count"), path)

    def optional(k: str) -> int | None:
        return _number(reader, key(k), path) if reader.fields.get(key(k)) is not None else None

    # head_dim: key_length where the converter wrote it (any HF config with head_dim: Qwen3's is not d / n_heads),
    # else the RoPE dimension (older llama converters), else d / n_heads
    head_dim = optional("attention.key_length") or optional("rope.dimension_count") or max(1, d // n_heads)
    for k in ("attention.value_length", "rope.dimension_count"):
        v = optional(k)
        if v is not None and v != head_dim:
            raise ConfigError(f"{path}: GGUF field '{key(k)}' is {v}, head_dim is {head_dim}; only V heads of "
                              "head_dim and RoPE over the whole head are supported")
    window = optional("attention.sliding_window")
    model_type = "mistral" if arch == "llama" and window else GGUF_ARCHS[arch]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None:
        raise ConfigError(f"{path}: GGUF metadata lacks 'tokenizer.ggml.tokens'")
    vocab = _number(reader, key("vocab_size"), path, default=len(tokens.data))
    hf = {
        "model_type": model_type, "vocab_size": vocab, "hidden_size": d, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": _number(reader, key("attention.head_count_kv"), path, default=n_heads),
        "head_dim": head_dim,
        "intermediate_size": _number(reader, key("feed_forward_length"), path),
        "rms_norm_eps": _number(reader, key("attention.layer_norm_rms_epsilon"), path, kind=float),
        "rope_theta": _number(reader, key("rope.freq_base"), path, default=10000.0, kind=float),
        "max_position_embeddings": _number(reader, key("context_length"), path),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": _number(reader, "tokenizer.ggml.bos_token_id", path, default=-1),
        "eos_token_id": _number(reader, "tokenizer.ggml.eos_token_id", path, default=-1),
    }
    if window:  # on every layer (a pattern is refused above)
        hf |= {"sliding_window": window, "use_sliding_window": True, "max_window_layers": 0}
    # the bias tensors the family has (qwen2: q, k and v); any other is a forward pass no engine runs
    allowed = {f"blk.{i}.{GGUF_LAYER_NAMES[b]}" for i in range(n_layers) for b in ("bq", "bk", "bv")} \
        if model_type == "qwen2" else set()
    extra = sorted(n for n in names if n.endswith(".bias") and n not in allowed)
    if extra:
        raise ConfigError(f"{path}: GGUF holds bias tensor '{extra[0]}' ({len(extra)} in all); "
                          f"{'only q/k/v biases (qwen2) are' if model_type == 'qwen2' else 'biases are not'} supported")
    for k in ("bos_token_id", "eos_token_id"):
        if hf[k] < 0:
            hf[k] = None
    if "rope_freqs.weight" in names:
        raise ConfigError(f"{path}: GGUF carries 'rope_freqs.weight' (Llama-3 rope scaling); load the HF checkpoint instead")
    return LlamaConfig.from_hf(hf, source=f"{path} (GGUF metadata)")


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head row interleave of Q/K, back to HF's rotate-half layout."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def load_gguf(path: str | Path, dtype: torch.dtype = torch.bfloat16):
    """-> (LlamaConfig, HF-named state dict in `dtype`, metadata dict for the tokenizer)."""
    import gguf

    path = Path(path)
    reader = _reader(path)
    cfg = gguf_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{path}: GGUF lacks tensor '{name}'")
        try:
            with np.errstate(all="ignore"):  # non-finite results are refused below, by name
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
            arr = np.asarray(arr, dtype=np.float32).reshape(tuple(int(x) for x in reversed(t.shape)))
        except (NotImplementedError, ValueError, TypeError, IndexError) as e:  # a tensor type or size it cannot hold
            raise ValueError(f"{path}: tensor '{name}' of type {getattr(t.tensor_type, 'name', t.tensor_type)} is "
                             f"unreadable ({type(e).__name__}: {e})") from None
        if arr.shape != shape:
            raise ValueError(f"{path}: tensor '{name}' has shape {arr.shape}, config wants {shape}")
        used.add(name)
        w = torch.from_numpy(arr.copy())
        check_finite(name, w.to(dtype), path)  # an inf block scale dequantises to a row of infs or NaNs
        return w

    shapes = layer_shapes(cfg)
    permuted = _field(reader, "general.architecture", path) == "llama"  # see the module docstring
    state = {"model.embed_tokens.weight": get("token_embd.weight", (cfg.vocab_size, cfg.d)).to(dtype),
             "model.norm.weight": get("output_norm.weight", (cfg.d,)).to(dtype)}
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = get("output.weight", (cfg.vocab_size, cfg.d)).to(dtype)
    for i in range(cfg.n_layers):
        for short in shapes:
            w = get(f"blk.{i}.{GGUF_LAYER_NAMES[short]}", shapes[short])
            if permuted and short == "wq":
                w = _unpermute(w, cfg.n_heads)
            elif permuted and short == "wk":
                w = _unpermute(w, cfg.n_kv_heads)
            state[f"model.layers.{i}.{LAYER_HF_NAMES[short]}"] = w.to(dtype)

    leftover = sorted(set(tensors) - used)
    if leftover:  # a header that disagrees with its tensors (a block count one short) would otherwise load silently
        raise ValueError(f"{path}: the GGUF holds {len(leftover)} tensors its metadata does not use "
                         f"({', '.join(leftover[:3])}{', ...' if len(leftover) > 3 else ''})")
    meta = {k: _contents(reader.fields[k], k, path) for k in (
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
        "tokenizer.ggml.add_bos_token") if k in reader.fields}
    return cfg, state, meta


def gguf_tokenizer_files(meta: dict, path: Path) -> tuple[str, dict]:
    """Build HF `tokenizer.json` text and a `tokenizer_config.json` dict from GGUF tokenizer metadata.

    Supports the byte-level BPE ('gpt2') tokenizers of Llama-3 / SmolLM-style models.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConfigError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ConfigError(f"{path}: GGUF metadata lacks 'tokenizer.ggml.tokens'")
    merges = meta.get("tokenizer.ggml.merges", [])
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens) or \
            not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        raise ConfigError(f"{path}: GGUF fields 'tokenizer.ggml.tokens' / 'tokenizer.ggml.merges' are not lists of "
                          "strings (merges: two tokens separated by a space)")
    try:
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                   merges=[tuple(m.split(" ", 1)) for m in merges], fuse_unk=False, byte_fallback=False))
    except Exception as e:  # noqa: BLE001 (the tokenizers package raises plain Exception for bad merges)
        raise ConfigError(f"{path}: GGUF tokenizer metadata does not make a BPE tokenizer ({e})") from None
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # digits one at a time, then GPT-2's split (llama.cpp's 'smollm' pre-tokenizer)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3"):
        split = Regex(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(split, behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif pre in ("default", "gpt2"):
        tok.pre_tokenizer = byte_level
    else:
        raise ConfigError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (smollm, llama-bpe, gpt2)")
    tok.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [1] * len(tokens))
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
    tok.add_special_tokens(special)

    def name(key):
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tok_cfg = {"bos_token": name("tokenizer.ggml.bos_token_id"), "eos_token": name("tokenizer.ggml.eos_token_id"),
               "unk_token": name("tokenizer.ggml.unknown_token_id"), "pad_token": name("tokenizer.ggml.padding_token_id"),
               "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               "chat_template": meta.get("tokenizer.chat_template")}
    return tok.to_str(), tok_cfg
