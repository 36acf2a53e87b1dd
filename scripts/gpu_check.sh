#!/usr/bin/env bash
# GPU correctness suite and op benchmarks. Writes logs and JSON under $OUT (default
# benchmarks/results). Usage: scripts/gpu_check.sh [tests|causality|profile|decode|bench|all] [pytest args for tests,
# or extra args for ops.py]
# Carries optional wheels from .whl/ (flash-linear-attention, pytest, hypothesis) when present.
set -uo pipefail
mode=${1:-all}; shift || true
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$OUT/gpu_env.txt"
import torch, triton
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY
if [[ $mode == tests || $mode == all ]]; then
  # the whole suite takes ~8 minutes on an H100; `tests ARGS` passes ARGS to pytest instead of the
  # default files, to split it over two calls (e.g. `tests tests/test_gpu.py`, then the other three)
  tests=(tests/test_gpu.py tests/test_gpu_models.py tests/test_triton_chunk.py tests/test_triton_schedule.py)
  [[ $mode == tests && $# -gt 0 ]] && tests=("$@")
  # with pytest-xdist (carried in .whl/), 8 processes share the GPU: most of the suite's time is
  # Triton compiling on the CPU, and the machine has 16 cores
  workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
  python3 -m pytest -q -x -p no:cacheprovider --durations=10 "${workers[@]}" "${tests[@]}" 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
fi
if [[ $mode == causality || $mode == all ]]; then
  python3 scripts/causality_check.py --out "$OUT/causality.json" 2>&1 | tee "$OUT/causality.log"
fi
if [[ $mode == profile || $mode == all ]]; then
  python3 benchmarks/profile_chunk.py 2>&1 | tee "$OUT/profile.txt" | tail -40
fi
if [[ $mode == decode || $mode == all ]]; then
  python3 benchmarks/decode.py --out "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log"
fi
if [[ $mode == bench || $mode == all ]]; then
  python3 benchmarks/ops.py --out "$OUT/ops.json" "$@" 2>&1 | tee "$OUT/ops.log"
fi
