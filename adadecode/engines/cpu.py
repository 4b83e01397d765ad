"""CpuEngine: the engine contract (docs/design.md#contract) on native CPU kernels, through the C++ runtime of adadecode_cpu.

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
* `max_seqs` sequences, each with its own KV cache region and ring of rows (csrc/cpu/engine.h): `run_batch` is one
  forward whose 5 jobs per layer take the rows of every segment that runs the layer, `final_batch` one LM-head job over
  every item's rows (each sampled item then drawn in C++ by its own rule at its own positions); `prefill(tokens,
  start)` continues a prompt in the cache, and any piece size gives the bits of one call (prefill is decode on more
  rows).

Bitwise by construction (docs/design.md#invariance): every output's reduction order is the CUDA kernels' (csrc/cpu/lanes.h),
a function of the shapes alone, never of the rows in a call, the thread count or the instruction set (AVX-512 with
and without the bf16 dot-product instruction, AVX2, NEON and a portable path compute the same bits; threads split
output columns and (kv head, chunk) items, never a reduction). So CpuEngine agrees bit for bit with CudaEngine on the emulated device wherever that one runs the same
kernels (decode, and prefill in chunks of at most 16 rows), and with itself across machines.

Options (adadecode.engines.options.EngineOptions, which reads the environment for what is left unset): `threads`
(None: ADADECODE_CPU_THREADS or the cores this process may use), `isa` (None: ADADECODE_CPU_ISA or the best path of
this CPU), `schedule` (tests only; None: ADADECODE_CPU_SCHEDULE, else "natural"): "reverse" or "shuffle[:seed]"
runs every job's items on one thread in reversed or shuffled order under the thread indices that work stealing could
give them (csrc/cpu/thread_pool.h); the bits must not change.
"""
from __future__ import annotations

import warnings

import torch

from ..model.config import LlamaConfig
from ..model.math import rope_tables
from ..model.weights import LlamaWeights
from .options import EngineOptions, usable_cores
from .native import NativeEngine, check_finite_logits, family_args, model_dims


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
        self._w = ext.Weights(**model_dims(cfg), embed=bf(weights.embed), norm=bf(weights.norm),
                              lm_head=None if tied else bf(weights.lm_head), layers=layers,
                              **family_args(cfg, weights, bf))

    @property
    def bytes(self) -> int:
        return self._w.bytes


