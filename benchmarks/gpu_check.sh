#!/usr/bin/env bash
# One GPU check on a fresh machine: environment, build, GPU tests, compute-sanitizer,
# benchmarks, then the summary table last.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Written for a fresh H200 with torch/Triton preinstalled, 16 cores and no network. Every
# step runs under `timeout` and the script goes on past failures, so one broken step
# still leaves the later ones' results. The whole run fits in GPU_CHECK_BUDGET_S (default
# 460 s, under the 8 minutes a check may take): a step gets at most its own cap, and never
# the time the steps after it need as a minimum.
#
# Only a few files come back from OUTDIR (8 at most, 2 folders deep), so it stays flat:
#   gpu_check.log  everything printed, all steps
#   records.json   benchmark records of every suite
#   summary.md     geomean table, notes, per-case tables
#   speedup.png    speedup plot
#
# Exit status: 0 when every step passed, else 1. Environment knobs:
#   PYTHON (default python, else python3), GPU_CHECK_BUDGET_S, BENCH_ARGS (default --quick),
#   BENCH_COMMIT (the commit to record when the tree has no .git).

set -u

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2    # the repository root
REPO=$PWD
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

PY=${PYTHON:-python}
command -v "$PY" > /dev/null || PY=python3
# fastconv/triton_kernels is a symlink into the tree, so the repository root on the path
# is enough: no pip install (and no network) needed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ -z "${BENCH_COMMIT:-}" ]] && ! git -C "$REPO" rev-parse HEAD > /dev/null 2>&1; then
    export BENCH_COMMIT=unknown-no-git
fi

BUDGET=${GPU_CHECK_BUDGET_S:-460}
START=$SECONDS
RESULTS=()
FAILED=0

# limit CAP RESERVE: seconds a step may take, given what the later steps need at least.
limit() {
    local left=$(( BUDGET - (SECONDS - START) - $2 ))
    echo $(( $1 < left ? $1 : left ))
}

# step NAME LIMIT OK_CODES CMD...: run CMD under timeout, log and record its verdict.
# OK_CODES is a space-separated list of exit codes that count as a pass.
step() {
    local name=$1 lim=$2 ok_codes=$3
    shift 3
    echo
    echo "===== [$name] $(date -u +%H:%M:%S) limit ${lim}s: $*"
    if (( lim < 10 )); then
        RESULTS+=("$name: FAILED (not run: time budget spent)")
        FAILED=1
        return
    fi
    local t0=$SECONDS rc
    timeout --kill-after=10 "$lim" "$@"
    rc=$?
    local took=$(( SECONDS - t0 ))
    if [[ " $ok_codes " == *" $rc "* ]]; then
        local note=""
        [[ $rc -eq 5 ]] && note=", pytest selected no tests"
        RESULTS+=("$name: ok (rc $rc$note, ${took}s)")
    elif (( rc == 124 || rc == 137 )); then
        RESULTS+=("$name: FAILED (timed out after ${lim}s)")
        FAILED=1
    else
        RESULTS+=("$name: FAILED (rc $rc, ${took}s)")
        FAILED=1
    fi
    echo "===== [$name] finished: ${RESULTS[-1]}"
}

# Minimum seconds each later step needs; a step's reserve is the sum of those after it.
MIN_BACKENDS=15 MIN_TESTS=60 MIN_MEMCHECK=30 MIN_RACECHECK=30 MIN_BENCH=100
R_BENCH=5
R_RACECHECK=$(( R_BENCH + MIN_BENCH ))
R_MEMCHECK=$(( R_RACECHECK + MIN_RACECHECK ))
R_TESTS=$(( R_MEMCHECK + MIN_MEMCHECK ))
R_BACKENDS=$(( R_TESTS + MIN_TESTS ))
R_BUILD=$(( R_BACKENDS + MIN_BACKENDS ))
R_ENV=$(( R_BUILD + 90 ))

