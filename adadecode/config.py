"""LlamaConfig: the shape of a Llama-architecture model, read from an HF `config.json` (or a GGUF header).

Only plain Llama is accepted: anything that changes the forward pass in a way the engines do not
implement (biases, sliding windows, experts, other activations, unknown RoPE scaling) is refused
here, with the source and the field named, before a single weight is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A checkpoint's config names something this package does not run."""


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

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "LlamaConfig":
        def bad(field: str, why: str) -> ConfigError:
            return ConfigError(f"{source}: field '{field}' {why}")

        model_type = cfg.get("model_type")
        if model_type != "llama":
            raise bad("model_type", f"is {model_type!r}; only plain 'llama' checkpoints are supported")
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if archs != ["LlamaForCausalLM"]:
            raise bad("architectures", f"is {archs!r}; expected ['LlamaForCausalLM']")
        for field in ("attention_bias", "mlp_bias"):
            if cfg.get(field):
                raise bad(field, "is true; biases are not supported")
        if cfg.get("sliding_window") not in (None, 0):
            raise bad("sliding_window", f"is {cfg['sliding_window']!r}; sliding-window attention is not supported")
        for field in ("num_local_experts", "num_experts", "n_routed_experts", "num_experts_per_tok"):
            if cfg.get(field):
                raise bad(field, f"is {cfg[field]!r}; mixture-of-experts models are not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise bad("hidden_act", f"is {act!r}; only 'silu' is supported")
        if cfg.get("pretraining_tp", 1) not in (1, None):
            raise bad("pretraining_tp", f"is {cfg['pretraining_tp']!r}; only 1 is supported")

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            if not isinstance(cfg.get(field), int) or cfg[field] <= 0:
                raise bad(field, f"must be a positive integer, got {cfg.get(field)!r}")
        d, n_heads = cfg["hidden_size"], cfg["num_attention_heads"]
        n_kv_heads = cfg.get("num_key_value_heads") or n_heads
        if n_heads % n_kv_heads:
            raise bad("num_key_value_heads", f"({n_kv_heads}) must divide num_attention_heads ({n_heads})")
        head_dim = cfg.get("head_dim") or d // n_heads
        if head_dim % 2:
            raise bad("head_dim", f"is {head_dim}; RoPE needs an even head_dim")
        if cfg.get("head_dim") is None and d % n_heads:
            raise bad("hidden_size", f"({d}) is not a multiple of num_attention_heads ({n_heads})")

        scaling = cfg.get("rope_scaling")
        if scaling is not None:
            kind = scaling.get("rope_type", scaling.get("type"))
            if kind == "default":
                scaling = None
            elif kind == "llama3":
                need = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
                missing = [k for k in need if k not in scaling]
                if missing:
                    raise bad("rope_scaling", f"of type llama3 lacks {missing}")
                scaling = {k: scaling[k] for k in need} | {"rope_type": "llama3"}
            else:
                raise bad("rope_scaling", f"has type {kind!r}; only 'llama3' (or none) is supported")

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return cls(
            vocab_size=cfg["vocab_size"], d=d, n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=n_kv_heads, head_dim=head_dim, ffn_dim=cfg["intermediate_size"],
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=float(cfg.get("rope_theta", 10000.0)),
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling, bos_token_id=cfg.get("bos_token_id"), eos_token_ids=eos_ids,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "LlamaConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no config.json (an HF Llama checkpoint directory needs one)")
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf(cfg, source=str(path))

    def to_hf(self) -> dict[str, Any]:
        """The HF `config.json` of this shape (what the default-model cache writes and transformers reads)."""
        cfg = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": self.vocab_size,
            "hidden_size": self.d, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim, "intermediate_size": self.ffn_dim,
            "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "rope_scaling": self.rope_scaling,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
        }
        return cfg

    def fingerprint_text(self) -> str:
        """The fields that decide the forward pass, as canonical JSON (one half of a model fingerprint)."""
        fields = dataclasses.asdict(self)
        for k in ("bos_token_id", "eos_token_ids"):
            fields.pop(k)
        return json.dumps(fields, sort_keys=True)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
