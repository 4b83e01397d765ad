"""Which CPU engine kernel paths (AVX-512, AVX2, portable: adadecode_cpu.isas()) this run tested (issue 32, item 7).

Which paths run depends on the host: an AVX2-only machine never runs the AVX-512 path. So the run says which it
tested. The extension's entry points that pick a path (adadecode_cpu.Engine, the kernel probes of adadecode_cpu.testing: lane_dot, fixed_exp,
attn_partials, attn_merge and read_bandwidth) are wrapped here to note the path each call used; a path counts as
tested when a test that used it PASSED (a skipped or failed test counts for nothing). pytest's header names the
paths this CPU runs; a line at the end of the run names those tested, each with its number of passing tests.

Enforced (the run fails when a path this CPU runs was tested by no passing test) when the run holds the CPU path
tests (a test parametrized by `isa`: tests/test_cpu_kernels.py, tests/test_cpu_reference.py) and is not narrowed by
-k or by test ids (`file::test`): then every path must have run, whatever else was selected (the whole suite, a
file, -m exactness). Other runs only report.
"""
from __future__ import annotations

import functools
import os

import pytest

try:
    import adadecode_cpu
except ImportError:  # not built: nothing to report (tests/test_cpu_*.py say so themselves)
    adadecode_cpu = None

SUPPORTED: list[str] = adadecode_cpu.isas() if adadecode_cpu is not None else []
_current: set[str] = set()  # paths used by the test running now (setup and call)
_passed: dict[str, int] = {isa: 0 for isa in SUPPORTED}  # path -> passing tests that used it
_state = {"enforce": False, "why": ""}


def _default_isa() -> str:
    return os.environ.get("ADADECODE_CPU_ISA") or (SUPPORTED[0] if SUPPORTED else "")


def _noting(fn, isa_of):
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        _current.add(isa_of(out, args, kwargs) or _default_isa())
        return out
    return wrapped


def install() -> None:
    """Wrap the entry points once (idempotent)."""
    m = adadecode_cpu
    if m is None or getattr(m, "_isa_paths_installed", False):
        return
    m.Engine = _noting(m.Engine, lambda e, a, kw: e.isa)
    t = m.testing  # the probes' seam (binding.cpp: the testing submodule)
    t.lane_dot = _noting(t.lane_dot, lambda o, a, kw: kw.get("isa", a[2] if len(a) > 2 else ""))
    t.fixed_exp = _noting(t.fixed_exp, lambda o, a, kw: kw.get("isa", a[1] if len(a) > 1 else ""))
    t.read_bandwidth = _noting(t.read_bandwidth, lambda o, a, kw: kw.get("isa", a[3] if len(a) > 3 else ""))
    for name, at in (("attn_partials", 5), ("attn_merge", 4)):  # the attention probes
        if hasattr(t, name):
            isa_of = lambda o, a, kw, at=at: kw.get("isa", a[at] if len(a) > at else "")  # noqa: E731
            setattr(t, name, _noting(getattr(t, name), isa_of))
    m._isa_paths_installed = True


def header() -> str:
    if not SUPPORTED:
        return "CPU engine paths: adadecode_cpu is not built"
    return (f"CPU engine paths this CPU runs: {', '.join(SUPPORTED)} (each must pass a test when the run holds the "
            f"path tests and is not narrowed by -k or test ids)")


def collection_finish(session) -> None:
    items = session.items
    has_path_tests = any("isa" in getattr(getattr(i, "callspec", None), "params", {}) for i in items)
    narrowed = bool(session.config.option.keyword) or any("::" in a for a in session.config.args)
    _state["enforce"] = bool(SUPPORTED) and has_path_tests and not narrowed
    _state["why"] = ("" if _state["enforce"] else
                     "not enforced: " + ("no CPU path tests in this run" if not has_path_tests else
                                         "the run is narrowed by -k or test ids"))


def start_test() -> None:
    _current.clear()


def logreport(report) -> None:
    if report.when == "call" and report.passed:
        for isa in _current:
            if isa in _passed:
                _passed[isa] += 1


def missing() -> list[str]:
    return [isa for isa in SUPPORTED if _passed[isa] == 0]


def session_finish(session) -> None:
    if _state["enforce"] and missing() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def terminal_summary(terminalreporter) -> None:
    if not SUPPORTED:
        return
    tested = ", ".join(f"{isa} ({_passed[isa]} passing tests)" for isa in SUPPORTED if _passed[isa])
    line = f"CPU engine paths tested: {tested or 'none'}"
    gone = missing()
    if gone and _state["enforce"]:
        line += f"; NOT TESTED: {', '.join(gone)} -- the run fails: a path this CPU runs was tested by no passing test"
    elif gone:
        line += f"; not tested: {', '.join(gone)} ({_state['why']})"
    terminalreporter.write_line(line, red=bool(gone and _state["enforce"]), bold=True)
