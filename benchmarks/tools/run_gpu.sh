#!/usr/bin/env bash
# On a GPU machine (one call of at most 9 minutes on an H200): build, check and time; all output
# under benchmarks/results/<gpu-name>-<date>/ (logs, gpu_check.md/.json, benchmarks.json/.md/.png).
#
#   benchmarks/tools/run_gpu.sh                       # the default steps, within DEADLINE seconds
#   STEPS="build check" benchmarks/tools/run_gpu.sh   # some of: build check tune bench train tests report
#   STEPS="build tests" DEADLINE=3000 BENCH_K= benchmarks/tools/run_gpu.sh   # the full suites (longer)
#
# Steps (default: build check bench train report):
#        build  pip install --no-build-isolation -e .  (builds the CUDA extension)
#        check  python -m benchmarks.tools.gpu_check --quick --skip-timings  (BatchRenorm, the norm
#               block and the noise kernels by the tests' kits on cuda and triton; pass/fail)
#        tune   python -m benchmarks.tools.tune_gpu         (kernel configurations; op timings three ways)
#        bench  pytest benchmarks --benchmark-only at full size, -k "$BENCH_K" (default: the
#               norm-block and train-step groups; BENCH_K= runs every group), JSON saved
#        train  speckle-train at the paper preset, 10 epochs each: Br-U-Net (fused block) and
#               D-U-Net, each eager, --compile and --cuda-graph; each run's metrics.json kept
#        tests  python -m pytest tests -q (not in the default: it does not fit 9 minutes)
#        report python -m benchmarks.tools.results_report           (markdown table + PNG chart)
# A failing step is logged and the next one still runs; the exit status is 1 if any failed.
# Every step's timeout is the smaller of STEP_TIMEOUT and what is left of DEADLINE, so the call
# ends (with its results packed) inside the device tool's limit.
# Environment: PYTHON (default python3), MAX_JOBS (build parallelism, default: all cores),
# DEADLINE (seconds for the whole script, default 530), STEP_TIMEOUT (seconds per step, default
# 900), CHECK_ARGS (default: --quick --skip-timings), BENCH_K, TUNE_ARGS (e.g. --skip-sweep),
# TRAIN_RUNS ('model norm epochs [args];...'), OUT (if set, the results folder is also packed
# into $OUT/results.tgz: the device tool brings back only what is under $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
STEPS="${STEPS:-build check bench train report}"
DEADLINE="${DEADLINE:-530}"
BENCH_K="${BENCH_K-norm_block or train_step}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
STEP_TIMEOUT="${STEP_TIMEOUT:-900}"
unset TRITON_INTERPRET  # the interpreter is a correctness tool; benchmarks time the GPU

gpu="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)" || gpu=""
if [ -z "$gpu" ]; then
    echo "run_gpu.sh: torch sees no CUDA device; run this on a GPU machine" >&2
    exit 2
fi
slug="$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')"
out="benchmarks/results/${slug}-$(date +%F)"
mkdir -p "$out"
echo "output: $out"

{
    echo "date: $(date -Iseconds)"
    echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git diff --quiet 2>/dev/null || echo '(uncommitted changes)')"
    "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda)'
    "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
    echo "cpus: $(nproc)"
} > "$out/environment.txt"
cat "$out/environment.txt"

failed=""
step() {  # step NAME COMMAND...: run, log to $out/NAME.log, remember a failure
    local name="$1"
    shift
    case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
    echo "=== $name: $*"
    local t0=$SECONDS left=$((DEADLINE - SECONDS)) limit="$STEP_TIMEOUT"
    if [ "$left" -lt 10 ]; then
        echo "=== $name: not run, DEADLINE ($DEADLINE s) reached" | tee -a "$out/summary.txt"
        failed="$failed $name"
        return 0
    fi
    [ "$left" -lt "$limit" ] && limit="$left"
    # shell functions run under timeout through a child bash (they are exported below)
    timeout "$limit" bash -c '"$@"' _ "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    [ "$rc" -eq 0 ] || failed="$failed $name"
    pack
}
pack() {  # after every step, so a call cut off at its time limit still brings back what it had
    if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
        tar czf "$OUT/results.tgz.tmp" "$out" && mv "$OUT/results.tgz.tmp" "$OUT/results.tgz"
    fi
}

build() {  # pip's editable install; where pip cannot (no index, old setuptools), build in place
    PIP_NO_INDEX=1 "$PY" -m pip install --no-build-isolation --no-deps -e . ||
        "$PY" setup.py build_ext --inplace
}
train() {  # wall time of whole runs at the paper preset on the phantom set; TRAIN_RUNS overrides
    local runs i=0
    runs="$(mktemp -d)"
    local specs="${TRAIN_RUNS:-br-unet fused 10;br-unet fused 10 --compile;br-unet fused 10 --cuda-graph;d-unet batchnorm 10;d-unet batchnorm 10 --compile;d-unet batchnorm 10 --cuda-graph}"
    IFS=';' read -ra specs_list <<< "$specs"
    for spec in "${specs_list[@]}"; do
        set -- $spec
        local model="$1" norm="$2" epochs="$3"
        shift 3
        i=$((i + 1))
        echo "--- $model --norm $norm, $epochs epochs $*"
        local t0=$SECONDS
        "$PY" -m speckle_models.training.train --model "$model" --norm "$norm" --epochs "$epochs" --preset paper \
            --device cuda --out "$runs/$i" --cache-dir "$runs/cache" --no-progress "$@" || return 1
        echo "--- $model --norm $norm $*: $((SECONDS - t0)) s wall (data generation included)"
        cut -d, -f1-9 "$runs/$i/metrics.csv" 2>/dev/null
        local mode="${1:-eager}"
        cp "$runs/$i/metrics.json" "$out/train-$i-$model-$norm${mode:+-${mode#--}}.json" 2>/dev/null
    done
}
export -f build train
export PY out
step build build
step check "$PY" -m benchmarks.tools.gpu_check --out "$out" ${CHECK_ARGS---quick --skip-timings}
step tune "$PY" -m benchmarks.tools.tune_gpu --out "$out" ${TUNE_ARGS:-}
step bench env SPECKLE_BENCH_SIZE=full "$PY" -m pytest benchmarks --benchmark-only -q \
    -p no:cacheprovider --benchmark-json="$out/benchmarks.json" ${BENCH_K:+-k "$BENCH_K"}
step train train
step tests "$PY" -m pytest tests -q -p no:cacheprovider ${PYTEST_ARGS:-}
step report "$PY" -m benchmarks.tools.results_report "$out/benchmarks.json" --out "$out"

if [ -n "$failed" ]; then
    echo "failed steps:$failed (logs in $out)" | tee -a "$out/summary.txt"
    exit 1
fi
echo "all steps passed; results in $out" | tee -a "$out/summary.txt"
