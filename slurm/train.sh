#!/bin/bash
# scalesft on Slurm: one template for 1..N nodes. Submit it directly or through `scalesft slurm`:
#
#   sbatch --nodes=2 --gpus-per-node=8 slurm/train.sh RECIPE [section.key=value ...]
#   scalesft slurm RECIPE --nodes 2 --gpus-per-node 8 --submit      # same, with checks; --dry-run prints it
#
# The #SBATCH lines below are defaults; options on the sbatch command line override them. They hold no
# shell variables: bash does not expand them there, and sbatch reads them before any shell runs.
#
# What it does: the batch step checks the recipe and the allocation (`python -m scalesft.launch.slurm
# preflight`), then starts one srun task per node: `python -m scalesft.launch.slurm node RECIPE ...`, which
# asks the Python renderer (launch/render.py, the one `scalesft plan` uses) for THAT node's command, with
# --machine_rank = its SLURM_NODEID, --num_processes = nodes x processes per node (from the allocation: GPUs
# on the node, or SCALESFT_PROCS_PER_NODE), the main process on the first host of `scontrol show hostnames`,
# and execs it (`python -m accelerate.commands.launch ...`). This script assembles no launch command itself.
#
# Preemption: USR1 (sent by Slurm --signal=B:USR1@120 before the time limit, or by
# `scancel --signal=USR1 --batch JOB`) is forwarded to the trainers, which agree to stop at the next
# optimizer step, write a complete checkpoint and exit; this script then requeues the job, and the trainer
# resumes from the newest complete checkpoint. SIGTERM (preemption by the scheduler, scancel) makes the
# trainers checkpoint and exit the same way, but this script does not requeue: Slurm requeues a preempted
# --requeue job itself, and a scancel'd job stays cancelled. On SIGTERM torchrun gives its workers 30 s
# before SIGKILL: the step in flight plus the checkpoint must fit (and fit the partition's GraceTime).
# A rank that dies ends its node's launcher with an error, and srun --kill-on-bad-exit ends the others.
#
# Settings (environment; a cluster profile, slurm/profiles/*.env, holds the cluster-specific ones):
#   SCALESFT_PROFILE           profile name in slurm/profiles/ or a path (default: default)
#   SCALESFT_HOME              the scalesft checkout to run from (default: the submit directory)
#   SCALESFT_PROCS_PER_NODE    processes per node (default: GPUs allocated on the node; 1 without GPUs)
#   SCALESFT_NODES, SCALESFT_GPUS_PER_NODE   what the submitter asked for; checked against the allocation
#   SCALESFT_STRATEGY          ddp (default), zero2, zero3, zero3_offload or fsdp2 (`scalesft slurm --strategy`)
#   SCALESFT_ACCELERATE_CONFIG accelerate config (default: the strategy's, in accelerate_configs/)
#   SCALESFT_DS_CONFIG         DeepSpeed json (default: the DeepSpeed strategy's, in ds_configs/)
#   SCALESFT_DRY_RUN=1         print the srun step and every node's command, and exit (`scalesft slurm --dry-run`)
# The batch step exports SCALESFT_MAIN_HOST, SCALESFT_MAIN_PORT, SCALESFT_PROCS_PER_NODE and SCALESFT_DEVICE
# (gpu or cpu) for the nodes; on CPU the strategy's variables (core/strategy.py cpu_env) are in each command.
#
#SBATCH --job-name=scalesft
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

