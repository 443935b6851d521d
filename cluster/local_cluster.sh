#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for the tests and for trying the templates on one machine.
#
#   bash cluster/local_cluster.sh start    install slurm-wlm + munge if missing, start munged,
#                                          slurmctld and slurmd; wait until the node is idle
#                                          (a quick no-op when the cluster is already up)
#   bash cluster/local_cluster.sh stop     cancel its jobs, end the daemons it started (by pid)
#   bash cluster/local_cluster.sh status   print the daemons, sinfo and squeue
#   bash cluster/local_cluster.sh env      print `export SLURM_CONF=...` (eval it to use sbatch)
#
# Everything lives in one state directory (TRANSFUSION_SLURM_DIR, default /tmp/transfusion-slurm):
# slurm.conf, its own munge key and socket, spool, state, pid and log files. Nothing under /etc
# is written and no system service is started or stopped; the daemons use their own ports
# (TRANSFUSION_SLURM_PORT, default 6917, and the next one), so an existing Slurm on the machine is untouched.
# Needs root (Slurm daemons run as root here). Options (environment):
#   TRANSFUSION_SLURM_DIR      state directory                     [/tmp/transfusion-slurm]
#   TRANSFUSION_SLURM_CPUS     CPUs of the node                    [max(nproc, 2)]
#   TRANSFUSION_SLURM_PORT     slurmctld port; slurmd uses PORT+1  [6917]
set -euo pipefail

STATE=${TRANSFUSION_SLURM_DIR:-/tmp/transfusion-slurm}
PORT=${TRANSFUSION_SLURM_PORT:-6917}
NODE=$(hostname -s)
CLUSTER=tflocal
CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
START_TIMEOUT=${TRANSFUSION_SLURM_START_TIMEOUT:-90}

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# pid file of each daemon this script starts, in start order
pidfile() {
  case $1 in
    munged) echo "$STATE/munge/munged.pid" ;;
    slurmctld) echo "$STATE/run/slurmctld.pid" ;;
    slurmd) echo "$STATE/run/slurmd-$NODE.pid" ;;
  esac
}

# shellcheck source=cluster/daemons.sh
source "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"

# pid of daemon NAME (munged, slurmctld, slurmd) if the one we started still runs
running_pid() { daemon_pid "$1" "$(pidfile "$1")"; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    && command -v sbatch >/dev/null; then
    return 0
  fi
  [[ $(id -u) == 0 ]] || die "slurm-wlm and munge are missing; install them as root: apt-get install -y slurm-wlm munge"
  log "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q slurm-wlm munge
}

write_slurm_conf() {
  local cpus=${TRANSFUSION_SLURM_CPUS:-$(nproc)}
  ((cpus >= 2)) || cpus=2
  mkdir -p "$STATE"/{ctld,spool,run,log}
  cat >"$CONF" <<EOF
# Written by cluster/local_cluster.sh: a one-node cluster on localhost.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire: a requeued job waits this long before it may start again (Slurm default 120 s)
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=20
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$(pidfile slurmctld)
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=20
KillWait=30
MinJobAge=600
JobRequeue=1
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
}

start_slurm_daemons() {
  export SLURM_CONF=$CONF
  start_slurmctld
  if ! running_pid slurmd >/dev/null; then
    slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start; see $STATE/log/slurmd-$NODE.log"
  fi
}

node_state() { SLURM_CONF=$CONF sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1; }

healthy() {
  running_pid munged >/dev/null && running_pid slurmctld >/dev/null && running_pid slurmd >/dev/null \
    && [[ $(node_state) =~ ^(idle|mix|alloc) ]]
}

wait_idle() {
  local t0=$SECONDS state=""
  while ((SECONDS - t0 < START_TIMEOUT)); do
    state=$(node_state || true)
    if [[ $state == idle ]]; then
      return 0
    fi
    if [[ $state =~ ^(down|drain|drng|fail) ]]; then
      SLURM_CONF=$CONF scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true
    fi
    sleep 1
  done
  die "node $NODE not idle after ${START_TIMEOUT}s (state '${state}'); logs in $STATE/log"
}

cmd_start() {
  [[ $(id -u) == 0 ]] || die "run as root (the local Slurm daemons run as root)"
  if healthy; then
    log "already up ($CONF)"
    return 0
  fi
  install_packages
  if running_pid munged >/dev/null || running_pid slurmctld >/dev/null || running_pid slurmd >/dev/null; then
    log "partly up: restarting"
    cmd_stop
  fi
  mkdir -p "$STATE"
  write_slurm_conf
  start_munged
  start_slurm_daemons
  wait_idle
  log "up: node $NODE idle; use it with: export SLURM_CONF=$CONF"
}

cmd_stop() {
  local pid
  cancel_jobs
  if pid=$(running_pid slurmd); then end_pid "$pid"; fi
  stop_controller
  log "stopped"
}

cmd_status() {
  local d pid rc=0
  for d in munged slurmctld slurmd; do
    if pid=$(running_pid "$d"); then echo "$d: running (pid $pid)"; else echo "$d: not running"; rc=1; fi
  done
  if ((rc == 0)); then
    SLURM_CONF=$CONF sinfo || rc=1
    SLURM_CONF=$CONF squeue || rc=1
  fi
  echo "SLURM_CONF=$CONF"
  return $rc
}

cluster_cli "$@"
