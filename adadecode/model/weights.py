"""LlamaWeights: the tensors of a Llama model under short names, and the map from HF checkpoint names.

Linear weights keep the HF layout `[out_features, in_features]`; y = x @ W^T.
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch

from .config import LlamaConfig


@dataclasses.dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [d]
    wq: torch.Tensor  # [n_heads * head_dim, d]
    wk: torch.Tensor  # [n_kv_heads * head_dim, d]
    wv: torch.Tensor  # [n_kv_heads * head_dim, d]
    wo: torch.Tensor  # [d, n_heads * head_dim]
    mlp_norm: torch.Tensor  # [d]
    w_gate: torch.Tensor  # [ffn_dim, d]
    w_up: torch.Tensor  # [ffn_dim, d]
    w_down: torch.Tensor  # [d, ffn_dim]
    # the families' extras (issue 24): None where the config has none
    bq: torch.Tensor | None = None  # [n_heads * head_dim]     qwen2 (cfg.qkv_bias)
    bk: torch.Tensor | None = None  # [n_kv_heads * head_dim]
    bv: torch.Tensor | None = None  # [n_kv_heads * head_dim]
    q_norm: torch.Tensor | None = None  # [head_dim]           qwen3 (cfg.qk_norm)
    k_norm: torch.Tensor | None = None  # [head_dim]


# short name -> HF name inside "model.layers.{layer}."
LAYER_HF_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight",
    "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight",
    "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight",
    "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
    "bq": "self_attn.q_proj.bias",
    "bk": "self_attn.k_proj.bias",
    "bv": "self_attn.v_proj.bias",
    "q_norm": "self_attn.q_norm.weight",
    "k_norm": "self_attn.k_norm.weight",
}


def layer_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """short name -> shape of every tensor one layer of this config holds (the extras only where it has them)."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    layer = {"attn_norm": (cfg.d,), "wq": (q, cfg.d), "wk": (kv, cfg.d), "wv": (kv, cfg.d), "wo": (cfg.d, q),
             "mlp_norm": (cfg.d,), "w_gate": (cfg.ffn_dim, cfg.d), "w_up": (cfg.ffn_dim, cfg.d),
             "w_down": (cfg.d, cfg.ffn_dim)}
    if cfg.qkv_bias:
        layer |= {"bq": (q,), "bk": (kv,), "bv": (kv,)}
    if cfg.qk_norm:
        layer |= {"q_norm": (cfg.head_dim,), "k_norm": (cfg.head_dim,)}
    return layer


def expected_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name a checkpoint of this config must hold, with its shape."""
    layer = layer_shapes(cfg)
    out = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.d), "model.norm.weight": (cfg.d,)}
    for i in range(cfg.n_layers):
        for short, shape in layer.items():
            out[f"model.layers.{i}.{LAYER_HF_NAMES[short]}"] = shape
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, cfg.d)
    return out


def check_finite(name: str, t: torch.Tensor, where) -> None:
    """Refuse a NaN or inf weight at load: found at generation time it is a non-finite-logits error on every request,
    naming no tensor. Checked after the conversion to the dtype held, so an fp32 value beyond bf16's range counts."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    # aminmax propagates NaN, and an inf is the max or the min: one pass, no temporary (isfinite().all() was ~20x
    # slower on bf16: 3.5 s against 0.16 s for the default model on one thread)
    low, high = t.aminmax()
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{where}: tensor '{name}' holds {bad} non-finite values (NaN or inf)")


@dataclasses.dataclass
class LlamaWeights:
    embed: torch.Tensor  # [vocab, d]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [d]
    lm_head: torch.Tensor  # [vocab, d]; the same tensor as `embed` when embeddings are tied

    @classmethod
    def from_hf_state(cls, cfg: LlamaConfig, state: dict[str, torch.Tensor]) -> "LlamaWeights":
        embed = state["model.embed_tokens.weight"]
        shorts = layer_shapes(cfg)
        layers = [LayerWeights(**{s: state[f"model.layers.{i}.{LAYER_HF_NAMES[s]}"] for s in shorts})
                  for i in range(cfg.n_layers)]
        lm_head = embed if cfg.tie_word_embeddings else state["lm_head.weight"]
        return cls(embed=embed, layers=layers, norm=state["model.norm.weight"], lm_head=lm_head)

    @classmethod
    def random(cls, cfg: LlamaConfig, *, seed: int = 0, device="cpu", dtype=torch.float32) -> "LlamaWeights":
        """Random weights with a trained model's scale (unit-ish activations, norm weights near 1), made on `device`.

        For tests on tiny configs and for speed runs of shapes too large to ship (8B: 16 GB in bf16, made on the GPU).
        """
        g = torch.Generator(device=device).manual_seed(seed)
        state = {}
        for name, shape in expected_shapes(cfg).items():
            t = torch.randn(shape, generator=g, device=device, dtype=dtype)
            if name.endswith(".bias"):  # large enough to matter next to x @ W^T (unit-ish), small enough to stay sane
                t = t.mul_(0.1)
            elif len(shape) == 1:  # norm weights, q/k head norms included
                t = t.mul_(0.1).add_(1.0)
            elif name != "model.embed_tokens.weight":
                t = t.mul_(shape[-1] ** -0.5)
            state[name] = t
        return cls.from_hf_state(cfg, state)

    def to_hf_state(self, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
        state = {"model.embed_tokens.weight": self.embed, "model.norm.weight": self.norm}
        for i, lw in enumerate(self.layers):
            for s, hf in LAYER_HF_NAMES.items():
                if getattr(lw, s) is not None:
                    state[f"model.layers.{i}.{hf}"] = getattr(lw, s)
        if not cfg.tie_word_embeddings:
            state["lm_head.weight"] = self.lm_head
        return state

    def to(self, device=None, dtype=None) -> "LlamaWeights":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype)
        embed = mv(self.embed)
        tied = self.lm_head is self.embed
        return LlamaWeights(
            embed=embed, layers=[LayerWeights(**{f.name: mv(getattr(lw, f.name)) for f in dataclasses.fields(lw)})
                                 for lw in self.layers],
            norm=mv(self.norm), lm_head=embed if tied else mv(self.lm_head))

    def fingerprint(self, cfg: LlamaConfig) -> str:
        """A short hash that names this model: its config and a sample of every tensor's bytes.

        Sampling (a fixed stride through each tensor) keeps it cheap for 8B models while any real
        difference in a checkpoint (other training, other quantisation) changes it.
        """
        h = hashlib.sha256(cfg.fingerprint_text().encode())
        for name, t in sorted(self.to_hf_state(cfg).items()):
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].to(torch.float32).cpu().contiguous()
            h.update(name.encode())
            h.update(str(tuple(t.shape)).encode())
            h.update(sample.numpy().tobytes())
        return h.hexdigest()[:16]


class ReleasedWeights:
    """What a Model holds once its torch weights were handed to an engine that keeps its own copy (the CPU engine
    packs them once, into its lane order): any use names where they went, instead of holding them twice."""

    def __init__(self, source: str, holder: str):
        self._source, self._holder = source, holder

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"{self._source}: the model's torch weights were released ({self._holder} holds them); "
                           f"load the model again to use them elsewhere")
