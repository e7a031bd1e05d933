#!/usr/bin/env bash
# The GPU check, one command: bash scripts/device-check.sh OUTDIR [tests] [attention] [bench]
#
# Runs on one CUDA device (H100/H200), with no network and nothing to install (torch, triton,
# transformers and pytest are all it needs), within 8 minutes: each step has its own `timeout`, and
# a step that runs out of time or fails leaves the others' results in place.
#   tests      pytest tests/test_cuda.py, one process per test, 12 at once, a log and JUnit XML each;
#              meanwhile two processes compile the benchmarks' kernels into Triton's cache    <= 180 s
#   attention  python -m kernels.attention: ours vs SDPA-flash and SDPA-cuDNN, fwd/bwd TFLOP/s <= 120 s
#   bench      python bench_gpu.py all: batch-1 decode bandwidth, batch-64 sampler vs transformers,
#              GRPO update tokens/s and MFU, at the Qwen2.5-0.5B shape                          <= 100 s
# Then scripts/device_report.py writes OUTDIR/device-check.json and OUTDIR/device-check.md (the table
# with each measure against its goal). Name steps to run only those (a rerun after a fix).
# Without a CUDA device it prints "no CUDA device" and exits 0. Exit code 1: a test failed or a step
# did not finish (the report says which). MAX_JOBS (default 12) caps the parallel test processes;
# Triton's compiled kernels stay in TRITON_CACHE_DIR (default /tmp/r1-triton-cache), so a rerun on
# the same machine skips the compiling. On a lent device: one call, `bash scripts/device-check.sh
# "$OUT"`, with a limit of about 500 s.
set -u
OUT=${1:?usage: bash scripts/device-check.sh OUTDIR [tests] [attention] [bench]}
shift
STEPS=${*:-tests attention bench}
PY=${PYTHON:-python}
cd "$(dirname "$0")/.." || exit 2
for s in $STEPS; do
    case $s in tests | attention | bench) ;; *) echo "unknown step $s: use tests, attention or bench"; exit 2 ;; esac
done

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "no CUDA device: nothing to check here (the CPU suite is: python -m pytest -q tests)"
    exit 0
fi

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
export R1_DEVICE_OUT="$OUT"                          # tests/test_cuda.py writes its peak memory here
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/r1-triton-cache}  # compiled kernels, shared by the steps
export PYTHONDONTWRITEBYTECODE=1
STEPLOG="$OUT/steps.jsonl"
: > "$STEPLOG"

# step NAME SECONDS COMMAND...: run it under its own timeout, log output and exit code
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0)), \"limit\": $limit}" >> "$STEPLOG"
    echo "   rc $rc in $((SECONDS - t0))s (log: $OUT/$name.log)"
    tail -n 5 "$OUT/$name.log"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    "$PY" -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, 'transformers', transformers.__version__)" 2>&1
} > "$OUT/environment.txt"

for s in $STEPS; do
    case $s in
    tests)
        # One process per test, up to MAX_JOBS at once, beside two that compile what the benchmarks run:
        # Triton compiles each autotune config on one CPU core (seconds each, 19 per kernel variant),
        # so 16 cores share the work. The autotuner's timings are skewed by the sharing, which
        # changes speed, never results; the benchmark steps below autotune again, alone on the GPU.
        deadline=$((SECONDS + 180))
        "$PY" -m pytest -p no:cacheprovider --collect-only -q tests/test_cuda.py > "$OUT/collected.txt" 2>&1
        ids=$(grep '^tests/test_cuda.py::' "$OUT/collected.txt" | grep -v '::test_kernel_'
              grep '^tests/test_cuda.py::test_kernel_' "$OUT/collected.txt")  # the slow model tests first
        [ -n "$ids" ] || ids=tests/test_cuda.py                               # a collection error: show it
        step warm-attention 175 "$PY" -m kernels.attention --compile-only &
        step warm-bench 175 "$PY" bench_gpu.py decode sampler train --repeats 1 --json "$OUT/bench_gpu_warm.json" &
        i=0
        for id in $ids; do
            while [ "$(jobs -rp | wc -l)" -ge "${MAX_JOBS:-12}" ]; do wait -n; done
            i=$((i + 1))
            left=$((deadline - SECONDS))
            step "tests-$(printf %02d $i)" $((left > 10 ? left : 10)) "$PY" -m pytest -p no:cacheprovider -v -rA \
                "$id" --junitxml="$OUT/junit-$i.xml" &
        done
        wait
        ;;
    attention)
        # alone on the GPU, with the chosen tile configs printed into the log
        step attention 120 env TRITON_PRINT_AUTOTUNING=1 "$PY" -m kernels.attention --json "$OUT/attention.json"
        ;;
    bench)
        step bench 100 "$PY" bench_gpu.py all --json "$OUT/bench_gpu.json"
        ;;
    esac
done

"$PY" scripts/device_report.py "$OUT"
