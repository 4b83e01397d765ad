"""CpuEngine: the engine contract (DESIGN.md §3) on native CPU kernels, through the C++ runtime of adadecode_cpu.

The same Python API and semantics as TorchEngine (the oracle) and CudaEngine: prefill, embed, run_layers, head,
final, final_logits, set_heads, truncate, hidden, kv. The host-side bookkeeping and the contract checks are
EngineContract's; the compute runs in `adadecode_cpu.Engine` (csrc/cpu/engine.cpp):

* the weights are packed once, in bf16, into the kernels' lane order (`CpuWeights`, held by the C++ side: the
  caller may drop its own tensors, and `Model.cpu_weights()` packs a model once for every engine built from it);
* `run_layers` on R rows reads each weight once for all R rows (the rows sit inside the weight tile), attention
  runs R rows in one pass over the cache, and the RMSNorms, RoPE, the K/V append, SiLU * up and the residual adds
  are folded into the GEMM jobs that consume or produce them, as on the GPU;
* `final` returns the greedy tokens of the native LM head; with sampling, the token is drawn in C++ right after
  the LM head (csrc/cpu/sampling.h) by the reference rule of adadecode.engines.sampling, bit for bit, from the same
  bf16-rounded logits the CUDA kernel samples from; a head's sampled guess likewise.

Bitwise by construction (DESIGN.md §4): every output's reduction order is the CUDA kernels' (csrc/cpu/lanes.h),
a function of the shapes alone, never of the rows in a call, the thread count or the instruction set (AVX-512 with
and without the bf16 dot-product instruction, AVX2, NEON and a portable path compute the same bits; threads split
output columns and (kv head, chunk) items, never a reduction). So CpuEngine agrees bit for bit with CudaEngine on the emulated device wherever that one runs the same
kernels (decode, and prefill in chunks of at most 16 rows), and with itself across machines.

Threads: `threads=None` takes ADADECODE_CPU_THREADS or the cores this process may use. `isa=None` takes
ADADECODE_CPU_ISA or the best path of this CPU. `schedule` (tests only; None takes ADADECODE_CPU_SCHEDULE, else
"natural"): "reverse" or "shuffle[:seed]" runs every job's items on one thread in reversed or shuffled order under
the thread indices that work stealing could give them (csrc/cpu/thread_pool.h); the bits must not change.
"""
from __future__ import annotations

import math
import os

import torch

from ..model.config import LlamaConfig
from ..model.weights import LlamaWeights
from .contract import EngineContract
from .torch import rope_inv_freq


def _rule(sampling):
    """A Sampling as the native sampler takes it (csrc/cpu/sampling.h), or None for greedy."""
    if sampling is None:
        return None
    return (sampling.seed, sampling.inv_temperature, sampling.top_k, sampling.top_p)


def cpu_unavailable_reason() -> str | None:
    """Why the CPU engine cannot run here, or None when it can."""
    try:
        import adadecode_cpu  # noqa: F401
    except ImportError as e:
        return (f"the extension adadecode_cpu is not built or does not load ({e}); `pip install --no-build-isolation "
                f"-e .` builds it with g++ wherever torch is installed (see README)")
    return None


def _ext():
    why = cpu_unavailable_reason()
    if why:
        raise RuntimeError(f"the CPU engine cannot run: {why}")
    import adadecode_cpu

    return adadecode_cpu


def read_bandwidth(threads: int = 1, mib: int = 1024, reps: int = 5) -> float:
    """Bytes/s of `threads` threads reading `mib` MiB that no cache holds (a STREAM-like sum, best of `reps`): the
    ceiling of a decode step, which reads every weight once. The benchmarks measure it in the same run."""
    return float(_ext().read_bandwidth(mib, threads, reps))


def fma_peak(threads: int = 1, reps: int = 3) -> float:
    """fp32 FMA FLOP/s of `threads` threads (12 independent FMA chains each on the best kernel path, best of
    `reps`): the ceiling of the compute-bound steps (prefill, several rows), beside read_bandwidth's."""
    return float(_ext().fma_peak(threads, reps))


