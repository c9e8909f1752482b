#!/usr/bin/env bash
# Long-context distillation on one GPU (device machine, after `source .device/install.sh`): the GPU tests of the
# block masks, then zebra_1b KD and ILD at 2K / 8K / 16K / 32K with the same tokens per step (16K: micro-batch 8 at
# 2K, 2 at 8K, 1 at 16K; 32K at micro-batch 1), packed documents through dense masks or FlexAttention block masks.
#   bash bench/run_long_context.sh [results.json] [log folder]
#   ROWS="kd:2048:8:flex kd:32768:1:flex:ckpt" bash bench/run_long_context.sh   # stage:seq:micro-batch:masking[:ckpt]
# Each row is one `python -m bench.train` process (no compile: every length would recompile; the ratio between
# lengths is what this measures). DOC_LEN: mean document length of the packed rows (default 700, as at 2K).
set -uo pipefail
results=${1:-bench/results/long_context_zebra_1b.json}
logs=${2:-/tmp}
export TRITON_CACHE_DIR=/tmp/triton-cache TRITON_CACHE_AUTOTUNING=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [[ -z ${SKIP_TESTS:-} ]]; then
    echo "== GPU tests of the block masks"
    timeout 240 python -m pytest -q -s tests/gpu/test_long_context_gpu.py 2>&1 | grep -E "rel err|passed|failed|Error" | tail -6
fi
# Fresh machines autotune every mamba-ssm kernel per shape (minutes): 2 configs each unless FULL_AUTOTUNE=1 (an
# H100 row of the first attempt did not reach its first step in 55 s). Every row autotunes alike.
light=$([[ -n ${FULL_AUTOTUNE:-} ]] || echo 1)
rows=${ROWS:-"kd:2048:8:dense kd:2048:8:flex kd:16384:1:flex kd:16384:1:dense kd:8192:2:flex kd:32768:1:flex ild:2048:8:flex ild:16384:1:flex"}
for row in $rows; do
    IFS=: read -r stage seq mb masking ckpt <<<"$row"  # ckpt: "ckpt" = student activation checkpointing
    name="${stage}_${seq}_${mb}_${masking}${ckpt:+_$ckpt}"
    echo "== $name ($((SECONDS))s)"
    timeout -k 10 "${ROW_SECONDS:-150}" python -m bench.train --preset zebra_1b --stages "$stage" --seq "$seq" \
        --micro-batch "$mb" --masking "$masking" --doc-len "${DOC_LEN:-700}" --steps "${STEPS:-6}" --warmup 2 \
        --no-compile ${ckpt:+--gradient-checkpointing} ${light:+--light-autotune} --out "$results" >"$logs/$name.log" 2>&1
    echo "   rc=$? $(grep -E '"tokens_per_s_per_gpu"|"peak_memory_gib"' "$logs/$name.log" | tr -d ' \n')"
    pkill -9 -f "^[^ ]*python[0-9.]* -m bench[.]train" && sleep 3
done
[[ -f $results ]] || { echo "no row finished: nothing to plot"; exit 1; }
python - "$results" <<'PY'
import json, sys
from pathlib import Path
from bench.plots import plot_long_context
path = Path(sys.argv[1])
print("plots:", *plot_long_context(json.loads(path.read_text()), path.with_suffix("")))
PY
