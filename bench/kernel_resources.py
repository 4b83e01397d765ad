"""Registers, spills, stack, shared memory and occupancy of every kernel instantiation the CUDA engine launches.

    python bench/kernel_resources.py [--out bench/results/kernel-resources] [--jobs N]     (make kernel-resources)

Three sources, joined by the kernel's demangled name:

1. ptxas (no GPU needed): every translation unit of the extension (csrc/cuda/kernels/*.cu, csrc/cuda/runtime/*.cu) compiled for
   sm_90 with the flags of the real build (setup.py's NVCC_FLAGS, torch's COMMON_NVCC_FLAGS, the -gencode of
   TORCH_CUDA_ARCH_LIST=9.0, -Icsrc) plus `-Xptxas -v`, which reports per entry function: registers, barriers,
   static shared memory, stack frame, spill stores and loads. Names are demangled with c++filt.
2. The launches as the engine configures them: the engine runtime (csrc/cuda/runtime/engine.cu) and the kernel launchers
   (csrc/cuda/kernels/*.cu) run on the emulated device (adadecode_emu) with execution off (`set_execute(False)`: every
   launch is checked and logged, no block runs), so the Llama-3.1-8B shape costs no emulation time. The log gives
   each launch's kernel, grid, block and dynamic shared memory; the kernel is an offset into adadecode_emu's image,
   which `nm` names. Scenarios, for SmolLM2-135M (its 30 layers) and the Llama-3.1-8B shape (2 of its 32 layers:
   each layer launches the same kernels), both decode paths (fused, unfused), max_seq 4096, max_rows 16, prefill
   chunk 256: a 300-token prefill (a 256-row chunk and a 44-row one), run_layers over all layers for R = 1..16 rows,
   final (greedy, and sampled with top-k and top-p) for R = 1..16, and a head evaluation on one row (a full-vocabulary
   head and a 1024-token subset head with its rest logit), greedy and sampled.
3. Occupancy on sm_90 (H100 / H200), the CUDA occupancy calculator's formula with the documented limits
   (`occupancy()` below): 64 warps (2048 threads) and 32 blocks per SM; 65536 registers per SM and per block, 255 per
   thread, allocated per warp in units of 256 (a thread's count rounds up to a multiple of 8), the warps that fit
   rounded down to the warp allocation granularity of 4; 228 KB of shared memory per SM (the largest carveout: the
   driver picks the carveout per kernel), at most 227 KB per block, 1 KB reserved by the system per block, allocated
   in units of 128 bytes. The grid column says how many blocks each SM gets at most from the launch itself
   (ceil(grid / 132 SMs)): a launch of fewer blocks than the SMs can hold is limited by its grid, not its resources.

Writes <out>.md and <out>.json with the command, the date and the nvcc version. Needs nvcc (CUDA_HOME or nvcc on
PATH, found as setup.py finds it), c++filt and nm (binutils), and adadecode_emu (built by `pip install -e .`).
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's adadecode_emu, not an installed one

# ---- sm_90 limits (CUDA C++ Programming Guide, "Compute capabilities", and the occupancy calculator) ---------------
SM90 = dict(warps_per_sm=64, threads_per_sm=2048, blocks_per_sm=32, regs_per_sm=65536, regs_per_block=65536,
            regs_per_thread=255, reg_alloc_unit=256, warp_alloc_granularity=4, smem_per_sm=228 * 1024,
            smem_per_block=227 * 1024, smem_reserved_per_block=1024, smem_alloc_unit=128, max_threads_per_block=1024,
            sms_h200=132)

# torch.utils.cpp_extension.COMMON_NVCC_FLAGS (torch 2.x), used where torch cannot be imported
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr"]
DECODE_KERNELS = ("skinny_gemm_kernel", "skinny_qkv_rope_kernel", "attn_split_kernel", "attn_merge_kernel",
                  "lm_head_partial_kernel", "lm_head_merge_kernel", "lm_head_perturb_kernel", "lm_head_select_kernel",
                  "add_rmsnorm_kernel", "rope_append_kv_kernel", "embedding_kernel", "gather_rows_kernel",
                  "scatter_rows_kernel")


def ceil_to(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def floor_to(x: int, unit: int) -> int:
    return x // unit * unit


def occupancy(regs: int, threads: int, smem_bytes: int, lim: dict = SM90) -> dict:
    """Resident blocks and warps per SM of a kernel using `regs` registers per thread, `threads` per block and
    `smem_bytes` of shared memory per block (static + dynamic), by the occupancy calculator's formula:

        warps/block        = ceil(threads / 32)
        by warps           = floor(warps_per_sm / warps/block)
        regs/warp          = ceil_to(regs * 32, reg_alloc_unit)
        by registers       = floor(floor_to(floor(regs_per_block / regs/warp), warp_alloc_granularity) / warps/block)
                             * floor(regs_per_sm / regs_per_block)
        smem/block         = ceil_to(smem_bytes + smem_reserved_per_block, smem_alloc_unit)
        by shared memory   = floor(smem_per_sm / smem/block)
        blocks/SM          = min(blocks_per_sm, by warps, by registers, by shared memory)
        occupancy          = blocks/SM * warps/block / warps_per_sm
    """
    if not 1 <= threads <= lim["max_threads_per_block"]:
        raise ValueError(f"{threads} threads per block is outside 1..{lim['max_threads_per_block']}")
    if not 1 <= regs <= lim["regs_per_thread"]:
        raise ValueError(f"{regs} registers per thread is outside 1..{lim['regs_per_thread']}")
    warps = -(-threads // 32)
    by_warps = lim["warps_per_sm"] // warps
    regs_per_warp = ceil_to(regs * 32, lim["reg_alloc_unit"])
    warps_by_regs = floor_to(lim["regs_per_block"] // regs_per_warp, lim["warp_alloc_granularity"])
    by_regs = warps_by_regs // warps * (lim["regs_per_sm"] // lim["regs_per_block"])
    smem = ceil_to(smem_bytes + lim["smem_reserved_per_block"], lim["smem_alloc_unit"])
    if smem_bytes > lim["smem_per_block"]:
        by_smem = 0
    else:
        by_smem = lim["smem_per_sm"] // smem
    blocks = min(lim["blocks_per_sm"], by_warps, by_regs, by_smem)
    limits = {"blocks": lim["blocks_per_sm"], "warps": by_warps, "registers": by_regs, "shared memory": by_smem}
    limiter = ",".join(k for k, v in limits.items() if v == blocks)
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps, "occupancy": blocks * warps / lim["warps_per_sm"],
            "limiter": limiter, "by_warps": by_warps, "by_registers": by_regs, "by_smem": by_smem,
            "smem_per_block_allocated": smem}


# ---- ptxas -------------------------------------------------------------------------------------------------------
@dataclass
class Resources:
    """One function as ptxas -v reports it (entry = a __global__ kernel)."""
    mangled: str
    name: str = ""  # demangled
    unit: str = ""  # translation unit
    entry: bool = False
    registers: int | None = None
    barriers: int | None = None
    static_smem: int = 0
    cmem: dict = field(default_factory=dict)
    stack: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    warnings: list = field(default_factory=list)


_ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_PROPS = re.compile(r"ptxas info\s*: Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"ptxas info\s*: Used (\d+) registers")
_BARRIERS = re.compile(r"used (\d+) barriers")
_SMEM = re.compile(r"(\d+) bytes smem")
_CMEM = re.compile(r"(\d+) bytes cmem\[(\d+)\]")
_WARN = re.compile(r"ptxas warning\s*: (.*)")


def parse_ptxas(text: str, unit: str = "", arch: str = "sm_90") -> dict[str, Resources]:
    """Functions of one `nvcc -Xptxas -v` output (stderr), by mangled name. `Function properties for X` opens X
    (entries and non-inlined device functions alike); the stack/spill line and the `Used` line that follow belong
    to it. Entries compiled for another arch than `arch` are ignored (a multi-arch build reports each arch)."""
    out: dict[str, Resources] = {}
    cur: Resources | None = None
    skip = False
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            skip = m.group(2) != arch
            if not skip:
                out.setdefault(m.group(1), Resources(m.group(1), unit=unit)).entry = True
            cur = None
            continue
        if skip:
            continue
        m = _PROPS.search(line)
        if m:
            cur = out.setdefault(m.group(1), Resources(m.group(1), unit=unit))
            continue
        m = _FRAME.search(line)
        if m and cur is not None:
            cur.stack, cur.spill_stores, cur.spill_loads = (int(g) for g in m.groups())
            continue
        m = _USED.search(line)
        if m and cur is not None:
            cur.registers = int(m.group(1))
            b = _BARRIERS.search(line)
            cur.barriers = int(b.group(1)) if b else 0
            s = _SMEM.search(line)
            cur.static_smem = int(s.group(1)) if s else 0
            cur.cmem = {int(bank): int(n) for n, bank in _CMEM.findall(line)}
            continue
        m = _WARN.search(line)
        if m and cur is not None:
            cur.warnings.append(m.group(1))
    return out


def demangle(names: list[str]) -> list[str]:
    if not names:
        return []
    tool = shutil.which("c++filt")
    if tool is None:
        raise RuntimeError("c++filt (binutils) is needed to demangle the kernel names")
    r = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True)
    out = r.stdout.splitlines()
    if len(out) != len(names):
        raise RuntimeError(f"c++filt returned {len(out)} names for {len(names)}")
    return out


def qualified_name(demangled: str) -> str:
    """`void ns::(anonymous namespace)::k<16, 1>(args)` -> `ns::(anonymous namespace)::k<16, 1>`: the demangled name
    without the return type and the parameter list (the key that joins ptxas's names and nm's)."""
    s = demangled.strip()
    if s.endswith(")"):
        depth = 0
        for i in range(len(s) - 1, -1, -1):  # the parameter list: the last top-level parenthesis group
            depth += {")": 1, "(": -1}.get(s[i], 0)
            if depth == 0:
                s = s[:i]
                break
    return s[5:] if s.startswith("void ") else s


def short_name(demangled: str) -> str:
    """`void ns::(anonymous namespace)::k<16, 1>(args)` -> `k<16, 1>`."""
    q = qualified_name(demangled)
    head, sep, tmpl = q.partition("<")
    return head.rsplit("::", 1)[-1] + sep + tmpl


def find_cuda_home() -> Path:
    """As setup.py's cuda_home(): CUDA_HOME, else nvcc on PATH (following a wrapper script that execs the real one)."""
    spec = {}
    exec(compile(_function_source(ROOT / "setup.py", "cuda_home"), "setup.py", "exec"), spec)  # noqa: S102
    home = spec["cuda_home"]()
    if home is None or not Path(home, "bin", "nvcc").exists():
        raise RuntimeError("nvcc was not found (set CUDA_HOME to the CUDA toolkit root, or put nvcc on PATH)")
    return Path(home)


