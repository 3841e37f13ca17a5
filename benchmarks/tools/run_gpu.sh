#!/usr/bin/env bash
# On a lent GPU: the run in four stages, each one device call of at most 9 minutes with a minute
# to spare (DEADLINE, default 480 s of work a stage); results under
# benchmarks/results/<gpu-name>-<date>/stage<N>/, written as each item finishes.
#
#   benchmarks/tools/run_gpu.sh 1            # build; the case kits on the CUDA and Triton kernels in
#                                            # every dtype and layout (verdict and error/bound ratio a
#                                            # case); the checkpoint tests on the GPU
#   benchmarks/tools/run_gpu.sh 2            # timings at the headline shape against copy bandwidth,
#                                            # registers and spills; the norm-block and host-time rows
#   benchmarks/tools/run_gpu.sh 3            # the train-step and inference benchmark groups
#   benchmarks/tools/run_gpu.sh 4            # speckle-denoise's GPU paths (gpu_inference.py)
#   benchmarks/tools/run_gpu.sh --dry-run    # each stage's plan, commands and budget (no GPU; CI)
#
# Every step runs under `timeout -k`: at its limit the step's whole process group gets TERM, then
# KILL, so no child outlives it. A failing or timed-out step is logged and the next one runs; the
# exit status is 1 if any failed. Rows are appended to JSONL files as they finish (the kits, the
# timings, every benchmark row through SPECKLE_BENCH_JSONL), so a deadline loses only the row in
# flight. Interpreter tests are not run: on a GPU tests/conftest.py leaves TRITON_INTERPRET unset.
# After every step the stage's folder is packed into $OUT (the device tool brings back only what
# is under $OUT): results-stage<N>.tgz, and after a build the extension's .so files and the Triton
# cache (triton-cache.tgz), which a later call can carry (speckle_kernels/_C*.so, .triton-cache)
# to skip the build and the compiling: a stage finds a loadable CUDA extension and does not build.
# Environment: PYTHON (default python3), MAX_JOBS (build, default all cores), DEADLINE, SHARDS
# (stage 1's parallel kit processes, default 8), CHECK_ARGS (e.g. --quick); TRAIN_RUNS=1 adds
# four speckle-train runs of TRAIN_EPOCHS (2) epochs to stage 3 (not in its budget).
set -uo pipefail
cd "$(dirname "$0")/../.."

PY="${PYTHON:-python3}"
DEADLINE="${DEADLINE:-480}"
SHARDS="${SHARDS:-8}"
TRAIN_EPOCHS="${TRAIN_EPOCHS:-2}"
# the benchmark rows of stages 2 and 3 (gpu_plan counts the same selection in --dry-run)
BENCH2_FILES="benchmarks/test_bench_batch_renorm_act.py benchmarks/test_bench_host_time.py"
BENCH2_K="not compiled and not cpu and not channels_last"
BENCH3_FILES="benchmarks/test_bench_train_step.py benchmarks/test_bench_inference.py"
BENCH3_K="(train_step and not cpu) or (inference and not compiled and not int8)"  # int8: CPU only
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$(pwd)/.triton-cache}"
unset TRITON_INTERPRET  # the interpreter is a correctness tool for machines without a GPU
# speckle_models is models/ under its installed name: importable even where pip's editable
# install fails and the build falls back to build_ext --inplace
if [ ! -e .gpu-path/speckle_models ]; then mkdir -p .gpu-path && ln -sfn ../models .gpu-path/speckle_models; fi
export PYTHONPATH="$(pwd):$(pwd)/.gpu-path${PYTHONPATH:+:$PYTHONPATH}"
DRY_RUN=0
STAGES=()
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        1|2|3|4) STAGES+=("$arg") ;;
        *) echo "run_gpu.sh: unknown argument '$arg' (expected 1, 2, 3, 4 or --dry-run)" >&2; exit 2 ;;
    esac
