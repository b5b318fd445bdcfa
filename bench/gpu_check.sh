#!/usr/bin/env bash
# One-shot check on a lent GPU machine (H100/H200; torch, triton and nvcc installed; no network).
#
#   bash bench/gpu_check.sh              # from the repository root; results in $OUT or bench/results/gpu-<date>
#
# Stages, each with its own time limit inside one overall budget (TOTAL_S, default 470 s < 8 min),
# most important first (a stage that would start with the budget spent is skipped):
#   0. environment: nvidia-smi, versions, backends                     (always)
#   1. build the C++/CUDA extensions in place (MAX_JOBS=16)            (skipped without nvcc / CUDA torch)
#   2. selftest: python -m dit_fast.selftest --device cuda --json $OUT/selftest.json
#      (every kernel vs its reference, then the fused DiT; without a CUDA device: --device cpu)
#   3. kernels: bench/gpu_kernels.py (row-op bandwidth vs copy_, attention TFLOP/s at head dim 72
#      vs SDPA / flash-attn, profile of an fp32 DiT-XL/2 training step; without a CUDA device: a
#      --dry-run of the row-op and attention sections on CPU, which checks the script only)
#   4. GPU tests: python -m pytest -q -x tests -k "$TEST_FILTER"       (skipped without a CUDA device)
#   5. throughput: DiT-XL/2 bf16 batch 32, forward / train / sample    (skipped without a CUDA device)
#   6. Gflops table + forward throughput of the 12 Table-4 models      (skipped without a CUDA device)
#   7. kernel microbenchmarks: pytest bench --benchmark-only           (skipped without pytest-benchmark)
#   8. README-style markdown of the JSON results (bench/report.py --print)
# Everything (logs, JSON, PNG, nvidia-smi, versions, summary.txt) goes to one folder. A stage that fails
# or times out is recorded and the next one still runs; the exit status is 1 if any stage failed.
#
# Environment: OUT (results folder), TOTAL_S (overall budget, s), TEST_FILTER (pytest -k expression for
# stage 2; empty = the whole suite), TP_ARGS (extra bench/throughput.py arguments), MAX_JOBS.
set -u -o pipefail

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
RES=${OUT:-$ROOT/bench/results/gpu-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$RES" || exit 2
TOTAL_S=${TOTAL_S:-470}
TEST_FILTER=${TEST_FILTER-cuda or triton or gpu}
START=$(date +%s)
FAILED=0
SUMMARY="$RES/summary.txt"
: >"$SUMMARY"
PY=${PYTHON:-python}

note() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$SUMMARY"; }

# remaining: seconds left in the overall budget.
remaining() { echo $((TOTAL_S - ($(date +%s) - START))); }

# stage NAME LIMIT_S CMD...: runs CMD with stdout/stderr in $RES/NAME.log under min(LIMIT_S, remaining).
stage() {
    local name=$1 limit=$2
    shift 2
    local left
    left=$(remaining)
    if ((left < 15)); then
        note "$name: SKIPPED (overall budget of ${TOTAL_S}s used up)"
        return 0
    fi
    ((limit > left)) && limit=$left
    note "$name: start (limit ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout --signal=TERM --kill-after=10 "$limit" "$@" >"$RES/$name.log" 2>&1
    rc=$?
    if ((rc == 124 || rc == 137)); then
        note "$name: TIMEOUT after ${limit}s (log: $name.log)"
        FAILED=1
    elif ((rc != 0)); then
        note "$name: FAILED rc=$rc after $(($(date +%s) - t0))s (log: $name.log)"
        tail -n 15 "$RES/$name.log" | sed 's/^/    /' | tee -a "$SUMMARY"
        FAILED=1
    else
        note "$name: ok in $(($(date +%s) - t0))s"
    fi
    return 0
}

skip() { note "$1: SKIPPED ($2)"; }

# ---- 0. environment
{
    echo "date: $(date -u)"
    echo "host kernel: $(uname -srm)"
    echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed file(s)"
    echo "python: $($PY --version 2>&1)"
    echo "nvcc: $(command -v nvcc >/dev/null && nvcc --version | tail -n 1 || echo 'not found')"
    "$PY" - <<'EOF' 2>&1
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "device available:", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device:", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
try:
    import triton
    print("triton", triton.__version__)
except ImportError as e:
    print("triton: not importable:", e)
for mod in ("pytest", "pytest_benchmark", "diffusers", "matplotlib", "flash_attn"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except ImportError:
        print(mod, "not installed")
EOF
} >"$RES/versions.txt" 2>&1
if command -v nvidia-smi >/dev/null; then
    nvidia-smi >"$RES/nvidia-smi.txt" 2>&1
    nvidia-smi -q >"$RES/nvidia-smi-q.txt" 2>&1
else
    echo "nvidia-smi not found" >"$RES/nvidia-smi.txt"
fi
pip freeze >"$RES/pip-freeze.txt" 2>/dev/null || true
note "environment: $(grep -E '^(torch|device:)' "$RES/versions.txt" | tr '\n' ' ')"

HAS_CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
TORCH_CUDA=$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null || echo "")

# ---- 1. build
if ! command -v nvcc >/dev/null && [ -z "${CUDA_HOME:-}" ]; then
    skip build "nvcc not found: the CPU extension only"
    stage build_cpu 240 env MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
elif [ -z "$TORCH_CUDA" ]; then
    skip build "torch is not a CUDA build"
else
    if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && [ "$HAS_CUDA" = 1 ]; then
        # Only this device's architecture (half the compile time of the default "8.0;9.0a").
        TORCH_CUDA_ARCH_LIST=$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}" + ("a" if m == 9 else ""))')
        export TORCH_CUDA_ARCH_LIST
    fi
    note "build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}"
    stage build 200 env MAX_JOBS="${MAX_JOBS:-16}" "$PY" setup.py build_ext --inplace