def _function_source(path: Path, name: str) -> str:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return "import os, re, shutil\nfrom pathlib import Path\n" + ast.get_source_segment(path.read_text(), node)
    raise RuntimeError(f"{path}: no function {name}()")


def setup_nvcc_flags() -> list[str]:
    """setup.py's NVCC_FLAGS, read without running setup.py."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NVCC_FLAGS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise RuntimeError("setup.py defines no NVCC_FLAGS list")


def torch_nvcc_flags() -> list[str]:
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except ImportError:
        return list(TORCH_NVCC_FLAGS)
    return list(COMMON_NVCC_FLAGS)


def units() -> list[Path]:
    """The CUDA translation units of the extension, as setup.py's extension_sources() globs them."""
    cuda = ROOT / "csrc" / "cuda"
    return sorted((cuda / "kernels").glob("*.cu")) + sorted((cuda / "runtime").glob("*.cu"))


def compile_command(nvcc: Path, src: Path, obj: Path) -> list[str]:
    flags = list(dict.fromkeys(setup_nvcc_flags() + torch_nvcc_flags()))  # --expt-relaxed-constexpr once
    return [str(nvcc), *flags, "-gencode=arch=compute_90,code=sm_90", "-I", str(ROOT / "csrc"), "-Xptxas", "-v",
            "-c", str(src), "-o", str(obj)]


