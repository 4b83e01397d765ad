"""Head files (docs/design.md#heads): intermediate heads (adadecode.engines.head.Head) saved with the model they were trained
for, and the default model's shipped heads (`heads_path("default:code")`, ...).

A head file is safetensors. Tensors, for head i (in layer order):
  head.{i}.T       [d, d] float16     the trained matrix (rounded to fp16 once, at save time)
  head.{i}.vocab   [K] int32          restricted heads only: token ids, ascending
  head.{i}.w_rest  [d] float32        restricted heads only: the "rest of the vocabulary" logit weights
Metadata (safetensors stores strings; lists and dicts are JSON):
  format "adadecode-heads", format_version "1", model_fingerprint (Model.fingerprint), model (source),
  d, n_layers, vocab_size (the model's), layers (JSON list), head_vocab (K per head, 0 = full),
  gamma (recommended), description (training data), training (JSON: how they were trained, held-out numbers),
  optionally gammas (JSON list, one gamma per head, in layer order; preferred over gamma where present)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..engines.head import Head

FORMAT = "adadecode-heads"
FORMAT_VERSION = "1"
DATA_DIR = Path(__file__).parent / "shipped"
SHIPPED = {"general": "heads_default_general.safetensors", "code": "heads_default_code.safetensors"}
REQUIRED_META = ("format", "format_version", "model_fingerprint", "d", "layers", "gamma", "description")


class HeadFileError(ValueError):
    """A head file that cannot be used: unreadable, truncated, missing metadata, or made for another model."""


def save_heads(path, heads: list[Head], model, meta: dict) -> None:
    """Write `heads` (bound to `model`'s fingerprint) with `meta` (must hold 'gamma' and 'description';
    anything else JSON-serialisable is kept). Written to a temporary file and renamed into place."""
    from safetensors.torch import save_file

    from ..model.filesys import atomic_path

    for k in ("gamma", "description"):
        if k not in meta:
            raise ValueError(f"save_heads: meta lacks '{k}'")
    heads = sorted(heads, key=lambda h: h.layer)
    cfg = model.cfg
    tensors = {}
    for i, h in enumerate(heads):
        if not h.plain:
            raise ValueError(f"head at layer {h.layer}: adapter / previous-token parts are ablations; head files store T only")
        if tuple(h.T.shape) != (cfg.d, cfg.d):
            raise ValueError(f"head at layer {h.layer}: T has shape {tuple(h.T.shape)}, the model needs ({cfg.d}, {cfg.d})")
        tensors[f"head.{i}.T"] = h.T.detach().to("cpu", torch.float16).contiguous()
        if h.vocab is not None:
            tensors[f"head.{i}.vocab"] = h.vocab.detach().to("cpu", torch.int32).contiguous()
            tensors[f"head.{i}.w_rest"] = h.w_rest.detach().to("cpu", torch.float32).contiguous()
    md = {"format": FORMAT, "format_version": FORMAT_VERSION, "model_fingerprint": model.fingerprint,
          "model": str(getattr(model, "source", "")), "d": str(cfg.d), "n_layers": str(cfg.n_layers),
          "vocab_size": str(cfg.vocab_size), "layers": json.dumps([h.layer for h in heads]),
          "head_vocab": json.dumps([0 if h.vocab is None else int(h.vocab.numel()) for h in heads])}
    for k, v in meta.items():
        if k in md:
            continue
        md[k] = v if isinstance(v, str) else json.dumps(v)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=md)


def heads_path(spec) -> Path:
    """'default' (= 'default:general'), 'default:code', 'default:general', or a file path."""
    s = str(spec)
    if s == "default" or s.startswith("default:"):
        kind = s.partition(":")[2] or "general"
        if kind not in SHIPPED:
            raise ValueError(f"unknown shipped heads {s!r}: give 'default', 'default:general' or 'default:code'")
        return DATA_DIR / SHIPPED[kind]
    return Path(spec)


def read_head_file(path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, raw metadata) of a head file, with a clear error for a missing, corrupt or truncated one."""
    from safetensors import SafetensorError, safe_open

    from ..model.filesys import check_file

    path = check_file(path, "head file")  # a FIFO would block the open, /dev/zero never end
    try:
        with safe_open(str(path), framework="pt") as f:
            md = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError, Exception) as e:  # noqa: BLE001 (any parse failure)
        raise HeadFileError(f"{path}: not a readable head file: corrupt or truncated safetensors ({type(e).__name__}: {e})") from None
    return tensors, md


