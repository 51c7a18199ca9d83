#!/usr/bin/env bash
# One GPU check on a fresh machine, in order of value, each step's result kept as it ends:
#
#   bash benchmarks/gpu_check.sh OUTDIR     run it
#   bash benchmarks/gpu_check.sh --plan     print the steps and their caps (no GPU needed)
#
# Written for a fresh H200 with torch/Triton preinstalled (Python 3.12, torch 2.11, Triton
# 3.6), 16 cores and no network, where GPU time is about 15 minutes a session, start-up
# included. Every step runs under `timeout` and the script goes on past failures, so a run cut
# short still leaves the most valuable evidence. Steps, most valuable first:
#
#   env             GPU, clocks, versions
#   build           install fastconv offline (editable), build the CUDA extension for sm_90
#   backends        which backends load: a build that "passed" but does not load shows here
#   smoke           correctness: the small `sanitizer`-named tests, both GPU backends
#   memcheck        compute-sanitizer memcheck on the CUDA share of that subset
#   bench-headline  the headline suites (every suite but bn_act), no torch.compile baselines
#   bench-model     python -m fastconv bench: MobileNetV2 inference, batch 256, fp16, channels_last
#   bench-compile   the same suites with their torch.compile baselines
#   gpu-tests       the rest of the GPU tests (gets the time the earlier steps left over)
#   racecheck       compute-sanitizer racecheck on the CUDA subset
#   bench-bn_act    the bn_act suite, with its 18 torch.compile baselines
#
# The whole run fits in GPU_CHECK_BUDGET_S (default 540 s; the caps below sum to it), which
# leaves a rerun on the warm machine within its 15 minutes: ninja then skips the rebuild.
#
# Only 8 files, 2 folders deep, come back from OUTDIR, so it holds 8, each rewritten whole
# (then renamed) when a step ends:
#   gpu_check.log  everything printed, all steps
#   junit.xml      one <testsuite> per pytest step (smoke, memcheck, gpu-tests, racecheck)
#   records.json   benchmark records of every suite, merged over the bench steps
#   summary.md     geomean table, notes, per-case tables: rewritten after each suite
#   speedup.png    speedup plot: rewritten after each suite
#   memory.png     the dense suite's memory against depth: rewritten after each suite
#   bench.json     python -m fastconv bench: MobileNetV2 inference against eager cuDNN
#   bench.png      its bar chart
#
# Exit status: 0 when every step passed, else 1; 2 for bad arguments. Environment knobs:
#   PYTHON (default python, else python3), GPU_CHECK_BUDGET_S, BENCH_ARGS (default --quick),
#   BENCH_COMMIT (the commit to record when the tree has no .git).

set -u

# name cap_seconds, in the order they run; they sum to 535 of the 540, 5 s for the summary.
# Estimates, none measured on the GPU yet: env + build about 170 s on 16 cores (twelve CUDA
# files for sm_90 only; a warm rerun about 10 s). smoke: 92 small tests, the Triton half a
# compile of a second or two per kernel specialisation. memcheck/racecheck: the CUDA half of
# those under compute-sanitizer, caching allocator off. bench-headline: the quick suites, whose
# Triton kernels autotune (compile and time every config) on first use of each shape: the
# longest of the benchmark steps, and --time-budget ends it 30 s early with its outputs.
PLAN=(
    "env 15"
    "build 170"
    "backends 15"
    "smoke 60"
    "memcheck 40"
    "bench-headline 110"
    "bench-model 35"
    "bench-compile 35"
    "gpu-tests 25"
    "racecheck 20"
    "bench-bn_act 15"
)
# The step that also gets the seconds the earlier ones left unused (a warm rebuild takes
# about 10 s of build's 170): the GPU tests, about 360 of them, are the ones a cap cuts short.
ELASTIC=gpu-tests
OUTPUTS=(gpu_check.log junit.xml records.json summary.md speedup.png memory.png bench.json bench.png)
DEFAULT_BUDGET=540
BUDGET=${GPU_CHECK_BUDGET_S:-$DEFAULT_BUDGET}

