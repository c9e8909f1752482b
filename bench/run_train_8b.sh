#!/usr/bin/env bash
# zebra_8b KD (8B teacher, 8.38B student) on 2x 80 GB, as docs/performance.md describes (one call, ~6 minutes):
#   bash bench/run_train_8b.sh [results.json] [log folder]
# Plain ZeRO-3 needs ~83 GB per GPU before activations on 2 GPUs, so the offload strategy runs (DeepSpeed's CPU
# Adam: its C++ op is built on the first run, about a minute). Plain ZeRO-3 is tried at micro-batch 1 afterwards,
# so its out-of-memory is recorded rather than assumed.
set -uo pipefail
results=${1:-bench/results/train_zebra_8b.json}
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
free -g | head -2
step 330 zebra_8b_kd_zero3_offload --preset zebra_8b --stages kd --devices 2 --strategy deepspeed_zero3_offload \
    --micro-batch 2 --steps 4 --warmup 2
step 150 zebra_8b_kd_zero3 --preset zebra_8b --stages kd --devices 2 --strategy deepspeed_zero3 \
    --micro-batch 1 --steps 3 --warmup 1
