#!/usr/bin/env bash
# The training benchmarks behind docs/performance.md, as run on the lent 2x H100 machine, one call per part:
#   bash bench/run_train_h100.sh [results.json] [log folder]            # zebra_1b on 1 GPU + GPU tests, ~9 min
#   PART=2gpu bash bench/run_train_h100.sh [results.json] [log folder]  # zebra_1b 1 vs 2 GPUs, 8B teacher, ~8 min
#   PART=8b bash bench/run_train_h100.sh [results.json] [log folder]    # zebra_8b KD on 2x 80 GB, ~7 minutes
#   PART=cached bash bench/run_train_h100.sh [results.json] [log folder] # KD: live 8B teacher vs a top-64 cache, ~8 min
# Triton's autotuning results are cached on disk, so only the first process pays for them.
# zebra_8b: plain ZeRO-3 needs ~83 GB per GPU before activations on 2 GPUs, so the optimizer goes to CPU memory
# (deepspeed_zero3_offload_optimizer; DeepSpeed's CPU Adam, its C++ op built first, about a minute), at the
# preset's micro-batch 2 x 4 accumulated, each GPU capped at an H100's 79.6 GiB (the 2-GPU kind may serve H200s),
# with --light-autotune so that a fresh machine's Triton autotuning of the 8B shapes does not eat the time limit.
# OFFLOAD_PARAMS=1 also runs deepspeed_zero3_offload (parameters in CPU memory too); ZERO3=1 plain ZeRO-3.
set -uo pipefail
part=${PART:-1b}
results=${1:-bench/results/train_zebra_${part}_h100.json}
logs=${2:-/tmp}
export TRITON_CACHE_DIR=/tmp/triton-cache TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache  # compiled student pieces, shared by the processes

step() {  # step <seconds> <log name> <bench.train arguments...>
    local limit=$1 name=$2
    shift 2
    echo "== $name: python -m bench.train $*"
    timeout -k 10 "$limit" python -m bench.train --out "$results" "$@" >"$logs/$name.log" 2>&1
    echo "   rc=$? ($(grep -c . "$logs/$name.log") log lines; last: $(tail -1 "$logs/$name.log" | cut -c1-200))"
    # a rank that outlives its killed launcher keeps its GPU memory and would skew the next run
    pkill -9 -f "^[^ ]*python[0-9.]* -m bench[.]train" && sleep 5
    nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader
}

gpu_tests() {  # the GPU test marker, if the call (600 s at most) still has the ~160 s it takes
    if ((SECONDS > ${CALL_SECONDS:-570} - 160)); then echo "== GPU tests: skipped, ${SECONDS}s used"; return; fi
    echo "== GPU tests"
    timeout 170 python -m pytest -q -m gpu tests/gpu >"$logs/gpu_tests.log" 2>&1
    echo "   rc=$? $(tail -1 "$logs/gpu_tests.log")"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ $part == 8b ]]; then
    free -g | head -2
    echo "== DeepSpeed CPU Adam op: $(date -u +%T) build/load"
    python -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" >"$logs/cpu_adam_build.log" 2>&1
    echo "   rc=$? $(date -u +%T)"
    cap=(--memory-cap-gib 79.6 --light-autotune)
    step "${LIMIT_8B:-420}" zebra_8b_kd_zero3_offload_optimizer --preset zebra_8b --stages kd --devices 2 \
        --strategy deepspeed_zero3_offload_optimizer --micro-batch 2 --accumulate 4 --steps 4 --warmup 2 "${cap[@]}"
    if [[ ${OFFLOAD_PARAMS:-0} == 1 ]]; then
        step 300 zebra_8b_kd_zero3_offload --preset zebra_8b --stages kd --devices 2 \
            --strategy deepspeed_zero3_offload --micro-batch 2 --accumulate 4 --steps 1 --warmup 1 "${cap[@]}"
    fi
    if [[ ${ZERO3:-0} == 1 ]]; then  # plain ZeRO-3: expected out of memory on 2x 80 GB (docs/performance.md)
        step 150 zebra_8b_kd_zero3 --preset zebra_8b --stages kd --devices 2 --strategy deepspeed_zero3 \
            --micro-batch 1 --steps 3 --warmup 1 "${cap[@]}"
    fi
    gpu_tests
    exit 0
fi
if [[ $part == cached ]]; then  # offline KD: the zebra_1b student from the live 8B teacher (call E's settings) and
    # from a top-64 cache file of the same rows (no teacher), one GPU each, same machine; then the GPU tests
    for stage in kd kd_cached; do
        step 170 "teacher8b_$stage" --preset zebra_1b --stages "$stage" --teacher llama_3_1_8b --micro-batch 4 \
            --strategy deepspeed_zero2 --compile --light-autotune --steps 8
    done
    gpu_tests
    exit 0
fi
# One process per Trainer run: a finished DeepSpeed engine keeps its GPU memory until the process ends.
# Student steps run with student.compile (--compile) and the fused KD kernel (the default), as the GPU presets do.
if [[ $part == 2gpu ]]; then  # scaling in one call: 1 and 2 GPUs; then the 8B teacher, the largest micro-batch,
    # and the KD loss through torch ops (the path before the fused kernel) for the breakdown comparison
    step 110 zero2_1gpu_kd --preset zebra_1b --stages kd --strategy deepspeed_zero2 --compile
    step 130 zero2_2gpu --preset zebra_1b --stages kd --devices 2 --strategy deepspeed_zero2 --compile
    step 90 teacher8b_1gpu --preset zebra_1b --stages kd --teacher llama_3_1_8b --micro-batch 4 \
        --strategy deepspeed_zero2 --compile
    step 60 max_batch --preset zebra_1b --stages kd --skip-trainer --max-batch --compile
    step 80 breakdown_kd_torch --preset zebra_1b --stages kd --skip-trainer --breakdown --kd-torch
    gpu_tests
    exit 0
fi
for stage in kd teacher_ce ild; do
    step 240 "zero2_1gpu_$stage" --preset zebra_1b --stages "$stage" --strategy deepspeed_zero2 --compile --steps 8
done
step 120 breakdown --preset zebra_1b --stages kd,ild --skip-trainer --breakdown --profile --compile
gpu_tests