def ptxas_report(jobs: int) -> tuple[dict[str, Resources], list[str], str]:
    """Every function of every unit (by mangled name), the compile commands, nvcc's version line."""
    home = find_cuda_home()
    nvcc = home / "bin" / "nvcc"
    version = subprocess.run([str(nvcc), "--version"], capture_output=True, text=True, check=True).stdout
    version_line = next((ln for ln in version.splitlines() if "release" in ln), version.strip().splitlines()[-1])
    funcs: dict[str, Resources] = {}
    commands = []
    with tempfile.TemporaryDirectory() as tmp:
        def one(src: Path):
            cmd = compile_command(nvcc, src, Path(tmp) / (src.stem + ".o"))
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"{src.relative_to(ROOT)}: nvcc failed ({r.returncode}):\n{r.stderr[-4000:]}")
            return src, cmd, r.stderr

        with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
            for src, cmd, err in pool.map(one, units()):
                rel = str(src.relative_to(ROOT))
                shown = ["nvcc", *cmd[1:-1], src.stem + ".o"]  # from the repository root, nvcc = $CUDA_HOME/bin/nvcc
                commands.append(" ".join(c.replace(str(ROOT) + "/", "").replace(str(ROOT), ".") for c in shown))
                for k, v in parse_ptxas(err, unit=rel).items():
                    if k in funcs and funcs[k].unit != rel:  # a device function defined in a header: per unit
                        k = f"{k}@{rel}"
                    funcs[k] = v
    mangled = [f.mangled for f in funcs.values()]
    for f, name in zip(funcs.values(), demangle(mangled)):
        f.name = name
    return funcs, commands, version_line


