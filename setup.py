"""Builds the package `adadecode` and, where a CUDA build of torch and nvcc are present, the extension
`adadecode_cuda` from csrc/cuda/ (kernels in csrc/cuda/kernels/*.cu, the engine runtime in csrc/cuda/runtime/*.cu,
bindings in csrc/cuda/bindings/*.cpp; headers shared with the CPU engine in csrc/common/). On every machine with torch and g++ it also builds `adadecode_emu`: the same sources
on the emulated device of csrc/emu (the CUDA execution model on the CPU; no GPU, no nvcc).

Wherever torch and g++ are, it also builds `adadecode_cpu`, the CPU engine (csrc/cpu: native kernels, no nvcc).

Without nvcc or a CUDA build of torch the package installs without adadecode_cuda; asking for the CUDA engine
then raises an error that says what is missing. ADADECODE_REQUIRE_CUDA=1 makes a failed build fatal.
ADADECODE_BUILD_CUDA=0 / ADADECODE_BUILD_EMU=0 / ADADECODE_BUILD_CPU=0 skip a module.
"""
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
# nvcc's flags for csrc/ (torch's cpp_extension adds its COMMON_NVCC_FLAGS and the -gencode of TORCH_CUDA_ARCH_LIST);
# bench/kernel_resources.py reads this list to compile the kernels for the resource report exactly as here.
NVCC_FLAGS = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]


def cuda_home() -> str | None:
    """The toolkit root. `nvcc` on PATH may be a wrapper script that execs the real one: follow it."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    nvcc = os.path.realpath(nvcc)
    try:
        head = Path(nvcc).read_bytes()[:4096]
    except OSError:
        head = b""
    if head.startswith(b"#!"):
        m = re.search(rb"exec\s+(\S+/bin/nvcc)", head)
        if m:
            nvcc = os.path.realpath(m.group(1).decode())
    return str(Path(nvcc).parent.parent)


CUDA_SRC = ROOT / "csrc" / "cuda"  # kernels/, runtime/, bindings/ (csrc/common: headers shared with csrc/cpu)


def extension_sources() -> list[str]:
    # The one source list: CMakeLists.txt globs the same folders.
    return [str(p.relative_to(ROOT)) for folder, pattern in (("kernels", "*.cu"), ("runtime", "*.cu"), ("bindings", "*.cpp"))
            for p in sorted((CUDA_SRC / folder).glob(pattern))]


def host_extension_class(module: str):
    """torch's CppExtension, or None (with a warning) where torch is not installed: `module` is then not built."""
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError:
        print(f"warning: building adadecode without {module}: torch is not installed", file=sys.stderr)
        return None
    return CppExtension


def cuda_extensions():
    if os.environ.get("ADADECODE_BUILD_CUDA") == "0":  # e.g. the emulated-device mutation test's builds
        return [], {}
    home = cuda_home()
    require = os.environ.get("ADADECODE_REQUIRE_CUDA") == "1"
    try:
        import torch
    except ImportError:
        why = "torch is not installed in the build environment"
        torch = None
    else:
        why = None if torch.version.cuda else f"torch {torch.__version__} is a CPU-only build"
    if why is None and (home is None or not Path(home, "bin", "nvcc").exists()):
        why = "nvcc was not found (set CUDA_HOME to the CUDA toolkit root)"
    if why:
        if require:
            sys.exit(f"adadecode_cuda cannot be built: {why}")
        print(f"warning: building adadecode without adadecode_cuda: {why}", file=sys.stderr)
        return [], {}
    os.environ["CUDA_HOME"] = home
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0"  # no GPU to detect: build for the H100
    ext = CUDAExtension(
        name="adadecode_cuda",
        sources=extension_sources(),
        include_dirs=[str(ROOT / "csrc")],
        # so that `import adadecode_cuda` finds libc10 & co. without torch imported first
        extra_link_args=[f"-Wl,-rpath,{Path(torch.__file__).parent / 'lib'}"],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"],
                            "nvcc": list(NVCC_FLAGS)},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


