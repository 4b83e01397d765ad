#!/usr/bin/env bash
# The CPU benchmarks' peer, llama.cpp, built from the llama-cpp-python source package on PyPI (no other network):
# llama-bench, llama-quantize and llama-server (plain, n-gram lookup speculation, parallel slots: bench/llama_server.py)
# under $PEERS (default .peers/, ignored by git), and the default model as BF16, Q8_0 and Q4_K_M GGUFs requantised
# from the shipped Q4_1 GGUF (BF16 holds the values the project's loader dequantises to: bench/cpu_engine.py checks it
# bit for bit before timing it). About 20 minutes on 2 cores; not part of `make test`.
#   bash bench/peers.sh            (make bench-peers)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers=${PEERS:-$root/.peers}
py=${PY:-$root/.venv/bin/python}
version=0.3.36
mkdir -p "$peers"
cd "$peers"
src=llama_cpp_python-$version/vendor/llama.cpp
tools="llama-bench llama-quantize llama-server"
missing=0
for t in $tools; do [ -x "$src/build/bin/$t" ] || missing=1; done
if [ $missing = 1 ]; then
  [ -f llama_cpp_python-$version.tar.gz ] || "$py" -m pip download -q --no-deps --no-binary :all: \
      llama-cpp-python==$version -d .
  tar xzf llama_cpp_python-$version.tar.gz
  cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON > cmake.log
  cmake --build "$src/build" -j "${MAX_JOBS:-2}" --target $tools >> cmake.log
fi
for t in $tools; do ln -sf "$src/build/bin/$t" "$t"; done
q41=$("$py" -c "from adadecode.model.loader import default_gguf_path; print(default_gguf_path())")
for q in BF16 Q8_0 Q4_K_M; do
  [ -f smollm2-$q.gguf ] || ./llama-quantize --allow-requantize "$q41" smollm2-$q.gguf $q > quantize-$q.log
done
ls -la "$peers"/llama-bench "$peers"/smollm2-*.gguf
