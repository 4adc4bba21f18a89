#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine (Debian, as root), for tests and for trying
# slurm/train.sbatch without a cluster.
#
#   scripts/slurm_local.sh start    install slurmctld/slurmd/munge if missing, write a config under
#                                   $SLURM_LOCAL_DIR, start munged + slurmctld + slurmd, wait for
#                                   the node to be idle, print the `export SLURM_CONF=...` to use
#   scripts/slurm_local.sh stop     cancel this cluster's jobs, stop its daemons (by their pid files)
#   scripts/slurm_local.sh status   sinfo + squeue of this cluster
#
# Everything (config, munge key and socket, state, spool, logs) lives in SLURM_LOCAL_DIR
# (default /tmp/longnet-slurm); nothing under /etc is changed. Clients find the cluster through
# SLURM_CONF=$SLURM_LOCAL_DIR/slurm.conf (jobs inherit it). Ports: SLURM_LOCAL_PORT (default 6817)
# for slurmctld and the next one for slurmd.
set -euo pipefail

STATE_DIR="${SLURM_LOCAL_DIR:-/tmp/longnet-slurm}"
CTLD_PORT="${SLURM_LOCAL_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
CONF="$STATE_DIR/slurm.conf"
MUNGE_SOCKET="$STATE_DIR/munge/munge.socket.2"
NODE="$(hostname -s)"
export SLURM_CONF="$CONF"

log() { echo "[slurm_local] $*" >&2; }
die() { log "error: $*"; exit 1; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
        && command -v sbatch >/dev/null; then
        return
    fi
    [ "$(id -u)" -eq 0 ] || die "slurmctld/slurmd/munge are missing and installing them needs root"
    command -v apt-get >/dev/null || die "slurmctld/slurmd/munge are missing and there is no apt-get"
    log "installing slurmctld slurmd munge slurm-client with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    local apt_log="$STATE_DIR/apt.log"
    mkdir -p "$STATE_DIR"
    # The packages' own services are not started (policy-rc.d may forbid it); we run our own daemons.
    if ! { apt-get update -q && apt-get install -y -q --no-install-recommends slurmctld slurmd munge slurm-client; } \
        >"$apt_log" 2>&1; then
        tail -n 20 "$apt_log" >&2
        die "apt-get could not install the SLURM packages (full log: $apt_log)"
    fi
}

write_config() {
    mkdir -p "$STATE_DIR"/{munge,state,spool,log}
    chmod 0700 "$STATE_DIR/munge"
    if [ ! -s "$STATE_DIR/munge/munge.key" ]; then
        head -c 1024 /dev/urandom > "$STATE_DIR/munge/munge.key"
        chmod 0600 "$STATE_DIR/munge/munge.key"
    fi
    local cpus memory_mb
    cpus="$(nproc)"
    memory_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
    cat > "$CONF" <<EOF
# Written by scripts/slurm_local.sh: a one-node test cluster.
ClusterName=longnet-local
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$STATE_DIR/slurmctld.pid
SlurmdPidFile=$STATE_DIR/slurmd.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
ReturnToService=2
# Keep finished jobs visible to scontrol for 10 minutes (tests read their state and exit code).
MinJobAge=600
KillWait=30
SchedulerParameters=sched_interval=2
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory_mb State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

pid_alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install_packages
    write_config
    if ! pid_alive "$STATE_DIR/munged.pid"; then
        munged --force --socket="$MUNGE_SOCKET" --key-file="$STATE_DIR/munge/munge.key" \
            --pid-file="$STATE_DIR/munged.pid" --log-file="$STATE_DIR/log/munged.log" \
            --seed-file="$STATE_DIR/munge/munged.seed"
    fi
    if ! pid_alive "$STATE_DIR/slurmctld.pid"; then
        slurmctld -f "$CONF" -c   # -c: clear old state (a fresh cluster every start)
    fi
    if ! pid_alive "$STATE_DIR/slurmd.pid"; then
        slurmd -f "$CONF" -N "$NODE"
    fi
    local deadline=$((SECONDS + ${SLURM_LOCAL_START_TIMEOUT:-90})) state=""
    while [ $SECONDS -lt $deadline ]; do
        state="$(sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)"
        case "$state" in
            idle*|mixed*|allocated*) log "node $NODE is $state"; echo "export SLURM_CONF=$CONF"; return 0 ;;
            down*|drain*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
        esac
        sleep 1
    done
    log "node $NODE did not become idle (state: '${state:-no answer}'); logs follow"
    tail -n 20 "$STATE_DIR"/log/*.log >&2 || true
    exit 1
}

stop_daemon() {  # $1 = pid file; TERM, then KILL after 10 s
    local pid_file="$1" pid
    pid_alive "$pid_file" || return 0
    pid="$(cat "$pid_file")"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

stop() {
    if pid_alive "$STATE_DIR/slurmctld.pid"; then
        local jobs
        jobs="$(squeue -h -o %A 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            log "cancelling jobs: $(echo $jobs)"
            # shellcheck disable=SC2086
            scancel $jobs || true
            for _ in $(seq 30); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 1; done
        fi
    fi
    stop_daemon "$STATE_DIR/slurmd.pid"
    stop_daemon "$STATE_DIR/slurmctld.pid"
    stop_daemon "$STATE_DIR/munged.pid"
    log "stopped (state kept in $STATE_DIR)"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo; squeue ;;
    *) echo "usage: $0 start|stop|status   (SLURM_LOCAL_DIR=$STATE_DIR)" >&2; exit 2 ;;
esac
