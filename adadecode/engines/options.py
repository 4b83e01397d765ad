"""EngineOptions: every option of an engine in one object, read from the environment in one place, checked once.

The faces (the CLI's flags, `adadecode.LLM(...)`, the server through the CLI) build an EngineOptions and hand it down
to `make_engine`, which builds the engine it names; an engine built directly (CpuEngine(..., threads=2)) builds one
from its keyword arguments. Each field is checked when the object is made, and a bad value is a BadOption naming
the field (or the environment variable it came from); the native code keeps only the bounds that keep its memory
accesses safe.

    engine         auto | cuda | cpu | torch | emu (docs/design.md#engines)
    device, dtype  the torch engine's (the CPU engine runs on the CPU in bf16: anything else is refused by name)
    threads        the CPU engine's pool: 1..1024; None: $ADADECODE_CPU_THREADS, else the cores this process may use
    isa            the CPU engine's kernel path: avx512bf16 | avx512 | avx2 | neon | portable; None: $ADADECODE_CPU_ISA, else the best
    schedule       the CPU pool's test schedule: natural | reverse | shuffle[:seed]; None: $ADADECODE_CPU_SCHEDULE
    max_rows       rows in flight the engine holds per sequence (default 16; at most 256 on the CPU, 16 on CUDA)
    max_seqs       sequences the engine holds, each with its own KV cache and rows in flight (default 1; the KV
                   memory grows with it: engines/contract.py, "Sequences")
    prefill_chunk  rows per prefill step (default 64 on the CPU, at most 1024; 256 on CUDA)
"""
from __future__ import annotations

import dataclasses
import os

import torch

from ..errors import BadOption

ENGINES = ("auto", "cuda", "cpu", "torch", "emu")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
ISAS = ("avx512bf16", "avx512", "avx2", "neon", "portable")
SCHEDULES = ("natural", "reverse", "shuffle")
ENV = {"threads": "ADADECODE_CPU_THREADS", "isa": "ADADECODE_CPU_ISA", "schedule": "ADADECODE_CPU_SCHEDULE"}
MAX_THREADS = 1024
DEFAULT_MAX_ROWS = 16
# per engine kind: (the most rows in flight, the prefill chunk's default, its most)
LIMITS = {"cpu": (256, 64, 1024), "cuda": (16, 256, None)}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_schedule(spec: str | None, what: str = "schedule") -> tuple[str, int]:
    """(schedule, seed) of a pool schedule spec: "natural", "reverse" or "shuffle[:seed]"; None reads
    ADADECODE_CPU_SCHEDULE (unset: natural). A bad spec is a BadOption naming `what` (or the variable)."""
    if spec is None:
        spec, what = os.environ.get(ENV["schedule"]) or "natural", ENV["schedule"]
    name, _, seed = str(spec).partition(":")
    if name not in SCHEDULES or (seed and (name != "shuffle" or not seed.isdigit())):
        raise BadOption(f"{what}={spec!r} must be one of natural, reverse, shuffle[:seed]", param=what)
    return name, int(seed or 0)