# 1. Environment.
step env "$(limit 30 $R_ENV)" "0" bash -c '
    nvidia-smi
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version --format=csv
    echo "cores: $(nproc)"; free -g | head -2; df -h . | tail -1
    command -v nvcc > /dev/null && nvcc --version | tail -2
    echo "compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -1)"
    "$0" -c "import sys, torch, triton
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| cuda\", torch.version.cuda,
      \"| cudnn\", torch.backends.cudnn.version(), \"| triton\", triton.__version__)
print(\"device:\", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
' "$PY"

# 2. Build the CUDA extension for sm_90 with every core. FASTCONV_BUILD_CUDA=1 asks
#    setup.py for the CUDA build explicitly (it gates on CUDA_HOME, not on a visible GPU).
step build "$(limit 240 $R_BUILD)" "0" \
    env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTCONV_BUILD_CUDA=1 "$PY" setup.py build_ext --inplace

# 2b. Which backends can run now: a build that "passed" but does not load shows up here.
step backends "$(limit 30 $R_BACKENDS)" "0" "$PY" -c '
import sys, fastconv
status = fastconv.backends.available()
for name, s in status.items():
    print(name.ljust(8), "available" if s.available else "UNAVAILABLE: " + s.reason)
sys.exit(0 if all(s.available for s in status.values()) else 1)'

# 3. The GPU tests: the cuda backend's share of every test grid, and tests/test_gpu.py (both
#    GPU backends on small cases, determinism, graphs, 64-bit sizes). Not the Triton backend's
#    share of the big grids: each of its geometries is a Triton compile of a few seconds, about
#    180 of them, which would not fit; the CPU run covers those kernels in the interpreter.
#    The slow every-config test runs by hand: pytest tests/test_gpu.py -m slow.
step gpu-tests "$(limit 200 $R_TESTS)" "0" \
    "$PY" -m pytest tests -q -m "gpu and not slow" -p no:cacheprovider -rfEs --tb=short

# 4. compute-sanitizer on the small CUDA subset (tests named "sanitizer"). Exit 5 means
#    none is selected yet: fine. PyTorch's caching allocator would hide out-of-bounds
#    accesses inside its pooled blocks, so memcheck runs with caching off.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -1)
SAN_TESTS=("$PY" -m pytest tests -q -m gpu -k "cuda and sanitizer" -p no:cacheprovider -rfE --tb=short)
if [[ -n "$SAN" ]]; then
    step memcheck "$(limit 60 $R_MEMCHECK)" "0 5" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SAN" --tool memcheck --error-exitcode 99 "${SAN_TESTS[@]}"
    step racecheck "$(limit 60 $R_RACECHECK)" "0 5" \
        "$SAN" --tool racecheck --error-exitcode 99 "${SAN_TESTS[@]}"
else
    RESULTS+=("memcheck: SKIPPED (compute-sanitizer not found)" "racecheck: SKIPPED (compute-sanitizer not found)")
fi

# 5. Benchmarks, every registered suite. --time-budget makes the run stop starting cases
#    before its timeout, so the records, summary and plot are always written.
BENCH_LIMIT=$(limit 240 $R_BENCH)
# shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
step bench "$BENCH_LIMIT" "0" "$PY" -m benchmarks.run --out "$OUT" --single-file \
    --time-budget $(( BENCH_LIMIT > 60 ? BENCH_LIMIT - 45 : BENCH_LIMIT / 2 )) ${BENCH_ARGS:---quick}

# 6. Step verdicts, then the summary table last (it is what the end of a log shows).
echo
echo "===== gpu_check: $(( SECONDS - START ))s in all; outputs in $OUT"
for r in "${RESULTS[@]}"; do
    echo "  $r"
done
if [[ -f "$OUT/summary.md" ]]; then
    echo
    # The geomean section of summary.md: from its heading up to the per-case tables.
    sed -n '/^## Geomean/,/^## Per case/p' "$OUT/summary.md" | sed '$d'
fi
# Let tee flush the log before the machine hands OUTDIR back.
exec 1>&- 2>&-
wait "$TEE_PID" 2> /dev/null
exit $FAILED
