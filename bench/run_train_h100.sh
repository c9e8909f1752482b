#!/usr/bin/env bash
# The training benchmarks behind docs/performance.md, as run on the lent 2x H100 machine, one call per part:
#   bash bench/run_train_h100.sh [results.json] [log folder]            # zebra_1b, ~9 minutes
#   PART=8b bash bench/run_train_h100.sh [results.json] [log folder]    # zebra_8b KD on 2x 80 GB, ~6 minutes
# Triton's autotuning results are cached on disk, so only the first process pays for them.
# zebra_8b: plain ZeRO-3 needs ~83 GB per GPU before activations on 2 GPUs, so the offload strategy runs first
# (DeepSpeed's CPU Adam: its C++ op is built on the first run, about a minute); plain ZeRO-3 is then tried at
# micro-batch 1, so its out-of-memory is recorded rather than assumed.
set -uo pipefail
part=${PART:-1b}
results=${1:-bench/results/train_zebra_${part}_h100.json}
logs=${2:-/tmp}
export TRITON_CACHE_DIR=/tmp/triton-cache TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1

step() {  # step <seconds> <log name> <bench.train arguments...>
    local limit=$1 name=$2
    shift 2
    echo "== $name: python -m bench.train $*"
    timeout "$limit" python -m bench.train --out "$results" "$@" >"$logs/$name.log" 2>&1
    echo "   rc=$? ($(grep -c . "$logs/$name.log") log lines; last: $(tail -1 "$logs/$name.log" | cut -c1-200))"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ $part == 8b ]]; then
    free -g | head -2
    step 330 zebra_8b_kd_zero3_offload --preset zebra_8b --stages kd --devices 2 --strategy deepspeed_zero3_offload \
        --micro-batch 2 --steps 4 --warmup 2
    step 150 zebra_8b_kd_zero3 --preset zebra_8b --stages kd --devices 2 --strategy deepspeed_zero3 \
        --micro-batch 1 --steps 3 --warmup 1
    exit 0
fi
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