# ---- launches on the emulated device -------------------------------------------------------------------------------
SMOL = dict(n_layers=30, d=576, n_heads=9, n_kv_heads=3, head_dim=64, ffn=1536, vocab=49152, layers_full=30)
L8B = dict(n_layers=2, d=4096, n_heads=32, n_kv_heads=8, head_dim=128, ffn=14336, vocab=128256, layers_full=32)
SHAPES = {"SmolLM2-135M": SMOL, "Llama-3.1-8B": L8B}
MAX_SEQ, MAX_ROWS, CHUNK = 4096, 16, 256


def emu_symbols(module_file: str) -> dict[int, str]:
    """Offsets of adadecode_emu's functions (nm's values: offsets into the shared object) -> demangled names."""
    tool = shutil.which("nm")
    if tool is None:
        raise RuntimeError("nm (binutils) is needed to name the emulated device's launches")
    r = subprocess.run([tool, "--defined-only", "-C", module_file], capture_output=True, text=True, check=True)
    out = {}
    for line in r.stdout.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[1] in ("t", "T", "W", "w"):
            out[int(parts[0], 16)] = parts[2]
    return out


def emu_launches() -> list[dict]:
    """Every distinct launch of the scenarios (module doc), with the kernel's demangled name."""
    import torch

    import adadecode_emu as emu

    names = emu_symbols(emu.__file__)
    BF = torch.bfloat16
    rows = []
    emu.set_execute(False)
    try:
        for shape, s in SHAPES.items():
            d, H, Hkv, hd, ffn, V = s["d"], s["n_heads"], s["n_kv_heads"], s["head_dim"], s["ffn"], s["vocab"]
            qkv_n = (H + 2 * Hkv) * hd

            def dev(*shape, dtype=BF):
                return emu.empty(list(shape), dtype)

            embed = dev(V, d)  # the LM head shares it (tied): the launches are the same as an untied one's
            layers = [[dev(d), dev(qkv_n, d), dev(d, H * hd), dev(d), dev(ffn, d), dev(ffn, d), dev(d, ffn)]
                      for _ in range(s["n_layers"])]
            cos, sin = dev(MAX_SEQ, hd // 2, dtype=torch.float32), dev(MAX_SEQ, hd // 2, dtype=torch.float32)
            vocab = emu.empty([1024], torch.int32).copy_(torch.arange(0, 1024, dtype=torch.int32) * (V // 1024))
            heads = [(s["n_layers"] // 2, dev(d, d), None, None), (s["n_layers"] // 2, dev(d, d), vocab, dev(d))]
            sampling = (7, 1 / 0.7, 50, 0.9)  # (seed, 1/T, top_k, top_p): all four sampling kernels run
            for fused in (True, False):
                emu.set_launch_log(True)
                eng = emu.Engine(n_layers=s["n_layers"], d=d, n_heads=H, n_kv_heads=Hkv, head_dim=hd, ffn=ffn,
                                 vocab=V, eps=1e-5, embed=embed, norm=dev(d), lm_head=embed, layers=layers, cos=cos,
                                 sin=sin, max_seq=MAX_SEQ, max_rows=MAX_ROWS, prefill_chunk=CHUNK)
                path = "fused" if fused else "unfused"
                L = s["n_layers"]
                for rec in emu.launch_log():  # the constructor's own launches (positions 0..max_seq-1)
                    rows.append({"shape": shape, "path": path, "scenario": "engine construction", "R": None,
                                 "kernel": names.get(rec["kernel_offset"], f"?+{rec['kernel_offset']:#x}"),
                                 **{k: rec[k] for k in ("grid", "block", "dynamic_smem", "pdl", "count")}})
                emu.set_launch_log(False)
                eng.fused = fused
                eng.set_heads(heads)

                def logged(scenario: str, R: int | None, fn):
                    emu.set_launch_log(True)
                    fn()
                    for rec in emu.launch_log():
                        rows.append({"shape": shape, "path": path, "scenario": scenario, "R": R,
                                     "kernel": names.get(rec["kernel_offset"], f"?+{rec['kernel_offset']:#x}"),
                                     **{k: rec[k] for k in ("grid", "block", "dynamic_smem", "pdl", "count")}})
                    emu.set_launch_log(False)

                prompt = [1] * 300
                logged("prefill 300 tokens", None, lambda: eng.prefill(0, prompt))
                for R in range(1, MAX_ROWS + 1):
                    first = len(prompt)

                    def decode(R=R, first=first):
                        for r in range(R):
                            eng.embed(0, first + r, 1)
                        eng.run_layers(0, first, first + R - 1, 0, L)

                    logged("decode run_layers", R, decode)
                    logged("final greedy", R, lambda R=R, first=first: eng.final(0, first, first + R - 1))
                    logged("final sampled", R, lambda R=R, first=first: eng.final(0, first, first + R - 1,
                                                                                    sampling=sampling))
                pos = len(prompt)
                eng.embed(0, pos, 1)
                eng.run_layers(0, pos, pos, 0, L // 2)
                for i, what in enumerate(("head (full vocabulary)", "head (1024-token subset + rest)")):
                    logged(what + " greedy", 1, lambda i=i: eng.head(0, pos, i))
                    logged(what + " sampled", 1, lambda i=i: eng.head(0, pos, i, sampling=sampling))
                eng = None  # the next engine reuses its memory
    finally:
        emu.set_execute(True)
        emu.set_launch_log(False)
    unnamed = sorted({r["kernel"] for r in rows if r["kernel"].startswith("?")})
    if unnamed:
        raise RuntimeError(f"launches of kernels nm does not name in {emu.__file__}: {unnamed}")
    return rows


# ---- the report ---------------------------------------------------------------------------------------------------
def join(funcs: dict[str, Resources], launches: list[dict]) -> tuple[list[dict], list[dict]]:
    """Kernels (one row per entry instantiation) and launch configurations (one row per distinct launch of a
    scenario, with the occupancy it gets)."""
    by_name = {qualified_name(f.name): f for f in funcs.values() if f.entry}
    kernels = []
    launched = {qualified_name(r["kernel"]) for r in launches}
    for key, f in sorted(by_name.items(), key=lambda kv: (kv[1].unit, kv[0])):
        kernels.append({"kernel": short_name(f.name), "qualified": key, "unit": f.unit, "registers": f.registers,
                        "barriers": f.barriers, "static_smem": f.static_smem, "stack": f.stack,
                        "spill_stores": f.spill_stores, "spill_loads": f.spill_loads, "warnings": f.warnings,
                        "launched": key in launched,
                        "decode_path": any(k in key for k in DECODE_KERNELS)})
    configs = []
    missing = sorted({qualified_name(r["kernel"]) for r in launches} - set(by_name))
    if missing:
        raise RuntimeError(f"launched kernels that ptxas did not report (the TU list is stale?): {missing}")
    for r in launches:
        f = by_name[qualified_name(r["kernel"])]
        threads = r["block"][0] * r["block"][1] * r["block"][2]
        blocks = r["grid"][0] * r["grid"][1] * r["grid"][2]
        occ = occupancy(f.registers, threads, f.static_smem + r["dynamic_smem"])
        per_sm = math.ceil(blocks / SM90["sms_h200"])
        configs.append({**r, "kernel": short_name(f.name), "threads": threads, "blocks": blocks,
                        "registers": f.registers, "static_smem": f.static_smem, **occ,
                        "grid_blocks_per_sm": per_sm,
                        "resident_warps_per_sm": min(occ["blocks_per_sm"], per_sm) * (-(-threads // 32))})
    return kernels, configs


def fmt_kb(n: int) -> str:
    return f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} B"


def spilled(k: dict) -> bool:
    return bool((k["spill_stores"] or 0) + (k["spill_loads"] or 0) + (k["stack"] or 0))


def format_uses(uses: dict) -> str:
    """{scenario: {R: {path labels}}} -> `decode run_layers R=1,2 (fused PDL, unfused); ...`"""
    parts = []
    for scenario, by_r in uses.items():
        by_paths: dict[tuple, list] = {}
        for R, paths in by_r.items():
            by_paths.setdefault(tuple(sorted(paths)), []).append(R)
        for paths, Rs in by_paths.items():
            rs = "" if Rs == [None] else " R=" + ",".join(str(r) for r in sorted(r for r in Rs if r is not None))
            parts.append(f"{scenario}{rs} ({', '.join(paths)})")
    return "; ".join(parts)


def markdown(meta: dict, kernels: list[dict], configs: list[dict]) -> str:
    bad = [k for k in kernels if spilled(k)]
    decode = [c for c in configs if c["scenario"].startswith(("decode", "final", "head"))]
    low = min(decode, key=lambda c: c["occupancy"]) if decode else None
    lines = ["# Kernel resources (sm_90)", "",
             f"`{meta['command']}`, {meta['date']}, {meta['nvcc']}. Resources from ptxas (`-Xptxas -v`, the flags of "
             "the real build); launches from the engine runtime on the emulated device with execution off; occupancy "
             "by the occupancy calculator's formula (the end of this page). Regenerate: `make kernel-resources`.", "",
             f"**Spills: {len(bad)} of {len(kernels)} kernel instantiations have a stack frame or spill stores/loads"
             + (": " + ", ".join(f"`{k['kernel']}`" for k in bad) + "**" if bad else
                "** (all: 0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads)."), ""]
    if low:
        lines += [f"Lowest occupancy of a decode-path launch: `{low['kernel']}` ({low['shape']}, {low['path']} "
                  f"{low['scenario']}, R={low['R']}): {100 * low['occupancy']:.0f}% ({low['limiter']}).", ""]
    lines += ["## The fused decode step at a glance", "",
              "Occupancy (resident warps / 64) of each launch of a decode step on the fused path at R = 1 and R = 16 "
              "rows (run_layers, then the greedy final step), with the limiting resource, and the warps per SM the launch "
              "can keep resident at all: min(blocks/SM, ceil(grid / 132)) x warps per block.", "",
              "| shape | step | kernel | grid, block at R = 1 | R = 1 | R = 16 | warps per SM the grid fills, R = 1 |",
              "|---|---|---|---|---|---|---|"]
    glance: dict[tuple, dict] = {}
    for c in configs:  # one row per launch of the step: the R-independent part of its geometry names it
        if c["path"] == "fused" and c["scenario"] in ("decode run_layers", "final greedy") and c["R"] in (1, 16):
            base = c["kernel"].split("<")[0]
            per_row = base in ("gather_rows_kernel", "scatter_rows_kernel", "lm_head_merge_kernel")
            key = (c["shape"], c["scenario"], base, "R" if per_row else c["grid"][0], c["block"][0])
            glance.setdefault(key, {}).setdefault(c["R"], c)
    for (shape, scenario, base, _, _), g in glance.items():
        def cell(c):
            return f"{100 * c['occupancy']:.0f}% ({c['limiter']})" if c else "-"
        c1 = g.get(1)
        geo = (f"{'x'.join(map(str, c1['grid'])) if c1['grid'][1] * c1['grid'][2] > 1 else c1['grid'][0]}, "
               f"{c1['block'][0]}" if c1 else "-")
        fill = f"{c1['resident_warps_per_sm']} of 64" if c1 else "-"
        lines.append(f"| {shape} | {scenario.split()[0]} | `{base}` | {geo} | {cell(c1)} | {cell(g.get(16))} | "
                     f"{fill} |")
    lines += ["", "## Every kernel instantiation (ptxas -v)", "",
              "| kernel | unit | registers | barriers | static smem | stack | spill stores / loads | launched by the engine |",
              "|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        lines.append(f"| `{k['kernel']}` | {k['unit']} | {k['registers']} | {k['barriers']} | {fmt_kb(k['static_smem'])} | "
                     f"{k['stack']} B | {k['spill_stores']} / {k['spill_loads']} B | "
                     f"{'yes' if k['launched'] else 'no (kernel ops only)'} |")
    lines += ["", "## Each launch as the engine configures it", "",
              f"max_seq {meta['max_seq']}, max_rows {meta['max_rows']}, prefill chunk {meta['prefill_chunk']}. One row "
              "per distinct (shape, kernel, grid, block, dynamic shared memory); `used by` lists the scenarios and, in "
              "brackets, the decode paths (PDL: launched as a programmatic dependent) (R = rows of the call; prefill: a 300-token prompt in chunks of 256 and 44 rows; decode and "
              "final rows are shown for R = 1, 2, 4, 8, 16, the JSON has every R). blocks/SM: resident blocks by the "
              "formula, the limiting resource in brackets; occupancy: resident warps / 64; grid/SM: ceil(grid / 132 "
              "SMs), the most blocks the launch itself gives an SM.", "",
              "| shape | kernel | grid | block | dyn smem | regs | blocks/SM | occupancy | grid/SM | used by (path) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, dict] = {}
    for c in configs:
        if c["scenario"].startswith(("decode", "final")) and c["R"] not in (1, 2, 4, 8, 16):
            continue
        key = (c["shape"], c["kernel"], tuple(c["grid"]), tuple(c["block"]), c["dynamic_smem"])
        g = groups.setdefault(key, {"c": c, "uses": {}})
        g["uses"].setdefault(c["scenario"], {}).setdefault(c["R"], set()).add(
            c["path"] + (" PDL" if c["pdl"] else ""))
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2], k[4])):
        c, uses = groups[key]["c"], groups[key]["uses"]
        grid = "x".join(str(v) for v in c["grid"]) if c["grid"][1] * c["grid"][2] > 1 else str(c["grid"][0])
        block = "x".join(str(v) for v in c["block"]) if c["block"][1] * c["block"][2] > 1 else str(c["block"][0])
        lines.append(f"| {c['shape']} | `{c['kernel']}` | {grid} | {block} | {fmt_kb(c['dynamic_smem'])} | "
                     f"{c['registers']} | {c['blocks_per_sm']} ({c['limiter']}) | {100 * c['occupancy']:.0f}% | "
                     f"{c['grid_blocks_per_sm']} | {format_uses(uses)} |")
    lines += ["", "## The formula", "", "```", occupancy.__doc__.strip(), "```", "",
              "Limits (sm_90): " + ", ".join(f"{k} {v}" for k, v in SM90.items()) + ".", "",
              "Compile command of each unit (from the repository root):", ""]
    lines += [f"    {c}" for c in meta["compile_commands"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "kernel-resources"),
                    help="output stem: writes STEM.md and STEM.json")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="nvcc processes at once")
    args = ap.parse_args(argv)
    funcs, commands, nvcc = ptxas_report(args.jobs)
    launches = emu_launches()
    kernels, configs = join(funcs, launches)
    now = datetime.datetime.now(datetime.timezone.utc)
    meta = {"command": " ".join(["python bench/kernel_resources.py"] + list(argv if argv is not None else sys.argv[1:])),
            "date": now.strftime("%Y-%m-%d"), "nvcc": nvcc.strip(), "arch": "sm_90", "limits": SM90,
            "shapes": SHAPES, "max_seq": MAX_SEQ, "max_rows": MAX_ROWS, "prefill_chunk": CHUNK,
            "compile_commands": commands}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # one kernel and one launch per line: a regenerated report diffs line by line
    body = json.dumps({**meta, "kernels": None, "launches": None}, indent=1)
    drop = ("threads", "blocks", "registers", "static_smem", "smem_per_block_allocated", "qualified")  # in `kernels`
    rows = lambda xs: "[\n" + ",\n".join(json.dumps({k: v for k, v in x.items() if k not in drop or "unit" in x},
                                                      separators=(",", ":")) for x in xs) + "\n]"  # noqa: E731
    body = body.replace('"kernels": null', '"kernels": ' + rows(kernels)).replace('"launches": null',
                                                                                   '"launches": ' + rows(configs))
    from adadecode.model.filesys import write_atomic

    write_atomic(out.with_suffix(".json"), body + "\n")
    md = markdown(meta, kernels, configs)
    write_atomic(out.with_suffix(".md"), md)
    print(md.split("\n## ")[0])
    print(f"wrote {out.with_suffix('.md')} and .json ({len(kernels)} kernels, {len(configs)} launch rows)")
    decode_spills = [k["kernel"] for k in kernels if k["decode_path"] and spilled(k)]
    if decode_spills:
        print(f"SPILLS on the decode path: {decode_spills}", file=sys.stderr)
    return 1 if decode_spills else 0


if __name__ == "__main__":
    sys.exit(main())
