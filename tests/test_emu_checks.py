"""The checks of the emulated device (csrc/emu) on kernels that break the rules: tests/emu/checks.cu, built here
with emu_pp.py and g++ against csrc/emu alone (no torch, a few seconds), one scenario per run.

Launch limits (threads per block, dynamic shared memory above 48 KB without the attribute), capture rules
(no synchronisation, allocation or legacy-stream work while capturing; a replay uses the captured arguments),
never-written device and shared memory reading as NaN, a warp shuffle that half the warp skips, a read past an
allocation (and the device usable after it), a missing barrier that the thread order exposes, and a kernel launched
as a programmatic dependent (PDL) whose blocks never wait for their predecessor.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EMU = ROOT / "csrc" / "emu"


@pytest.fixture(scope="module")
def checks(tmp_path_factory) -> Path:
    if os.environ.get("ADADECODE_BUILD_EMU") == "0":
        pytest.skip("ADADECODE_BUILD_EMU=0: no emulated-device builds")
    out = tmp_path_factory.mktemp("emu_checks")
    sys.path.insert(0, str(EMU))
    try:
        from emu_pp import preprocess
    finally:
        sys.path.remove(str(EMU))
    src = out / "checks.cu.cpp"
    preprocess(str(ROOT / "tests" / "emu" / "checks.cu"), str(src), shown_as="tests/emu/checks.cu")
    exe = out / "checks"
    cmd = ["g++", "-std=c++20", "-O1", "-ffp-contract=off", "-fno-strict-aliasing", f"-I{EMU}", str(src),
           str(EMU / "emu.cpp"), "-o", str(exe)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return exe


def run(exe: Path, scenario: str) -> str:
    r = subprocess.run([str(exe), scenario], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"{scenario}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_threads_per_block(checks):
    out = run(checks, "threads_per_block")
    assert "1025 threads: cudaErrorInvalidConfiguration" in out and "1024 threads: cudaSuccess" in out


def test_dynamic_shared_memory_needs_the_attribute(checks):
    out = run(checks, "dynamic_smem")
    assert "49168 bytes without the attribute: cudaErrorInvalidValue" in out
    assert "above the kernel's 49152 (cudaFuncAttributeMaxDynamicSharedMemorySize)" in out
    assert "49168 bytes with the attribute: cudaSuccess" in out


def test_capture_rules(checks):
    lines = run(checks, "capture").splitlines()
    verdicts = [ln for ln in lines if not ln.startswith("  ")]
    assert verdicts == [
        "cudaStreamSynchronize while capturing: cudaErrorStreamCaptureUnsupported",
        "cudaStreamEndCapture after it: cudaErrorStreamCaptureInvalidated",
        "cudaMalloc while capturing: cudaErrorStreamCaptureUnsupported",
        "cudaStreamEndCapture after it: cudaErrorStreamCaptureInvalidated",
        "a launch on the legacy stream while capturing: cudaErrorStreamCaptureUnsupported",
        "cudaStreamEndCapture after it: cudaErrorStreamCaptureInvalidated",
    ]


def test_graph_replays_the_captured_arguments(checks):
    out = run(checks, "replay")
    assert "capture: cudaSuccess" in out and "before replay: nan, after replay: 1" in out


def test_unwritten_shared_memory_reads_nan(checks):
    assert "written half: 1, unwritten half: nan" in run(checks, "unwritten_shared")


def test_warp_shuffle_that_half_the_warp_skips(checks):
    out = run(checks, "half_warp_shuffle")
    assert "launch: cudaErrorLaunchFailure" in out, out
    assert "exited while its warp waits" in out or "has exited" in out, out


def test_read_past_an_allocation(checks):
    out = run(checks, "read_past_end")
    assert "launch: cudaErrorLaunchFailure" in out
    assert "0 bytes past the end of a device allocation of 400 bytes, thread (1,0,0) in block (0,0,0)" in out, out
    assert "tests/emu/checks.cu:" in out  # the launch site, in the original file
    assert "next launch: cudaSuccess" in out


def test_missing_barrier_shows_in_some_thread_order(checks):
    out = run(checks, "missing_barrier")
    assert "asc order, barrier 1: 255.000000" in out and "desc order, barrier 1: 255.000000" in out
    assert "asc order, barrier 0: nan" in out  # thread 0 ran before thread 255 wrote


def test_a_programmatic_dependent_must_wait(checks):
    out = run(checks, "pdl")
    assert "a programmatic dependent that waits: cudaSuccess" in out and "its result: 2" in out
    assert "a programmatic dependent that never waits: cudaErrorLaunchFailure" in out
    assert "exited without griddepcontrol.wait" in out
    assert "the same kernel, launched ordinarily: cudaSuccess" in out
