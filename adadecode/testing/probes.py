"""The CPU kernels' probes, which no engine uses: adadecode_cpu.testing (csrc/cpu/binding.cpp) behind Python calls.

    read_bandwidth(threads, mib, reps)   bytes/s of `threads` threads reading `mib` MiB no cache holds: the ceiling of
                                         a decode step, which reads every weight once (the benchmarks measure it)
    fma_peak(threads, reps)              fp32 FMA FLOP/s of `threads` threads: the ceiling of the compute-bound steps
    cpu_probes()                         adadecode_cpu.testing itself: fixed_exp, fixed_exp_scalar, lane_dot,
                                         attn_partials, attn_merge, sample_rows, bf16_dot_fallbacks (tests)
"""
from __future__ import annotations

from ..engines.options import EngineOptions


def cpu_probes():
    """The module adadecode_cpu.testing (a RuntimeError saying why when the CPU engine is not built here)."""
    from ..engines.cpu import cpu_unavailable_reason

    why = cpu_unavailable_reason()
    if why:
        raise RuntimeError(f"the CPU engine's probes cannot run: {why}")
    import adadecode_cpu

    return adadecode_cpu.testing


def fma_peak(threads: int = 1, reps: int = 3) -> float:
    """fp32 FMA FLOP/s of `threads` threads (12 independent FMA chains each on the best kernel path, best of
    `reps`): the ceiling of the compute-bound steps (prefill, several rows), beside read_bandwidth's."""
    threads = EngineOptions(threads=threads).threads
    return float(cpu_probes().fma_peak(threads, reps))


def read_bandwidth(threads: int = 1, mib: int = 1024, reps: int = 5) -> float:
    """Bytes/s of `threads` threads reading `mib` MiB that no cache holds (a STREAM-like sum, best of `reps`): the
    ceiling of a decode step, which reads every weight once. The benchmarks measure it in the same run."""
    threads = EngineOptions(threads=threads).threads  # the pool's range, checked where every thread count is
    return float(cpu_probes().read_bandwidth(mib, threads, reps))
