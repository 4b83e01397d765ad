"""Read a llama, qwen2 or qwen3 GGUF file (via the `gguf` package): config, weights dequantised to bf16, and the tokenizer.

llama.cpp's converter stores a llama GGUF's Q and K projections with their rows permuted for its interleaved
RoPE; they are permuted back to the HF (rotate-half) layout here, so every engine sees HF-layout weights.
qwen2/qwen3 GGUFs are not permuted (llama.cpp runs them with NeoX-style RoPE, HF's layout). Mistral converts to
the llama architecture; a `llama.attention.sliding_window` there makes it a Mistral with that window.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, LlamaConfig
from .filesys import check_file
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


_SCALARS = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32, 7: np.bool_,
            10: np.uint64, 11: np.int64, 12: np.float64}  # GGUF value type -> its numpy type (little-endian)
_STRING, _ARRAY = 8, 9
GGUF_VERSIONS = (2, 3)  # what the gguf package reads too (version 1's counts were 32-bit)
GGML_MAX_DIMS = 4
# far beyond any real file (Llama-3's merges: 280147 strings; a model's tensors: a few thousand), and each entry costs
# a Python object, so a crafted file of millions of tiny entries costs seconds and gigabytes before a check fails
MAX_METADATA = 2**16
MAX_TENSORS = 2**16
MAX_ARRAY = 2**24


class GGUFField:
    """One metadata value, decoded when asked for: an array nobody reads costs its bounds check alone."""

    def __init__(self, file: "GGUFFile", key: str, vtype: int, offset: int, count: int | None = None,
                 itype: int | None = None):
        self.file, self.key, self.vtype, self.offset, self.count, self.itype = file, key, vtype, offset, count, itype

    def _string(self, offset: int, n: int, where: str) -> str:
        try:
            return bytes(self.file.buf[offset:offset + n]).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{self.file.path}: GGUF field {where} is not UTF-8 text ({e})") from None

    def contents(self):
        buf, key = self.file.buf, self.key
        if self.vtype in _SCALARS:
            return np.frombuffer(buf, _SCALARS[self.vtype], 1, self.offset)[0].item()
        if self.vtype == _STRING:
            return self._string(self.offset, self.count, f"'{key}'")
        if self.itype in _SCALARS:
            return np.frombuffer(buf, _SCALARS[self.itype], self.count, self.offset).tolist()
        out, pos = [], self.offset
        for i in range(self.count):  # lengths checked when the file was opened
            n = int.from_bytes(buf[pos:pos + 8], "little")
            out.append(self._string(pos + 8, n, f"'{key}'[{i}]"))
            pos += 8 + n
        return out


class GGUFTensor:
    def __init__(self, file: "GGUFFile", name: str, dims: list[int], tensor_type, offset: int):
        self.file, self.name, self.dims, self.tensor_type, self.offset = file, name, dims, tensor_type, offset

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy's order (GGML lists the innermost dimension first)."""
        return tuple(reversed(self.dims))

    def data(self) -> np.ndarray:
        """The raw data as gguf.quants.dequantize takes it: elements for float and integer types, bytes (the last
        dimension in bytes) for quantised ones. A view of the file, nothing copied."""
        import gguf

        T = gguf.GGMLQuantizationType
        items = {T.F32: np.float32, T.F16: np.float16, T.F64: np.float64, T.I8: np.int8, T.I16: np.int16,
                 T.I32: np.int32, T.I64: np.int64}
        if self.tensor_type in items:
            shape, dtype = self.shape, items[self.tensor_type]
        else:
            shape, dtype = gguf.quants.quant_shape_to_byte_shape(self.shape, self.tensor_type), np.uint8
        return np.frombuffer(self.file.buf, dtype, math.prod(shape), self.offset).reshape(shape)


