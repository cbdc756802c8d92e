#!/usr/bin/env bash
# Stop the one-node Slurm cluster that .ci/slurm-up.sh started (slurmd, slurmctld, munged).
# Jobs still running are cancelled first. Safe to run when nothing is running.
set -uo pipefail

stop() {
    local pidfile=$1 name=$2 pid i
    [[ -f "$pidfile" ]] || return 0
    pid=$(cat "$pidfile" 2>/dev/null)
    [[ "$pid" =~ ^[0-9]+$ && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || return 0
    kill "$pid" 2>/dev/null
    for ((i = 0; i < 150; i++)); do
        [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$name" ]] || { echo "slurm-down: stopped $name"; return 0; }
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null
    echo "slurm-down: killed $name"
}

[[ "$(id -u)" -eq 0 ]] || { echo "slurm-down: must run as root" >&2; exit 1; }

if command -v scancel >/dev/null 2>&1 && [[ -f /run/slurm/slurmctld.pid ]]; then
    timeout 10 scancel --full --partition="${SLURM_CI_PARTITION:-debug}" 2>/dev/null || true
fi
stop /run/slurm/slurmd.pid slurmd
stop /run/slurm/slurmctld.pid slurmctld
stop /run/munge/munged.pid munged
exit 0
