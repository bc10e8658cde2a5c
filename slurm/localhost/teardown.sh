#!/usr/bin/env bash
# Stops what slurm/localhost/setup.sh started: both slurmd, slurmctld, munged.
# Leaves packages, /etc/slurm/slurm.conf and the saved job state in place (setup.sh reuses them).
set -uo pipefail
[[ $EUID -eq 0 ]] || { echo "slurm teardown: must run as root" >&2; exit 1; }

stop_pidfile() {
    local f=$1 pid i
    [[ -s $f ]] || return 0
    pid=$(cat "$f")
    if kill "$pid" 2>/dev/null; then
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$f"
}

for n in n1 n2; do stop_pidfile "/run/slurmd-$n.pid"; done
stop_pidfile /run/slurmctld.pid
stop_pidfile /run/munge/munged.pid
echo "slurm: stopped"