class GGUFFile:
    """A GGUF file's metadata and tensor infos, read with every count and length checked against the bytes that
    remain before anything is allocated or read, and each error a ValueError naming the key or tensor and the file.

    The gguf package's reader trusts them: one array of 2**40 uint8 in a file of a few hundred bytes made it loop
    and grow without bound (6.2 GB after 75 s, issue 35), and a real array costs it ~800 bytes and ~10 us per
    element. Here a value is decoded only when read (GGUFField.contents) and tensor data is a view of the mapped
    file. Little-endian files only (llama.cpp writes big-endian ones only when asked to, for s390x)."""

    def __init__(self, path: Path):
        import mmap

        import gguf

        self.path = path
        check_file(path, "GGUF file")
        with open(path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            if self.size < 24:
                raise ValueError(f"{path}: {self.size} bytes, too short for a GGUF file (its header alone is 24)")
            self.buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.pos = 0
        if bytes(self.buf[:4]) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (it begins {bytes(self.buf[:4])!r}, not b'GGUF')")
        self.pos = 4
        version = self._int(4, "the version")
        if version not in GGUF_VERSIONS:
            endian = " (a big-endian file: not supported)" if version & 0xFFFF == 0 and version else ""
            raise ValueError(f"{path}: GGUF version {version}{endian}; this reader takes versions "
                             f"{', '.join(map(str, GGUF_VERSIONS))}")
        n_tensors, n_kv = self._int(8, "the tensor count"), self._int(8, "the metadata count")
        self._need(13 * n_kv + 24 * n_tensors, f"the header's {n_kv} metadata entries (13 bytes each at least) and "
                                               f"{n_tensors} tensor infos (24 bytes each at least)")
        for n, what, most in ((n_kv, "metadata entries", MAX_METADATA), (n_tensors, "tensors", MAX_TENSORS)):
            if n > most:
                raise ValueError(f"{path}: the GGUF header counts {n} {what}; at most {most} are read")
        self.fields: dict[str, GGUFField] = {}
        for i in range(n_kv):
            where = f"metadata entry {i} of {n_kv}" + (f" (after '{next(reversed(self.fields))}')" if self.fields else "")
            key = self._text(f"the key of {where}")
            if key in self.fields:
                raise ValueError(f"{path}: GGUF metadata key '{key}' appears twice")
            self.fields[key] = self._value(key, self._int(4, f"the value type of '{key}'"))
        self.tensors: list[GGUFTensor] = []
        infos = []
        for i in range(n_tensors):
            name = self._text(f"the name of tensor info {i} of {n_tensors}")
            n_dims = self._int(4, f"the dimension count of tensor '{name}'")
            if n_dims > GGML_MAX_DIMS:
                raise ValueError(f"{path}: tensor '{name}' has {n_dims} dimensions; GGUF allows at most {GGML_MAX_DIMS}")
            dims = [self._int(8, f"dimension {d} of tensor '{name}'") for d in range(n_dims)]
            raw_type = self._int(4, f"the type of tensor '{name}'")
            try:
                ttype = gguf.GGMLQuantizationType(raw_type)
            except ValueError:
                raise ValueError(f"{path}: tensor '{name}' has type {raw_type}, which GGML does not define") from None
            infos.append((name, dims, ttype, self._int(8, f"the data offset of tensor '{name}'")))
        align = self.fields.get("general.alignment")
        alignment = 32
        if align is not None:
            alignment = align.contents() if align.vtype == 4 else 0
            if alignment < 1 or alignment & (alignment - 1):
                raise ValueError(f"{path}: GGUF field 'general.alignment' must be a uint32 power of two")
        start = -(-self.pos // alignment) * alignment
        seen = set()
        for name, dims, ttype, offset in infos:
            if name in seen:
                raise ValueError(f"{path}: GGUF holds tensor '{name}' twice")
            seen.add(name)
            block, type_size = gguf.GGML_QUANT_SIZES[ttype]
            if dims and dims[0] % block:
                raise ValueError(f"{path}: tensor '{name}' of type {ttype.name} has rows of {dims[0]} values, not a "
                                 f"multiple of its block of {block}")
            n_bytes = math.prod(dims) // block * type_size
            if start + offset + n_bytes > self.size:
                raise ValueError(f"{path}: tensor '{name}' ({n_bytes} bytes at data offset {offset}) runs past the end "
                                 f"of the file ({self.size} bytes, data from byte {start})")
            self.tensors.append(GGUFTensor(self, name, dims, ttype, start + offset))

    def _need(self, n: int, what: str) -> None:
        left = self.size - self.pos
        if n > left:
            raise ValueError(f"{self.path}: {what} needs {n} bytes, but only {left} remain in the file (at byte "
                             f"{self.pos} of {self.size})")

    def _int(self, width: int, what: str) -> int:
        self._need(width, what)
        v = int.from_bytes(self.buf[self.pos:self.pos + width], "little")
        self.pos += width
        return v

    def _text(self, what: str) -> str:
        n = self._int(8, f"the length of {what}")
        self._need(n, f"{what}, a string of {n} bytes,")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{self.path}: {what} is not UTF-8 text ({raw[:40]!r})") from None

    def _value(self, key: str, vtype: int) -> GGUFField:
        if vtype in _SCALARS:
            dtype = np.dtype(_SCALARS[vtype])
            self._need(dtype.itemsize, f"GGUF field '{key}' (a {dtype.name})")
            self.pos += dtype.itemsize
            return GGUFField(self, key, vtype, self.pos - dtype.itemsize)
        if vtype == _STRING:
            n = self._int(8, f"the length of GGUF field '{key}'")
            self._need(n, f"GGUF field '{key}', a string of {n} bytes,")
            self.pos += n
            return GGUFField(self, key, vtype, self.pos - n, count=n)
        if vtype != _ARRAY:
            raise ValueError(f"{self.path}: GGUF field '{key}' has value type {vtype}, which GGUF does not define")
        itype = self._int(4, f"the item type of GGUF field '{key}'")
        count = self._int(8, f"the length of GGUF field '{key}'")
        offset = self.pos
        if itype in _SCALARS:
            dtype = np.dtype(_SCALARS[itype])
            self._need(count * dtype.itemsize, f"GGUF field '{key}', an array of {count} {dtype.name},")
        elif itype == _STRING:
            self._need(8 * count, f"GGUF field '{key}', an array of {count} strings (8 bytes each at least),")
        if count > MAX_ARRAY:
            raise ValueError(f"{self.path}: GGUF field '{key}' is an array of {count} values; at most {MAX_ARRAY} are read")
        if itype in _SCALARS:
            self.pos += count * np.dtype(_SCALARS[itype]).itemsize
        elif itype == _STRING:
            for i in range(count):
                n = self._int(8, f"the length of GGUF field '{key}'[{i}]")
                self._need(n, f"GGUF field '{key}'[{i}], a string of {n} bytes,")
                self.pos += n
        elif itype == _ARRAY:
            raise ValueError(f"{self.path}: GGUF field '{key}' is an array of arrays, which GGUF readers do not take")
        else:
            raise ValueError(f"{self.path}: GGUF field '{key}' is an array of value type {itype}, which GGUF does not "
                             "define")
        return GGUFField(self, key, _ARRAY, offset, count=count, itype=itype)


def _field(reader, key: str, path: Path, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is not None:
            return default
        raise ConfigError(f"{path}: GGUF metadata lacks '{key}'")
    return _contents(f, key, path)


def _contents(f: GGUFField, key: str, path: Path):
    return f.contents()  # its bounds were checked when the file was opened; a string that is not UTF-8: ConfigError


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
    if tokens.itype != _STRING or not tokens.count:
        raise ConfigError(f"{path}: GGUF field 'tokenizer.ggml.tokens' is not a non-empty array of strings")
    vocab = _number(reader, key("vocab_size"), path, default=tokens.count)
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
    reader = GGUFFile(path)
    cfg = gguf_config(reader, path)
    tensors = {t.name: t for t in reader.tensors}
    used: set[str] = set()

    def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        t = tensors.get(name)
        if t is None:
            raise ValueError(f"{path}: GGUF lacks tensor '{name}'")
        if t.shape != shape:  # before dequantising: the file's dims are not the config's to trust
            raise ValueError(f"{path}: tensor '{name}' has shape {t.shape}, config wants {shape}")
        try:
            with np.errstate(all="ignore"):  # non-finite results are refused below, by name
                arr = gguf.quants.dequantize(t.data(), t.tensor_type)
            arr = np.asarray(arr, dtype=np.float32).reshape(shape)
        except (NotImplementedError, ValueError, TypeError, IndexError) as e:  # a tensor type or size it cannot hold
            raise ValueError(f"{path}: tensor '{name}' of type {t.tensor_type.name} is unreadable "
                             f"({type(e).__name__}: {e})") from None
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
