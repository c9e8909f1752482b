#!/usr/bin/env bash
# The training benchmarks behind docs/performance.md, as run on the lent 2x H100 machine (one call, ~9 minutes):
#   bash bench/run_train_h100.sh [results.json] [log folder]
# Triton's autotuning results are cached on disk, so only the first process pays for them.
set -uo pipefail
results=${1:-bench/results/train_zebra_1b_h100.json}
logs=${2:-/tmp}
export TRITON_CACHE_DIR=/tmp/triton-cache TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1

step() {  # step <seconds> <log name> <bench.train arguments...>
    local limit=$1 name=$2
    shift 2
    echo "== $name: python -m bench.train $*"
    timeout "$limit" python -m bench.train --out "$results" "$@" >"$logs/$name.log" 2>&1
    echo "   rc=$? ($(grep -c . "$logs/$name.log") log lines)"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# One process per Trainer run: a finished DeepSpeed engine keeps its GPU memory until the process ends.
for stage in kd teacher_ce ild; do
    step 75 "zero2_1gpu_$stage" --preset zebra_1b --stages "$stage" --strategy deepspeed_zero2
done
step 130 zero2_2gpu --preset zebra_1b --stages kd --devices 2 --strategy deepspeed_zero2
step 80 teacher8b_1gpu --preset zebra_1b --stages kd --teacher llama_3_1_8b --micro-batch 4 --strategy deepspeed_zero2
step 100 breakdown --preset zebra_1b --stages kd,ild --skip-trainer --breakdown --profile
step 45 max_batch --preset zebra_1b --stages kd --skip-trainer --max-batch
echo "== GPU tests"
timeout 150 python -m pytest -q -m gpu tests/gpu >"$logs/gpu_tests.log" 2>&1
echo "   rc=$? $(tail -1 "$logs/gpu_tests.log")"
