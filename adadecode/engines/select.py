"""Choosing an engine: `cuda` (adadecode_cuda, the product on an NVIDIA GPU), `cpu` (adadecode_cpu, the product on
a CPU), `torch` (the reference, CPU or GPU) or `emu` (the CUDA engine on the emulated device of adadecode_emu: the
CPU, for tests without a GPU). `auto` takes cuda where it can run, else cpu, else torch.

Why an engine cannot run here is said by the engine's own module (cuda.py: `cuda_unavailable_reason`,
`emu_unavailable_reason`; cpu.py: `cpu_unavailable_reason`), so that an engine built directly refuses with the same
words; this module imports the engines, never the other way round."""
from __future__ import annotations

import torch

from ..model.loader import Model
from .cpu import CpuEngine, CpuWeights, cpu_unavailable_reason
from .cuda import CudaEngine, cuda_unavailable_reason
from .torch import TorchEngine

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


ENGINES = ("auto", "cuda", "cpu", "torch", "emu")


def auto_engine() -> str:
    """The engine `auto` picks here: cuda where it can run, else cpu where it is built, else torch."""
    if cuda_unavailable_reason() is None:
        return "cuda"
    return "cpu" if cpu_unavailable_reason() is None else "torch"


def make_engine(model: Model, engine: str = "auto", *, device: str | None = None, dtype: str | None = None,
                max_seq: int | None = None, max_rows: int = 16, threads: int | None = None):
    """An engine for `model`. cpu: the weights are packed once per model (Model.cpu_weights() keeps the pack, so an
    engine rebuilt for a longer context reuses it); threads: the CPU engine's thread count (default: the cores)."""
    if engine == "auto":
        engine = auto_engine()
    if engine == "cpu":
        if dtype not in (None, "bf16", "bfloat16"):
            raise ValueError(f"the CPU engine computes in bf16 (fp32 accumulation); dtype={dtype!r} is the torch "
                             f"engine's option")
        if device not in (None, "cpu"):
            raise ValueError(f"the CPU engine runs on the CPU; device={device!r} is the torch engine's option")
        return CpuEngine(model.cfg, cpu_weights(model), max_seq=max_seq, max_rows=max_rows, threads=threads)
    if engine == "cuda":
        why = cuda_unavailable_reason()
        if why:
            raise RuntimeError(f"the CUDA engine cannot run: {why}")
        return CudaEngine(model.cfg, model.weights, max_seq=max_seq, max_rows=max_rows)
    if engine == "emu":
        return CudaEngine(model.cfg, model.weights, max_seq=max_seq, max_rows=max_rows, device="emu")
    if engine != "torch":
        raise ValueError(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {engine!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return TorchEngine(model.cfg, model.weights, device=device, dtype=DTYPES[dtype], max_seq=max_seq, max_rows=max_rows)


def cpu_weights(model: Model) -> CpuWeights:
    """The model's weights packed for the CPU engine, packed on first use and kept with the model."""
    packed = getattr(model, "_cpu_weights", None)
    if packed is None:
        packed = CpuWeights(model.cfg, model.weights)
        model._cpu_weights = packed
    return packed
