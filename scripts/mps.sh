#!/usr/bin/env bash
# NVIDIA MPS for sweeps of small models: without it, the runs that share a GPU (one process each)
# take turns on it, and a tiny model's kernels leave most multiprocessors idle during its turn;
# under MPS their kernels run side by side. Usage (source it, so the exported pipe directory
# reaches the runs started afterwards):
#   source scripts/mps.sh start   # prints "mps on" and returns 0 once a CUDA client got through
#   source scripts/mps.sh stop
# It changes no setting of the card (compute mode, clocks): the control daemon is an ordinary
# process, and `stop` ends it.
mps_dir=${MPS_DIR:-/tmp/dla-mps}
case ${1:-} in
  start)
    command -v nvidia-cuda-mps-control >/dev/null || { echo "mps: nvidia-cuda-mps-control not found"; return 1 2>/dev/null || exit 1; }
    mkdir -p "$mps_dir/pipe" "$mps_dir/log"
    export CUDA_MPS_PIPE_DIRECTORY=$mps_dir/pipe CUDA_MPS_LOG_DIRECTORY=$mps_dir/log
    nvidia-cuda-mps-control -d
    if python3 -c "import torch; torch.ones(1, device='cuda').add_(1); torch.cuda.synchronize()"; then
      echo "mps on"
    else
      echo "mps: a CUDA client failed under MPS; stopping it"; tail -5 "$mps_dir/log/control.log" 2>/dev/null
      echo quit | nvidia-cuda-mps-control; unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
      return 1 2>/dev/null || exit 1
    fi
    ;;
  stop)
    echo quit | CUDA_MPS_PIPE_DIRECTORY=$mps_dir/pipe nvidia-cuda-mps-control
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
    echo "mps off"
    ;;
  *) echo "usage: source scripts/mps.sh start|stop"; return 2 2>/dev/null || exit 2 ;;
esac