log() { echo "[scalesft-slurm $(date -u +%H:%M:%S)] $*"; }
die() { echo "scalesft-slurm: error: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || die "usage: sbatch [sbatch options] slurm/train.sh RECIPE [section.key=value ...]"
recipe=$1
shift

# Paths in the recipe resolve against the working directory (sbatch's default: the submit directory).
home=${SCALESFT_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
[[ -d $home/trainer ]] || die "SCALESFT_HOME '$home' is not a scalesft checkout on $(hostname): set SCALESFT_HOME"
profile=${SCALESFT_PROFILE:-default}
[[ $profile == */* ]] || profile=$home/slurm/profiles/$profile.env
[[ -f $profile ]] || die "cluster profile '$profile' does not exist (SCALESFT_PROFILE names a file in slurm/profiles/ or a path)"
# shellcheck source=profiles/default.env
source "$profile"
export PYTHONPATH="$home${PYTHONPATH:+:$PYTHONPATH}"

# Where rank 0 (on this node: machine rank 0 is the first node, where the batch step runs) reports how the
# run ended, and where this script asks it to stop even if a signal came before the trainers listened: a new
# private folder (mktemp -d: unpredictable name, mode 0700), so no other user can pre-create, read or
# symlink it. Removed when the script exits.
if [[ ${SCALESFT_DRY_RUN:-0} != 1 ]]; then
    state_dir=$(mktemp -d "${TMPDIR:-/tmp}/scalesft-${SLURM_JOB_ID:-0}.${SLURM_RESTART_COUNT:-0}.XXXXXXXX") \
        || die "cannot create a private state folder in ${TMPDIR:-/tmp} on $(hostname): set TMPDIR to a writable folder"
    chmod 700 "$state_dir"
    export SCALESFT_STATUS_FILE=$state_dir/status SCALESFT_STOP_FILE=$state_dir/stop
    trap 'rm -rf "$state_dir"' EXIT
    stop_signal=
    on_signal() {  # forward to the launch step: srun delivers it to every process of the step on every node
        stop_signal=$1
        log "got SIG$1: the trainers checkpoint at the next optimizer step and exit"
        : >"$SCALESFT_STOP_FILE"
        [[ -z ${step_pid:-} ]] || kill -s "$1" "$step_pid" 2>/dev/null || true
    }
    trap 'on_signal USR1' USR1
    trap 'on_signal TERM' TERM
fi

# Preflight on the batch node: the recipe loads, output_dir is writable, the allocation matches what was asked
# for. Prints "PROCS_PER_NODE DEVICE" (DEVICE: gpu or cpu).
plan=$("$SCALESFT_PYTHON" -m scalesft.launch.slurm preflight "$recipe" "$@") || exit 2
read -r procs device <<<"$plan"
nodes=${SLURM_NNODES:-1}
world=$((nodes * procs))
if [[ -n ${SCALESFT_MAIN_HOST:-} ]]; then
    main_host=$SCALESFT_MAIN_HOST
else
    main_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
# What each node's `scalesft.launch.slurm node` reads (srun passes the environment on).
export SCALESFT_MAIN_HOST=$main_host SCALESFT_MAIN_PORT SCALESFT_PROCS_PER_NODE=$procs SCALESFT_DEVICE=$device

# shellcheck disable=SC2206
srun_args=(srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 $SCALESFT_SRUN_ARGS)
step=("${srun_args[@]}" "$SCALESFT_PYTHON" -m scalesft.launch.slurm node "$recipe" "$@")
# print_node_command ID ARGS...: the command node ID will exec, from the same code path as the step (`node
# --print`). Run for node 0 before the step starts, so a bad setting fails here, before any node starts.
print_node_command() {
    local id=$1
    shift
    SLURM_NODEID=$id SLURM_NNODES=$nodes "$SCALESFT_PYTHON" -m scalesft.launch.slurm node --print "$recipe" "$@"
}

log "job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: $nodes node(s) x $procs process(es) ($device) = $world; main $main_host:$SCALESFT_MAIN_PORT; profile $profile"
if [[ ${SCALESFT_DRY_RUN:-0} == 1 ]]; then
    for var in NCCL_NVLS_ENABLE TORCH_NCCL_ASYNC_ERROR_HANDLING; do
        [[ -z ${!var:-} ]] || printf 'export %s=%q\n' "$var" "${!var}"
    done
    printf '%q ' "${step[@]}"
    echo
    for ((i = 0; i < nodes; i++)); do
        echo "# node $i of $nodes execs:"
        print_node_command "$i" "$@" || exit 2
    done
    exit 0
fi
node0=$(print_node_command 0 "$@") || exit 2
log "node 0 of $nodes execs: $node0"

# In the background + wait: bash runs a trap only between commands, so a foreground srun would defer it.
"${step[@]}" &
step_pid=$!
while :; do
    wait "$step_pid"
    rc=$?
    # > 128 with the step still there: wait was interrupted by a trap; keep waiting.
    if (( rc > 128 )) && kill -0 "$step_pid" 2>/dev/null; then continue; fi
    break
done
status=$(cat "$SCALESFT_STATUS_FILE" 2>/dev/null || echo "none")
log "launch step exited with $rc; trainer status: $status"
# Stopped early on USR1 (time limit near, or a request): requeue. Not after SIGTERM: a preempting scheduler
# requeues the job itself, and a cancelled job must stay cancelled.
if [[ $status == preempted* && $stop_signal != TERM ]]; then
    log "requeueing job $SLURM_JOB_ID: it resumes from the checkpoint just written"
    rm -rf "$state_dir"
    scontrol requeue "$SLURM_JOB_ID" || { log "requeue failed: resubmit the same command to resume"; exit 1; }
    exit 0
fi
rm -rf "$state_dir"
exit "$rc"
