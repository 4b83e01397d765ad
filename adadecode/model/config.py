"""LlamaConfig: the shape of a Llama-family model, read from an HF `config.json` (or a GGUF header).

Four families share one forward pass (FAMILIES): Llama, Mistral (plus a sliding window), Qwen2/Qwen2.5 (plus
q/k/v biases and an optional sliding window) and Qwen3 (plus RMSNorm on each q and k head, head_dim set on its
own). Anything else that changes the forward pass in a way the engines do not implement (other biases, windows
on some layers only, experts, other activations, unknown RoPE scaling) is refused here, with the source and the
field named, before a single weight is read.

Both layouts of config.json are read: transformers 5's (`rope_parameters`, `dtype`) and the older one
(`rope_theta` + `rope_scaling`, `torch_dtype`); a config that writes a setting in both must agree with itself.
Where a field is absent, the default is the one the family's transformers Config class applies. `dtype` is not
read: the loader holds weights in bf16 whatever the checkpoint stores.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint's config names something this package does not run."""


# The settings each supported RoPE type needs. All are required: where llama3 lacks original_max_position_embeddings,
# transformers 5 takes max_position_embeddings and older versions required it, so a missing one is refused, not guessed.
ROPE_TYPES = {"default": (), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")}
# model_type -> the one `architectures` entry transformers writes for it
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
# transformers' defaults where config.json omits a field (each family's Config class; 5.x)
FAMILY_DEFAULTS = {"llama": {"max_position_embeddings": 2048}, "mistral": {"max_position_embeddings": 131072},
                   "qwen2": {"max_position_embeddings": 32768}, "qwen3": {"max_position_embeddings": 32768,
                                                                          "head_dim": 128}}
# What transformers uses when a config names no theta anywhere (RotaryEmbeddingConfigMixin.default_theta).
DEFAULT_ROPE_THETA = 10000.0


def read_json(file: Path) -> dict:
    """A JSON object from one of the checkpoint's files; its errors name the file (the parser's alone do not)."""
    try:
        value = json.loads(Path(file).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{file}: is a JSON {type(value).__name__}; expected an object of fields")
    return value


def read_int(cfg: dict[str, Any], field: str, bad, default: Any = None, minimum: int = 1) -> int | None:
    """cfg[field] as an int >= minimum; a string, float or bool is refused, not converted: "3" and 3.0 are
    what a damaged or hand-edited config writes, and int() would silently read 3.7 as 3."""
    value = cfg.get(field)
    value = default if value is None else value  # null: transformers' default, as for an absent field
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad(field, f"is {value!r}; expected an integer >= {minimum}")
    return value


def read_float(cfg: dict[str, Any], field: str, bad, default: float) -> float:
    """cfg[field] as a finite number > 0 (an eps or a theta: 0, negative or NaN would give non-finite logits)."""
    value = cfg.get(field)
    value = default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
        raise bad(field, f"is {value!r}; expected a finite number > 0")
    return float(value)


def read_bool(cfg: dict[str, Any], field: str, bad, default: bool) -> bool:
    """cfg[field] as a JSON boolean; the string "false" would read as true."""
    value = cfg.get(field)
    value = default if value is None else value
    if not isinstance(value, bool):
        raise bad(field, f"is {value!r}; expected true or false")
    return value


def read_token_ids(value: Any, field: str, bad) -> tuple[int, ...]:
    """A token id or a list of them (HF's eos_token_id) -> a tuple; null -> ()."""
    if value is None:
        return ()
    ids = value if isinstance(value, list) else [value]
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise bad(field, f"is {value!r}; expected a token id or a list of token ids (integers >= 0)")
    return tuple(ids)


def read_rope(cfg: dict[str, Any], bad) -> tuple[float, dict | None]:
    """(rope_theta, llama3 scaling or None) from either layout of config.json.

    transformers 5 writes one `rope_parameters` object (rope_type, rope_theta, factor, ...); older versions wrote a
    top-level `rope_theta` and a `rope_scaling` object. A setting may thus be written in several places: all of
    them must agree, because transformers 5 and 4 would each pick a different one.
    """
    found: dict[str, tuple[str, Any]] = {}  # setting -> (the field that wrote it first, its value)

    def put(field: str, key: str, value: Any) -> None:
        if key in found and found[key][1] != value:
            raise bad(field, f"says {key} = {value!r} but '{found[key][0]}' says {found[key][1]!r}; "
                             "the config's two RoPE layouts disagree")
        found.setdefault(key, (field, value))

    for field in ("rope_parameters", "rope_scaling"):
        params = cfg.get(field)
        if not params:  # null or {}: transformers reads both as absent
            continue
        if not isinstance(params, dict):
            raise bad(field, f"is {params!r}; expected an object")
        nested = [k for k, v in params.items() if isinstance(v, dict)]
        if nested:
            raise bad(field, f"holds per-layer-type settings {nested}; one RoPE for all layers is supported")
        kinds = [params[k] for k in ("rope_type", "type") if k in params] or ["default"]  # `type`: oldest name
        for kind in kinds:
            if not isinstance(kind, str) or kind not in ROPE_TYPES:
                raise bad(field, f"has rope_type {kind!r}; only 'llama3' and 'default' (no scaling) are supported")
            put(field, "rope_type", kind)
        for key in ("rope_theta", "partial_rotary_factor") + ROPE_TYPES[kind]:
            if key in params:
                put(field, key, params[key])
    kind = found.get("rope_type", ("", "default"))[1]
    for key in ("rope_theta", "partial_rotary_factor") + ROPE_TYPES[kind]:  # the older top-level fields
        if key in cfg:
            put(key, key, cfg[key])

    def positive(key: str) -> None:
        field, value = found[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not value > 0:
            raise bad(field, f"has {key} {value!r}; expected a finite number > 0")

    found.setdefault("rope_theta", ("rope_theta", DEFAULT_ROPE_THETA))
    positive("rope_theta")
    theta = float(found["rope_theta"][1])
    field, partial = found.get("partial_rotary_factor", ("", 1.0))
    if partial != 1.0:
        raise bad(field, f"has partial_rotary_factor {partial!r}; only RoPE over the whole head is supported")
    if kind == "default":
        return theta, None
    missing = [k for k in ROPE_TYPES[kind] if k not in found]
    if missing:
        raise bad(found["rope_type"][0], f"of rope_type {kind} lacks {missing}")
    for k in ROPE_TYPES[kind]:
        positive(k)
    return theta, {k: found[k][1] for k in ROPE_TYPES[kind]} | {"rope_type": kind}


def read_window(cfg: dict[str, Any], model_type: str, bad) -> int | None:
    """The sliding window W that applies to every layer, or None (full attention on every layer).

    Mistral applies `sliding_window` (null: none) to every layer. Qwen2/Qwen3 apply it only when
    `use_sliding_window` is true, and then (transformers' layer_types) only to layers >= `max_window_layers`:
    a window on some layers and not on others is refused, as is any window on Llama.
    """
    n_layers = cfg.get("num_hidden_layers")
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if model_type in ("qwen2", "qwen3"):
        if not read_bool(cfg, "use_sliding_window", bad, False):
            window = None  # transformers drops it: Qwen2.5 configs carry a sliding_window that is off
        if layer_types is None and isinstance(n_layers, int):
            first = cfg.get("max_window_layers", 28)  # transformers' default
            if isinstance(first, bool) or not isinstance(first, int) or first < 0:
                raise bad("max_window_layers", f"is {first!r}; expected an integer >= 0")
            layer_types = ["sliding_attention" if window is not None and i >= first else "full_attention"
                           for i in range(n_layers)]
    elif model_type == "mistral":  # MistralForCausalLM applies sliding_window everywhere and ignores layer_types,
        # so a layer_types that says otherwise (Ministral's alternating layers) is refused rather than ignored
        ours = ["full_attention" if window is None else "sliding_attention"] * (n_layers if isinstance(n_layers, int) else 0)
        if layer_types is not None and layer_types != ours:
            raise bad("layer_types", f"is {layer_types!r}; a Mistral model has sliding_window {window!r} on every "
                                     "layer (alternating layers, as Ministral's, are not supported)")
        layer_types = ours
    elif window not in (None, 0):
        raise bad("sliding_window", f"is {window!r}; model_type 'llama' has no sliding-window attention "
                                    "(a Mistral checkpoint says model_type 'mistral')")
    if layer_types is not None:
        if not isinstance(layer_types, list) or any(t not in ("full_attention", "sliding_attention") for t in layer_types):
            raise bad("layer_types", f"is {layer_types!r}; only 'full_attention' and 'sliding_attention' are known")
        if isinstance(n_layers, int) and len(layer_types) != n_layers:
            raise bad("layer_types", f"names {len(layer_types)} layers; num_hidden_layers is {n_layers}")
        kinds = set(layer_types)
        if len(kinds) > 1:
            field = "layer_types" if "layer_types" in cfg else "max_window_layers"
            raise bad(field, f"puts a sliding window on {layer_types.count('sliding_attention')} of {len(layer_types)} "
                             "layers; a window on every layer or on none is supported")
        if kinds != {"sliding_attention"}:
            return None
        if window is None:
            raise bad("layer_types", "names sliding_attention layers but no sliding_window is set (or "
                                     "use_sliding_window is false)")
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise bad("sliding_window", f"is {window!r}; expected a positive integer or null")
    return window


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    d: int  # hidden_size
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int  # intermediate_size
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_word_embeddings: bool
    rope_scaling: dict | None = None  # llama3: factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # the families (issue 24); the defaults are plain Llama's, and fingerprint_text omits a field at its default
    model_type: str = "llama"  # "llama" | "mistral" | "qwen2" | "qwen3"
    qkv_bias: bool = False  # qwen2: biases on the q, k and v projections
    qk_norm: bool = False  # qwen3: RMSNorm over head_dim on each q and k head, before RoPE
    sliding_window: int | None = None  # W on every layer: row p attends to max(0, p - W + 1)..p; None: all of 0..p

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field}' {why}")

        if not isinstance(cfg, dict):
            raise ConfigError(f"{source}: is a JSON {type(cfg).__name__}; expected an object of fields")
        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or model_type not in FAMILIES:  # a list is no dict key either
            raise bad("model_type", f"is {model_type!r}; supported: {', '.join(map(repr, FAMILIES))}")
        archs = cfg.get("architectures") or [FAMILIES[model_type]]
        if archs != [FAMILIES[model_type]]:
            raise bad("architectures", f"is {archs!r}; expected [{FAMILIES[model_type]!r}] for model_type {model_type!r}")
        # qwen2 puts biases on q/k/v always (transformers ignores attention_bias there); qwen3's attention_bias
        # would put one on o_proj too, which no engine adds, so it is refused like Llama's
        for field in ("attention_bias", "mlp_bias"):
            value = cfg.get(field)
            if value in (None, False) or (field == "attention_bias" and model_type == "qwen2"):
                continue  # anything else, a string "false" included, is refused with its value named
            raise bad(field, f"is {value!r}; biases are not supported" + (" (only Qwen2's q/k/v biases)"
                                                                         if field == "attention_bias" else ""))
        sliding_window = read_window(cfg, model_type, bad)
        for field in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok"):
            if cfg.get(field):
                raise bad(field, f"is {cfg[field]!r}; mixture-of-experts models are not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise bad("hidden_act", f"is {act!r}; only 'silu' is supported")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise bad("pretraining_tp", f"is {cfg['pretraining_tp']!r}; only 1 is supported")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if read_int(cfg, field, bad) is None:
                raise bad(field, f"is {cfg.get(field)!r}; expected an integer >= 1")
        d, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        n_kv_heads = read_int(cfg, "num_key_value_heads", bad) or n_heads
        if n_heads % n_kv_heads:
            raise bad("num_key_value_heads", f"({n_kv_heads}) must divide num_attention_heads ({n_heads})")
        head_dim = read_int(cfg, "head_dim", bad)  # null: the family's default (Qwen3: 128), else hidden_size / heads
        if head_dim is None:
            if "head_dim" not in FAMILY_DEFAULTS[model_type] and d % n_heads:
                raise bad("hidden_size", f"({d}) is not a multiple of num_attention_heads ({n_heads})")
            head_dim = FAMILY_DEFAULTS[model_type].get("head_dim") or d // n_heads
        if head_dim % 2:
            raise bad("head_dim", f"is {head_dim}; RoPE needs an even head_dim")

        rope_theta, scaling = read_rope(cfg, bad)

        eos_ids = read_token_ids(cfg.get("eos_token_id"), "eos_token_id", bad)
        bos = read_token_ids(cfg.get("bos_token_id"), "bos_token_id", bad)
        if len(bos) > 1:
            raise bad("bos_token_id", f"is {cfg['bos_token_id']!r}; expected one token id")
        return cls(
            vocab_size=cfg["vocab_size"], d=d, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=cfg["intermediate_size"],
            rms_norm_eps=read_float(cfg, "rms_norm_eps", bad, 1e-6), rope_theta=rope_theta,
            max_position=read_int(cfg, "max_position_embeddings", bad,
                                  FAMILY_DEFAULTS[model_type]["max_position_embeddings"]),
            tie_word_embeddings=read_bool(cfg, "tie_word_embeddings", bad, False),
            rope_scaling=scaling, bos_token_id=bos[0] if bos else None, eos_token_ids=eos_ids,
            model_type=model_type, qkv_bias=model_type == "qwen2", qk_norm=model_type == "qwen3",
            sliding_window=sliding_window,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        from .filesys import check_file

        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no config.json (an HF Llama checkpoint directory needs one)")
        cfg = read_json(check_file(path, "config file"))
        return cls.from_hf(cfg, source=str(path))

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` of this shape (what the default-model cache writes and transformers reads)."""
        cfg = {
            "architectures": [FAMILIES[self.model_type]], "model_type": self.model_type, "vocab_size": self.vocab_size,
            "hidden_size": self.d, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": self.rope_scaling,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        if self.model_type == "qwen2":
            del cfg["attention_bias"]  # qwen2's biases are not a setting
        if self.model_type in ("qwen2", "qwen3"):  # the window on every layer from the first (max_window_layers 0)
            cfg |= {"use_sliding_window": self.sliding_window is not None, "sliding_window": self.sliding_window,
                    "max_window_layers": 0}
        elif self.model_type == "mistral":
            cfg["sliding_window"] = self.sliding_window
        return cfg

    def fingerprint_text(self) -> str:
        """The fields that decide the forward pass, as canonical JSON (one half of a model fingerprint)."""
        fields = dataclasses.asdict(self)
        for k in ("bos_token_id", "eos_token_ids"):
            fields.pop(k)
        for f in dataclasses.fields(self):  # the family fields at Llama's defaults: fingerprints made before them hold
            if f.name in ("model_type", "qkv_bias", "qk_norm", "sliding_window") and fields[f.name] == f.default:
                fields.pop(f.name)
        return json.dumps(fields, sort_keys=True)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
