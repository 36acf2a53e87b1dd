#!/usr/bin/env bash
# GPU correctness suite and op benchmarks. Writes logs and JSON under $RESULTS_DIR (default
# benchmarks/results). Usage: scripts/gpu_check.sh [tests|causality|profile|decode|bench|all] [pytest args for tests,
# or extra args for ops.py]
# Installs optional wheels from .whl/ (flash-linear-attention, pytest, hypothesis) when present (offline machines).
set -uo pipefail
mode=${1:-all}; shift || true
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  # one wheel at a time: a wheel built for another Python would make pip refuse the whole set
  for wheel in .whl/*.whl; do
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheel" \
      || echo "gpu_check: $wheel does not install here, skipped" >&2
  done
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$RESULTS_DIR/gpu_env.txt"
import torch, triton
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY
if [[ $mode == tests || $mode == all ]]; then
  # the whole suite takes ~8 minutes on an H100; `tests ARGS` passes ARGS to pytest instead of the
  # default files, to split it over two jobs (e.g. `tests tests/test_gpu.py`, then the other three)
  tests=(tests/test_gpu.py tests/test_gpu_models.py tests/test_triton_chunk.py tests/test_triton_schedule.py)
  [[ $mode == tests && $# -gt 0 ]] && tests=("$@")
  # with pytest-xdist (installed from .whl/), 8 processes share the GPU: most of the suite's time is
  # Triton compiling on the CPU, and the machine has 16 cores
  workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
  python3 -m pytest -q -x -p no:cacheprovider --durations=10 "${workers[@]}" "${tests[@]}" 2>&1 | tee "$RESULTS_DIR/gpu_tests.log" | tail -25
fi
if [[ $mode == causality || $mode == all ]]; then
  python3 scripts/causality_check.py --out "$RESULTS_DIR/causality.json" 2>&1 | tee "$RESULTS_DIR/causality.log"
fi
if [[ $mode == profile || $mode == all ]]; then
  python3 benchmarks/profile_chunk.py 2>&1 | tee "$RESULTS_DIR/profile.txt" | tail -40
fi
if [[ $mode == decode || $mode == all ]]; then
  python3 benchmarks/decode.py --out "$RESULTS_DIR/decode.json" 2>&1 | tee "$RESULTS_DIR/decode.log"
fi
if [[ $mode == bench || $mode == all ]]; then
  python3 benchmarks/ops.py --out "$RESULTS_DIR/ops.json" "$@" 2>&1 | tee "$RESULTS_DIR/ops.log"
fi
