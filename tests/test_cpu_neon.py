"""The NEON path (csrc/cpu/vec_neon.h) bit for bit against the x86 paths, without ARM hardware: the torch-free kernel
check program (csrc/cpu/tests/kernel_check.cpp: fixed inputs, every kernel, one hash of the output bits per check
and path) is built natively and with Debian's aarch64 cross compiler, the aarch64 binary runs under qemu-user (its
neon and portable paths), and every hash must equal the x86 one (each binary also checks that its own paths agree).

Needs `g++-aarch64-linux-gnu` and `qemu-user` (`make test` installs them where it may run apt-get); skips with the
reason otherwise. The NEON path's speed is measured only where an ARM machine exists (docs/cpu.md)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.exactness

ROOT = Path(__file__).resolve().parent.parent
CPU = ROOT / "csrc" / "cpu"
FLAGS = ["-O2", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", "-Wno-unknown-pragmas", f"-I{ROOT / 'csrc'}"]
X86 = ["kernels_avx512.cpp", "kernels_avx512bf16.cpp", "kernels_avx2.cpp", "kernels_portable.cpp", "dispatch.cpp"]
ARM = ["kernels_neon.cpp", "kernels_portable.cpp", "dispatch.cpp"]
CROSS, QEMU = "aarch64-linux-gnu-g++", "qemu-aarch64"


def build(jobs: list[tuple[str, list[str], Path, list[str]]]) -> None:
    """Each (compiler, sources, output, flags) compiled at once, one process per source (CI has 2 cores)."""
    procs = []
    for cxx, sources, out, extra in jobs:
        objs = []
        for src in ["tests/kernel_check.cpp", *sources]:
            obj = out.parent / f"{out.name}-{Path(src).stem}.o"
            cmd = [cxx, *FLAGS, *extra, "-c", str(CPU / src), "-o", str(obj)]
            procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
            objs.append(str(obj))
        procs.append(([cxx, *extra, *objs, "-o", str(out)], None))
    for cmd, p in procs:
        if p is None:  # a link: after its objects (they come before it in the list)
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, f"{' '.join(cmd)} failed:\n{err[-3000:]}"


def hashes(cmd: list[str]) -> dict[str, str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"{' '.join(cmd)}: its paths disagree (exit {r.returncode}):\n{r.stdout[-3000:]}{r.stderr[-2000:]}"
    out = {}
    for line in r.stdout.splitlines():
        name, h, *per_path = line.split("\t")
        assert all(p.endswith("=" + h) for p in per_path), line
        out[name] = h
    return out


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "amd64"), reason="compares the NEON path with the x86 paths")
def test_neon_path_gives_the_x86_bits(tmp_path):
    missing = [t for t in (CROSS, QEMU, "g++") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt-get install g++-aarch64-linux-gnu qemu-user; "
                    "`make test` does it where it may)")
    x86, arm = tmp_path / "kernel_check_x86", tmp_path / "kernel_check_aarch64"
    build([("g++", X86, x86, []), (CROSS, ARM, arm, ["-static"])])
    want = hashes([str(x86)])
    got = hashes([QEMU, str(arm), "--paths", "neon,portable"])
    assert set(got) == set(want)
    differ = [k for k in want if got[k] != want[k]]
    assert not differ, f"the aarch64 build differs from x86 on: {differ}"
