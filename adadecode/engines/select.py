"""Choosing an engine: `torch` (the reference, CPU or GPU), `cuda` (adadecode_cuda, the product) or `emu` (the
same CUDA engine on the emulated device of adadecode_emu: the CPU, for tests without a GPU).

Why an engine cannot run here is said by the engine's own module (cuda.py: `cuda_unavailable_reason`,
`emu_unavailable_reason`), so that an engine built directly refuses with the same words; this module imports the
engines, never the other way round."""
from __future__ import annotations

import torch

from ..model.loader import Model
from .cuda import CudaEngine, cuda_unavailable_reason
from .torch import TorchEngine

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def make_engine(model: Model, engine: str = "auto", *, device: str | None = None, dtype: str | None = None,
                max_seq: int | None = None, max_rows: int = 16):
    if engine == "auto":
        engine = "cuda" if cuda_unavailable_reason() is None else "torch"
    if engine == "cuda":
        why = cuda_unavailable_reason()
        if why:
            raise RuntimeError(f"the CUDA engine cannot run: {why}")
        return CudaEngine(model.cfg, model.weights, max_seq=max_seq, max_rows=max_rows)
    if engine == "emu":
        return CudaEngine(model.cfg, model.weights, max_seq=max_seq, max_rows=max_rows, device="emu")
    if engine != "torch":
        raise ValueError(f"engine must be 'auto', 'cuda', 'emu' or 'torch', got {engine!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return TorchEngine(model.cfg, model.weights, device=device, dtype=DTYPES[dtype], max_seq=max_seq, max_rows=max_rows)
