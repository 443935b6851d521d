#!/usr/bin/env bash
# A true multi-node Slurm cluster on one machine: each node is a network namespace with its own
# address, so ranks on different "nodes" talk over a real (virtual) network, not loopback.
#
#   bash cluster/netns_cluster.sh start    create bridge + namespaces, start munged, slurmctld, slurmds
#   bash cluster/netns_cluster.sh stop     end what it started (by pid) and delete the network pieces
#   bash cluster/netns_cluster.sh status
#   bash cluster/netns_cluster.sh env      print `export SLURM_CONF=...`
#
# Layout (root needed): bridge tfbr0 10.200.0.1/24 in the root namespace, slurmctld there
# (SlurmctldHost=<hostname>(10.200.0.1)); node nK lives in namespace tfnK, joined to the bridge by
# a veth pair whose inner end is called tfnet0 in every node (so GLOO_SOCKET_IFNAME=tfnet0 /
# NCCL_SOCKET_IFNAME=tfnet0 fit all nodes), address 10.200.0.(10+K), 1 CPU per node. Each slurmd
# is started with `nsenter --net=/var/run/netns/tfnK slurmd -N nK` (`ip netns exec` would remount
# /sys and hide the cgroup mounts slurmd needs), in a private mount namespace with its own
# /dev/shm (a tmpfs that goes away with the node). Node names do not resolve: jobs take MASTER_ADDR
# from `scontrol show node` (NodeAddr), as cluster/common.sh does.
# It is independent of local_cluster.sh: own state directory, munge key and socket, ports
# (TRANSFUSION_NETNS_PORT, default 6927, and the next one) and cluster name, so both can run at once.
#   TRANSFUSION_NETNS_DIR    state directory      [/tmp/transfusion-slurm-netns]
#   TRANSFUSION_NETNS_NODES  number of nodes, 1-9 [2]
set -euo pipefail

STATE=${TRANSFUSION_NETNS_DIR:-/tmp/transfusion-slurm-netns}
PORT=${TRANSFUSION_NETNS_PORT:-6927}
NODES=${TRANSFUSION_NETNS_NODES:-2}
CLUSTER=tfnetns
BRIDGE=tfbr0
SUBNET=10.200.0
IFNAME=tfnet0
HOST=$(hostname -s)
CONF=$STATE/slurm.conf
MUNGE_SOCKET=$STATE/munge/munge.socket
START_TIMEOUT=${TRANSFUSION_SLURM_START_TIMEOUT:-90}

