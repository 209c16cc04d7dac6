#!/usr/bin/env bash
# One-GPU speed and memory check of distlm (<= 8 minutes on an H100/H200): see benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh            # needs a CUDA build of torch (make TORCH=... ) and one GPU
#   bash benchmarks/gpu_check.sh --tiny     # on CPU, a tiny model: proves the script runs end to end
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"   # one GPU
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
if [ "${1:-}" != "--tiny" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
"$PYTHON" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__)"
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py "$@"
