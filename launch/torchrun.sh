#!/bin/bash
# `python -m train` on every GPU of one or more machines without SLURM, through torchrun. Run it on each node:
#
#   launch/torchrun.sh conf=zebra_1b [overrides]                                  # one node, all its GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh conf=zebra_1b      # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh conf=zebra_1b      # on node1
#
# Lightning recognises torchrun (TorchElasticEnvironment: TORCHELASTIC_RUN_ID is set) and requires
# trainer.devices x trainer.num_nodes == WORLD_SIZE. `python -m train` takes both from torchrun's LOCAL_WORLD_SIZE and
# WORLD_SIZE (train/runtime/cluster.py): leave them unset, or give the values --nproc_per_node and --nnodes have.
# Every node must see the same output_dir (a shared file system) for checkpoints and resume. Stopping it (Ctrl-C,
# SIGTERM) and running the same command again resumes from the last checkpoint.
set -euo pipefail

nproc="${NPROC_PER_NODE:-}"
if [[ -z "$nproc" ]]; then
  nproc="$(nvidia-smi --list-gpus | wc -l)"  # one process per visible GPU
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"  # torchrun would set 1; a few threads help the CPU-side data work
export TOKENIZERS_PARALLELISM=false

# --max_restarts=0: a failed rank ends the run (rerun to resume) instead of torchrun restarting it in place.
exec torchrun --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="$nproc" \
  --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}" --max_restarts=0 \
  -m train "$@"