def load_heads(spec, model) -> tuple[list[Head], dict]:
    """Heads for `model` from `spec` (see heads_path) -> (heads in layer order, metadata with JSON fields decoded).

    Raises HeadFileError (a ValueError) naming the file for a corrupt/truncated file, missing metadata, tensors
    that do not fit the model, and heads made for another model (both fingerprints named).
    """
    path = heads_path(spec)
    tensors, md = read_head_file(path)
    if md.get("format") != FORMAT:
        raise HeadFileError(f"{path}: not an adadecode head file (metadata 'format' is {md.get('format')!r}, expected {FORMAT!r})")
    missing = [k for k in REQUIRED_META if k not in md]
    if missing:
        raise HeadFileError(f"{path}: head file metadata lacks {missing}")
    if md["format_version"] != FORMAT_VERSION:
        raise HeadFileError(f"{path}: head file format_version {md['format_version']!r}; this adadecode reads {FORMAT_VERSION!r}")
    if md["model_fingerprint"] != model.fingerprint:
        raise HeadFileError(f"{path}: these heads were trained for another model (fingerprint {md['model_fingerprint']}, "
                            f"model {md.get('model', '?')!r}); the loaded model {getattr(model, 'source', '')!r} has "
                            f"fingerprint {model.fingerprint}")
    meta = {}
    for k, v in md.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    layers, gamma = meta["layers"], meta["gamma"]
    # ints and numbers as JSON wrote them: int() would read a layer 8.7 as 8, and float("nan") passes as a string
    if not isinstance(layers, list) or not all(isinstance(l, int) and not isinstance(l, bool) for l in layers):
        raise HeadFileError(f"{path}: metadata 'layers' is {md['layers']!r}; expected a list of layer numbers (integers)")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
        raise HeadFileError(f"{path}: metadata 'gamma' is {md['gamma']!r}; expected a number")
    gamma = float(gamma)
    cfg = model.cfg
    if not 0 < gamma <= 1:  # NaN fails this too
        raise HeadFileError(f"{path}: metadata 'gamma' is {gamma}, expected a probability in (0, 1]")
    if "gammas" in meta:  # optional: one gamma per head (tuned by the simulator)
        g = meta["gammas"]
        if not isinstance(g, list) or len(g) != len(layers) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in g):
            raise HeadFileError(f"{path}: metadata 'gammas' is {md['gammas']!r}, expected {len(layers)} probabilities in (0, 1]")
        meta["gammas"] = [float(v) for v in g]
    known = {f"head.{i}.{part}" for i in range(len(layers)) for part in ("T", "vocab", "w_rest")}
    extra = sorted(set(tensors) - known)
    if extra:  # e.g. metadata naming fewer heads than the file holds: the rest would be dropped silently
        raise HeadFileError(f"{path}: tensors {extra[:3]} are not among the {len(layers)} heads the metadata names")
    heads = []
    for i, layer in enumerate(layers):
        if not 1 <= layer < cfg.n_layers:
            raise HeadFileError(f"{path}: head {i} sits at layer {layer}; the model has layers 1..{cfg.n_layers - 1}")
        if i and layer <= layers[i - 1]:
            raise HeadFileError(f"{path}: metadata 'layers' is {layers}; expected distinct layers in ascending order")
        T = tensors.get(f"head.{i}.T")
        if T is None:
            raise HeadFileError(f"{path}: tensor 'head.{i}.T' is missing (metadata names {len(layers)} heads)")
        if tuple(T.shape) != (cfg.d, cfg.d):
            raise HeadFileError(f"{path}: tensor 'head.{i}.T' has shape {tuple(T.shape)}, the model needs ({cfg.d}, {cfg.d})")
        vocab, w_rest = tensors.get(f"head.{i}.vocab"), tensors.get(f"head.{i}.w_rest")
        if (vocab is None) != (w_rest is None):
            raise HeadFileError(f"{path}: head {i} has only one of 'head.{i}.vocab' and 'head.{i}.w_rest'")
        if vocab is not None:
            if vocab.is_floating_point():
                raise HeadFileError(f"{path}: 'head.{i}.vocab' has dtype {vocab.dtype}; expected integer token ids")
            vocab = vocab.long()
            if vocab.ndim != 1 or vocab.numel() == 0 or int(vocab.min()) < 0 or int(vocab.max()) >= cfg.vocab_size \
                    or bool((vocab[1:] <= vocab[:-1]).any()):
                raise HeadFileError(f"{path}: 'head.{i}.vocab' must be ascending distinct token ids in 0..{cfg.vocab_size - 1}")
            if tuple(w_rest.shape) != (cfg.d,):
                raise HeadFileError(f"{path}: 'head.{i}.w_rest' has shape {tuple(w_rest.shape)}, expected ({cfg.d},)")
            w_rest = w_rest.float()
        T = T.float()
        if not torch.isfinite(T).all() or (w_rest is not None and not torch.isfinite(w_rest).all()):
            raise HeadFileError(f"{path}: head {i} holds non-finite values")
        heads.append(Head(layer=layer, T=T, vocab=vocab, w_rest=w_rest))
    meta["layers"], meta["gamma"], meta["path"] = layers, gamma, str(path)
    return heads, meta
