#!/usr/bin/env bash
# The GPU work of one lease, in as few device calls as possible (each call may run 10 minutes).
# On the GPU machine, from the repository root, after staging the default model (README: "On a lent GPU"):
#   bash bench/gpu_session.sh build     # build adadecode_cuda (sm_90)                          ~2 min on 16 cores
#   bash bench/gpu_session.sh test      # pytest -m gpu: kernels, CudaEngine, graphs             ~5 min
#   bash bench/gpu_session.sh bench     # micro suite, engine latency, bench/latency.py          ~8 min
# Logs and a tarball of bench/results go to $OUT (what the device tool brings back).
set -uo pipefail
stage=${1:?usage: bash bench/gpu_session.sh build|test|bench}
OUT=${OUT:-/tmp/adadecode-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export ADADECODE_DEFAULT_GGUF=${ADADECODE_DEFAULT_GGUF:-/tmp/adadecode-model/SmolLM2-135M-Instruct.Q4_1.gguf}
export ADADECODE_CACHE=${ADADECODE_CACHE:-/tmp/adadecode-cache}
PY=${PY:-python3}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1

case "$stage" in
  build)
    TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=${MAX_JOBS:-16} ADADECODE_REQUIRE_CUDA=1 \
      $PY -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tee "$OUT/build.log"
    $PY -c "import adadecode_cuda, torch; print('adadecode_cuda', adadecode_cuda.__file__, torch.cuda.get_device_name())" \
      2>&1 | tee -a "$OUT/build.log"
    ;;
  test)
    $PY -m pytest -m gpu -q -rf --durations=15 2>&1 | tee "$OUT/gpu-tests.log"
    ;;
  bench)
    $PY bench/micro/run.py 2>&1 | tee "$OUT/micro.log"
    $PY bench/engine_latency.py 2>&1 | tee "$OUT/engine-latency.log"
    $PY bench/latency.py --prompts code 2>&1 | tee "$OUT/latency-code.log"
    tar czf "$OUT/results.tgz" bench/results
    ;;
  *)
    echo "unknown stage $stage" >&2
    exit 2
    ;;
esac
