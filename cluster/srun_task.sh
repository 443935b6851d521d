#!/usr/bin/env bash
# Runs inside each Slurm task: exports the torch-style rank variables that DeepSpeed,
# torch.distributed and streaming read, then execs the command.
#
#   srun bash cluster/srun_task.sh python -m pretrain.train --config ...
#
# RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS (of this step),
# LOCAL_WORLD_SIZE = tasks of this step on this node, derived by `python -m contract.dist_env`
# (the same code the trainer uses), which then execs the command; MASTER_ADDR/MASTER_PORT come
# from the batch script (common.sh: tf_rendezvous). `python` is the task's (inside the prefix).
# Every GPU of the node stays visible; the program picks cuda:LOCAL_RANK (one task per GPU). TRANSFUSION_TASK_PREFIX, when set, is put before the command
# (e.g. "apptainer exec --nv /path/image.sif"). TRANSFUSION_TASK_VERBOSE=1 prints one line per task (rank,
# node, master) to stderr.
set -euo pipefail

: "${SLURM_PROCID:?srun_task.sh runs inside an srun task (SLURM_PROCID is not set)}"
: "${MASTER_ADDR:?MASTER_ADDR is not set: the batch script should call tf_rendezvous}"
: "${MASTER_PORT:?MASTER_PORT is not set: the batch script should call tf_rendezvous}"

prefix=()
if [[ -n ${TRANSFUSION_TASK_PREFIX:-} ]]; then
  read -ra prefix <<<"$TRANSFUSION_TASK_PREFIX"
fi
# contract.dist_env derives RANK & co. from SLURM_* (the one implementation), exports them, execs "$@"
exec "${prefix[@]}" python -m contract.dist_env "$@"
