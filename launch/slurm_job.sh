#!/bin/bash
# The body of the sbatch scripts in launch/ (zebra_1node.sbatch, zebra_multinode.sbatch, and the copies that
# launch/submit.py renders): `python -m train <args>` on every GPU of the allocation through srun, then a requeue
# when the run stopped on a preemption signal. Arguments: the preset and Hydra overrides (`conf=zebra_1b kd.lr=1e-4`).
#
# Requeue. `#SBATCH --signal=USR1@300` makes SLURM send SIGUSR1 to every task of the job step (not to this shell)
# five minutes before the time limit. Each rank finishes its step, they write one checkpoint together and exit 138
# (128 + SIGUSR1; train/runtime/preemption.py), so srun returns 138 and this shell asks SLURM to requeue the job. Lightning's
# own SLURM auto-requeue stays idle: it only takes SIGUSR1 when no handler is installed, and PreemptionCheckpoint
# installs one first. SIGTERM (143: preemption, scancel, the time limit itself) also writes the checkpoint; it is
# requeued too unless the job was cancelled (a user's scancel must stop it). SLURM itself requeues jobs preempted
# under PreemptMode=REQUEUE and jobs on failed nodes, since they carry --requeue.
#
# Resume. A requeued job keeps its SLURM_JOB_ID and its arguments, so it reruns the same command with the same
# output_dir (outputs/<preset>-<job id>): finished stages are skipped, the interrupted one resumes from last.ckpt.
# The W&B run id is keyed on the job id as well (WANDB_RUN_ID, WANDB_RESUME=allow): the same W&B run continues.
# To continue an older job's run in a new job, pass its folder: `output_dir=outputs/<preset>-<old job id>`.
set -uo pipefail  # no -e: srun's exit status is examined below

: "${SLURM_JOB_ID:?run this through sbatch (launch/zebra_1node.sbatch), not directly}"
cd "${SLURM_SUBMIT_DIR:-.}" || exit 1  # relative paths (outputs/, logs/) are relative to where sbatch ran

preset=tiny  # python -m train's default preset
output_given=0
for arg in "$@"; do
  case "$arg" in
    conf=*) preset="${arg#conf=}" ;;
    output_dir=* | run_name=*) output_given=1 ;;
  esac
done
run_id="${preset}-${SLURM_JOB_ID}"
outputs=()
if ((output_given == 0)); then
  outputs=("output_dir=outputs/${run_id}")
fi

# Rendezvous: rank 0 on the first node of the allocation; the port derived from the job id (Lightning's rule) so two
# jobs sharing a node do not collide.
mapfile -t nodes < <(scontrol show hostnames "${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}")
export MASTER_ADDR="${MASTER_ADDR:-${nodes[0]:-127.0.0.1}}"
export MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 10000))}"

# The W&B run of this output_dir (the wandb logger honours WANDB_RUN_ID, train/runtime/tracking.py). With output_dir or
# run_name given (to resume an older job's folder) the id saved in that folder (.wandb_run_id) continues its run.
if ((output_given == 0)); then
  export WANDB_RUN_ID="${WANDB_RUN_ID:-${run_id}}"
fi
export WANDB_RESUME="${WANDB_RESUME:-allow}"  # resume the run when it exists (requeue), create it otherwise

# CPU threads per rank: the cores SLURM gave each task (otherwise every rank starts one thread per core of the node).
# srun no longer inherits --cpus-per-task from sbatch (SLURM >= 22.05); SRUN_CPUS_PER_TASK passes it on.
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
  export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK}"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-4}}"
export TOKENIZERS_PARALLELISM=false  # DataLoader workers fork; the tokenizer's threads would deadlock or warn
export PYTHONUNBUFFERED=1  # log lines reach logs/<job>.out as they happen
# NCCL: a failed collective aborts the step (and srun, through --kill-on-bad-exit) instead of hanging until the
# timeout; network interfaces (NCCL_SOCKET_IFNAME, NCCL_IB_HCA) are cluster-specific: set them in your environment.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Compute nodes usually have no internet: the teacher and data come from the caches filled on the login node
# (README, "Running on a cluster"). Export HF_HUB_OFFLINE=0 before sbatch where nodes may download.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-${HF_HUB_OFFLINE}}"

# This shell gets SIGTERM too (time limit, preemption, scancel). Without a trap bash would die with srun and nothing
# would requeue; with it bash waits for srun (whose tasks are writing their checkpoint) and then decides.
trap 'echo "slurm_job.sh: SIGTERM received, waiting for the training processes" >&2' TERM

echo "job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_NNODES:-1} node(s) x" \
  "${SLURM_NTASKS_PER_NODE:-1} task(s), MASTER_ADDR=${MASTER_ADDR}:${MASTER_PORT}, W&B run ${WANDB_RUN_ID:-(saved)}"
status=0
# One task per GPU (--ntasks-per-node = --gpus-per-node, from the #SBATCH lines); every task sees all GPUs of its
# node and Lightning picks cuda:<SLURM_LOCALID>. trainer.devices / num_nodes follow SLURM (train/runtime/cluster.py).
# ${a[@]+"${a[@]}"}: an empty array under `set -u` on bash < 4.4 (still common on cluster login images).
srun --kill-on-bad-exit=1 "${ZEBRA_PYTHON:-python}" -m train ${outputs[@]+"${outputs[@]}"} "$@" || status=$?

max_requeues="${ZEBRA_MAX_REQUEUES:-50}"  # a run that keeps stopping is not left cycling forever
case "$status" in
  138 | 143)
    state="$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | head -n 1)"
    if [[ "$state" == "JobState=CANCELLED" ]]; then
      echo "slurm_job.sh: srun exited ${status} after scancel; not requeueing" >&2
    elif ((${SLURM_RESTART_COUNT:-0} >= max_requeues)); then
      echo "slurm_job.sh: srun exited ${status}; ${max_requeues} requeues already (ZEBRA_MAX_REQUEUES), stopping" >&2
    else
      echo "slurm_job.sh: srun exited ${status} (stopped after a checkpoint); requeueing job ${SLURM_JOB_ID}" >&2
      scontrol requeue "$SLURM_JOB_ID" || echo "slurm_job.sh: scontrol requeue failed; resubmit the same command" >&2
    fi
    ;;
esac
exit "$status"