class CpuEngine(NativeEngine):
    name = "cpu"

    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights | CpuWeights, *, max_seq: int | None = None,
                 max_rows: int | None = None, threads: int | None = None, isa: str | None = None,
                 prefill_chunk: int | None = None, schedule: str | None = None, max_seqs: int | None = None,
                 options: EngineOptions | None = None):
        given = dict(max_rows=max_rows, threads=threads, isa=isa, prefill_chunk=prefill_chunk, schedule=schedule,
                     max_seqs=max_seqs)
        opts = (options or EngineOptions(engine="cpu")).replace(**{k: v for k, v in given.items() if v is not None})
        ext = _ext()
        cpu = opts.cpu(ext.isas(), ext.known_isas())  # checked, the environment read for what is unset (EngineOptions)
        cores = usable_cores()
        if cpu["threads"] > cores:  # the threads meet at the end of every job: one waiting for a core stalls them all
            warnings.warn(f"CpuEngine: threads={cpu['threads']} on {cores} usable cores; each step waits for threads "
                          f"that have no core to run on (64 on 2 cores ran 6.5-7.5x slower than 2): use threads <= "
                          f"{cores}", RuntimeWarning, stacklevel=2)
        self._init_contract(cfg, max_seq, cpu["max_rows"], cpu["max_seqs"])
        self.device = torch.device("cpu")
        if not isinstance(weights, CpuWeights):
            weights = CpuWeights(cfg, weights)
        elif weights.cfg != cfg:
            raise ValueError("CpuWeights were packed for another model config")
        self.packed = weights
        kv, free = ext.kv_cache_bytes(weights._w, self.max_seq, self.max_seqs), ext.available_memory()
        if kv > free:  # before the RoPE tables of max_seq rows are built
            seqs = "" if self.max_seqs == 1 else f"{self.max_seqs} sequences x "
            raise MemoryError(f"KV cache of {seqs}max_seq={self.max_seq} x {cfg.n_layers} layers x {cfg.n_kv_heads} kv "
                              f"heads x head_dim {cfg.head_dim} ({kv / 2**30:.2f} GiB, bf16) does not fit in the "
                              f"{free / 2**30:.2f} GiB of memory available")
        cos, sin = rope_tables(cfg, self.max_seq)
        self._eng = ext.Engine(weights._w, cos, sin, max_seq=self.max_seq, max_rows=self.max_rows,
                               prefill_chunk=cpu["prefill_chunk"], threads=cpu["threads"], isa=cpu["isa"],
                               max_seqs=self.max_seqs)
        self.prefill_chunk = self._eng.prefill_chunk
        self.schedule = cpu["schedule"]
        self._eng.set_schedule(*self.schedule)

    # ---- sizes ------------------------------------------------------------------------------------------------------
    @property
    def isa(self) -> str:
        """The kernel path in use: avx512bf16, avx512, avx2, neon or portable (all compute the same bits)."""
        return self._eng.isa

    @property
    def threads(self) -> int:
        return self._eng.threads

    # ---- readbacks (the compute hooks, heads and test copies: NativeEngine) ------------------------------------------
    def final_logits(self, first_pos: int, last_pos: int) -> torch.Tensor:
        """fp32 logits [rows, vocab] of rows at depth L: the native LM head's, rounded to bf16 as the CUDA kernel's."""
        self._rows(first_pos, last_pos, self.n_layers)
        _, logits = self._eng.final(self.seq, first_pos, last_pos, logits=True)
        return check_finite_logits(logits, first_pos, last_pos)

    def final(self, first_pos: int, last_pos: int, sampling=None) -> list[int]:
        """Tokens of rows at depth L: greedy (ties go to the lowest token id), or drawn by `sampling` for positions
        row + 1 from the bf16-rounded logits (adadecode.engines.sampling: the CUDA epilogue's rule, bit for bit)."""
        self._rows(first_pos, last_pos, self.n_layers)
        tokens, _ = self._eng.final(self.seq, first_pos, last_pos, sampling=_rule(sampling))
        if min(tokens) < 0:
            raise FloatingPointError(f"non-finite {'tempered ' if sampling else ''}logits at rows {first_pos}..{last_pos}")
        return tokens

    def _final_batch(self, items: list[tuple]) -> list[list[int]]:
        """One LM-head job over every item's rows; a sampled item's tokens drawn in C++ at its own positions by its
        own rule, as final draws them."""
        rules = [_rule(sampling) for *_, sampling in items]
        tokens, _ = self._eng.final_batch([(seq, a, b) for seq, a, b, _ in items],
                                          sampling=rules if any(r is not None for r in rules) else None)
        out, r = [], 0
        for seq, a, b, sampling in items:
            n = b - a + 1
            got = tokens[r:r + n]
            if min(got) < 0:
                raise FloatingPointError(f"non-finite {'tempered ' if sampling else ''}logits at rows {a}..{b}")
            out.append(list(got))
            r += n
        return out

    def _head_tensors(self, layer, T, ids, w_rest):
        return layer, _bf16(T), None if ids is None else ids.to(torch.int32).contiguous(), \
            None if w_rest is None else _bf16(w_rest)

    def head(self, pos: int, head_index: int, sampling=None) -> tuple[int, float]:
        """(token, confidence) of head `head_index` on row `pos`, which must be at that head's layer; with `sampling`
        the token is the head's own draw for position pos + 1 (over its real tokens, as TorchEngine.head)."""
        hd, head_index = self._head_call(pos, head_index)
        token, prob, _ = self._eng.head(self.seq, pos, head_index, sampling=_rule(sampling))
        return self._head_result(token, prob, pos, hd)
