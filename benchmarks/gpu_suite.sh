#!/usr/bin/env bash
# The whole GPU tier in one run of at most 9 minutes on one GPU, ending in one summary block with every number:
#   1. pytest -m gpu        tests/test_gpu.py: flex document masking, flash SDPA, CUDA memory metrics, bf16 training
#                           against the recorded CPU curve, planner vs measured peak, long context (one context-
#                           parallel rank's attention at 131,072 tokens; model=7b_128k at 32k tokens vs the planner)
#                           (each prints `GPU-RESULT ...`)
#   2. gpu_check.sh         speed, MFU and peak memory of a 1.3B model, compile off and on (10 timed steps each)
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]          # on a GPU machine with a CUDA build of torch (make TORCH=...)
#   bash benchmarks/gpu_suite.sh --tiny [OUT_DIR]   # on CPU: the gpu tests skip, gpu_check.sh --tiny; proves it runs
#
# Logs go to OUT_DIR (default runs/gpu_suite-<UTC time>); the summary is printed last and kept in OUT_DIR/summary.txt.
# Budget: GPU_SUITE_SECONDS (540) in all, of which GPU_SUITE_TEST_SECONDS (330) for the tests. Exit status 0 only if
# both parts passed.
set -uo pipefail
cd "$(dirname "$0")/.."
TINY=""
if [ "${1:-}" = "--tiny" ]; then TINY="--tiny"; shift; fi
OUT="${1:-runs/gpu_suite-$(date -u +%Y%m%dT%H%M%SZ)}"
BUDGET="${GPU_SUITE_SECONDS:-540}"
TEST_BUDGET="${GPU_SUITE_TEST_SECONDS:-330}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"   # one GPU
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/build/torch_extensions}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export PYTHON
mkdir -p "$OUT"
start=$SECONDS

if [ -z "$TINY" ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_suite.sh: torch sees no CUDA device here ($("$PYTHON" -c 'import torch; print(torch.__version__)'));" \
         "install a CUDA build of torch, or run with --tiny to check the script on CPU" >&2
    exit 2
fi

echo "gpu_suite: pytest -m gpu (at most ${TEST_BUDGET}s) -> $OUT/pytest.log"
timeout -k 10 "$TEST_BUDGET" "$PYTHON" -m pytest -m gpu -s -rA -p no:cacheprovider tests/test_gpu.py \
    > "$OUT/pytest.log" 2>&1
tests_rc=$?
tests_s=$(( SECONDS - start ))

left=$(( BUDGET - tests_s - 5 ))
echo "gpu_suite: benchmarks/gpu_check.sh (at most ${left}s) -> $OUT/gpu_check.log"
timeout -k 10 "$left" bash benchmarks/gpu_check.sh ${TINY:---steps 10} > "$OUT/gpu_check.log" 2>&1
check_rc=$?

status() {  # exit code -> words
    case "$1" in 0) echo "passed";; 124|137) echo "TIMED OUT";; *) echo "FAILED (exit $1)";; esac
}

{
    echo "==================== distlm GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC') ===================="
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    versions=$("$PYTHON" -c "import torch, deepspeed; print('torch', torch.__version__, 'cuda', torch.version.cuda,
                                                         'deepspeed', deepspeed.__version__)" 2>/dev/null | tail -n 1)
    echo "$versions, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
    echo "-- pytest -m gpu: $(status $tests_rc) in ${tests_s}s ($OUT/pytest.log)"
    grep -E "^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) " "$OUT/pytest.log" | sed 's/^/   /'
    grep -o "GPU-RESULT .*" "$OUT/pytest.log" | sed 's/^GPU-RESULT /   /'
    tail -n 1 "$OUT/pytest.log" | sed 's/^/   /'
    echo "-- gpu_check.sh: $(status $check_rc) in $(( SECONDS - start - tests_s ))s ($OUT/gpu_check.log)"
    grep -E "^(NVIDIA|cpu|distlm plan|torch )" "$OUT/gpu_check.log" | sed 's/^/   /'
    grep -E "^(variant |DeepSpeed engine|speed-up from compile)|FAILED|not taken" "$OUT/gpu_check.log" | sed 's/^/   /'
    echo "-- total $(( SECONDS - start ))s of ${BUDGET}s"
} | tee "$OUT/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$check_rc" -eq 0 ]
