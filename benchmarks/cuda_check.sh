#!/usr/bin/env bash
# The CUDA check of issue 12, item 7: on a machine with a GPU, run the CUDA tests and the benchmark with
# --device cuda, writing JSON and Markdown to a results folder.
#
#     bash benchmarks/cuda_check.sh [RESULTS_DIR]      # default results/cuda
#
# What it runs (each stage under its own time limit, so the whole stays under 8 minutes on one H100 and a slow
# stage cannot take the others' results with it):
#   1. the tests parametrized over devices, CUDA cases only (pytest -k cuda: tests/test_compiled.py today),
#      log in RESULTS_DIR/tests.log;
#   2. benchmarks/run.py --device cuda on mlp1024 (784-1024-1024-10) and the CNN at batch 128 for compiled_sgd,
#      compiled_sgd_bf16_autocast, compiled_svrg, compiled_halp8, compiled_halp8_int8 and compiled_halp8_int8_bf16, quick-like counts (3 rounds of 8 batches, no
#      first-call subprocesses), one JSON and one Markdown table per model, then RESULTS_DIR/benchmarks.md with both.
# On a machine without a GPU it prints why and exits 0 having run nothing.
# Override the limits with CUDA_CHECK_TEST_TIMEOUT / CUDA_CHECK_BENCH_TIMEOUT (seconds, per stage).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-results/cuda}"
PYTHON="${PYTHON:-python}"
TEST_TIMEOUT="${CUDA_CHECK_TEST_TIMEOUT:-150}"
BENCH_TIMEOUT="${CUDA_CHECK_BENCH_TIMEOUT:-150}"
METHODS=(compiled_sgd compiled_sgd_bf16_autocast compiled_svrg compiled_halp8 compiled_halp8_int8 compiled_halp8_int8_bf16)

cd "$ROOT" || exit 1

if ! "$PYTHON" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
    echo "cuda_check: no CUDA GPU available to torch ($("$PYTHON" -c 'import torch; print("torch", torch.__version__)' 2>/dev/null || echo 'torch not importable')); nothing run."
    exit 0
fi

mkdir -p "$OUT" || exit 1
OUT="$(cd "$OUT" && pwd)"
GPU="$("$PYTHON" -c 'import torch; print(torch.cuda.get_device_name())')"
echo "cuda_check: $GPU; results in $OUT"
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "gpu: $GPU"
    echo "torch: $("$PYTHON" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/nvidia-smi: /'
} > "$OUT/machine.txt"
cat "$OUT/machine.txt"

status=0
started=$SECONDS

echo "== CUDA tests (pytest -k cuda, limit ${TEST_TIMEOUT} s)"
timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -rs -k cuda tests > "$OUT/tests.log" 2>&1
rc=$?
tail -n 5 "$OUT/tests.log"
case $rc in
    0) echo "CUDA tests: passed" ;;
    5) echo "CUDA tests: none selected (no test has a cuda parameter)" ;;
    124) echo "CUDA tests: TIMED OUT after ${TEST_TIMEOUT} s"; status=1 ;;
    *) echo "CUDA tests: FAILED (exit $rc, see $OUT/tests.log)"; status=1 ;;
esac

for model in mlp1024 cnn; do
    echo "== benchmark --device cuda, $model batch 128 (limit ${BENCH_TIMEOUT} s)"
    timeout "$BENCH_TIMEOUT" "$PYTHON" benchmarks/run.py --device cuda --models "$model" --batch-sizes 128 \
        --methods "${METHODS[@]}" --repeats 3 --batches-per-epoch 8 --first-call none \
        --cache-dir "$OUT/inductor_cache" --json "$OUT/$model.json" --markdown "$OUT/$model.md" \
        > "$OUT/$model.log" 2>&1
    rc=$?
    if [ $rc -eq 0 ]; then
        sed -n '/^model /,$p' "$OUT/$model.log"
    else
        [ $rc -eq 124 ] && echo "benchmark $model: TIMED OUT after ${BENCH_TIMEOUT} s" \
                        || echo "benchmark $model: FAILED (exit $rc)"
        tail -n 5 "$OUT/$model.log"
        status=1
    fi
done

{
    echo "# CUDA check: $GPU"
    echo
    cat "$OUT/machine.txt"
    echo
    echo "CUDA tests: $(tail -n 1 "$OUT/tests.log" 2>/dev/null)"
    for model in mlp1024 cnn; do
        echo
        if [ -s "$OUT/$model.md" ]; then cat "$OUT/$model.md"; else echo "$model: no result (see $model.log)"; fi
    done
} > "$OUT/benchmarks.md"
rm -rf "$OUT/inductor_cache"
echo "cuda_check: done in $((SECONDS - started)) s, exit $status; $OUT/benchmarks.md"
exit $status
