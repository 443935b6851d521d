#!/usr/bin/env bash
# Runs inside each Slurm task: exports the torch-style rank variables that DeepSpeed,
# torch.distributed and streaming read, then execs the command.
#
#   srun bash cluster/srun_task.sh python -m pretrain.train --config ...
#
# RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = SLURM_NTASKS (of this step),
# LOCAL_WORLD_SIZE = tasks of this step on this node; MASTER_ADDR/MASTER_PORT come from the
# batch script (common.sh: tf_rendezvous). Every GPU of the node stays visible; the program picks
# cuda:LOCAL_RANK (one task per GPU). TF_TASK_PREFIX, when set, is put before the command
# (e.g. "apptainer exec --nv /path/image.sif"). TF_TASK_VERBOSE=1 prints one line per task (rank,
# node, master) to stderr.
set -euo pipefail

# tasks on node number $2 given Slurm's compressed per-node counts $1, e.g. "4(x2),3" -> 4 4 3
tasks_on_node() {
  local spec=$1 node=$2 item count reps i idx=0
  IFS=, read -ra items <<<"$spec"
  for item in "${items[@]}"; do
    if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
      count=${BASH_REMATCH[1]} reps=${BASH_REMATCH[2]}
    else
      count=$item reps=1
    fi
    for ((i = 0; i < reps; i++)); do
      if ((idx == node)); then
        echo "$count"
        return 0
      fi
      idx=$((idx + 1))
    done
  done
  echo "error: no task count for node $node in '$spec'" >&2
  return 1
}

: "${SLURM_PROCID:?srun_task.sh runs inside an srun task (SLURM_PROCID is not set)}"
: "${MASTER_ADDR:?MASTER_ADDR is not set: the batch script should call tf_rendezvous}"
: "${MASTER_PORT:?MASTER_PORT is not set: the batch script should call tf_rendezvous}"

RANK=$SLURM_PROCID
LOCAL_RANK=$SLURM_LOCALID
WORLD_SIZE=${SLURM_STEP_NUM_TASKS:-$SLURM_NTASKS}
LOCAL_WORLD_SIZE=$(tasks_on_node "${SLURM_STEP_TASKS_PER_NODE:-$SLURM_TASKS_PER_NODE}" "${SLURM_NODEID:-0}")
export RANK LOCAL_RANK WORLD_SIZE LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
if [[ ${TF_TASK_VERBOSE:-0} == 1 ]]; then
  echo "[srun_task] rank $RANK/$WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE node ${SLURMD_NODENAME:-?}" \
    "master $MASTER_ADDR:$MASTER_PORT gloo_if ${GLOO_SOCKET_IFNAME:-auto}" >&2
fi

prefix=()
if [[ -n ${TF_TASK_PREFIX:-} ]]; then
  read -ra prefix <<<"$TF_TASK_PREFIX"
fi
exec "${prefix[@]}" "$@"
