#!/usr/bin/env bash
# A real two-node Slurm cluster on this one host, for tests. Not a mock: Debian's slurmctld, two slurmd
# (nodes n1 and n2, both 127.0.0.1 on distinct ports) and munged, with every file under one state folder.
#
#   tests/slurm/cluster.sh start [DIR]   # install packages if missing, start; prints `export SLURM_CONF=...`
#   tests/slurm/cluster.sh stop  [DIR]   # stop the daemons started from DIR (by their pid files)
#   tests/slurm/cluster.sh env   [DIR]   # print the exports a client needs
#
# DIR defaults to $SCALESFT_SLURM_DIR or /tmp/scalesft-slurm. Ports: $SCALESFT_SLURM_PORT (slurmctld;
# default 16817) and the two following ports for the slurmd of n1 and n2.
#
# Settings that matter (measured on this one-host cluster):
#   MinJobAge=5                 finished jobs leave the queue fast (else `sbatch --wait` backs off to 32 s)
#   cred_expire=5               a requeued job restarts after ~7 s (measured; 10 gives ~11 s, default ~180 s)
#   sched_interval=2            the main scheduler runs every 2 s
#   unshare --mount + a private /etc/hosts per slurmd, so n1 and n2 resolve inside jobs
#   DIR/local is node-local: inside jobs on node N it shows DIR/nodes/N (empty from outside the cluster)
set -euo pipefail

cmd=${1:-}
dir=${2:-${SCALESFT_SLURM_DIR:-/tmp/scalesft-slurm}}
port=${SCALESFT_SLURM_PORT:-16817}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
nodes=(n1 n2)

die() { echo "cluster.sh: $*" >&2; exit 1; }

install_packages() {
    local missing=()
    for bin in slurmctld slurmd sbatch munged; do command -v "$bin" >/dev/null || missing+=("$bin"); done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "missing ${missing[*]}; install as root: apt-get install --no-install-recommends slurmctld slurmd slurm-client munge"
    echo "cluster.sh: installing slurm and munge (missing: ${missing[*]})" >&2
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d 101: the packages' postinst must not start the system-wide daemons.
    local policy=/usr/sbin/policy-rc.d had_policy=1
    [[ -e $policy ]] || { had_policy=0; printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod +x "$policy"; }
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null; }
    [[ $had_policy -eq 1 ]] || rm -f "$policy"
}

render() {  # render a template: @DIR@ @PORT@ @HOST@ ... -> values
    sed -e "s|@DIR@|$dir|g" -e "s|@PORT@|$port|g" -e "s|@PORT1@|$((port + 2))|g" -e "s|@PORT2@|$((port + 3))|g" \
        -e "s|@HOST@|$(hostname)|g" -e "s|@USER@|$(id -un)|g" -e "s|@CPUS@|$(nproc)|g" \
        -e "s|@MEM@|$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))|g" "$1"
}

wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
    local limit=$1 what=$2; shift 2
    local end=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < end )) || { echo "cluster.sh: timed out waiting for $what; logs:" >&2; tail -n 20 "$dir"/log/*.log >&2; return 1; }
        sleep 0.2
    done
}

print_env() {
    echo "export SLURM_CONF=$dir/slurm.conf"
}

start() {
    install_packages
    if [[ -f $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
        die "a cluster already runs from $dir; stop it first: $0 stop $dir"
    fi
    rm -rf "$dir"
    mkdir -p "$dir"/{state,spool,log,munge,run}
    chmod 700 "$dir/munge"
    chmod a+x "$dir" "$dir/run"   # the munge socket folder must be reachable by every user
    render "$here/slurm.conf.in" >"$dir/slurm.conf"
    cp "$here/cgroup.conf" "$dir/cgroup.conf"
    : >"$dir/plugstack.conf"
    printf '127.0.0.1 localhost %s\n' "$(hostname)" "${nodes[@]}" | sort -u >"$dir/hosts"
    # A fresh munge key per cluster.
    head -c 1024 /dev/urandom >"$dir/munge/munge.key"
    chmod 400 "$dir/munge/munge.key"
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/run/munge.socket" \
        --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
    wait_for 10 munged test -S "$dir/run/munge.socket"
    export SLURM_CONF=$dir/slurm.conf
    slurmctld -f "$dir/slurm.conf"
    for n in "${nodes[@]}"; do
        # Each slurmd (and so every job step it starts) has its own mount namespace: a private hosts file in
        # which n1, n2 resolve, and DIR/local showing DIR/nodes/<node>: a node-local folder, as on a cluster.
        mkdir -p "$dir/nodes/$n" "$dir/local"
        unshare --mount -- bash -c 'mount --bind "$1" /etc/hosts && mount --bind "$4" "$5" && exec slurmd -f "$2" -N "$3"' \
            _ "$dir/hosts" "$dir/slurm.conf" "$n" "$dir/nodes/$n" "$dir/local"
    done
    wait_for 30 "two idle nodes" bash -c "[[ \$(sinfo -h -N -t idle -o %N | sort -u | wc -l) -eq ${#nodes[@]} ]]"
    print_env
}

stop() {
    local pidfile pid jobs pids=()
    if [[ -f $dir/slurm.conf ]]; then  # end running jobs first: their slurmstepd outlive slurmd
        jobs=$(SLURM_CONF=$dir/slurm.conf timeout 5 squeue -h -o %A 2>/dev/null || true)
        [[ -z $jobs ]] || { SLURM_CONF=$dir/slurm.conf timeout 5 scancel $jobs 2>/dev/null || true; sleep 1; }
    fi
    for pidfile in "$dir"/run/slurmd.*.pid "$dir"/run/slurmctld.pid "$dir"/munge/munged.pid; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        kill "$pid" 2>/dev/null && pids+=("$pid")
        rm -f "$pidfile"
    done
    for _ in $(seq 50); do
        local alive=0
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
        [[ $alive -eq 1 ]] || return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}

case $cmd in
    start) start ;;
    stop) stop ;;
    env) print_env ;;
    *) die "usage: $0 start|stop|env [DIR]" ;;
esac