log() { echo "netns_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

# shellcheck source=cluster/daemons.sh
source "$(dirname "${BASH_SOURCE[0]}")/daemons.sh"

node_names() {
  local k
  for ((k = 1; k <= NODES; k++)); do echo "n$k"; done
}

setup_network() {
  local k
  ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
  ip addr replace "$SUBNET.1/24" dev "$BRIDGE"
  ip link set "$BRIDGE" up
  for ((k = 1; k <= NODES; k++)); do
    [[ -e /var/run/netns/tfn$k ]] || ip netns add "tfn$k"
    if ! ip link show "tfv${k}h" >/dev/null 2>&1; then
      ip link add "tfv${k}h" type veth peer name "$IFNAME" netns "tfn$k"
    fi
    ip link set "tfv${k}h" master "$BRIDGE" up
    ip -n "tfn$k" addr replace "$SUBNET.$((10 + k))/24" dev "$IFNAME"
    ip -n "tfn$k" link set "$IFNAME" up
    ip -n "tfn$k" link set lo up
  done
}

teardown_network() {
  local k
  for ((k = 1; k <= NODES; k++)); do
    ip link del "tfv${k}h" 2>/dev/null || true
    if [[ -e /var/run/netns/tfn$k ]]; then ip netns del "tfn$k" || true; fi
  done
  ip link del "$BRIDGE" 2>/dev/null || true
}

write_conf() {
  local k
  mkdir -p "$STATE"/{ctld,spool,run,log}
  write_munge_key
  {
    echo "# Written by cluster/netns_cluster.sh: $NODES nodes in network namespaces on one machine."
    cat <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$HOST($SUBNET.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=20
CredType=cred/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd-%n.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
SlurmdTimeout=60
MessageTimeout=20
KillWait=30
MinJobAge=600
EOF
    for ((k = 1; k <= NODES; k++)); do
      echo "NodeName=n$k NodeAddr=$SUBNET.$((10 + k)) CPUs=1 State=UNKNOWN"
    done
    echo "PartitionName=all Nodes=n[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

start_daemons() {
  local k
  start_munged
  start_slurmctld
  for ((k = 1; k <= NODES; k++)); do
    if ! daemon_pid slurmd "$STATE/run/slurmd-n$k.pid" >/dev/null; then
      # its own /dev/shm too (a private mount namespace), as a real node has: streaming and
      # DeepSpeed name their shared memory per node, and two nodes sharing one /dev/shm collide
      # shellcheck disable=SC2016  # $@ is expanded by the inner shell
      nsenter --net="/var/run/netns/tfn$k" unshare --mount --propagation private \
        sh -c 'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec slurmd "$@"' _ -f "$CONF" -N "n$k" \
        || die "slurmd n$k did not start; see $STATE/log/slurmd-n$k.log"
    fi
  done
}

wait_idle() {
  local t0=$SECONDS states=""
  while ((SECONDS - t0 < START_TIMEOUT)); do
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [[ $(SLURM_CONF=$CONF sinfo -h -N -t idle -o %N 2>/dev/null | sort -u | wc -l) -eq $NODES ]]; then
      return 0
    fi
    sleep 1
  done
  die "nodes not idle after ${START_TIMEOUT}s ($states); logs in $STATE/log"
}

cmd_start() {
  [[ $(id -u) == 0 ]] || die "run as root (namespaces and the Slurm daemons need it)"
  ((NODES >= 1 && NODES <= 9)) || die "TRANSFUSION_NETNS_NODES must be 1-9, got $NODES"
  command -v slurmctld >/dev/null || die "slurm-wlm is missing: bash cluster/local_cluster.sh start installs it"
  setup_network
  write_conf
  start_daemons
  wait_idle
  log "up: $(node_names | tr '\n' ' ')idle; use it with: export SLURM_CONF=$CONF"
}

cmd_stop() {
  local k pid
  cancel_jobs
  for ((k = 1; k <= NODES; k++)); do
    if pid=$(daemon_pid slurmd "$STATE/run/slurmd-n$k.pid"); then end_pid "$pid"; fi
  done
  stop_controller
  # whatever still runs inside our namespaces (job steps of cancelled jobs) was started by us
  for ((k = 1; k <= NODES; k++)); do
    if [[ -e /var/run/netns/tfn$k ]]; then
      for pid in $(ip netns pids "tfn$k" 2>/dev/null); do end_pid "$pid"; done
    fi
  done
  teardown_network
  log "stopped"
}

cmd_status() {
  local rc=0 k pid
  for f in "munged:$STATE/munge/munged.pid" "slurmctld:$STATE/run/slurmctld.pid"; do
    if pid=$(daemon_pid "${f%%:*}" "${f#*:}"); then echo "${f%%:*}: running (pid $pid)"; else
      echo "${f%%:*}: not running"
      rc=1
    fi
  done
  for ((k = 1; k <= NODES; k++)); do
    if pid=$(daemon_pid slurmd "$STATE/run/slurmd-n$k.pid"); then echo "slurmd n$k: running (pid $pid)"; else
      echo "slurmd n$k: not running"
      rc=1
    fi
  done
  ((rc == 0)) && SLURM_CONF=$CONF sinfo -N
  echo "SLURM_CONF=$CONF"
  return $rc
}

cluster_cli "$@"
