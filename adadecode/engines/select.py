"""Choosing an engine: `cuda` (adadecode_cuda, the product on an NVIDIA GPU), `cpu` (adadecode_cpu, the product on
a CPU), `torch` (the reference, CPU or GPU) or `emu` (the CUDA engine on the emulated device of adadecode_emu: the
CPU, for tests without a GPU). `auto` takes cuda where it can run, else cpu, else torch.

Why an engine cannot run here is said by the engine's own module (cuda.py: `cuda_unavailable_reason`,
`emu_unavailable_reason`; cpu.py: `cpu_unavailable_reason`), so that an engine built directly refuses with the same
words; this module imports the engines, never the other way round. The options (EngineOptions) are checked where
they are made and handed to the engine whole."""
from __future__ import annotations

import torch

from ..errors import BadOption
from ..model.loader import Model
from .cpu import CpuEngine, CpuWeights, cpu_unavailable_reason
from .cuda import CudaEngine, cuda_unavailable_reason
from .options import DTYPES, ENGINES, EngineOptions  # noqa: F401 (ENGINES, DTYPES: the names the faces offer)
from .torch import TorchEngine


def auto_engine() -> str:
    """The engine `auto` picks here: cuda where it can run, else cpu where it is built, else torch."""
    if cuda_unavailable_reason() is None:
        return "cuda"
    return "cpu" if cpu_unavailable_reason() is None else "torch"


def make_engine(model: Model, engine: str | EngineOptions = "auto", *, max_seq: int | None = None,
                max_rows: int | None = None, **options):
    """An engine for `model`, of the options `engine` (an EngineOptions, or its `engine` field with the others as
    keyword arguments: device, dtype, threads, isa, schedule, prefill_chunk, max_seqs); max_rows overrides the
    options'.
    cpu: the weights are packed once per model (Model.cpu_weights() keeps the pack, so an engine rebuilt for a
    longer context reuses it)."""
    opts = engine if isinstance(engine, EngineOptions) else EngineOptions(engine=engine, **options)
    if isinstance(engine, EngineOptions) and options:
        opts = opts.replace(**options)
    if max_rows is not None:
        opts = opts.replace(max_rows=max_rows)
    kind = auto_engine() if opts.engine == "auto" else opts.engine
    if (opts.max_seqs or 1) > 1 and kind == "cuda":  # its sequences run on the emulated device; no GPU check yet
        raise BadOption(f"max_seqs={opts.max_seqs}: the cuda engine holds one sequence here (its sequences are checked "
                        f"on the emulated device only: engine='emu'); use engine='torch' or 'cpu'", param="max_seqs")
    if kind == "cpu":
        return CpuEngine(model.cfg, cpu_weights(model), max_seq=max_seq, options=opts)
    if kind == "cuda":
        why = cuda_unavailable_reason()
        if why:
            raise RuntimeError(f"the CUDA engine cannot run: {why}")
        return CudaEngine(model.cfg, model.weights, max_seq=max_seq, options=opts.replace(device=None))  # the torch
        # engine's device and dtype do not apply: the CUDA engine runs on the current device, in bf16
    if kind == "emu":
        return CudaEngine(model.cfg, model.weights, max_seq=max_seq, options=opts.replace(device="emu"))
    device = opts.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return TorchEngine(model.cfg, model.weights, device=device, dtype=opts.torch_dtype(device), max_seq=max_seq,
                       max_rows=opts.rows("torch"), max_seqs=opts.seqs())


def cpu_weights(model: Model) -> CpuWeights:
    """The model's weights packed for the CPU engine, packed on first use and kept with the model."""
    packed = getattr(model, "_cpu_weights", None)
    if packed is None:
        packed = CpuWeights(model.cfg, model.weights)
        model._cpu_weights = packed
    return packed