def default_threads() -> int:
    env = os.environ.get("ADADECODE_CPU_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ValueError(f"ADADECODE_CPU_THREADS={env!r} is not an integer") from None
        if n < 1:
            raise ValueError(f"ADADECODE_CPU_THREADS={env!r} must be >= 1")
        return n
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


SCHEDULES = ("natural", "reverse", "shuffle")


def parse_schedule(spec: str | None) -> tuple[str, int]:
    """(schedule, seed) of a pool schedule spec: "natural", "reverse" or "shuffle[:seed]"; None reads
    ADADECODE_CPU_SCHEDULE (unset: natural)."""
    what = "schedule"
    if spec is None:
        spec, what = os.environ.get("ADADECODE_CPU_SCHEDULE") or "natural", "ADADECODE_CPU_SCHEDULE"
    name, _, seed = str(spec).partition(":")
    if name not in SCHEDULES or (seed and (name != "shuffle" or not seed.isdigit())):
        raise ValueError(f"{what}={spec!r} must be one of natural, reverse, shuffle[:seed]")
    return name, int(seed or 0)


def rope_tables(cfg: LlamaConfig, max_seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [max_seq, head_dim/2], computed exactly as TorchEngine and CudaEngine compute theirs."""
    t = torch.arange(max_seq, dtype=torch.float32)
    freqs = torch.outer(t, rope_inv_freq(cfg))
    emb = torch.cat((freqs, freqs), dim=-1)
    half = cfg.head_dim // 2
    return emb.cos()[:, :half].contiguous(), emb.sin()[:, :half].contiguous()


def check_supported(cfg: LlamaConfig) -> None:
    """The shapes the CPU kernels take; a clear ValueError naming the field otherwise."""
    if cfg.head_dim > 256:
        raise ValueError(f"the CPU engine supports head_dim up to 256, this model has {cfg.head_dim}")
    if cfg.n_heads * cfg.head_dim % 8:
        raise ValueError(f"the CPU engine needs num_attention_heads * head_dim % 8 == 0, this model has "
                         f"{cfg.n_heads} x {cfg.head_dim}")
    if cfg.d % 8:
        raise ValueError(f"the CPU engine needs hidden_size % 8 == 0, this model has {cfg.d}")
    if cfg.ffn_dim % 8:
        raise ValueError(f"the CPU engine needs intermediate_size % 8 == 0, this model has {cfg.ffn_dim}")
    if getattr(cfg, "qk_norm", False) and cfg.head_dim % 8:
        raise ValueError(f"the CPU engine's q/k head norm needs head_dim % 8 == 0, this model has {cfg.head_dim}")
    w = getattr(cfg, "sliding_window", None)
    if w is not None and (not isinstance(w, int) or isinstance(w, bool) or w < 1):
        raise ValueError(f"sliding_window must be a positive integer or None, got {w!r}")


def family_args(cfg: LlamaConfig, weights: LlamaWeights, convert) -> dict:
    """The family features of cfg (Qwen2's q/k/v biases, Qwen3's q/k head norms, a sliding window) as the native
    engines take them: flags, the window (0: full attention) and per layer [bqkv] + [q_norm, k_norm], each tensor
    through `convert`. A flag without its tensors is an error naming the layer and the field."""
    qkv_bias, qk_norm = bool(getattr(cfg, "qkv_bias", False)), bool(getattr(cfg, "qk_norm", False))
    extras = []
    for i, lw in enumerate(weights.layers if (qkv_bias or qk_norm) else []):
        x = []
        if qkv_bias:
            b = [getattr(lw, f, None) for f in ("bq", "bk", "bv")]
            if any(t is None for t in b):
                raise ValueError(f"layer {i}: qkv_bias is set but bq/bk/bv is missing")
            x.append(convert(torch.cat([t.reshape(-1) for t in b])))
        if qk_norm:
            for f in ("q_norm", "k_norm"):
                if getattr(lw, f, None) is None:
                    raise ValueError(f"layer {i}: qk_norm is set but {f} is missing")
                x.append(convert(getattr(lw, f)))
        extras.append(x)
    return dict(qkv_bias=qkv_bias, qk_norm=qk_norm, sliding_window=int(getattr(cfg, "sliding_window", None) or 0),
                extras=extras)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """t as the C++ side reads it: a contiguous bf16 CPU tensor."""
    return t.detach().to("cpu", torch.bfloat16).contiguous()


class CpuWeights:
    """A model's weights packed for the CPU kernels (bf16, lane order), held once by the C++ side."""

    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights):
        check_supported(cfg)
        ext = _ext()
        bf = _bf16
        layers = [[bf(lw.attn_norm), bf(lw.wq), bf(lw.wk), bf(lw.wv), bf(lw.wo), bf(lw.mlp_norm), bf(lw.w_gate),
                   bf(lw.w_up), bf(lw.w_down)] for lw in weights.layers]
        tied = weights.lm_head is weights.embed
        self.cfg = cfg
        self._w = ext.Weights(
            n_layers=cfg.n_layers, d=cfg.d, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
            ffn=cfg.ffn_dim, vocab=cfg.vocab_size, eps=float(cfg.rms_norm_eps), embed=bf(weights.embed),
            norm=bf(weights.norm), lm_head=None if tied else bf(weights.lm_head), layers=layers,
            **family_args(cfg, weights, bf))

    @property
    def bytes(self) -> int:
        return self._w.bytes


class CpuEngine(EngineContract):
    name = "cpu"
    dtype = torch.bfloat16

    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights | CpuWeights, *, max_seq: int | None = None,
                 max_rows: int = 16, threads: int | None = None, isa: str | None = None, prefill_chunk: int = 64,
                 schedule: str | None = None):
        if not isinstance(max_rows, int) or isinstance(max_rows, bool) or not 1 <= max_rows <= 256:
            raise ValueError(f"max_rows={max_rows!r} must be an integer in 1..256 for the CPU engine")
        if not isinstance(prefill_chunk, int) or not 1 <= prefill_chunk <= 1024:
            raise ValueError(f"prefill_chunk must be an integer in 1..1024, got {prefill_chunk!r}")
        threads = default_threads() if threads is None else threads
        if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= 1024:
            raise ValueError(f"threads={threads!r} must be an integer in 1..1024")
        ext = _ext()
        self._init_contract(cfg, max_seq, max_rows)
        self.device = torch.device("cpu")
        if not isinstance(weights, CpuWeights):
            weights = CpuWeights(cfg, weights)
        elif weights.cfg != cfg:
            raise ValueError("CpuWeights were packed for another model config")
        self.packed = weights
        kv = 2 * cfg.n_layers * -(-self.max_seq // 16) * 16 * cfg.n_kv_heads * cfg.head_dim * 2
        free = ext.available_memory()
        if kv > free:  # before the RoPE tables of max_seq rows are built
            raise MemoryError(f"KV cache of max_seq={self.max_seq} x {cfg.n_layers} layers x {cfg.n_kv_heads} kv heads x "
                              f"head_dim {cfg.head_dim} ({kv / 2**30:.2f} GiB, bf16) does not fit in the "
                              f"{free / 2**30:.2f} GiB of memory available")
        cos, sin = rope_tables(cfg, self.max_seq)
        self._eng = ext.Engine(weights._w, cos, sin, max_seq=self.max_seq, max_rows=self.max_rows,
                               prefill_chunk=prefill_chunk, threads=threads, isa=isa or "")
        self.schedule = parse_schedule(schedule)
        self._eng.set_schedule(*self.schedule)

    # ---- sizes ------------------------------------------------------------------------------------------------------
    @property
    def isa(self) -> str:
        """The kernel path in use: avx512bf16, avx512, avx2, neon or portable (all compute the same bits)."""
        return self._eng.isa

    @property
    def threads(self) -> int:
        return self._eng.threads

    @property
    def kv_bytes(self) -> int:
        return self._eng.kv_bytes

    # ---- the contract's compute (checks and bookkeeping: EngineContract) -----------------------------------------
    def _prefill(self, tokens: list[int]) -> None:
        self._eng.prefill(tokens)

    def _embed(self, pos: int, token: int, slot: int) -> None:
        self._eng.embed(pos, token)

    def _run_layers(self, first_pos: int, last_pos: int, l0: int, l1: int, slots: list[int]) -> None:
        self._eng.run_layers(first_pos, last_pos, l0, l1)

    def final_logits(self, first_pos: int, last_pos: int) -> torch.Tensor:
        """fp32 logits [rows, vocab] of rows at depth L: the native LM head's, rounded to bf16 as the CUDA kernel's."""
        self._rows(first_pos, last_pos, self.n_layers)
        _, logits = self._eng.final(first_pos, last_pos, logits=True)
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"non-finite logits at rows {first_pos}..{last_pos}")
        return logits

    def final(self, first_pos: int, last_pos: int, sampling=None) -> list[int]:
        """Tokens of rows at depth L: greedy (ties go to the lowest token id), or drawn by `sampling` for positions
        row + 1 from the bf16-rounded logits (adadecode.engines.sampling: the CUDA epilogue's rule, bit for bit)."""
        self._rows(first_pos, last_pos, self.n_layers)
        tokens, _ = self._eng.final(first_pos, last_pos, sampling=_rule(sampling))
        if min(tokens) < 0:
            raise FloatingPointError(f"non-finite {'tempered ' if sampling else ''}logits at rows {first_pos}..{last_pos}")
        return tokens

    def set_heads(self, heads) -> None:
        """Intermediate heads (adadecode.engines.head.Head), indexed by `head_index` in `head()`."""
        heads = list(heads)
        self._eng.set_heads([(layer, _bf16(T), None if ids is None else ids.to(torch.int32).contiguous(),
                              None if w_rest is None else _bf16(w_rest))
                             for layer, T, ids, w_rest in self._checked_heads(heads)])
        self.heads = [h.to("cpu", torch.bfloat16) for h in heads]

    def head(self, pos: int, head_index: int, sampling=None) -> tuple[int, float]:
        """(token, confidence) of head `head_index` on row `pos`, which must be at that head's layer; with `sampling`
        the token is the head's own draw for position pos + 1 (over its real tokens, as TorchEngine.head)."""
        hd = self.heads[head_index]
        head_index = range(len(self.heads))[head_index]
        self._row_slot(pos, hd.layer)
        token, prob, _ = self._eng.head(pos, head_index, sampling=_rule(sampling))
        if not math.isfinite(prob) or token < 0:
            raise FloatingPointError(f"non-finite head logits at row {pos} (head at layer {hd.layer})")
        return int(token), float(prob)

    def hidden(self, pos: int) -> torch.Tensor:
        """The residual stream of row `pos` (a copy), for tests."""
        self._row_slot(pos)
        return self._eng.hidden(pos)

    def kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of K and V [kv_len, n_kv_heads, head_dim] of `layer` (its valid cache entries), for tests."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} outside 0..{self.n_layers - 1}")
        return self._eng.kv(layer, self.kv_len[layer])
