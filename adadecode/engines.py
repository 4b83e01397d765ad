"""Choosing an engine: `torch` (the reference, CPU or GPU), `cuda` (adadecode_cuda, the product) or `emu` (the
same CUDA engine on the emulated device of adadecode_emu: the CPU, for tests without a GPU)."""
from __future__ import annotations

import torch

from .model.loader import Model
from .torch_engine import TorchEngine

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def cuda_unavailable_reason() -> str | None:
    """Why the CUDA engine cannot run here, or None when it can."""
    try:
        import adadecode_cuda  # noqa: F401
    except ImportError as e:
        return (f"the extension adadecode_cuda is not built or does not load ({e}); it needs nvcc and a CUDA build "
                f"of torch at install time (see README)")
    if not torch.cuda.is_available():
        return f"no CUDA GPU is visible to torch {torch.__version__} (CUDA {torch.version.cuda})"
    if not hasattr(adadecode_cuda, "Engine"):
        return "this build of adadecode_cuda has no Engine (rebuild: pip install --no-build-isolation -e .)"
    return None


def emu_unavailable_reason() -> str | None:
    """Why the CUDA engine cannot run on the emulated device here, or None when it can."""
    try:
        import adadecode_emu
    except ImportError as e:
        return (f"the extension adadecode_emu is not built or does not load ({e}); `pip install --no-build-isolation "
                f"-e .` builds it with g++ wherever torch is installed (see README)")
    if not hasattr(adadecode_emu, "Engine"):
        return "this build of adadecode_emu has no Engine (rebuild: pip install --no-build-isolation -e .)"
    return None


def make_engine(model: Model, engine: str = "auto", *, device: str | None = None, dtype: str | None = None,
                max_seq: int | None = None, max_rows: int = 16):
    if engine == "auto":
        engine = "cuda" if cuda_unavailable_reason() is None else "torch"
    if engine == "cuda":
        why = cuda_unavailable_reason()
        if why:
            raise RuntimeError(f"the CUDA engine cannot run: {why}")
        from .cuda_engine import CudaEngine

        return CudaEngine(model.cfg, model.weights, max_seq=max_seq, max_rows=max_rows)
    if engine == "emu":
        from .cuda_engine import CudaEngine

        return CudaEngine(model.cfg, model.weights, max_seq=max_seq, max_rows=max_rows, device="emu")
    if engine != "torch":
        raise ValueError(f"engine must be 'auto', 'cuda', 'emu' or 'torch', got {engine!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bf16" if device.startswith("cuda") else "fp32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return TorchEngine(model.cfg, model.weights, device=device, dtype=DTYPES[dtype], max_seq=max_seq, max_rows=max_rows)
