# shellcheck shell=bash
# Daemon start/stop shared by local_cluster.sh and netns_cluster.sh (sourced, not run).
#
# The sourcing script sets STATE (state directory), CONF (slurm.conf), MUNGE_SOCKET, and defines
# log/die. Layout under STATE: munge/{munge.key,munged.pid,munged.seed}, run/slurmctld.pid,
# log/{munged,slurmctld}.log. Only daemons whose pid file this cluster wrote are ever signalled.

# pid of daemon NAME from pid FILE if it still runs (checked against its command name)
daemon_pid() {
  local name=$1 file=$2 pid
  [[ -s $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm && $(<"/proc/$pid/comm") == "$name" ]] || return 1
  echo "$pid"
}

# TERM a pid, KILL it after 10 s, and wait for it to go
end_pid() {
  local pid=$1 _
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do
    [[ -d /proc/$pid ]] || return 0
    sleep 0.1
  done
  log "pid $pid did not stop on TERM: killing it"
  kill -KILL "$pid" 2>/dev/null || true
}

# this cluster's own munge key (never /etc/munge)
write_munge_key() {
  mkdir -p "$STATE/munge"
  chmod 0700 "$STATE/munge"
  if [[ ! -s $STATE/munge/munge.key ]]; then
    (umask 077 && head -c 1024 /dev/urandom >"$STATE/munge/munge.key")
  fi
  chmod 0600 "$STATE/munge/munge.key"
}

start_munged() {
  daemon_pid munged "$STATE/munge/munged.pid" >/dev/null && return 0
  write_munge_key
  mkdir -p "$STATE/log"
  munged --force --key-file="$STATE/munge/munge.key" --socket="$MUNGE_SOCKET" \
    --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
    --seed-file="$STATE/munge/munged.seed"
}

start_slurmctld() {
  daemon_pid slurmctld "$STATE/run/slurmctld.pid" >/dev/null && return 0
  # -c: start from a clean state: no jobs of an earlier session come back to life
  slurmctld -c -f "$CONF" || die "slurmctld did not start; see $STATE/log/slurmctld.log"
}

# cancel every job of this cluster and wait (up to 20 s) until the queue is empty
cancel_jobs() {
  daemon_pid slurmctld "$STATE/run/slurmctld.pid" >/dev/null || return 0
  local jobs _
  jobs=$(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null || true)
  [[ -n $jobs ]] || return 0
  log "cancelling jobs: $(echo "$jobs" | tr '\n' ' ')"
  # shellcheck disable=SC2086  # word splitting wanted: one argument per job id
  SLURM_CONF=$CONF scancel $jobs 2>/dev/null || true
  for _ in $(seq 1 40); do
    [[ -z $(SLURM_CONF=$CONF squeue -h -o %i 2>/dev/null) ]] && return 0
    sleep 0.5
  done
}

# stop slurmctld and munged (after the caller stopped its slurmds)
stop_controller() {
  local pid
  if pid=$(daemon_pid slurmctld "$STATE/run/slurmctld.pid"); then end_pid "$pid"; fi
  if pid=$(daemon_pid munged "$STATE/munge/munged.pid"); then end_pid "$pid"; fi
}

# the command line of both cluster scripts: start|stop|status|env (they define cmd_start/stop/status)
cluster_cli() {
  case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *)
      echo "usage: $0 start|stop|status|env" >&2
      exit 2
      ;;
  esac
}
