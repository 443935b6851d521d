# shellcheck shell=bash
# Shared steps of the Slurm templates (train.slurm, precompute.slurm, export.slurm); sourced, not run.
#
# What it gives a template:
#   tf_enter_repo       cd to the repository (TRANSFUSION_REPO, default: the directory sbatch was run from)
#   tf_activate         load modules / activate the virtualenv (TRANSFUSION_MODULES, TRANSFUSION_VENV, TRANSFUSION_ENV_SCRIPT)
#   tf_rendezvous       MASTER_ADDR (first node's NodeAddr) and MASTER_PORT (from the job id)
#   tf_prepare_nodes    one task per node: clean stale streaming shared memory, make the job's cache dir
#   tf_run_step ARGS    `srun ARGS` in the background; USR1/TERM sent to this script are forwarded to it
#   tf_cleanup_nodes    one task per node: remove the job's cache dir
#   tf_requeue          `scontrol requeue` this job (bounded by TRANSFUSION_MAX_RESTARTS)
# The per-task variables (RANK, LOCAL_RANK, ...) are set by cluster/srun_task.sh inside each task.

TRANSFUSION_RC=0
TRANSFUSION_SIGNAL=""
TRANSFUSION_SRUN_PID=""

tf_log() { echo "[$(date '+%F %T')] [${SLURM_JOB_ID:-nojob}] $*"; }

