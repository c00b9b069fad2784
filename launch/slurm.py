"""Slurm: render the sbatch invocation of slurm/train.sh, check a job's allocation, render and run each node's
command, print a dry run.

    scalesft slurm RECIPE [section.key=value ...] --nodes N --gpus-per-node G [--strategy S] [--partition P
                   --time T --account A ...] (--dry-run | --submit)
    python -m scalesft.launch.slurm preflight RECIPE [overrides]      # the batch step, before any node starts
    python -m scalesft.launch.slurm node [--print] RECIPE [overrides] # each node's srun task

`render_sbatch` is pure: it returns the sbatch argv and the variables to add to the environment; `submit` is
the one place that runs it. The template reads the variables (SCALESFT_*) in the batch step, and calls
`preflight` there to check the allocation against them before any node starts. Each node's srun task runs
`node`, which renders that node's `accelerate launch` with `node_command` (launch/render.py render_launch, the
renderer `scalesft plan` uses: the same argv and variables, except `python -m accelerate.commands.launch` for
`accelerate launch` and the main host and port, which Slurm fills in from the allocation) and replaces itself
with it (launch/run.py exec_command). `node --print` prints that command instead: the dry run shows every
node's. No torch import here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from scalesft.core.batch import BatchError
from scalesft.core.strategy import STRATEGIES, StrategyError, get_strategy
from scalesft.launch.render import LaunchCommand, LaunchError, render_launch
from scalesft.launch.run import exec_command, run_command

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "slurm" / "train.sh"

# Filesystems that every node of a cluster sees the same way. Anything else (ext4, xfs, tmpfs, overlay...)
# is assumed node-local: a checkpoint written there is invisible to a requeued job on another node.
SHARED_FS_TYPES = {"nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "cephfs", "ceph",
                   "glusterfs", "fuse.glusterfs", "panfs", "wekafs", "fuse.weka", "orangefs", "pvfs2",
                   "9p", "virtiofs", "fuse.sshfs", "fuse.s3fs", "fuse.juicefs", "fuse.cephfs", "quobyte",
                   "fuse.quobyte", "exafs", "vast", "fuse.vast"}


class SlurmError(ValueError):
    """A Slurm submission or allocation that cannot work: one line with the fix."""


SbatchCommand = LaunchCommand
"""An sbatch invocation: argv + the variables set on top of the submitting environment (sbatch --export=ALL
passes them to the job)."""


def render_sbatch(*, recipe: str | Path, overrides: list[str] | tuple[str, ...] = (), nodes: int,
                  gpus_per_node: int, procs_per_node: int | None = None, partition: str | None = None,
                  time: str | None = None, account: str | None = None, qos: str | None = None,
                  job_name: str | None = None, output: str | None = None, signal_seconds: int | None = None,
                  profile: str | None = None, strategy: str | None = None,
                  accelerate_config: str | Path | None = None, ds_config: str | Path | None = None,
                  extra_sbatch_args: list[str] | tuple[str, ...] = (), python: str | None = None,
                  template: str | Path = TEMPLATE, home: str | Path = ROOT) -> SbatchCommand:
    """The sbatch invocation that trains `recipe` on `nodes` x `gpus_per_node` (0: CPU nodes, one process
    each unless procs_per_node says otherwise). Options left None keep the template's #SBATCH default.
    strategy: SCALESFT_STRATEGY (the template's default: ddp); each node renders its command from it, with the
    strategy's shipped configs unless accelerate_config / ds_config name others.
    python: the interpreter every node runs (default: the profile's, python3 on the job's PATH)."""
    if strategy is not None:
        try:
            get_strategy(strategy)
        except StrategyError as e:
            raise SlurmError(str(e)) from None
    for name, value, low in (("nodes", nodes, 1), ("gpus_per_node", gpus_per_node, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SlurmError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
    if procs_per_node is not None:
        if procs_per_node < 1:
            raise SlurmError(f"--procs-per-node must be >= 1, got {procs_per_node}")
        if gpus_per_node and procs_per_node > gpus_per_node:
            raise SlurmError(f"--procs-per-node {procs_per_node} exceeds --gpus-per-node {gpus_per_node}: "
                             "one process drives one GPU")
    if signal_seconds is not None and signal_seconds < 1:
        raise SlurmError(f"--signal-seconds must be >= 1, got {signal_seconds}")
    argv = ["sbatch", f"--nodes={nodes}"]
    if gpus_per_node:
        argv.append(f"--gpus-per-node={gpus_per_node}")
    for opt, value in (("partition", partition), ("time", time), ("account", account), ("qos", qos),
                       ("job-name", job_name), ("output", output)):
        if value:
            argv.append(f"--{opt}={value}")
    if signal_seconds is not None:
        argv.append(f"--signal=B:USR1@{signal_seconds}")
    argv += [*extra_sbatch_args, "--export=ALL", str(template), str(recipe), *overrides]
    env = {"SCALESFT_HOME": str(home), "SCALESFT_NODES": str(nodes), "SCALESFT_GPUS_PER_NODE": str(gpus_per_node)}
    if procs_per_node is not None:
        env["SCALESFT_PROCS_PER_NODE"] = str(procs_per_node)
    if profile:
        env["SCALESFT_PROFILE"] = str(profile)
    if strategy:
        env["SCALESFT_STRATEGY"] = strategy
    if accelerate_config:
        env["SCALESFT_ACCELERATE_CONFIG"] = str(accelerate_config)
    if ds_config:
        env["SCALESFT_DS_CONFIG"] = str(ds_config)
    if python:
        env["SCALESFT_PYTHON"] = str(python)
    return SbatchCommand(argv=argv, env=env)


# ---------------------------------------------------------------- checks (submit time and in the batch step)

@dataclass(frozen=True, kw_only=True, slots=True)
class Allocation:
    nodes: int
    procs_per_node: int
    device: str
    """gpu or cpu"""

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def _int(env: Mapping[str, str], key: str) -> int | None:
    value = env.get(key, "").strip()
    if not value:
        return None
    try:
        return int(value.split("(")[0])  # SLURM_* counts may read "8(x2)"
    except ValueError:
        raise SlurmError(f"{key}={value!r} is not an integer") from None


def visible_gpus(env: Mapping[str, str]) -> int:
    """GPUs this node's job can use: Slurm's count when it allocated GPUs, else CUDA_VISIBLE_DEVICES, else
    nvidia-smi, else 0."""
    count = _int(env, "SLURM_GPUS_ON_NODE")
    if count is not None:
        return count
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return len([d for d in cvd.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = run_command(["nvidia-smi", "-L"], capture=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU ")) if out.returncode == 0 else 0


def resolve_allocation(env: Mapping[str, str], gpus: int) -> Allocation:
    """Processes per node from the allocation (`gpus` visible on this node), checked against what the
    submitter asked for (SCALESFT_NODES / SCALESFT_GPUS_PER_NODE / SCALESFT_PROCS_PER_NODE). Pure."""
    nodes = _int(env, "SLURM_NNODES") or 1
    asked_nodes = _int(env, "SCALESFT_NODES")
    if asked_nodes is not None and asked_nodes != nodes:
        raise SlurmError(f"asked for {asked_nodes} node(s) but the allocation has {nodes} (SLURM_NNODES): "
                         f"submit with --nodes={asked_nodes} or set SCALESFT_NODES={nodes}")
    asked_gpus = _int(env, "SCALESFT_GPUS_PER_NODE")
    if asked_gpus is not None and asked_gpus != gpus:
        raise SlurmError(f"asked for {asked_gpus} GPU(s) per node but the node has {gpus} in this allocation: "
                         f"submit with --gpus-per-node={asked_gpus} (or the cluster's --gres=gpu:{asked_gpus}), "
                         f"or set SCALESFT_GPUS_PER_NODE={gpus}")
    procs = _int(env, "SCALESFT_PROCS_PER_NODE")
    if procs is None:
        procs = gpus or 1
    if procs < 1:
        raise SlurmError(f"SCALESFT_PROCS_PER_NODE must be >= 1, got {procs}")
    if gpus and procs > gpus:
        raise SlurmError(f"SCALESFT_PROCS_PER_NODE={procs} but the node has {gpus} GPU(s): one process per GPU")
    return Allocation(nodes=nodes, procs_per_node=procs, device="gpu" if gpus else "cpu")


def filesystem_type(path: str | Path, mounts: str | None = None) -> tuple[str, str]:
    """(fs type, mount point) of the filesystem that holds `path` (or would, once created)."""
    p = Path(os.path.abspath(path))
    if mounts is None:
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return "unknown", "/"
    best = ("unknown", "")
    for line in mounts.splitlines():
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (str(p) == mnt or str(p).startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[1]):
            best = (parts[2], mnt)
    return best[0], best[1] or "/"


def check_output_dir(output_dir: str | Path) -> None:
    """Raise SlurmError unless output_dir exists as a writable folder or can be created. Probes with a real
    file (root passes os.access checks on read-only mounts). Leaves nothing behind."""
    out = Path(os.path.abspath(output_dir))
    probe_dir = out
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise SlurmError(f"training.output_dir '{out}' is not writable: '{probe_dir}' is a file, not a folder; "
                         "choose another training.output_dir")
    try:
        fd, name = tempfile.mkstemp(prefix=".scalesft-probe-", dir=probe_dir)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        what = "it" if probe_dir == out else f"its parent '{probe_dir}'"
        raise SlurmError(f"training.output_dir '{out}' is not writable ({what}: {e.strerror}): choose a folder "
                         "on a shared filesystem you can write, e.g. training.output_dir=$HOME/runs/NAME") from None


def node_local_warning(output_dir: str | Path, nodes: int, mounts: str | None = None) -> str | None:
    """A warning when a multi-node job would keep its checkpoints on a node-local filesystem."""
    fstype, mnt = filesystem_type(output_dir, mounts)
    if nodes > 1 and fstype not in SHARED_FS_TYPES and not fstype.startswith("fuse."):
        return (f"warning: training.output_dir '{output_dir}' is on a node-local filesystem ({fstype} at {mnt}): "
                f"with {nodes} nodes only the first node's copy holds the checkpoints, and a requeued job that "
                "lands on other nodes will not find them; use a shared filesystem (NFS, Lustre, GPFS, ...)")
    return None


def preflight(recipe_path: str, overrides: list[str], env: Mapping[str, str] | None = None,
              gpus: int | None = None) -> tuple[Allocation, list[str]]:
    """The checks the batch step runs before it starts any node: (allocation, warnings). Raises RecipeError or
    SlurmError."""
    from scalesft.core.recipe import RecipeError, load_recipe

    env = os.environ if env is None else env
    if not Path(recipe_path).is_file():
        raise RecipeError(f"recipe '{recipe_path}' does not exist on {os.uname().nodename} (cwd {os.getcwd()}): "
                          "put it on a filesystem every node mounts and pass that path")
    recipe = load_recipe(recipe_path, overrides)
    alloc = resolve_allocation(env, visible_gpus(env) if gpus is None else gpus)
    check_output_dir(recipe.training.output_dir)
    warnings = [w for w in [node_local_warning(recipe.training.output_dir, alloc.nodes)] if w]
    return alloc, warnings


# ---------------------------------------------------------------- each node's command

NODE_LAUNCHER = ("-m", "accelerate.commands.launch")
"""What a node runs after its python for `accelerate launch` (no `accelerate` script on PATH needed)."""


def _required_int(env: Mapping[str, str], key: str, low: int, why: str) -> int:
    value = _int(env, key)
    if value is None:
        raise SlurmError(f"{key} is not set: {why}")
    if value < low:
        raise SlurmError(f"{key}={value} must be >= {low}")
    return value


def node_command(env: Mapping[str, str], recipe: str | Path, overrides: Sequence[str] = (), *,
                 python: str) -> LaunchCommand:
    """The command node SLURM_NODEID of the job runs: render_launch (the renderer of `scalesft plan`) with that
    node's machine rank, SLURM_NNODES machines, SLURM_NNODES x SCALESFT_PROCS_PER_NODE processes, the main
    process at SCALESFT_MAIN_HOST:SCALESFT_MAIN_PORT, SCALESFT_STRATEGY (default ddp) with its shipped configs
    unless SCALESFT_ACCELERATE_CONFIG / SCALESFT_DS_CONFIG name others, the strategy's CPU variables when
    SCALESFT_DEVICE is cpu, and `python -m accelerate.commands.launch` as the launcher. Reads only `env` and
    whether the config files exist; raises SlurmError (one line) for a missing or invalid variable."""
    from_template = "slurm/train.sh exports it in the batch step"
    nodes = _required_int(env, "SLURM_NNODES", 1, "Slurm sets it in every job step")
    rank = _required_int(env, "SLURM_NODEID", 0, "Slurm sets it in every job step")
    if rank >= nodes:
        raise SlurmError(f"SLURM_NODEID={rank} but SLURM_NNODES={nodes}: node ids run 0..{nodes - 1}")
    procs = _required_int(env, "SCALESFT_PROCS_PER_NODE", 1, from_template)
    port = _required_int(env, "SCALESFT_MAIN_PORT", 0, "the cluster profile sets it (slurm/profiles/default.env)")
    if port > 65535:
        raise SlurmError(f"SCALESFT_MAIN_PORT={port} is not a port number")
    host = env.get("SCALESFT_MAIN_HOST", "").strip()
    if not host:
        raise SlurmError(f"SCALESFT_MAIN_HOST is not set: {from_template} (the first node of the allocation)")
    device = env.get("SCALESFT_DEVICE", "")
    if device not in ("gpu", "cpu"):
        raise SlurmError(f"SCALESFT_DEVICE={device!r} must be gpu or cpu: {from_template} (preflight's device)")
    strategy = env.get("SCALESFT_STRATEGY") or "ddp"
    if strategy not in STRATEGIES:
        raise SlurmError(f"SCALESFT_STRATEGY={strategy!r} is not a strategy: choose one of {', '.join(STRATEGIES)}")
    configs = {key: env.get(key) or None for key in ("SCALESFT_ACCELERATE_CONFIG", "SCALESFT_DS_CONFIG")}
    for key, path in configs.items():
        if path is not None and not Path(path).is_file():
            raise SlurmError(f"{key} '{path}' does not exist on this node: name an existing file on a "
                             "filesystem every node mounts, or unset it to use the strategy's shipped one")
    if configs["SCALESFT_DS_CONFIG"] and get_strategy(strategy).ds_config is None:
        raise SlurmError(f"SCALESFT_DS_CONFIG is set but SCALESFT_STRATEGY={strategy} is not a DeepSpeed strategy: "
                         "set SCALESFT_STRATEGY to zero2, zero3 or zero3_offload, or unset SCALESFT_DS_CONFIG")
    try:
        return render_launch(recipe=recipe, overrides=tuple(overrides), strategy=strategy,
                             num_processes=nodes * procs, num_machines=nodes, machine_rank=rank,
                             main_process_ip=host, main_process_port=port, cpu=device == "cpu",
                             accelerate_config=configs["SCALESFT_ACCELERATE_CONFIG"],
                             ds_config=configs["SCALESFT_DS_CONFIG"], launcher=(python, *NODE_LAUNCHER))
    except LaunchError as e:
        raise SlurmError(str(e)) from None


def recipe_unreadable(recipe: str, node: str) -> str | None:
    """The error line when this node cannot read the recipe (it lives on a filesystem this node lacks)."""
    if os.path.isfile(recipe) and os.access(recipe, os.R_OK):
        return None
    return f"recipe {recipe} is not readable on node {node}: put it on a filesystem every node mounts"


# ---------------------------------------------------------------- dry run and submission

def dry_run(cmd: SbatchCommand) -> str:
    """The sbatch invocation, and what the template would run on such an allocation: the template itself is
    executed in its dry-run mode with the allocation simulated (SLURM_NNODES, SLURM_GPUS_ON_NODE)."""
    env = {**os.environ, **cmd.env, "SCALESFT_DRY_RUN": "1", "SLURM_NNODES": cmd.env["SCALESFT_NODES"],
           "SLURM_JOB_ID": "0", "SCALESFT_MAIN_HOST": "<first-node>"}
    env.pop("SLURM_JOB_NODELIST", None)
    if int(cmd.env["SCALESFT_GPUS_PER_NODE"]):
        env["SLURM_GPUS_ON_NODE"] = cmd.env["SCALESFT_GPUS_PER_NODE"]
    else:
        env.pop("SLURM_GPUS_ON_NODE", None)
        env["CUDA_VISIBLE_DEVICES"] = ""
    i = cmd.argv.index("--export=ALL")
    template, script_args = cmd.argv[i + 1], cmd.argv[i + 2:]
    p = run_command(["bash", template, *script_args], env, inherit_env=False, capture=True,
                    cwd=cmd.env.get("SCALESFT_HOME"))
    if p.returncode:
        raise SlurmError(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"template failed ({p.returncode})")
    from scalesft.core.secrets import redact_text

    return (f"# submit:\n{cmd.shell()}\n# the batch step then runs (on a {cmd.env['SCALESFT_NODES']}-node "
            f"allocation):\n{redact_text(p.stderr + p.stdout, os.environ)}")


def submit(cmd: SbatchCommand) -> str:
    """Run sbatch; return the job id. The one call site that submits."""
    try:
        p = run_command([*cmd.argv[:1], "--parsable", *cmd.argv[1:]], cmd.env, capture=True)
    except FileNotFoundError:
        raise SlurmError("sbatch is not on PATH: submit from a Slurm login node, or use --dry-run to see "
                         "the command") from None
    if p.returncode:
        raise SlurmError(f"sbatch failed ({p.returncode}): {p.stderr.strip()}")
    return p.stdout.strip().split(";")[0]


def add_arguments(p) -> None:
    """The `scalesft slurm` options (launch/cli.py adds the subparser)."""
    p.add_argument("recipe", help="path to a YAML recipe, on a filesystem every node mounts")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. training.max_steps=10")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="0 for CPU nodes")
    p.add_argument("--procs-per-node", type=int, help="default: one per GPU (one per node without GPUs)")
    p.add_argument("--partition")
    p.add_argument("--time", help="time limit, e.g. 04:00:00")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--job-name")
    p.add_argument("--output", help="log file pattern (default slurm-%%x-%%j.out)")
    p.add_argument("--signal-seconds", type=int, help="USR1 this many seconds before the time limit (default 120)")
    p.add_argument("--profile", help="cluster profile: a name in slurm/profiles/ or a path (default: default)")
    p.add_argument("--strategy", default="ddp", choices=list(STRATEGIES))
    p.add_argument("--sbatch-arg", action="append", default=[], help="extra sbatch option, repeatable")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--dry-run", action="store_true", help="print the sbatch invocation and the launch; submit nothing")
    mode.add_argument("--submit", action="store_true")


def run_cli(args) -> int:
    """`scalesft slurm`: check, render, then print (--dry-run) or submit (--submit)."""
    try:
        return _run_cli(args)
    except (SlurmError, StrategyError) as e:
        print(f"scalesft: error: {e}", file=sys.stderr)
        return 2


_TIME = re.compile(r"^(\d+-\d+(:\d+(:\d+)?)?|\d+(:\d+(:\d+)?)?|UNLIMITED|INFINITE)$")
_PARTITION = re.compile(r"^[A-Za-z0-9_.-]+(,[A-Za-z0-9_.-]+)*$")


def check_job_options(*, partition: str | None, time: str | None, nodes: int, gpus_per_node: int,
                      procs_per_node: int | None) -> None:
    """sbatch's own syntax for the options scalesft passes through, checked before anything is rendered. Pure."""
    if nodes < 1:
        raise SlurmError(f"--nodes must be >= 1, got {nodes}")
    if gpus_per_node < 0:
        raise SlurmError(f"--gpus-per-node must be >= 0 (0 for CPU nodes), got {gpus_per_node}")
    if procs_per_node is not None and procs_per_node < 1:
        raise SlurmError(f"--procs-per-node must be >= 1, got {procs_per_node}")
    if partition is not None and not _PARTITION.match(partition):
        raise SlurmError(f"--partition {partition!r} is not a partition name (letters, digits, '_', '-', '.'; "
                         "a comma-separated list for several): see `sinfo -s`")
    if time is not None and not _TIME.match(time):
        raise SlurmError(f"--time {time!r} is not a Slurm time limit: use minutes, MM:SS, HH:MM:SS, D-HH, D-HH:MM "
                         "or D-HH:MM:SS, e.g. --time 12:00:00")


def _run_cli(args) -> int:
    from scalesft.core.recipe import RecipeError, load_recipe

    if not Path(args.recipe).is_file():
        raise RecipeError(f"recipe '{args.recipe}' does not exist: pass a path to a YAML recipe on a filesystem "
                          "every node mounts")
    recipe = load_recipe(args.recipe, args.overrides)   # RecipeError -> the CLI prints one line
    spec = get_strategy(args.strategy)
    check_job_options(partition=args.partition, time=args.time, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      procs_per_node=args.procs_per_node)
    procs = args.procs_per_node or max(args.gpus_per_node, 1)
    try:
        from scalesft.core.hardware import precision
        from scalesft.core.memory import choose_batching
        from scalesft.launch.preflight import planned_hardware_here
        from scalesft.trainer.assets import model_shape

        hw = planned_hardware_here(cpu=args.gpus_per_node == 0)
        choose_batching(recipe, model_shape(recipe.model.name_or_path), strategy=args.strategy,  # auto too
                        world_size=args.nodes * procs, precision=precision(recipe.training.precision, hw))
    except BatchError as e:
        raise SlurmError(f"{args.nodes} node(s) x {procs} process(es): {e}") from None
    check_output_dir(recipe.training.output_dir)
    warning = node_local_warning(recipe.training.output_dir, args.nodes)
    if warning and not args.dry_run:  # a dry run shows the batch step's own preflight, which says it once
        print(f"scalesft: {warning}", file=sys.stderr)
    cmd = render_sbatch(
        recipe=os.path.abspath(args.recipe), overrides=args.overrides, nodes=args.nodes,
        gpus_per_node=args.gpus_per_node, procs_per_node=args.procs_per_node, partition=args.partition,
        time=args.time, account=args.account, qos=args.qos, job_name=args.job_name, output=args.output,
        signal_seconds=args.signal_seconds, profile=args.profile, strategy=spec.name,
        extra_sbatch_args=args.sbatch_arg, python=os.environ.get("SCALESFT_PYTHON") or sys.executable)
    if args.dry_run:
        print(dry_run(cmd), end="")
        return 0
    print(f"submitted job {submit(cmd)}: {cmd.shell()}")
    return 0


def _preflight_main(argv: list[str]) -> int:
    from scalesft.core.recipe import RecipeError

    if not argv:
        print("usage: python -m scalesft.launch.slurm preflight RECIPE [overrides]", file=sys.stderr)
        return 2
    try:
        alloc, warnings = preflight(argv[0], argv[1:])
    except (RecipeError, SlurmError) as e:
        print(f"scalesft-slurm: error: {e}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"scalesft-slurm: {w}", file=sys.stderr)
    print(alloc.procs_per_node, alloc.device)
    return 0


def _node_main(argv: list[str]) -> int:
    """A node's srun task: check the recipe is readable here, ignore SIGUSR1 (the ignore survives the exec, so
    the launcher does not die of it; the trainers install their own handlers), then exec node_command's command.
    With --print: print that command (LaunchCommand.shell) instead."""
    show = argv[:1] == ["--print"]
    args = argv[1:] if show else argv
    if not args:
        print("usage: python -m scalesft.launch.slurm node [--print] RECIPE [overrides]", file=sys.stderr)
        return 2
    node = os.environ.get("SLURMD_NODENAME") or os.uname().nodename
    try:
        error = recipe_unreadable(args[0], node)
        if error:
            raise SlurmError(error)
        cmd = node_command(os.environ, args[0], args[1:], python=sys.executable)
    except SlurmError as e:
        print(f"scalesft-slurm: error: {e}", file=sys.stderr)
        return 2
    if show:
        print(cmd.shell())
        return 0
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    exec_command(cmd)


_COMMANDS = {"preflight": _preflight_main, "node": _node_main}

if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] in _COMMANDS:
        sys.exit(_COMMANDS[sys.argv[1]](sys.argv[2:]))
    print("usage: python -m scalesft.launch.slurm preflight|node [--print] RECIPE [overrides]  "
          "(or: scalesft slurm --help)", file=sys.stderr)
    sys.exit(2)