def emu_extension():
    """adadecode_emu: the files of extension_sources() rewritten by csrc/emu/emu_pp.py into build/emu_src (line
    numbers kept; the bindings' C++ is copied as it is, with its #line), compiled by g++ with csrc/emu first on the
    include path. Every object is built from build/emu_src, never from csrc/cuda itself: torch's build puts an object
    at the path of its source, and adadecode_cuda's objects of the same sources must not be overwritten by these."""
    CppExtension = host_extension_class("adadecode_emu") if os.environ.get("ADADECODE_BUILD_EMU", "1") != "0" else None
    if CppExtension is None:
        return []
    sys.path.insert(0, str(ROOT / "csrc" / "emu"))
    from emu_pp import preprocess

    out = ROOT / "build" / "emu_src"
    # the CUDA sources' own headers are rewritten too (csrc/common's are plain C++, read from csrc through -I csrc)
    headers = [p for d in ("kernels", "runtime", "bindings") for p in (CUDA_SRC / d).iterdir()
               if p.suffix in (".cuh", ".h")]
    sources = []
    for rel in extension_sources() + [str(p.relative_to(ROOT)) for p in headers]:
        src = ROOT / rel
        dst = out / src.relative_to(ROOT / "csrc")
        dst = dst.with_name(dst.name + ".cpp") if src.suffix == ".cu" else dst
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_name(dst.name + ".tmp")
        preprocess(str(src), str(tmp), shown_as=rel)
        if dst.exists() and dst.read_bytes() == tmp.read_bytes():
            tmp.unlink()  # unchanged: keep the mtime, ninja keeps the object
        else:
            tmp.replace(dst)
        if src.suffix in (".cu", ".cpp"):
            sources.append(str(dst.relative_to(ROOT)))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "emu").glob("*.cpp"))
    flags = ["-O2", "-std=c++20", "-DADADECODE_EMU", "-ffp-contract=off", "-fno-strict-aliasing",
             "-Wno-unknown-pragmas", "-Wno-sign-compare"]
    cpu = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if " fma " in cpu and " avx2 " in cpu:
        flags += ["-mfma", "-mavx2"]  # std::fmaf inline (the kernels' __fmaf_rn); built where it runs
    import torch

    return [CppExtension(
        name="adadecode_emu",
        sources=sources,
        include_dirs=[str(ROOT / "csrc" / "emu"), str(ROOT / "csrc")],
        extra_compile_args=flags,
        # torch's libcudart may be loaded in the same process: the emulated API binds inside the module only
        extra_link_args=["-Wl,-Bsymbolic", f"-Wl,-rpath,{Path(torch.__file__).parent / 'lib'}"],
    )]


def cpu_extension():
    """adadecode_cpu: the CPU engine (csrc/cpu), g++ only. Its kernels are built once per instruction set (AVX-512,
    AVX2 and portable on x86-64; portable elsewhere) and chosen at run time: no -march flag, so the module runs on
    any CPU of its architecture. -ffp-contract=off: no operation is fused that the source does not fuse."""
    CppExtension = host_extension_class("adadecode_cpu") if os.environ.get("ADADECODE_BUILD_CPU", "1") != "0" else None
    if CppExtension is None:
        return []
    import platform

    import torch

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    arm = platform.machine().lower() in ("aarch64", "arm64")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp")
                     if (x86 or not p.name.startswith(("kernels_avx512", "kernels_avx2")))
                     and (arm or p.name != "kernels_neon.cpp"))
    return [CppExtension(
        name="adadecode_cpu",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        extra_compile_args=["-O3", "-std=c++20", "-ffp-contract=off", "-fno-math-errno", "-Wno-unknown-pragmas"],
        extra_link_args=[f"-Wl,-rpath,{Path(torch.__file__).parent / 'lib'}"],
    )]


ext_modules, cmdclass = cuda_extensions()
host_modules = emu_extension() + cpu_extension()
if host_modules and not cmdclass:
    from torch.utils.cpp_extension import BuildExtension

    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=True)}
ext_modules += host_modules

setup(
    name="adadecode",
    version="0.1.0",
    description="AdaDecode: exact early-exit greedy decoding for Llama-family models, on custom CUDA kernels",
    packages=find_packages(include=["adadecode", "adadecode.*"]),
    package_data={"adadecode.heads": ["shipped/*"]},
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "safetensors", "tokenizers", "gguf", "jinja2", "tqdm"],
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["adadecode=adadecode.cli:main"]},
)