if [[ $# -ne 1 ]]; then
    echo "usage: $0 OUTDIR | --plan" >&2
    exit 2
fi

if [[ $1 == --plan ]]; then
    total=0
    echo "budget ${BUDGET}s"
    for entry in "${PLAN[@]}"; do
        read -r name cap <<< "$entry"
        total=$(( total + cap ))
        note=""
        [[ $name == "$ELASTIC" ]] && note=" (plus the seconds earlier steps leave unused)"
        echo "step $name ${cap}s$note"
    done
    echo "total ${total}s"
    echo "outputs ${OUTPUTS[*]}"
    exit 0
fi

mkdir -p "$1" || exit 2
OUT=$(cd "$1" && pwd)
cd "$(dirname "$0")/.." || exit 2    # the repository root
REPO=$PWD
for f in "${OUTPUTS[@]}"; do
    rm -f "$OUT/$f"    # a rerun into the same OUTDIR starts from nothing, not the last run's
done
LOG="$OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
TEE_PID=$!

WORK=$(mktemp -d)    # per-step junit XML before it is merged; never sent back
trap 'rm -rf "$WORK"' EXIT

PY=${PYTHON:-python}
command -v "$PY" > /dev/null || PY=python3
# The repository root first: `import fastconv` is this tree, not any other copy installed.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ -z "${BENCH_COMMIT:-}" ]] && ! git -C "$REPO" rev-parse HEAD > /dev/null 2>&1; then
    export BENCH_COMMIT=unknown-no-git
fi

START=$SECONDS
RESULTS=()
FAILED=0

# cap NAME: the step's cap from PLAN. later NAME: the sum of the caps of the steps after it.
cap() {
    local entry name c
    for entry in "${PLAN[@]}"; do
        read -r name c <<< "$entry"
        [[ $name == "$1" ]] && { echo "$c"; return; }
    done
    echo 0
}
later() {
    local entry name c sum=0 seen=0
    for entry in "${PLAN[@]}"; do
        read -r name c <<< "$entry"
        (( seen )) && sum=$(( sum + c ))
        [[ $name == "$1" ]] && seen=1
    done
    echo "$sum"
}

# limit NAME: seconds the step may take: its cap (the elastic step: all that is left), never
# more than the budget left after the caps of the steps after it.
limit() {
    local left=$(( BUDGET - (SECONDS - START) - $(later "$1") )) c
    c=$(cap "$1")
    [[ $1 == "$ELASTIC" ]] && c=$left
    echo $(( c < left ? c : left ))
}

# step NAME OK_CODES CMD...: run CMD under timeout, log and record its verdict. OK_CODES is a
# space-separated list of exit codes that count as a pass. SIGINT first: pytest then still
# writes its junit XML and summary, and the benchmarks their records; SIGKILL 15 s later.
step() {
    local name=$1 ok_codes=$2 lim
    shift 2
    lim=$(limit "$name")
    echo
    echo "===== [$name] $(date -u +%H:%M:%S) limit ${lim}s: $*"
    if (( lim < 10 )); then
        RESULTS+=("$name: FAILED (not run: time budget spent)")
        FAILED=1
        return
    fi
    local t0=$SECONDS rc
    timeout --signal=INT --kill-after=15 "$lim" "$@"
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

# merge_junit NAME: add the step's junit XML to OUTDIR/junit.xml as <testsuite name=NAME>
# (a step killed before pytest wrote any gets a testsuite with one error saying so).
merge_junit() {
    "$PY" - "$OUT/junit.xml" "$1" "$WORK/$1.xml" <<'EOF' || echo "merge_junit $1: failed (above)"
import os, sys, xml.etree.ElementTree as ET
out, name, part = sys.argv[1:]
root = ET.parse(out).getroot() if os.path.exists(out) else ET.Element("testsuites")
suites = []
if os.path.exists(part):
    try:
        tree = ET.parse(part).getroot()
        suites = [tree] if tree.tag == "testsuite" else list(tree)
    except ET.ParseError as exc:
        reason = f"{part}: unreadable junit XML ({exc})"
else:
    reason = f"{name} wrote no junit XML (killed, or never started)"
if not suites:
    suite = ET.Element("testsuite", name=name, tests="1", errors="1", failures="0", skipped="0")
    case = ET.SubElement(suite, "testcase", classname="gpu_check", name=name)
    ET.SubElement(case, "error", message=reason)
    suites = [suite]
for suite in suites:
    suite.set("name", name)
    root.append(suite)
ET.ElementTree(root).write(out + ".tmp", encoding="utf-8", xml_declaration=True)
os.replace(out + ".tmp", out)
EOF
}

# pytest_step NAME OK_CODES [PREFIX...] -- PYTEST_ARGS...: a pytest step whose junit XML is
# merged into OUTDIR/junit.xml as soon as it ends. PREFIX wraps the interpreter
# (compute-sanitizer).
pytest_step() {
    local name=$1 ok_codes=$2 prefix=()
    shift 2
    while [[ $# -gt 0 && $1 != -- ]]; do prefix+=("$1"); shift; done
    shift
    step "$name" "$ok_codes" "${prefix[@]}" "$PY" -m pytest tests -q -p no:cacheprovider \
        --junitxml="$WORK/$name.xml" -o junit_suite_name="$name" "$@"
    merge_junit "$name"
}

# bench_step NAME ARGS...: one benchmark run merged into OUTDIR/records.json; summary.md and
# the plot are rewritten after each of its suites. --time-budget stops it starting cases 30 s
# before its limit, so a case in flight can finish and the outputs be written.
bench_step() {
    local name=$1 lim
    shift
    lim=$(limit "$name")
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of flags
    step "$name" "0" "$PY" -m benchmarks.run "$@" --out "$OUT" --single-file --merge \
        --time-budget $(( lim > 60 ? lim - 30 : lim / 2 )) ${BENCH_ARGS:---quick}
}

# 1. Environment.
step env "0" bash -c '
    nvidia-smi
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem,power.limit,driver_version --format=csv
    echo "cores: $(nproc)"; free -g | head -2; df -h . | tail -1
    command -v nvcc > /dev/null && nvcc --version | tail -2
    echo "compute-sanitizer: $(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -1)"
    "$0" -c "import sys, numpy, torch, triton
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| cuda\", torch.version.cuda,
      \"| cudnn\", torch.backends.cudnn.version(), \"| triton\", triton.__version__, \"| numpy\", numpy.__version__)
print(\"device:\", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))"
    "$0" -m pytest --version 2>&1 | head -1
' "$PY"

# 2. Install and build. fastconv.triton_kernels and fastconv.benchmarks are the top-level
#    folders mapped into the package by setup.py's package_dir, so the package must be
#    installed: editable, offline, without the CUDA build (that is done in place next, so a
#    rerun's ninja skips what is built). Where pip cannot (no pip, an externally managed
#    Python, an old setuptools), links in this throwaway copy of the tree stand in for the
#    mapping: the layout the package had before package_dir. Then the CUDA extension for
#    sm_90 with every core; FASTCONV_BUILD_CUDA=1 makes a failed build an error.
#    Whether the package then imports is the backends step's question, not this one's: a
#    broken import must not stop the CUDA build.
install_and_build() {
    if FASTCONV_BUILD_CUDA=0 "$PY" -m pip install -qq --no-index --no-build-isolation --no-deps -e "$REPO"; then
        echo "build: fastconv installed (editable)"
    else
        echo "build: pip install -e failed (above); linking fastconv/triton_kernels and fastconv/benchmarks instead"
        ln -sfn ../triton_kernels "$REPO/fastconv/triton_kernels"
        ln -sfn ../benchmarks "$REPO/fastconv/benchmarks"
    fi
    env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 FASTCONV_BUILD_CUDA=1 "$PY" setup.py -q build_ext --inplace
}
export REPO PY
# timeout(1) runs programs, not shell functions: the function travels as bash -c's script.
step build "0" bash -c "$(declare -f install_and_build); install_and_build"

# 3. Which backends can run now.
step backends "0" "$PY" -c '
import sys, fastconv
print(fastconv.backends.report())
sys.exit(0 if all(s.available for s in fastconv.backends.available().values()) else 1)'

# 4. Correctness first: the small sanitizer-named tests on both GPU backends (cuda, triton).
pytest_step smoke "0" -- -m gpu -k sanitizer -rfEs --tb=short

# 5. compute-sanitizer memcheck on the CUDA share of that subset. Exit 5 means none is
#    selected: fine. PyTorch's caching allocator would hide out-of-bounds accesses inside its
#    pooled blocks, so memcheck runs with caching off.
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2> /dev/null | head -1)
SAN_ARGS=(-m gpu -k "cuda and sanitizer" -rfE --tb=short)
if [[ -n "$SAN" ]]; then
    pytest_step memcheck "0 5" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
        "$SAN" --tool memcheck --error-exitcode 99 -- "${SAN_ARGS[@]}"
else
    RESULTS+=("memcheck: SKIPPED (compute-sanitizer not found)")
fi

# 6. The headline benchmarks: every suite but bn_act (the ceilings run first in each run),
#    without the torch.compile baselines, whose max-autotune compiles take up to a minute each.
SUITES=$("$PY" -m benchmarks.run --list 2> /dev/null | grep -v -x -e ceilings -e bn_act | tr '\n' ' ')
[[ -n $SUITES ]] || SUITES="conv_bn_act depthwise pointwise"
# shellcheck disable=SC2086  # SUITES is a list of names
bench_step bench-headline $SUITES --no-compile

# 6b. A whole model: MobileNetV2 inference against eager cuDNN, on the cuda backend (under auto
#     each of its layer shapes would cost Triton compiles and timing first).
step bench-model "0" "$PY" -m fastconv bench --model mobilenet_v2 --batch 256 --dtype fp16 --mode inference \
    --compare eager --channels-last --backend cuda --steps 10 --out "$OUT"

# 7. The same suites with their compile baselines; each record replaces its headline twin.
# shellcheck disable=SC2086
bench_step bench-compile $SUITES --compile

# 8. The rest of the GPU tests. Not the Triton backend's share of the big CPU grids (those are
#    not gpu-marked): each geometry is a Triton compile of a few seconds. The slow
#    every-config test runs by hand: pytest tests -m "gpu and slow".
pytest_step gpu-tests "0" -- -m "gpu and not slow" -k "not sanitizer" -rfEs --tb=short

# 9. racecheck on the CUDA subset.
if [[ -n "$SAN" ]]; then
    pytest_step racecheck "0 5" "$SAN" --tool racecheck --error-exitcode 99 -- "${SAN_ARGS[@]}"
else
    RESULTS+=("racecheck: SKIPPED (compute-sanitizer not found)")
fi

# 10. bn_act last: its quick run compiles 18 torch.compile baselines.
bench_step bench-bn_act bn_act

# Step verdicts, then the summary table last (it is what the end of a log shows).
echo
echo "===== gpu_check: $(( SECONDS - START ))s of ${BUDGET}s; outputs in $OUT"
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
