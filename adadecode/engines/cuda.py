"""CudaEngine: the engine contract (docs/design.md#contract) on the CUDA kernels, through the C++ runtime of adadecode_cuda.

The same Python API and semantics as TorchEngine (the oracle): prefill, embed, run_layers, head, final,
final_logits, set_heads, truncate, hidden. The host-side bookkeeping (which rows are in flight, at which depth,
how much of each layer's cache is valid) and the contract checks live here, with TorchEngine's messages; the
compute runs in `adadecode_cuda.Engine` (csrc/cuda/runtime/engine.cu):

* weights go to the GPU once, in bf16 (q/k/v fused into one [q; k; v] matrix per layer); one KV cache and one
  workspace are allocated for `max_seq` up front (MemoryError naming the sizes when they do not fit);
* `run_layers` is one replay of a CUDA graph captured per (rows, l0, l1), the positions in device memory;
* `final` and `head` read back only their (token, confidence) pairs;
* `prefill` runs the tensor-core GEMMs in chunks of `prefill_chunk` rows; `prefill(tokens, start)` continues a
  prompt in the cache, with the bits of one call when the pieces are whole chunks (decoding/batch.py cuts them so);
* `max_seqs` sequences, each with its own KV cache region and ring of rows (csrc/cuda/runtime/engine.h): `run_batch`
  launches layer by layer over the rows of every segment that runs the layer (the GEMMs over all of them, attention
  per sequence), `final_batch` one LM head over every greedy item's rows and a launch per sampled item.

`device="emu"` runs the same C++ runtime and kernels on the emulated device (`adadecode_emu`, csrc/emu: the CUDA
execution model on the CPU, for CI): its memory is guarded host memory, so its tensors are CPU tensors.

Batch invariance (docs/design.md#invariance): every kernel of `run_layers` computes a row's bits independently of the other
rows of the call (skinny GEMM for <= 16 rows, split-sequence attention with fixed chunks), so `max_rows` is at
most 16.
"""
from __future__ import annotations

import contextlib
import math

import torch

from ..model.config import LlamaConfig
from ..model.math import rope_tables
from ..model.weights import LlamaWeights
from .options import DEFAULT_MAX_ROWS, LIMITS, EngineOptions
from .native import NativeEngine, check_finite_logits, family_args, model_dims

MAX_ROWS = LIMITS["cuda"][0]  # the batch-invariant skinny GEMM takes at most 16 rows


def _dev(t: torch.Tensor, device: torch.device, dtype: torch.dtype = torch.bfloat16, ext=None) -> torch.Tensor:
    """`t` on `device` in `dtype`, contiguous and 16-byte aligned (what the kernels read with 16-byte loads).
    With `ext` = adadecode_emu: a copy in the emulated device's (guarded) memory."""
    if ext is not None:
        return ext.empty(list(t.shape), dtype).copy_(t.detach())
    t = t.detach().to(device=device, dtype=dtype).contiguous()
    if t.data_ptr() % 16:
        t = t.clone()
    return t


