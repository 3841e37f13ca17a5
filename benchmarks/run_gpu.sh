#!/usr/bin/env bash
# On a GPU machine: build, check and time everything; all output under
# benchmarks/results/<gpu-name>-<date>/ (logs, gpu_check.md/.json, benchmarks.json/.md/.png).
#
#   benchmarks/run_gpu.sh                       # every step
#   STEPS="build check" benchmarks/run_gpu.sh   # some of: build check tests bench report
#
# Steps: build  pip install --no-build-isolation -e .  (builds the CUDA extension)
#        check  python -m benchmarks.gpu_check        (every kernel vs the reference, headline timings)
#        tests  python -m pytest tests -q
#        bench  pytest benchmarks --benchmark-only at full size, JSON saved
#        report python -m benchmarks.report           (markdown table + PNG chart)
# A failing step is logged and the next one still runs; the exit status is 1 if any failed.
# Environment: PYTHON (default python3), MAX_JOBS (build parallelism, default: all cores).
set -uo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
STEPS="${STEPS:-build check tests bench report}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
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
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    [ "$rc" -eq 0 ] || failed="$failed $name"
}

step build "$PY" -m pip install --no-build-isolation -e .
step check "$PY" -m benchmarks.gpu_check --out "$out"
step tests "$PY" -m pytest tests -q -p no:cacheprovider
step bench env SPECKLE_BENCH_SIZE=full "$PY" -m pytest benchmarks --benchmark-only -q \
    -p no:cacheprovider --benchmark-json="$out/benchmarks.json"
step report "$PY" -m benchmarks.report "$out/benchmarks.json" --out "$out"

if [ -n "$failed" ]; then
    echo "failed steps:$failed (logs in $out)" | tee -a "$out/summary.txt"
    exit 1
fi
echo "all steps passed; results in $out" | tee -a "$out/summary.txt"
