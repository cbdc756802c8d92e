#!/usr/bin/env bash
# Start a one-node Slurm cluster on this machine, for the tests of `hydra/launcher=slurm`.
#
#   sudo bash .ci/slurm-up.sh        # installs slurm-wlm + munge if missing, starts the daemons
#   sudo bash .ci/slurm-down.sh      # stops them again
#
# Debian / Ubuntu, as root, without systemd: munged, slurmctld and slurmd are started directly.
# The node is `localhost` with this machine's CPUs and most of its memory, in one default
# partition (`debug`, or $SLURM_CI_PARTITION). Safe to run again: a cluster that is up with the
# same configuration is left alone; a changed configuration restarts the Slurm daemons.
# Exit 0 once `sinfo` reports the node usable; otherwise exit 1 and print the daemons' logs.
set -euo pipefail

PARTITION="${SLURM_CI_PARTITION:-debug}"
WAIT_S="${SLURM_CI_WAIT_S:-60}"

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
RUN_DIR=/run/slurm
MUNGE_KEY=/etc/munge/munge.key
MUNGE_LOG=/var/log/munge/munged.log
MUNGE_PID=/run/munge/munged.pid

say() { echo "slurm-up: $*"; }

dump_logs() {
    local f
    for f in "$MUNGE_LOG" "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log"; do
        if [[ -f "$f" ]]; then
            echo "----- $f (last 40 lines) -----"
            tail -n 40 "$f"
        else
            echo "----- $f: missing -----"
        fi
    done
    if command -v scontrol >/dev/null 2>&1; then
        echo "----- scontrol show node localhost -----"
        timeout 10 scontrol show node localhost 2>&1 || true
    fi
}

die() {
    echo "slurm-up: ERROR: $*" >&2
    dump_logs >&2
    exit 1
}

# A process recorded in a pid file is alive and runs the named program.
running() {
    local pidfile=$1 name=$2 pid
    [[ -f "$pidfile" ]] || return 1
    pid=$(cat "$pidfile" 2>/dev/null) || return 1
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]]
}

# Stop the daemon of a pid file and wait until that process is gone (daemons remove their pid
# file before they have finished shutting down).
stop_pidfile() {
    local pidfile=$1 name=$2 pid i
    running "$pidfile" "$name" || return 0
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 0
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    sleep 0.5
}

[[ "$(id -u)" -eq 0 ]] || { echo "slurm-up: must run as root (it installs packages and starts daemons)" >&2; exit 1; }

# --- 1. packages ------------------------------------------------------------------------------
missing=()
for cmd in munged munge unmunge slurmctld slurmd sinfo sbatch srun scontrol; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if ((${#missing[@]})); then
    say "installing slurm-wlm and munge (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi
id munge >/dev/null 2>&1 || die "user 'munge' does not exist (the munge package creates it)"

# --- 2. munge: the authentication every Slurm message carries ---------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge
install -d -o munge -g munge -m 0711 /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    say "munged already running"
else
    stop_pidfile "$MUNGE_PID" munged
    # A fresh key, unless one of the right size is there (a restart keeps credentials valid).
    if [[ ! -s "$MUNGE_KEY" || "$(stat -c %s "$MUNGE_KEY")" -ne 1024 ]]; then
        dd if=/dev/urandom of="$MUNGE_KEY" bs=1024 count=1 status=none
    fi
    chown munge:munge "$MUNGE_KEY"
    chmod 0400 "$MUNGE_KEY"
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    runuser -u munge -- /usr/sbin/munged || die "munged did not start"
    for ((i = 0; i < 50; i++)); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.2
    done
    munge -n | unmunge >/dev/null || die "munged started but a credential does not round-trip"
    say "munged started"
fi

# --- 3. slurm.conf ----------------------------------------------------------------------------
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
# Leave a tenth of the memory (at least 1 GiB) to the system and the daemons.
headroom=$((mem_mb / 10 > 1024 ? mem_mb / 10 : 1024))
real_mb=$((mem_mb - headroom))
((real_mb > 0)) || die "too little memory for a Slurm node: ${mem_mb} MB"

new_conf=$(
    cat <<EOF
# One-node Slurm cluster on localhost, written by .ci/slurm-up.sh (do not edit: it is rewritten).
ClusterName=covidqu-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to squeue / scontrol for 10 minutes.
MinJobAge=600
KillWait=15
InactiveLimit=0
SlurmdTimeout=300
NodeName=localhost CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=$PARTITION Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
)

install -d -m 0755 "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR" "$RUN_DIR"
conf_changed=0
if [[ ! -f "$CONF" ]] || [[ "$(cat "$CONF")" != "$new_conf" ]]; then
    printf '%s\n' "$new_conf" >"$CONF"
    conf_changed=1
    say "wrote $CONF (node localhost: CPUs=$cpus RealMemory=${real_mb}MB, partition $PARTITION)"
fi

# --- 4. daemons -------------------------------------------------------------------------------
if ((conf_changed)); then
    stop_pidfile "$RUN_DIR/slurmd.pid" slurmd
    stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld
fi
if running "$RUN_DIR/slurmctld.pid" slurmctld; then
    say "slurmctld already running"
else
    slurmctld || die "slurmctld did not start"
    say "slurmctld started"
fi
if running "$RUN_DIR/slurmd.pid" slurmd; then
    say "slurmd already running"
else
    slurmd -N localhost || die "slurmd did not start"
    say "slurmd started"
fi

# --- 5. wait until the node takes jobs ---------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
resumed=0
state=""
while ((SECONDS < deadline)); do
    state=$(timeout 10 sinfo -h -N -n localhost -o %T 2>/dev/null | head -n 1 || true)
    case "$state" in
        idle | mixed | allocated | completing)
            say "cluster up: node localhost is $state, partition $PARTITION ($((SECONDS))s)"
            exit 0
            ;;
        down* | drain* | fail*)
            # Left down by an earlier, unclean stop: the node is healthy now, return it.
            if ((!resumed)); then
                timeout 10 scontrol update NodeName=localhost State=RESUME >/dev/null 2>&1 || true
                resumed=1
            fi
            ;;
    esac
    sleep 1
done
die "node localhost not usable after ${WAIT_S}s (sinfo state: '${state:-no answer}')"