def default_threads() -> int:
    """$ADADECODE_CPU_THREADS, else the cores this process may use."""
    env = os.environ.get(ENV["threads"])
    if env:
        try:
            n = int(env)
        except ValueError:
            raise BadOption(f"{ENV['threads']}={env!r} is not an integer", param=ENV["threads"]) from None
        if n < 1:
            raise BadOption(f"{ENV['threads']}={env!r} must be >= 1", param=ENV["threads"])
        return n
    return usable_cores()


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class EngineOptions:
    engine: str = "auto"
    device: str | None = None
    dtype: str | None = None
    threads: int | None = None
    isa: str | None = None
    schedule: str | None = None
    max_rows: int | None = None
    prefill_chunk: int | None = None
    max_seqs: int | None = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise BadOption(f"engine must be one of {', '.join(map(repr, ENGINES))}, got {self.engine!r}", param="engine")
        if self.threads is not None and (not _is_int(self.threads) or not 1 <= self.threads <= MAX_THREADS):
            raise BadOption(f"threads={self.threads!r} must be an integer in 1..{MAX_THREADS}", param="threads")
        if self.isa is not None and not isinstance(self.isa, str):
            raise BadOption(f"isa must be one of {', '.join(ISAS)}, got {self.isa!r}", param="isa")
        if self.schedule is not None:
            parse_schedule(self.schedule)
        if self.max_rows is not None and (not _is_int(self.max_rows) or self.max_rows < 1):
            raise BadOption(f"max_rows={self.max_rows!r} must be an integer >= 1", param="max_rows")
        if self.prefill_chunk is not None and (not _is_int(self.prefill_chunk) or self.prefill_chunk < 1):
            raise BadOption(f"prefill_chunk must be an integer >= 1, got {self.prefill_chunk!r}", param="prefill_chunk")
        if self.max_seqs is not None and (not _is_int(self.max_seqs) or self.max_seqs < 1):
            raise BadOption(f"max_seqs must be an integer >= 1, got {self.max_seqs!r}", param="max_seqs")

    def replace(self, **changes) -> "EngineOptions":
        return dataclasses.replace(self, **changes)

    # ---- what one engine kind takes: its bounds, the environment's values for what is left unset -----------------
    def rows(self, kind: str) -> int:
        """max_rows for an engine of `kind` (cpu, cuda/emu, torch), within that engine's bound."""
        rows = DEFAULT_MAX_ROWS if self.max_rows is None else self.max_rows
        most = LIMITS.get("cuda" if kind == "emu" else kind, (None,))[0]
        if most is not None and not 1 <= rows <= most:
            why = " (its batch-invariant skinny GEMM takes at most 16 rows)" if most == 16 else ""
            raise BadOption(f"max_rows={rows!r} must be an integer in 1..{most} for the "
                            f"{'CPU' if kind == 'cpu' else 'CUDA'} engine{why}", param="max_rows")
        return rows

    def seqs(self) -> int:
        """max_seqs, 1 when unset (any engine kind: the memory check of its KV caches is the engine's)."""
        return 1 if self.max_seqs is None else self.max_seqs

    def chunk(self, kind: str) -> int:
        """prefill_chunk for an engine of `kind`, its default when unset."""
        _, default, most = LIMITS["cuda" if kind == "emu" else kind]
        chunk = default if self.prefill_chunk is None else self.prefill_chunk
        if most is not None and chunk > most:
            raise BadOption(f"prefill_chunk must be an integer in 1..{most}, got {chunk!r}", param="prefill_chunk")
        return chunk

    def cpu(self, available_isas, known_isas=()) -> dict:
        """The CPU engine's settings, the environment read for what is unset: threads, isa ('' = the best of
        `available_isas`; one not among `known_isas` is unknown, not missing), schedule (name, seed), max_rows,
        prefill_chunk."""
        if self.dtype not in (None, "bf16", "bfloat16"):
            raise BadOption(f"the CPU engine computes in bf16 (fp32 accumulation); dtype={self.dtype!r} is the torch "
                            f"engine's option", param="dtype")
        if self.device not in (None, "cpu"):
            raise BadOption(f"the CPU engine runs on the CPU; device={self.device!r} is the torch engine's option",
                            param="device")
        isa, what = self.isa, "isa"
        if isa is None:
            isa, what = os.environ.get(ENV["isa"]) or "", ENV["isa"]
        if isa and known_isas and isa not in known_isas:  # a typo is not a missing CPU feature: say which it is
            named = f" ({what})" if what != "isa" else ""
            raise BadOption(f"CPU engine: unknown kernels '{isa}'{named}; the kernel paths are {', '.join(known_isas)} "
                            f"(this CPU runs: {', '.join(available_isas)})", param=what)
        if isa and isa not in available_isas:
            raise BadOption(f"CPU engine: kernels '{isa}' do not run on this CPU (it runs: {', '.join(available_isas)})",
                            param=what)
        return dict(threads=default_threads() if self.threads is None else self.threads, isa=isa,
                    schedule=parse_schedule(self.schedule), max_rows=self.rows("cpu"), prefill_chunk=self.chunk("cpu"),
                    max_seqs=self.seqs())

    def torch_dtype(self, device: str) -> torch.dtype:
        dtype = self.dtype or ("bf16" if device.startswith("cuda") else "fp32")
        if dtype not in DTYPES:
            raise BadOption(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}", param="dtype")
        return DTYPES[dtype]
