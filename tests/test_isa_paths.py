"""The run's report of the CPU engine paths it tested (tests/isa_paths.py, issue 32 item 7) cannot be fooled: a run of
path tests in which one path's test is skipped fails and names the path; the same run with every path passing, or
narrowed by -k, passes. Each case is a pytest subprocess over a scratch copy of conftest.py and isa_paths.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

adadecode_cpu = pytest.importorskip("adadecode_cpu", reason="adadecode_cpu is not built (see README)")
HERE = Path(__file__).resolve().parent

FAKE = '''
import os
import pytest
import torch
import adadecode_cpu


@pytest.mark.parametrize("isa", adadecode_cpu.isas())
def test_path(isa):
    if isa == os.environ.get("SKIP_PATH"):
        pytest.skip("this path is skipped")
    adadecode_cpu.testing.lane_dot(torch.zeros(1, 8), torch.zeros(1, 8, dtype=torch.bfloat16), isa)
'''


def run(tmp_path: Path, skip: str, *args: str) -> tuple[int, str]:
    for name in ("conftest.py", "isa_paths.py"):
        shutil.copy2(HERE / name, tmp_path / name)
    (tmp_path / "test_fake_paths.py").write_text(FAKE)
    env = dict(os.environ, SKIP_PATH=skip, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                        "--rootdir", str(tmp_path), *args, str(tmp_path / "test_fake_paths.py")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return r.returncode, r.stdout + r.stderr


def test_a_skipped_path_fails_the_run_and_is_named(tmp_path):
    isas = adadecode_cpu.isas()
    rc, out = run(tmp_path, isas[-1])
    assert rc == 1 and f"NOT TESTED: {isas[-1]} -- the run fails" in out, out
    assert "1 skipped" in out


def test_every_path_passing_passes_and_is_reported(tmp_path):
    rc, out = run(tmp_path, "")
    assert rc == 0, out
    tested = ", ".join(f"{isa} (1 passing tests)" for isa in adadecode_cpu.isas())
    assert f"CPU engine paths tested: {tested}" in out, out


def test_a_narrowed_run_only_reports(tmp_path):
    isas = adadecode_cpu.isas()
    rc, out = run(tmp_path, "", "-k", isas[-1])  # the last (portable): no other path's name contains it
    assert rc == 0, out
    if len(isas) > 1:
        assert f"not tested: {', '.join(isas[:-1])} (not enforced: the run is narrowed by -k or test ids)" in out, out