# The repository root: TRANSFUSION_REPO, else the submit directory. Templates run from a spool copy, so
# paths are taken from here, never from $0.
tf_enter_repo() {
  local repo=${TRANSFUSION_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
  if [[ ! -f $repo/cluster/srun_task.sh ]]; then
    echo "error: $repo is not the transfusion repository (no cluster/srun_task.sh); run sbatch from the" \
      "repository root or set TRANSFUSION_REPO=/path/to/repo" >&2
    exit 2
  fi
  cd "$repo" || exit 2
  TRANSFUSION_REPO=$PWD
  export TRANSFUSION_REPO
}

# Software environment. Pick what your cluster uses (see docs/cluster.md):
#   TRANSFUSION_MODULES="cuda/12.4 nccl/2.21"   module load these first (environment modules / Lmod)
#   TRANSFUSION_ENV_SCRIPT=/path/env.sh          source this script (conda activate, spack load, ...)
#   TRANSFUSION_VENV=/path/venv                  activate this virtualenv (default: ./.venv when it exists)
#   TRANSFUSION_VENV=none                        use whatever python is on PATH (e.g. inside a container)
# For a container, see TRANSFUSION_SRUN_ARGS (pyxis: --container-image=...) or TRANSFUSION_TASK_PREFIX (apptainer).
tf_activate() {
  if [[ -n ${TRANSFUSION_MODULES:-} ]]; then
    # shellcheck disable=SC2086  # a space-separated list of module names
    module load ${TRANSFUSION_MODULES}
  fi
  if [[ -n ${TRANSFUSION_ENV_SCRIPT:-} ]]; then
    # shellcheck disable=SC1090  # a user-chosen file
    source "$TRANSFUSION_ENV_SCRIPT"
  fi
  local venv=${TRANSFUSION_VENV:-$TRANSFUSION_REPO/.venv}
  if [[ $venv != none && -f $venv/bin/activate ]]; then
    # shellcheck disable=SC1091  # created by `make install`, not present when linting
    source "$venv/bin/activate"
  elif [[ $venv != none && -n ${TRANSFUSION_VENV:-} ]]; then
    echo "error: TRANSFUSION_VENV=$TRANSFUSION_VENV has no bin/activate" >&2
    exit 2
  fi
  export PYTHONUNBUFFERED=1
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
}

# Address other nodes reach the first node at: its NodeAddr in slurm.conf (node names need not
# resolve), else the name itself. The port comes from the job id, so a requeued job keeps it and
# jobs sharing a node do not collide (override with MASTER_PORT).
tf_rendezvous() {
  local first addr
  first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  addr=$(scontrol show node "$first" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' | head -n1)
  MASTER_ADDR=${MASTER_ADDR:-${addr:-$first}}
  MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export MASTER_ADDR MASTER_PORT
}

# Forward USR1 (time limit, via --signal=B:USR1@120, or `scancel -b --signal=USR1`) and TERM
# (preemption, scancel) to the running srun, which passes them to every task.
tf_on_signal() {
  TRANSFUSION_SIGNAL=$1
  tf_log "batch script got SIG$1; forwarding it to the tasks"
  if [[ -n $TRANSFUSION_SRUN_PID ]]; then
    kill -s "$1" "$TRANSFUSION_SRUN_PID" 2>/dev/null || true
  fi
}
trap 'tf_on_signal USR1' USR1
trap 'tf_on_signal TERM' TERM

# srun "$@" in the background and wait for it, surviving the traps above; TRANSFUSION_RC = its exit code.
tf_run_step() {
  local seen
  srun "$@" &
  TRANSFUSION_SRUN_PID=$!
  while :; do
    seen=$TRANSFUSION_SIGNAL
    if wait "$TRANSFUSION_SRUN_PID"; then TRANSFUSION_RC=0; else TRANSFUSION_RC=$?; fi
    # a trap interrupted `wait` (status > 128, srun still running): wait again
    if [[ $TRANSFUSION_SIGNAL != "$seen" || $TRANSFUSION_RC -gt 128 ]] && kill -0 "$TRANSFUSION_SRUN_PID" 2>/dev/null; then
      continue
    fi
    break
  done
  TRANSFUSION_SRUN_PID=""
  return 0
}

# Streaming's node-local cache: the trainer is given ROOT/job-$SLURM_JOB_ID as data.cache_dir, one
# per job (removed when it ends); a requeued job keeps its id and so reuses its own. Under it the
# loader keeps one folder per (remote, index.json, pack.json): data_pipeline.loader.stream_cache_dir.
tf_cache_root() { echo "${TRANSFUSION_CACHE_ROOT:-${TMPDIR:-/tmp}/transfusion-cache}"; }
tf_cache_dir() { echo "$(tf_cache_root)/job-${SLURM_JOB_ID}"; }

# One task per node: create this job's cache dir and remove streaming shared memory left by
# crashed jobs (FileExistsError ..._locals on the next start). Streaming's cleaner removes every
# streaming segment on the node, so it runs before any rank starts and assumes the job has its
# nodes to itself (the usual case for training); on shared nodes set TRANSFUSION_CLEAN_SHM=0.
tf_prepare_nodes() {
  local cache
  cache=$(tf_cache_dir)
  # shellcheck disable=SC2016  # expanded by the task's shell, not here
  srun --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES" --kill-on-bad-exit=1 bash -c '
    mkdir -p "$1" || exit 1
    [[ ${TRANSFUSION_CLEAN_SHM:-1} == 0 ]] && exit 0
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE  # keep streaming from starting a process group
    python -c "from streaming.base.util import clean_stale_shared_memory as c; c()"' _ "$cache"
}

tf_cleanup_nodes() {
  local cache
  cache=$(tf_cache_dir)
  srun --ntasks-per-node=1 --ntasks="$SLURM_JOB_NUM_NODES" rm -rf "$cache" || true
}

# Put this job back in the queue (same job id, same log file with --open-mode=append). Slurm
# ends this script right away; the job starts again once resources (and BeginTime) allow.
tf_requeue() {
  local restarts=${SLURM_RESTART_COUNT:-0} max=${TRANSFUSION_MAX_RESTARTS:-100}
  if [[ $TRANSFUSION_SIGNAL == TERM ]]; then
    # TERM reaches the batch script on `scancel JOB` (the user wants it gone) and on preemption
    # (Slurm requeues preempted jobs itself when PreemptMode=REQUEUE): requeueing here would
    # bring a cancelled job back
    tf_log "stopped by SIGTERM (scancel or preemption): not requeueing; the checkpoint is saved"
    exit 75
  fi
  if ((restarts >= max)); then
    tf_log "not requeueing: restarted $restarts times (TRANSFUSION_MAX_RESTARTS=$max)"
    exit 75
  fi
  tf_log "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
  scontrol requeue "$SLURM_JOB_ID" || {
    tf_log "scontrol requeue failed (was the job submitted with --requeue?); resubmit to resume"
    exit 75
  }
  sleep 60 # Slurm ends the script during this sleep
  exit 75
}