def _without_engine(ext) -> str | None:
    """Why a loaded extension cannot run the engine: a build of it without the Engine class."""
    if hasattr(ext, "Engine"):
        return None
    return f"this build of {ext.__name__} has no Engine (rebuild: pip install --no-build-isolation -e .)"


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA engine cannot run here, or None when it can."""
    try:
        import adadecode_cuda
    except ImportError as e:
        return (f"the extension adadecode_cuda is not built or does not load ({e}); it needs nvcc and a CUDA build "
                f"of torch at install time (see README)")
    if not torch.cuda.is_available():
        return f"no CUDA GPU is visible to torch {torch.__version__} (CUDA {torch.version.cuda})"
    return _without_engine(adadecode_cuda)


def emu_unavailable_reason() -> str | None:
    """Why the CUDA engine cannot run on the emulated device here, or None when it can."""
    try:
        import adadecode_emu
    except ImportError as e:
        return (f"the extension adadecode_emu is not built or does not load ({e}); `pip install --no-build-isolation "
                f"-e .` builds it with g++ wherever torch is installed (see README)")
    return _without_engine(adadecode_emu)


def check_supported(cfg: LlamaConfig, max_rows: int) -> None:
    """The shapes the kernels take; a clear ValueError naming the field otherwise."""
    if cfg.head_dim not in (64, 128):
        raise ValueError(f"the CUDA engine supports head_dim 64 or 128, this model has {cfg.head_dim}")
    if cfg.d % 8:
        raise ValueError(f"the CUDA engine needs hidden_size % 8 == 0, this model has {cfg.d}")
    if cfg.ffn_dim % 8:
        raise ValueError(f"the CUDA engine needs intermediate_size % 8 == 0, this model has {cfg.ffn_dim}")
    if cfg.n_heads // cfg.n_kv_heads > 128:
        raise ValueError(f"the CUDA engine supports at most 128 query heads per KV head, this model has "
                         f"{cfg.n_heads // cfg.n_kv_heads}")
    EngineOptions(max_rows=max_rows).rows("cuda")


def _sampling_kw(s) -> dict:
    """adadecode.engines.sampling.Sampling -> the binding's sampling=(seed, inv_temperature, top_k, top_p);
    greedy: none."""
    return {} if s is None else {"sampling": (s.seed, s.inv_temperature, s.top_k, s.top_p)}


class CudaEngine(NativeEngine):
    name = "cuda"

    def __init__(self, cfg: LlamaConfig, weights: LlamaWeights, *, max_seq: int | None = None,
                 max_rows: int | None = None, prefill_chunk: int | None = None,
                 device: str | torch.device | None = None, max_seqs: int | None = None,
                 options: EngineOptions | None = None):
        opts = options or EngineOptions(engine="cuda")
        given = dict(max_rows=max_rows, prefill_chunk=prefill_chunk, device=None if device is None else str(device),
                     max_seqs=max_seqs)
        opts = opts.replace(**{k: v for k, v in given.items() if v is not None})
        device = opts.device
        if str(device) == "emu":  # the emulated device: adadecode_emu, CPU tensors
            why = emu_unavailable_reason()
            if why:
                raise RuntimeError(f"the emulated CUDA engine cannot run: {why}")
            import adadecode_emu as ext

            self.name, self.device, self._ext = "emu", torch.device("cpu"), ext
            on_device = contextlib.nullcontext()
        else:
            why = cuda_unavailable_reason()
            if why:
                raise RuntimeError(f"the CUDA engine cannot run: {why}")
            import adadecode_cuda as ext

            self.device = torch.device(device or f"cuda:{torch.cuda.current_device()}")
            if self.device.type != "cuda":
                raise ValueError(f"the CUDA engine runs on a CUDA device (or device='emu'), got {self.device}")
            if self.device.index is None:
                self.device = torch.device(f"cuda:{torch.cuda.current_device()}")
            self._ext = None
            on_device = torch.cuda.device(self.device)
        max_rows = DEFAULT_MAX_ROWS if opts.max_rows is None else opts.max_rows
        check_supported(cfg, max_rows)  # the shapes, then max_rows
        prefill_chunk = opts.chunk("cuda")
        self._init_contract(cfg, max_seq, max_rows, opts.seqs())
        self.prefill_chunk = prefill_chunk

        put = self._put
        with on_device:
            embed = put(weights.embed)
            lm_head = embed if weights.lm_head is weights.embed else put(weights.lm_head)
            norm = put(weights.norm)
            layers = []
            for lw in weights.layers:  # one layer at a time: the peak is one extra fused qkv
                wqkv = put(torch.cat([put(lw.wq), put(lw.wk), put(lw.wv)], dim=0))
                layers.append([put(lw.attn_norm), wqkv, put(lw.wo), put(lw.mlp_norm),
                               put(lw.w_gate), put(lw.w_up), put(lw.w_down)])
            fam = family_args(cfg, weights, put)  # Qwen2 biases, Qwen3 head norms, a sliding window
            cos, sin = rope_tables(cfg, self.max_seq)
            cos, sin = put(cos, torch.float32), put(sin, torch.float32)
            # the LM head for final_logits (the runtime holds raw pointers into all of these: kept alive by it)
            self._lm_head = lm_head
            if self._ext is None:
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()  # the runtime allocates with cudaMalloc, outside torch's cache
            self._eng = ext.Engine(
                **model_dims(cfg), embed=embed, norm=norm, lm_head=lm_head, layers=layers, cos=cos, sin=sin,
                max_seq=self.max_seq, max_rows=self.max_rows, prefill_chunk=prefill_chunk, max_seqs=self.max_seqs, **fam)

    @classmethod
    def _with_backend(cls, cfg: LlamaConfig, backend, *, max_seq: int, max_rows: int = 16,
                      device: str = "cpu", max_seqs: int = 1) -> "CudaEngine":
        """The host-side contract over any object with adadecode_cuda.Engine's methods (tests without a GPU)."""
        e = cls.__new__(cls)
        e._init_contract(cfg, max_seq, max_rows, max_seqs)
        e.device, e._eng, e._lm_head, e._ext = torch.device(device), backend, None, None
        e.prefill_chunk = LIMITS["cuda"][1]
        return e

    def _put(self, t: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """`t` in the engine's device memory (16-byte aligned, contiguous)."""
        return _dev(t, self.device, dtype, self._ext)

    # ---- sizes and switches -------------------------------------------------------------------------------------
    @property
    def workspace_bytes(self) -> int:
        return self._eng.workspace_bytes

    @property
    def n_graphs(self) -> int:
        """CUDA graphs captured so far (run_layers per (rows, l0, l1); final and head launch eagerly)."""
        return self._eng.n_graphs

    @property
    def use_graphs(self) -> bool:
        return self._eng.use_graphs

    @use_graphs.setter
    def use_graphs(self, on: bool) -> None:
        """False launches every kernel eagerly (same kernels and arguments as the graphs: the same bits)."""
        self._eng.use_graphs = bool(on)

    @property
    def fused(self) -> bool:
        return self._eng.fused

    @fused.setter
    def fused(self, on: bool) -> None:
        """False runs the unfused kernels (9 launches per decode layer instead of 5): the same bits, the reference
        that the fused kernels are tested against."""
        self._eng.fused = bool(on)

    @property
    def pdl(self) -> bool:
        """Whether the fused launches are programmatic dependent launches (sm_90+, ADADECODE_PDL != 0)."""
        return self._eng.pdl

    def synchronize(self) -> None:
        self._eng.synchronize()

    # ---- readbacks (the compute hooks, heads and test copies: NativeEngine) ------------------------------------------
    def final_logits(self, first_pos: int, last_pos: int) -> torch.Tensor:
        """fp32 logits [rows, vocab] of rows at depth L (final norm on the GPU kernels, LM head by torch)."""
        self._rows(first_pos, last_pos, self.n_layers)
        x = self._eng.final_normed(self.seq, first_pos, last_pos)
        return check_finite_logits((x @ self._lm_head.T).float(), first_pos, last_pos)

    def final(self, first_pos: int, last_pos: int, sampling=None) -> list[int]:
        """Tokens of rows at depth L: greedy (ties go to the lowest token id), or drawn by `sampling`
        (adadecode.engines.sampling.Sampling) for positions row + 1, in the LM-head kernel's epilogue."""
        self._rows(first_pos, last_pos, self.n_layers)
        tokens, probs = self._eng.final(self.seq, first_pos, last_pos, **_sampling_kw(sampling))
        if not all(math.isfinite(p) for p in probs) or min(tokens) < 0:
            raise FloatingPointError(f"non-finite logits at rows {first_pos}..{last_pos}")
        return tokens

    def _final_batch(self, items: list[tuple]) -> list[list[int]]:
        """One binding call: the greedy items' rows in LM-head launches of up to 16 rows, each sampled item's in its
        own launch (the kernel's epilogue draws them), one read-back."""
        tokens, probs = self._eng.final_batch([(seq, a, b, _sampling_kw(s).get("sampling")) for seq, a, b, s in items])
        out, r = [], 0
        for seq, a, b, _ in items:
            n = b - a + 1
            got, p = tokens[r:r + n], probs[r:r + n]
            if not all(math.isfinite(x) for x in p) or min(got) < 0:
                raise FloatingPointError(f"non-finite logits at rows {a}..{b}")
            out.append(list(got))
            r += n
        return out

    def _head_tensors(self, layer, T, ids, w_rest):
        return layer, self._put(T), None if ids is None else self._put(ids, torch.int32), \
            None if w_rest is None else self._put(w_rest)

    def head(self, pos: int, head_index: int, sampling=None) -> tuple[int, float]:
        """(token, confidence) of head `head_index` on row `pos`, which must be at that head's layer; with
        `sampling` the token is the head's own draw for position pos + 1 (as TorchEngine.head)."""
        hd, head_index = self._head_call(pos, head_index)
        token, prob = self._eng.head(self.seq, pos, head_index, **_sampling_kw(sampling))
        return self._head_result(token, prob, pos, hd)
