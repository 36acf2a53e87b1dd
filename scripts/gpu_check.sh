#!/usr/bin/env bash
# GPU correctness suite and op benchmarks. Writes logs and JSON under $RESULTS_DIR (default
# benchmarks/results). Usage: scripts/gpu_check.sh [tests|decoding|causality|profile|decode|bench|all] [pytest args
# for tests and decoding, or extra args for ops.py]
# Installs optional wheels from .whl/ (flash-linear-attention, pytest, hypothesis) when present (offline machines).
set -uo pipefail
mode=${1:-all}; shift || true
RESULTS_DIR=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS_DIR"
if ls .whl/*.whl >/dev/null 2>&1; then
  # one pip call: flash-linear-attention and fla-core both install into fla/, and a second --target
  # install would replace the first's folder; one wheel at a time only if the set is refused (a wheel
  # built for another Python)
  pip_target=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site)
  if ! "${pip_target[@]}" .whl/*.whl; then
    for wheel in .whl/*.whl; do
      "${pip_target[@]}" "$wheel" || echo "gpu_check: $wheel does not install here, skipped" >&2
    done
  fi
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
python3 - <<'PY' | tee "$RESULTS_DIR/gpu_env.txt"
import torch, triton
print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
PY
# the kernels' suite and the decoding suite each take a few minutes on an H100 with 8 workers, together
# more than some job limits allow: `tests` and `decoding` run one each; ARGS after the mode replace
# its default files when they start with a path (e.g. `tests tests/test_gpu.py -k walk`), and are
# added to them when they start with an option (e.g. `decoding -x`)
if [[ $mode == tests || $mode == decoding || $mode == all ]]; then
  suites=()
  [[ $mode != decoding ]] && suites+=(tests)
  [[ $mode != tests ]] && suites+=(decoding)
  for suite in "${suites[@]}"; do
    if [[ $suite == tests ]]; then
      files=(tests/test_gpu.py tests/test_gpu_models.py tests/test_triton_chunk.py tests/test_triton_schedule.py)
    else
      files=(tests/test_generation.py tests/test_token_step.py tests/test_models.py)
    fi
    # arguments that start with a path replace the default files; options alone (-k, -x, -n) add to them
    if [[ $mode != all && $# -gt 0 ]]; then
      if [[ $1 == -* ]]; then files+=("$@"); else files=("$@"); fi
    fi
    # with pytest-xdist (installed from .whl/), 8 processes share the GPU: most of the suite's time is
    # Triton compiling on the CPU, and the machine has 16 cores
    workers=(); python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
    python3 -m pytest -q -p no:cacheprovider -rfE --durations=10 "${workers[@]}" "${files[@]}" 2>&1 \
      | tee "$RESULTS_DIR/gpu_${suite}.log" | tail -25
  done
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
