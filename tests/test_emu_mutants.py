"""The emulated-device suite catches broken kernels: a copy of the project with deliberately broken kernels
(a dropped barrier, a missing cp.async wait, an off-by-one read past the KV cache, a warp shuffle that only half
the warp reaches) is built into its own adadecode_emu, and the kernel test that covers each break must fail,
with the emulator's message where it has one (an illegal address names the allocation it ran past).

One build for all four (g++ only, a few minutes); each break sits in a different kernel and its test exercises
that kernel alone, so the failures cannot hide each other.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (what, file, original text, broken text, the test that must fail, what its output must say)
MUTANTS = [
    ("dropped __syncthreads", "csrc/cuda/kernels/skinny_core.cuh",
     "    if (threadIdx.x % 32 == 0) inv[r] = v;\n  }\n  __syncthreads();\n",
     "    if (threadIdx.x % 32 == 0) inv[r] = v;\n  }\n",
     "tests/test_fused_kernels.py::test_skinny_gemm_with_the_norm_in_its_prologue[emu-smol-plain]",
     r"non-finite|out of tolerance|not bitwise"),
    ("missing cp.async wait", "csrc/cuda/kernels/gemm_tc.cu",
     "      cp_async_commit();\n      cp_async_wait_all_but_one();\n", "      cp_async_commit();\n",
     "tests/test_kernels.py::test_gemm_tc[emu-17-576-576-plain]", r"non-finite|out of tolerance"),
    ("off-by-one: K read one position later", "csrc/cuda/kernels/attention.cu",
     "cp_async16(Ks + t * LDK + j * 8, k_cache + (t0 + t) * kv_row", "cp_async16(Ks + t * LDK + j * 8, k_cache + (t0 + t + 1) * kv_row",
     "tests/test_kernels.py::test_attention[emu-smol-4080-16]",
     r"illegal address 0x[0-9a-f]+: \d+ bytes past the end of a device allocation of 1572864 bytes"),
    ("warp shuffle reached by half the warp", "csrc/cuda/kernels/lm_head.cu",
     "    a = warp_sum(a);\n", "    if (tid % 32 < 16) a = warp_sum(a);\n",
     "tests/test_kernels.py::test_lm_head_subset_and_rest[emu-smol]", r"deadlock|warp"),
]


@pytest.fixture(scope="module")
def mutant_tree(tmp_path_factory) -> Path:
    if os.environ.get("ADADECODE_BUILD_EMU") == "0":
        pytest.skip("ADADECODE_BUILD_EMU=0: no emulated-device builds")
    tree = tmp_path_factory.mktemp("mutant")
    for name in ("setup.py", "pytest.ini"):
        shutil.copy2(ROOT / name, tree / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", ".pytest_cache")
    for name in ("csrc", "adadecode", "tests"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    for what, path, old, new, _, _ in MUTANTS:
        text = (tree / path).read_text()
        assert text.count(old) == 1, f"mutant '{what}': the original text is not (once) in {path} any more"
        (tree / path).write_text(text.replace(old, new))
    env = dict(os.environ, ADADECODE_BUILD_CUDA="0", MAX_JOBS=os.environ.get("MAX_JOBS", "2"))
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"the mutant build failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    where = subprocess.run([sys.executable, "-c", "import adadecode_emu; print(adadecode_emu.__file__)"], cwd=tree,
                           env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True)
    assert where.stdout.startswith(str(tree)), f"the tests would not run the mutant: {where.stdout}{where.stderr}"
    return tree


@pytest.mark.parametrize("what,path,old,new,test,expect", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_broken_kernel_fails_its_test(mutant_tree, what, path, old, new, test, expect):
    env = dict(os.environ, PYTHONPATH=str(mutant_tree), ADADECODE_EMU_ORDER="random")
    r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test], cwd=mutant_tree,
                       env=env, capture_output=True, text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 1, f"mutant '{what}': {test} did not fail (exit {r.returncode}):\n{out[-3000:]}"
    assert re.search(expect, out), f"mutant '{what}': {test} failed without saying /{expect}/:\n{out[-3000:]}"