done
[ ${#STAGES[@]} -eq 0 ] && { [ "$DRY_RUN" = 1 ] && STAGES=(1 2 3 4) || { echo "run_gpu.sh: name a stage: 1, 2, 3 or 4 (or --dry-run)" >&2; exit 2; }; }

failed=""
out=""
START=$SECONDS
step() {  # step NAME CAP COMMAND...: at most CAP seconds (less if the deadline is nearer), logged
    local name="$1" cap="$2"
    shift 2
    if [ "$DRY_RUN" = 1 ]; then
        printf '    %-12s <= %4s s  ' "$name" "$cap"
        printf '%q ' "$@"
        echo
        return 0
    fi
    local left=$((DEADLINE - (SECONDS - START))) limit="$cap"
    [ "$left" -lt "$limit" ] && limit="$left"
    if [ "$limit" -lt 15 ]; then
        echo "=== $name: not run, the stage's deadline ($DEADLINE s) is reached" | tee -a "$out/summary.txt"
        failed="$failed $name"
        return 0
    fi
    echo "=== $name (at most $limit s): $*"
    local t0=$SECONDS
    timeout -k 15 "$limit" "$@" 2>&1 | tee -a "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    local why=""
    [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && why=" (timed out)"
    echo "=== $name: exit $rc$why after $((SECONDS - t0)) s" | tee -a "$out/summary.txt"
    [ "$rc" -eq 0 ] || failed="$failed $name"
    pack
}
pack() {  # after every step, so a call cut off at its limit still brings back what it had
    [ -n "${OUT:-}" ] && [ -d "$OUT" ] || return 0
    tar czf "$OUT/results-stage$STAGE.tgz.tmp" "$out" 2>/dev/null && mv "$OUT/results-stage$STAGE.tgz.tmp" "$OUT/results-stage$STAGE.tgz"
}
carry_out() {  # the build and the compiled Triton kernels, for a later call to carry
    [ -n "${OUT:-}" ] && [ -d "$OUT" ] || return 0
    cp speckle_kernels/_C*.so "$OUT/" 2>/dev/null
    [ -d "$TRITON_CACHE_DIR" ] && tar czf "$OUT/triton-cache.tgz" -C "$(dirname "$TRITON_CACHE_DIR")" "$(basename "$TRITON_CACHE_DIR")"
    return 0
}

build() {  # a carried, loadable build is kept; else pip's editable install, else an in-place build
    if "$PY" -c 'import sys; from speckle_kernels import _ext; sys.exit(0 if _ext.HAS_CUDA_EXT else 1)' 2>/dev/null; then
        echo "the CUDA extension loads (a carried build): not rebuilt"
    else
        PIP_NO_INDEX=1 "$PY" -m pip install --no-build-isolation --no-deps -e . || "$PY" setup.py build_ext --inplace
    fi
    "$PY" -c 'from speckle_kernels import _ext
print("CUDA extension loaded:", _ext.HAS_CUDA_EXT, "" if _ext.HAS_CUDA_EXT else "because " + str(_ext.cuda_status()["error"]))'
}
checks() {  # the kits in SHARDS processes, which share the compiling over the cores
    local k rc=0 pids=()
    for k in $(seq 0 $((SHARDS - 1))); do
        "$PY" -m benchmarks.tools.gpu_check checks --jsonl "$out/checks-$k.jsonl" --shard "$k/$SHARDS" \
            ${CHECK_ARGS:-} > "$out/checks-$k.log" 2>&1 &
        pids+=($!)
    done
    for k in "${pids[@]}"; do wait "$k" || rc=1; done
    grep -h '^\[' "$out"/checks-*.log | sort
    return $rc
}
train() {  # speckle-train runs, each under its own limit; one failing does not stop the others
    local i=0 rc=0 runs
    runs="$(mktemp -d)"
    local per=$(( (600 - 30) / 4 ))
    for spec in "br-unet fused" "br-unet fused --cuda-graph" "d-unet batchnorm" "d-unet batchnorm --cuda-graph"; do
        set -- $spec
        local model="$1" norm="$2"
        shift 2
        i=$((i + 1))
        echo "--- $model --norm $norm $* ($TRAIN_EPOCHS epochs, at most $per s)"
        if timeout -k 15 "$per" "$PY" -m speckle_models.training.train --model "$model" --norm "$norm" \
                --epochs "$TRAIN_EPOCHS" --preset paper --device cuda --out "$runs/$i" --cache-dir "$runs/cache" \
                --no-progress "$@"; then
            local mode="${1:-eager}"
            cp "$runs/$i/metrics.json" "$out/train-$i-$model-$norm-${mode#--}.json" 2>/dev/null
            cut -d, -f1-9 "$runs/$i/metrics.csv" 2>/dev/null
        else
            echo "--- $model --norm $norm $*: failed or timed out"
            rc=1
        fi
    done
    return $rc
}
export -f build checks train
export PY SHARDS TRAIN_EPOCHS DEADLINE START

for STAGE in "${STAGES[@]}"; do
    if [ "$DRY_RUN" = 1 ]; then
        echo "stage $STAGE (DEADLINE $DEADLINE s):"
        out="benchmarks/results/GPU-DATE/stage$STAGE"
    else
        gpu="$("$PY" -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null)" || gpu=""
        if [ -z "$gpu" ]; then
            echo "run_gpu.sh: torch sees no CUDA device; run this on a GPU machine (or --dry-run)" >&2
            exit 2
        fi
        slug="$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -e 's/[^a-z0-9]\+/-/g' -e 's/^-//' -e 's/-$//')"
        out="benchmarks/results/${slug}-$(date +%F)/stage$STAGE"
        mkdir -p "$out"
        START=$SECONDS
        {
            echo "date: $(date -Iseconds); stage $STAGE; deadline $DEADLINE s"
            echo "commit: $(git rev-parse HEAD 2>/dev/null) $(git diff --quiet 2>/dev/null || echo '(uncommitted changes)')"
            "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)'
            "$PY" -c 'import triton, numpy; print("triton", triton.__version__, "numpy", numpy.__version__)' 2>&1
            nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1
            echo "cpus: $(nproc)"
        } > "$out/environment.txt"
        cat "$out/environment.txt"
    fi
    export out
    step build 300 bash -c build
    case "$STAGE" in
        1)
            [ "$DRY_RUN" = 1 ] || carry_out
            step checkpoint 150 "$PY" -m pytest tests/test_checkpoint.py -v -p no:cacheprovider --no-header
            # the kits take what is left but 20 s for the summary (which also runs later, anywhere)
            step checks $((DEADLINE - (SECONDS - START) - 20)) bash -c checks
            step summary 20 "$PY" -m benchmarks.tools.gpu_check summary "$out"
            [ "$DRY_RUN" = 1 ] || carry_out
            ;;
        2)
            step timings 300 "$PY" -m benchmarks.tools.gpu_check timings --jsonl "$out/timings.jsonl" \
                --impls reference batchnorm2d triton cuda
            step bench 240 env SPECKLE_BENCH_SIZE=full SPECKLE_BENCH_JSONL="$out/bench.jsonl" "$PY" -m pytest \
                $BENCH2_FILES -k "$BENCH2_K" --benchmark-only -q -p no:cacheprovider \
                --benchmark-json="$out/benchmarks.json"
            step summary 60 "$PY" -m benchmarks.tools.gpu_check summary "$out"
            ;;
        3)
            step bench 360 env SPECKLE_BENCH_SIZE=full SPECKLE_BENCH_JSONL="$out/bench.jsonl" "$PY" -m pytest \
                $BENCH3_FILES -k "$BENCH3_K" --benchmark-only -q -p no:cacheprovider \
                --benchmark-json="$out/benchmarks.json"
            step report 60 "$PY" -m benchmarks.tools.results_report "$out/benchmarks.json" --out "$out"
            [ "${TRAIN_RUNS:-0}" = 1 ] && step train 600 bash -c train
            ;;
        4)
            # speckle-denoise's GPU paths (issue 25): bf16, CUDA graph, compile, batches 8 and 32
            step inference 360 "$PY" -m benchmarks.tools.gpu_inference --out "$out"
            ;;
    esac
    if [ "$DRY_RUN" = 1 ]; then
        case "$STAGE" in
            1) bench=() ;;
            2) bench=(--bench $BENCH2_FILES --bench-k "$BENCH2_K") ;;
            3) bench=(--bench $BENCH3_FILES --bench-k "$BENCH3_K") ;;
            4) bench=() ;;
        esac
        "$PY" -m benchmarks.tools.gpu_plan --stage "$STAGE" --budget "$DEADLINE" --shards "$SHARDS" \
            ${CHECK_ARGS:-} "${bench[@]}" | sed 's/^/  /'
        [ "${PIPESTATUS[0]}" -eq 0 ] || failed="$failed stage$STAGE"
    fi
done

if [ -n "$failed" ]; then
    echo "failed:$failed"
    exit 1
fi
[ "$DRY_RUN" = 1 ] && echo "every stage fits its budget" || echo "all steps passed; results in $out"
