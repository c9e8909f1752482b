#!/usr/bin/env bash
# The multi-GPU acceptance run of the pipeline (docs/performance.md, issue 6) on a 2-GPU machine (~20 minutes):
# a random-weight teacher at the zebra_1b shape, then for ZeRO-2 and ZeRO-3 on 2 GPUs: init, ILD and KD with a
# SIGUSR1 in KD (checkpoint, exit 138), the same command again (resumes, finishes, exports), the exported student
# loads and generates; then ZeRO-2 on 1 GPU at the same global batch, whose losses bench/compare_losses.py checks.
#   bash bench/run_pipeline_gpu.sh [work dir]
# SIZE, TRAINER, SEQ and MICRO override the teacher size, trainer group, sequence length and micro-batch
# (TRAINER=cpu SIZE=smoke SEQ=128 runs the same steps on CPU processes); STRATEGIES (default "deepspeed_zero2
# deepspeed_zero3") and ONE_GPU=0 split the run over calls: an existing teacher and init in the work dir are reused.
set -uo pipefail
work=${1:-/tmp/pipeline}
size=${SIZE:-llama_3_2_1b}
trainer=${TRAINER:-gpu}
seq=${SEQ:-2048}
micro=${MICRO:-2}
strategies=${STRATEGIES:-deepspeed_zero2 deepspeed_zero3}
mkdir -p "$work"
common=(
    conf=zebra_1b "teacher.name_or_path=$work/teacher" data=default "data.seq_len=$seq" "trainer=$trainer"
    "data.micro_batch_size=$micro" data.eval_max_rows=8 trainer.accumulate_grad_batches=1 trainer.log_every_n_steps=1
    ild.max_steps=6 ild.warmup_steps=1 ild.val_every_n_steps=100 ild.checkpoint_every_n_steps=2
    kd.max_steps=6 kd.warmup_steps=1 kd.val_every_n_steps=100 kd.checkpoint_every_n_steps=2
    eval.max_batches=1 eval.num_generations=0 export.dtype=bfloat16
)
[[ $trainer == cpu ]] && common+=("student.mla_layers=[0,2]" student.mla.q_lora_rank=32 student.mla.kv_lora_rank=16 student.mla.qk_rope_head_dim=8
    student.mla.qk_nope_head_dim=8 student.mla.v_head_dim=16 student.mamba.d_state=16 student.mamba.headdim=16)
stages="stages=[init,ild,kd,export]"
sigusr1='{"kind": "signal", "stage": "kd", "step": 3, "signal": "SIGUSR1"}'

echo "== teacher ($size)"
[[ -f $work/teacher/config.json ]] || python -m bench.random_teacher --size "$size" --out "$work/teacher" || exit 1
echo "== init (shared by the runs below)"
[[ -f $work/init/init/done.json ]] ||
    python -m train "${common[@]}" "output_dir=$work/init" "stages=[init]" >"$work/init.log" 2>&1 || exit 1

for strategy in $strategies; do
    out=$work/$strategy
    rm -rf "$out" && cp -r "$work/init" "$out"
    run=("${common[@]}" "output_dir=$out" "strategy=$strategy" trainer.devices=2 "$stages")
    python -m tests.faults.driver "$sigusr1" "${run[@]}" >"$out.interrupted.log" 2>&1
    echo "== $strategy, 2 GPUs, SIGUSR1 in KD step 3: rc=$? (138 expected), $(grep -m1 '^error:' "$out.interrupted.log")"
    echo "   KD checkpoint shards: $(find "$out/kd/checkpoints/last.ckpt" -name '*optim_states.pt' 2>/dev/null | wc -l)"
    python -m train "${run[@]}" >"$out.resumed.log" 2>&1
    echo "== $strategy, rerun: rc=$? (0 expected)"
    python -c "import sys; from pathlib import Path; from bench.compare_losses import step_losses
for stage in ('ild', 'kd'):
    losses = step_losses(Path(sys.argv[1]) / stage)
    print(f'   {stage} train/loss by step: ' + ', '.join(f'{s}: {v:.4f}' for s, v in sorted(losses.items())))" "$out"
    python - "$out/student" <<'PY'
import sys
import torch
from transformers import AutoModelForCausalLM
student = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.bfloat16)
ids = student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
print(f"   exported student loads: {sum(p.numel() for p in student.parameters()):,} params, generated {ids.shape[1] - 3}")
PY
done

[[ ${ONE_GPU:-1} == 1 ]] || exit 0
out=$work/zero2_1gpu
rm -rf "$out" && cp -r "$work/init" "$out"
python -m train "${common[@]}" "output_dir=$out" strategy=deepspeed_zero2 trainer.devices=1 \
    "data.micro_batch_size=$((2 * micro))" "$stages" >"$out.log" 2>&1
echo "== ZeRO-2, 1 GPU, micro-batch $((2 * micro)): rc=$?"
status=0
for run in "$work"/deepspeed_zero*/; do  # each 2-GPU run in the work dir, this call's or an earlier one's
    echo "   ${run%/} vs 1 GPU:"
    python -m bench.compare_losses "$run" "$out" --stages ild,kd --rtol 0.02 || status=1
done
exit $status
