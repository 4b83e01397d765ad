"""bench/kernel_resources.py (issue 22): the ptxas parser on captured output, the occupancy formula on known answers,
the emulated device's launch log (the engine's launch geometry without running a block), and, where nvcc is, no
spill or stack frame in any kernel the engine launches on the decode path (sm_90, the real build's flags).

Captured samples (tests/data): ptxas-spill-sm80-sm90.txt is `nvcc -O3 -gencode=arch=compute_80,code=sm_80
-gencode=arch=compute_90,code=sm_90 -maxrregcount=32 -Xptxas -v -c tests/data/ptxas-spill.cu` (a kernel made to
spill, and a non-inlined helper); ptxas-attention-maxrreg40.txt is csrc/cuda/kernels/attention.cu at both archs with
-maxrregcount=40 (constant-bank lines, template instantiations).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
sys.path.insert(0, str(ROOT / "bench"))
import kernel_resources as kr  # noqa: E402


def test_parser_reads_spills_stack_and_registers_per_arch():
    text = (DATA / "ptxas-spill-sm80-sm90.txt").read_text()
    f90 = kr.parse_ptxas(text, unit="spill.cu")
    k, h = f90["_Z12spill_kernelPKfPfi"], f90["_Z6helperPKfi"]
    assert k.entry and not h.entry
    assert (k.registers, k.barriers, k.stack, k.spill_stores, k.spill_loads) == (32, 0, 304, 440, 444)
    assert (h.stack, h.spill_stores, h.spill_loads, h.registers) == (0, 44, 40, None)
    f80 = kr.parse_ptxas(text, arch="sm_80")  # the other arch's numbers, not mixed with sm_90's
    assert (f80["_Z12spill_kernelPKfPfi"].spill_stores, f80["_Z12spill_kernelPKfPfi"].spill_loads) == (432, 436)
    assert f80["_Z12spill_kernelPKfPfi"].cmem == {0: 372}


def test_parser_reads_every_instantiation_and_its_shared_memory():
    f = kr.parse_ptxas((DATA / "ptxas-attention-maxrreg40.txt").read_text(), unit="csrc/cuda/kernels/attention.cu")
    entries = {kr.short_name(name): r for r, name in zip(f.values(), kr.demangle([r.mangled for r in f.values()]))}
    assert sorted(entries) == ["attn_merge_kernel<128>", "attn_merge_kernel<64>", "attn_split_kernel<128>",
                               "attn_split_kernel<64>"]
    split = entries["attn_split_kernel<128>"]
    assert (split.registers, split.barriers, split.static_smem, split.stack, split.cmem) == (128, 1, 16, 0, {})
    assert entries["attn_merge_kernel<64>"].static_smem == 0 and all(r.entry for r in f.values())
    assert all(r.unit == "csrc/cuda/kernels/attention.cu" for r in f.values())


def test_names_join_ptxas_and_nm():
    nvcc = "void adadecode::(anonymous namespace)::skinny_gemm_kernel<16, 1>(adadecode::XRows, adadecode::RowNorm, " \
           "__nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16 const*, __nv_bfloat16*, int, int, int)"
    assert kr.qualified_name(nvcc) == "adadecode::(anonymous namespace)::skinny_gemm_kernel<16, 1>"
    assert kr.short_name(nvcc) == "skinny_gemm_kernel<16, 1>"
    assert kr.short_name("adadecode::rt::(anonymous namespace)::gather_rows_kernel(uint4 const*, int, int, int, "
                         "uint4*, int*)") == "gather_rows_kernel"
    assert kr.short_name("void f<(anonymous namespace)::S<2>>(int (*)(int))") == "f<(anonymous namespace)::S<2>>"


def test_occupancy_formula_known_answers():
    # CUDA C++ Best Practices Guide, "Calculating Occupancy" (compute capability 7.0, whose register file,
    # allocation unit, warp granularity and warp and block limits are sm_90's): 128-thread blocks at 37 registers
    # per thread give 12 blocks, 75%; 320-thread blocks at 37 registers fit 4 blocks.
    o = kr.occupancy(37, 128, 0)
    assert (o["blocks_per_sm"], o["occupancy"], o["limiter"]) == (12, 0.75, "registers")
    assert kr.occupancy(37, 320, 0)["blocks_per_sm"] == 4
    assert kr.occupancy(64, 256, 0)["occupancy"] == 0.5  # 64 registers: half the threads
    o = kr.occupancy(32, 1024, 0)
    assert (o["blocks_per_sm"], o["occupancy"]) == (2, 1.0)
    assert kr.occupancy(255, 256, 0)["blocks_per_sm"] == 1  # 255 -> 256 per thread: 8 warps
    # the attention split kernel as the 8B decode step launches it (R = 1): registers and shared memory both bind
    o = kr.occupancy(168, 128, 16 + 73728)
    assert (o["blocks_per_sm"], o["limiter"], o["smem_per_block_allocated"]) == (3, "registers,shared memory", 74880)
    assert kr.occupancy(8, 32, 0)["limiter"] == "blocks"  # 32 one-warp blocks: the block limit, half the warps
    assert kr.occupancy(32, 128, 227 * 1024 + 1)["blocks_per_sm"] == 0  # over the per-block maximum
    with pytest.raises(ValueError, match="threads per block"):
        kr.occupancy(32, 1025, 0)


emu_missing = importlib.util.find_spec("adadecode_emu") is None and os.environ.get("ADADECODE_BUILD_EMU") == "0"


@pytest.mark.skipif(emu_missing, reason="adadecode_emu is not built (ADADECODE_BUILD_EMU=0)")
def test_emulated_launch_log_records_the_launchers_geometry():
    """skinny_gemm at R = 3, N = 100, K = 576: the R <= 4 instantiation, N / 4 blocks of 32 threads (K / 8 = 72 chunks:
    one warp); with execution off the same launch is logged and its output is left as it was."""
    import adadecode_emu as emu

    names = kr.emu_symbols(emu.__file__)
    bf = torch.bfloat16
    x = emu.empty([3, 576], bf).copy_(torch.randn(3, 576).to(bf))
    w = emu.empty([100, 576], bf).copy_(torch.randn(100, 576).to(bf))
    y, y_off = emu.empty([3, 100], bf), emu.empty([3, 100], bf)
    try:
        emu.set_launch_log(True)
        emu.skinny_gemm(x, w, y)
        emu.set_execute(False)
        emu.skinny_gemm(x, w, y_off)
        assert not emu.executes()
    finally:
        emu.set_execute(True)
        log = emu.launch_log()
        emu.set_launch_log(False)
    (rec,) = log
    assert kr.short_name(names[rec["kernel_offset"]]) == "skinny_gemm_kernel<4, 1>"
    assert (rec["grid"], rec["block"], rec["dynamic_smem"], rec["pdl"], rec["count"]) == ((25, 1, 1), (32, 1, 1), 0,
                                                                                        False, 2)
    assert torch.isfinite(y.float()).all() and torch.isnan(y_off.float()).all()
    emu.set_launch_log(True)
    assert emu.launch_log() == []  # cleared
    emu.set_launch_log(False)


@pytest.mark.skipif(shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"), reason="no nvcc here")
def test_no_spills_in_any_kernel_the_engine_launches():
    """Every translation unit compiled as the real build compiles it (sm_90): every entry parsed, and none of the
    decode path's kernels has a stack frame or spills (bench/results/kernel-resources.md has the whole table)."""
    funcs, commands, version = kr.ptxas_report(jobs=os.cpu_count() or 1)
    entries = {kr.short_name(f.name): f for f in funcs.values() if f.entry}
    assert len(commands) == len(kr.units()) and "release" in version
    for stem in kr.DECODE_KERNELS:
        assert any(n.startswith(stem) for n in entries), f"{stem}: no such kernel in the ptxas report"
    assert all(f.registers and f.stack is not None for f in entries.values())
    spilled = {n: (f.stack, f.spill_stores, f.spill_loads) for n, f in entries.items()
               if any(n.startswith(k) for k in kr.DECODE_KERNELS) and (f.stack or f.spill_stores or f.spill_loads)}
    assert not spilled, f"decode-path kernels with a stack frame or spills (stack, stores, loads): {spilled}"