fi
"$PY" -c 'import dit_fast; [print(b) for b in dit_fast.backends().values()]' >"$RES/backends.txt" 2>&1
note "backends: $(tr '\n' ' ' <"$RES/backends.txt" | cut -c1-400)"

# ---- 2. selftest (its per-check lines are in selftest.log; the failures end up in the summary)
if [ "$HAS_CUDA" = 1 ]; then
    stage selftest 150 "$PY" -m dit_fast.selftest --device cuda --json "$RES/selftest.json"
else
    stage selftest 150 "$PY" -m dit_fast.selftest --device cpu --json "$RES/selftest.json"
fi
[ -f "$RES/selftest.log" ] && note "selftest: $(tail -n 1 "$RES/selftest.log")"

# ---- 3. kernel measurements (issue 15 item 7; they settle the auto order)
if [ "$HAS_CUDA" = 1 ]; then
    stage kernels 120 "$PY" bench/gpu_kernels.py --out "$RES"
else
    stage kernels 120 "$PY" bench/gpu_kernels.py --out "$RES" --dry-run --sections rowops,attention
fi

# ---- 4. GPU tests
if [ "$HAS_CUDA" != 1 ]; then
    skip tests "no CUDA device"
elif [ -n "$TEST_FILTER" ]; then
    stage tests 90 "$PY" -m pytest -q -x tests -k "$TEST_FILTER" -p no:cacheprovider --junitxml="$RES/tests.xml"
else
    stage tests 90 "$PY" -m pytest -q -x tests -p no:cacheprovider --junitxml="$RES/tests.xml"
fi

# ---- 5. throughput (torch.compile is left out: its compile time alone would take the stage's budget)
if [ "$HAS_CUDA" != 1 ]; then
    skip throughput "no CUDA device"
else
    # shellcheck disable=SC2086  # TP_ARGS is a list of arguments
    stage throughput 100 "$PY" bench/throughput.py --model DiT-XL/2 --dtype bf16 --batch-size 32 \
        --modes forward,train,sample --impls reference,diffusers,dit_fast --warmup 2 --iters 5 \
        --note "bench/gpu_check.sh" --out "$RES/throughput-DiT-XL_2.json" ${TP_ARGS:-}
fi

# ---- 6. Gflops vs throughput
if [ "$HAS_CUDA" != 1 ]; then
    skip gflops "no CUDA device"
else
    stage gflops 30 "$PY" bench/gflops.py --batch-size 32 --warmup 1 --iters 3 --out "$RES/gflops.json"
fi

# ---- 7. kernel microbenchmarks
if ! "$PY" -c 'import pytest_benchmark' 2>/dev/null; then
    skip microbench "pytest-benchmark not installed (pip install -r requirements-test.txt)"
else
    stage microbench 60 "$PY" -m pytest bench --benchmark-only -q -p no:cacheprovider \
        --benchmark-max-time=0.2 --benchmark-min-rounds=3 --benchmark-columns=min,median,max,rounds \
        --benchmark-json="$RES/microbench.json"
fi

# ---- 8. markdown
jsons=()
for f in "$RES"/throughput-*.json "$RES"/gflops.json; do
    [ -f "$f" ] && jsons+=("$f")
done
if ((${#jsons[@]})); then
    "$PY" bench/report.py "${jsons[@]}" --print >"$RES/report.md" 2>&1 || FAILED=1
    note "report: report.md"
else
    skip report "no JSON results"
fi

note "done in $(($(date +%s) - START))s; results in $RES; $( ((FAILED)) && echo 'SOME STAGE FAILED' || echo 'all stages ok or skipped')"
exit "$FAILED"
