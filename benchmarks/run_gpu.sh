#!/usr/bin/env bash
# On a GPU machine: build, check and time everything; all output under
# benchmarks/results/<gpu-name>-<date>/ (logs, gpu_check.md/.json, benchmarks.json/.md/.png).
#
#   benchmarks/run_gpu.sh                       # every step
#   STEPS="build check" benchmarks/run_gpu.sh   # some of: build check train tests bench report
#
# Steps: build  pip install --no-build-isolation -e .  (builds the CUDA extension)
#        check  python -m benchmarks.gpu_check        (every kernel vs the reference, headline timings)
#        tune   python -m benchmarks.tune_gpu         (kernel configurations; op timings three ways)
#        train  speckle-train at the paper preset: Br-U-Net (fused, and the reference norm for
#               one epoch), D-U-Net; each run's metrics.json kept (issue 4's 30 s target)
#        tests  python -m pytest tests -q
#        bench  pytest benchmarks --benchmark-only at full size, JSON saved
#        report python -m benchmarks.report           (markdown table + PNG chart)
# A failing step is logged and the next one still runs; the exit status is 1 if any failed.
# Environment: PYTHON (default python3), MAX_JOBS (build parallelism, default: all cores),
# STEP_TIMEOUT (seconds per step, default 900), TUNE_ARGS (e.g. --skip-sweep), TRAIN_RUNS ('model norm epochs [args];...'), OUT (if set, the results folder is also packed
# into $OUT/results.tgz: the device tool brings back only what is under $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
STEPS="${STEPS:-build check train tests bench report}"
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
    local t0=$SECONDS
    # shell functions run under timeout through a child bash (they are exported below)
    timeout "$STEP_TIMEOUT" bash -c '"$@"' _ "$@" 2>&1 | tee "$out/$name.log"
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
    local specs="${TRAIN_RUNS:-br-unet fused 10;br-unet reference 1;d-unet batchnorm 10}"
    IFS=';' read -ra specs_list <<< "$specs"
    for spec in "${specs_list[@]}"; do
        set -- $spec
        local model="$1" norm="$2" epochs="$3"
        shift 3
        i=$((i + 1))
        echo "--- $model --norm $norm, $epochs epochs $*"
        local t0=$SECONDS
        "$PY" -m speckle_models.train --model "$model" --norm "$norm" --epochs "$epochs" --preset paper \
            --device cuda --out "$runs/$i" --cache-dir "$runs/cache" --no-progress "$@" || return 1
        echo "--- $model --norm $norm $*: $((SECONDS - t0)) s wall (data generation included)"
        cut -d, -f1-9 "$runs/$i/metrics.csv" 2>/dev/null
        cp "$runs/$i/metrics.json" "$out/train-$i-$model-$norm.json" 2>/dev/null
    done
}
export -f build train
export PY out
step build build
step check "$PY" -m benchmarks.gpu_check --out "$out"
step tune "$PY" -m benchmarks.tune_gpu --out "$out" ${TUNE_ARGS:-}
step train train
step tests "$PY" -m pytest tests -q -p no:cacheprovider ${PYTEST_ARGS:-}
step bench env SPECKLE_BENCH_SIZE=full "$PY" -m pytest benchmarks --benchmark-only -q \
    -p no:cacheprovider --benchmark-json="$out/benchmarks.json"
step report "$PY" -m benchmarks.report "$out/benchmarks.json" --out "$out"

if [ -n "$failed" ]; then
    echo "failed steps:$failed (logs in $out)" | tee -a "$out/summary.txt"
    exit 1
fi
echo "all steps passed; results in $out" | tee -a "$out/summary.txt"
