#!/bin/bash
# The real-teacher benchmark on one H200 (device machine), after ../shared/device/smollm2.sh staged the teacher to
# /root/smollm2 and .device/install.sh ran. Logs and results go to $OUT (the device tool returns them).
#   PART=checks  GPU tests at the real shapes, the compile crash reproduced without its fix, a ZeRO-2 + compile +
#                fused-KD pipeline smoke on the real teacher (TEACHER: default the GGUF)
#   PART=main    the main row at the given budget (ILD / KD steps), resumable across calls; CHATS_FILE: teacher chat
#                answers made earlier (bench/fidelity_data.generate_teacher_chats, e.g. on a CPU) instead of here
#   PART=rows    ROWS without main (only rows that reuse none of main's stages: mla_gdn, smart_3kinds)
#   PART=all     main (ILD / KD steps) and the ablation rows (ILD / ABLATION_KD steps): each row starts beside
#                main's KD as soon as the main stages it reuses are finished; resumable across calls. PARALLEL 2
#                overlaps one row's start (compile, autotune: GPU idle) with another's training; KD itself fills the
#                GPU (two rows at once each ran at half the tokens/s on an H100), and two rows used 75 of its 80 GB
#   OVERRIDES    extra Hydra overrides for every row (space-separated), e.g. "stages=[init,ild,select,kd,export]"
set -uo pipefail
OUT="${OUT:-/tmp/out}"; mkdir -p "$OUT"
GGUF=/root/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
WORK=/root/fidelity
export PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1  # parallel rows and later stages reuse autotune results
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  # two rows share the GPU: less fragmentation
stamp() { date -u +%H:%M:%S; }
read -ra EXTRA <<< "${OVERRIDES:-}"  # extra Hydra overrides, space-separated
# Compilation outlives the machine: Triton's autotune choices (a few KB of json) and inductor's cache (compiled
# graphs and their kernels), or a fresh machine spends minutes compiling and benchmarking every config of every
# kernel before a row's first step. KERNEL_CACHE: the kernel_cache.tgz an earlier call brought back from $OUT.
if [ -n "${KERNEL_CACHE:-}" ] && [ -f "$KERNEL_CACHE" ]; then
  tar xzf "$KERNEL_CACHE" -C / && echo "$(stamp) compile caches restored from $KERNEL_CACHE"
fi
save_kernel_cache() {  # one file back (at most 16 MiB): inductor's cache only when it fits beside the choices
  local inductor
  inductor="tmp/torchinductor_$(id -un)"
  tunes() { (cd / && find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -name '*.autotune.json' | sed 's|^/||'); }
  (cd / && { tunes; [ -d "/$inductor" ] && echo "$inductor"; } | tar czf "$OUT/kernel_cache.tgz" -T - 2>/dev/null)
  if [ "$(stat -c %s "$OUT/kernel_cache.tgz" 2>/dev/null || echo 0)" -gt 15000000 ]; then
    (cd / && tunes | tar czf "$OUT/kernel_cache.tgz" -T - 2>/dev/null)
  fi
}
fidelity() {  # bench.fidelity with its results and doc copied back
  python3 -m bench.fidelity --teacher "$GGUF" --out "$WORK" "$@" 2>&1 | tee -a "$OUT/fidelity.log"
  # at most 8 files come back: the results and the page in one tarball, the rows' logs in another
  tar czf "$OUT/results.tgz" bench/results/fidelity_smollm2_*.json bench/results/fidelity_smollm2_*.png \
    docs/fidelity.md 2>/dev/null
  # logs, metrics, nvidia-smi samples and the teacher's chat answers (carry them to skip regenerating)
  # (not the teacher_cache row's top-k shards: GBs, and taring them outlived a call's limit on 12-07)
  tar czf "$OUT/rows_logs.tgz" -C "$WORK" --exclude='*.ckpt' --exclude='*.safetensors' --exclude=cache \
    --exclude='rows/teacher_cache/teacher_cache' rows \
    data/chats.jsonl.gz data/manifest.json data/chats_stats.json 2>/dev/null
}

case "${PART:-checks}" in
checks)
  echo "$(stamp) GPU tests at SmolLM2 shapes"
  python3 -m pytest -q -s tests/gpu/test_real_shapes_gpu.py tests/gpu/test_kernels_gpu.py -k "not hybrid_model" \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -5
  echo "$(stamp) the compile test without the alignment fix (expected: CUDA misaligned address)"
  python3 - > "$OUT/compile_without_fix.log" 2>&1 <<'PY'
import models.compile as c
c._aligned = lambda value: value  # the code before the fix
from tests.gpu import test_real_shapes_gpu as t
try:
    t.test_compiled_kd_step_with_deepspeed_flat_bf16_parameters()
    print("WITHOUT FIX: passed")
except Exception as e:
    print("WITHOUT FIX: failed:", type(e).__name__, str(e).splitlines()[0])
PY
  tail -2 "$OUT/compile_without_fix.log"
  ;&  # fall through to the smoke
smoke)
  echo "$(stamp) pipeline smoke: ZeRO-2, compile, fused KD, real teacher (the first real-teacher crash)"
  python3 -m train conf=smollm2_135m teacher.name_or_path="${TEACHER:-$GGUF}" output_dir=/root/smoke strategy=deepspeed_zero2 \
    data.sources=[] data.seq_len=512 data.micro_batch_size=8 data.eval_max_rows=16 ild.max_steps=6 kd.max_steps=12 ild.warmup_steps=1 kd.warmup_steps=1 \
    ild.val_every_n_steps=100 kd.val_every_n_steps=6 eval.max_batches=2 logger=csv > "$OUT/smoke.log" 2>&1
  echo "smoke exit $?"; grep -E "eval on|Error|error|final student|^teacher " "$OUT/smoke.log" | tail -8
  ;;
main)  # a finished main row is not retrained; an interrupted one resumes
  fidelity --rows main --ild-steps "${ILD:-300}" --kd-steps "${KD:-1600}" --deadline-s "${DEADLINE:-540}" \
    --max-train-mb "${TRAIN_MB:-100}" --chats "${CHATS:-1500}" ${CHATS_FILE:+--chats-file "$CHATS_FILE"} "${EXTRA[@]}"
  ;;
rows)  # rows that reuse none of main's stages (e.g. the GDN rows), without main
  fidelity --rows "${ROWS:?ROWS=row,row}" --parallel "${PARALLEL:-2}" --ild-steps "${ILD:-100}" \
    --kd-steps "${KD:-300}" --deadline-s "${DEADLINE:-500}" --max-train-mb "${TRAIN_MB:-100}" --chats "${CHATS:-1500}" \
    ${CHATS_FILE:+--chats-file "$CHATS_FILE"} "${EXTRA[@]}"
  ;;
all)
  # rows in the order they start; with ABLATION_KD < KD add `baseline` first (the preset at the ablation budget)
  fidelity --rows "main,${ROWS:-zebra_init,rope_shared,no_ild,random_mixers,uniform,reverse_kl,teacher_cache,jsd,mla4,mla12,kd_lr1e3,rank64,rank256,mla_gdn,smart_3kinds}" \
    --parallel "${PARALLEL:-2}" --ild-steps "${ILD:-100}" --kd-steps "${KD:-300}" --ablation-kd-steps "${ABLATION_KD:-300}" \
    --deadline-s "${DEADLINE:-500}" --max-train-mb "${TRAIN_MB:-100}" --chats "${CHATS:-1500}" \
    ${CHATS_FILE:+--chats-file "$CHATS_FILE"} "${EXTRA[@]}"
  ;;
esac
save_kernel_cache
echo "$(stamp) done"
