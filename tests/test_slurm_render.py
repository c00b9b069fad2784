"""Slurm rendering and checks that need no cluster: the sbatch invocation, the template's dry run for 4 nodes x 8
GPUs, allocation checks, output_dir checks, and the complete-checkpoint rule. (tests/slurm/ runs real jobs.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sys
from pathlib import Path

import pytest

from scalesft.launch import slurm
from scalesft.launch.cli import main as cli_main
from scalesft.trainer import preemption

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "slurm" / "train.sh"


def recipe_file(tmp_path: Path, output_dir: Path | str | None = None) -> Path:
    r = tmp_path / "recipe.yaml"
    r.write_text(f"model: {{name_or_path: {tmp_path}/model}}\ndata: {{path: {tmp_path}/data.json}}\n"
                 f"training: {{output_dir: '{output_dir or tmp_path / 'out'}', micro_batch_size: 1}}\n")
    return r


def sbatch_lines() -> list[str]:
    lines = TEMPLATE.read_text().splitlines()
    return [ln for ln in lines if ln.startswith("#SBATCH")]


def test_template_sbatch_lines_are_literal_defaults():
    lines = sbatch_lines()
    assert lines, "the template has #SBATCH defaults"
    assert not [ln for ln in lines if "$" in ln or "`" in ln], "no shell expansions in #SBATCH lines"
    text = "\n".join(lines)
    for opt in ("--requeue", "--signal=B:USR1@", "--ntasks-per-node=1", "--open-mode=append"):
        assert opt in text
    # sbatch stops reading directives at the first command: all #SBATCH lines precede it.
    body = TEMPLATE.read_text().splitlines()
    first_cmd = next(i for i, ln in enumerate(body[1:], 1) if ln.strip() and not ln.startswith("#"))
    assert max(i for i, ln in enumerate(body) if ln.startswith("#SBATCH")) < first_cmd


def printed_node_commands(out: str) -> list[list[str]]:
    """The per-node commands of a dry run: the line after each `# node I of N execs:`, split as a shell would."""
    lines = out.splitlines()
    heads = [i for i, ln in enumerate(lines) if re.fullmatch(r"# node \d+ of \d+ execs:", ln)]
    assert [lines[i] for i in heads] == [f"# node {k} of {len(heads)} execs:" for k in range(len(heads))]
    return [shlex.split(lines[i + 1]) for i in heads]


def split_env(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """(leading VAR=value words, the argv after them)."""
    n = next(i for i, w in enumerate(words) if not re.match(r"^[A-Z_][A-Z0-9_]*=", w))
    return dict(w.split("=", 1) for w in words[:n]), words[n:]


def test_dry_run_4_nodes_x_8_gpus(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    rc = cli_main(["slurm", str(recipe), "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                   "--time", "02:00:00", "--dry-run", "training.max_steps=7"])
    out = capsys.readouterr().out
    assert rc == 0, out
    submit = out.split("# submit:\n")[1].splitlines()[0]
    argv = shlex.split(submit)
    assert "--nodes=4" in argv and "--gpus-per-node=8" in argv and "--partition=gpu" in argv
    assert argv[-3:] == [str(TEMPLATE), str(recipe.resolve()), "training.max_steps=7"]
    assert "SCALESFT_NODES=4" in argv and "SCALESFT_GPUS_PER_NODE=8" in argv and "SCALESFT_STRATEGY=ddp" in argv
    # The step: one task per node, each asking the Python renderer for its own command. No shell assembles one.
    srun = shlex.split(next(ln for ln in out.splitlines() if ln.startswith("srun ")))
    assert "--nodes=4" in srun and "--ntasks-per-node=1" in srun and "--kill-on-bad-exit=1" in srun
    i = srun.index("-m")
    assert srun[i - 1] == sys.executable
    assert srun[i:] == ["-m", "scalesft.launch.slurm", "node", str(recipe.resolve()), "training.max_steps=7"]
    assert "bash" not in srun and not any("accelerate" in w for w in srun)
    # Then the command each node execs, machine ranks 0..3: nothing left for a node's shell to evaluate.
    nodes = printed_node_commands(out)
    assert len(nodes) == 4
    for rank, words in enumerate(nodes):
        env, node_argv = split_env(words)
        assert env == {}  # GPUs: nothing extra
        assert node_argv[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
        opt = dict(zip(node_argv[3::2], node_argv[4::2]))
        assert opt["--machine_rank"] == str(rank) and opt["--num_processes"] == "32" and opt["--num_machines"] == "4"
        assert opt["--main_process_ip"] == "<first-node>"
        assert (opt["--rdzv_backend"], opt["--max_restarts"], opt["--monitor_interval"]) == ("static", "0", "1")
        assert node_argv[-4:] == ["-m", "scalesft.trainer.train", str(recipe.resolve()), "training.max_steps=7"]
        assert not any("$" in w for w in node_argv)
    assert "4 node(s) x 8 process(es) (gpu) = 32" in out
    assert "ACCELERATE_USE_CPU" not in out and "DS_ACCELERATOR" not in out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "zero2", "zero3"])
def test_dry_run_cpu_nodes_get_the_strategy_cpu_variables(tmp_path, capsys, strategy):
    from scalesft.core.strategy import STRATEGIES

    rc = cli_main(["slurm", str(recipe_file(tmp_path)), "--nodes", "2", "--gpus-per-node", "0",
                   "--procs-per-node", "3", "--strategy", strategy, "--dry-run", "training.global_batch_size=12"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "export ACCELERATE_USE_CPU" not in out and "export DS_ACCELERATOR" not in out
    spec = STRATEGIES[strategy]
    assert spec.cpu_env == ({"DS_ACCELERATOR": "cpu"} if spec.zero_stage else {"ACCELERATE_USE_CPU": "true"})
    nodes = printed_node_commands(out)
    assert len(nodes) == 2
    for rank, words in enumerate(nodes):
        env, node_argv = split_env(words)
        assert env == spec.cpu_env  # core/strategy.py, through render_launch: nowhere else
        opt = dict(zip(node_argv[3::2], node_argv[4::2]))
        assert opt["--machine_rank"] == str(rank) and opt["--num_processes"] == "6"
        assert opt["--config_file"] == str(REPO / "accelerate_configs" / spec.accelerate_config)
        assert opt.get("--deepspeed_config_file") == (str(REPO / "ds_configs" / spec.ds_config) if spec.ds_config
                                                      else None)


NODE_ENV = {"SLURM_NNODES": "2", "SCALESFT_MAIN_HOST": "n1", "SCALESFT_MAIN_PORT": "20042",
            "SCALESFT_PROCS_PER_NODE": "2", "SCALESFT_DEVICE": "gpu"}


@pytest.mark.parametrize("device", ["gpu", "cpu"])
def test_plan_prints_the_command_of_every_slurm_node(tmp_path, capsys, device):
    """`scalesft plan --nodes 2` prints the command of each node, and each equals what that Slurm node runs
    (node_command) after replacing exactly three things: the launcher prefix (`accelerate launch` for `python
    -m accelerate.commands.launch`), and the main host and port, which Slurm fills in from the allocation."""
    recipe = str(recipe_file(tmp_path))
    overrides = ["training.global_batch_size=8"]
    cpu = ["--cpu"] if device == "cpu" else []
    assert cli_main(["plan", recipe, *overrides, "--nodes", "2", "--gpus-per-node", "2", "--strategy", "zero3",
                     *cpu, "--json"]) == 0
    entry, = json.loads(capsys.readouterr().out)
    planned = entry["node_commands"]
    assert [n["machine_rank"] for n in planned] == [0, 1]
    assert (planned[0]["command"], planned[0]["argv"], planned[0]["env"]) == \
        (entry["command"], entry["argv"], entry["env"])
    python = "/venv/bin/python"
    for node in planned:
        cmd = slurm.node_command({**NODE_ENV, "SCALESFT_DEVICE": device, "SCALESFT_STRATEGY": "zero3",
                                  "SLURM_NODEID": str(node["machine_rank"])}, recipe, overrides, python=python)
        assert cmd.argv[:3] == [python, "-m", "accelerate.commands.launch"]
        argv = ["accelerate", "launch", *cmd.argv[3:]]
        assert argv[argv.index("--main_process_ip") + 1] == "n1"
        argv[argv.index("--main_process_ip") + 1] = "MAIN_NODE_IP"
        assert argv[argv.index("--main_process_port") + 1] == "20042"
        argv[argv.index("--main_process_port") + 1] = "29500"
        assert argv == node["argv"] and cmd.env == node["env"]
    assert planned[0]["env"] == ({"DS_ACCELERATOR": "cpu"} if device == "cpu" else {})
    # The text form prints the same commands, one per node.
    assert cli_main(["plan", recipe, *overrides, "--nodes", "2", "--gpus-per-node", "2", "--strategy", "zero3",
                     *cpu]) == 0
    text = capsys.readouterr().out
    for node in planned:
        assert f"command (node {node['machine_rank']} of 2, world size 4):\n  {node['command']}\n" in text


def test_node_command_reads_the_node_env():
    cmd = slurm.node_command({**NODE_ENV, "SLURM_NODEID": "1"}, "/r.yaml", ["training.seed=1"], python="/py")
    assert cmd.env == {}
    assert cmd.argv[:3] == ["/py", "-m", "accelerate.commands.launch"]
    assert cmd.argv[-4:] == ["-m", "scalesft.trainer.train", "/r.yaml", "training.seed=1"]
    opt = dict(zip(cmd.argv[3::2], cmd.argv[4::2]))
    assert opt == {"--config_file": str(REPO / "accelerate_configs" / "ddp.yaml"), "--num_processes": "4",
                   "--num_machines": "2", "--machine_rank": "1", "--main_process_ip": "n1",
                   "--main_process_port": "20042", "--rdzv_backend": "static", "--max_restarts": "0",
                   "--monitor_interval": "1", "-m": "scalesft.trainer.train", "/r.yaml": "training.seed=1"}
    custom = slurm.node_command({**NODE_ENV, "SLURM_NODEID": "0", "SCALESFT_STRATEGY": "zero2",
                                 "SCALESFT_DEVICE": "cpu", "SCALESFT_ACCELERATE_CONFIG": str(TEMPLATE)},
                                "/r.yaml", python="/py")
    assert custom.env == {"DS_ACCELERATOR": "cpu"}
    assert custom.argv[custom.argv.index("--config_file") + 1] == str(TEMPLATE)
    assert custom.argv[custom.argv.index("--deepspeed_config_file") + 1] == str(REPO / "ds_configs" / "zero2.json")


@pytest.mark.parametrize("change, message", [
    ({"SLURM_NODEID": None}, "SLURM_NODEID is not set"),
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 but SLURM_NNODES=2: node ids run 0..1"),
    ({"SLURM_NNODES": "x"}, "SLURM_NNODES='x' is not an integer"),
    ({"SCALESFT_PROCS_PER_NODE": "0"}, "SCALESFT_PROCS_PER_NODE=0 must be >= 1"),
    ({"SCALESFT_MAIN_HOST": None}, "SCALESFT_MAIN_HOST is not set: slurm/train.sh exports it"),
    ({"SCALESFT_MAIN_PORT": "70000"}, "SCALESFT_MAIN_PORT=70000 is not a port number"),
    ({"SCALESFT_DEVICE": "tpu"}, "SCALESFT_DEVICE='tpu' must be gpu or cpu"),
    ({"SCALESFT_STRATEGY": "zero4"}, "SCALESFT_STRATEGY='zero4' is not a strategy"),
    ({"SCALESFT_ACCELERATE_CONFIG": "/nowhere.yaml"}, "SCALESFT_ACCELERATE_CONFIG '/nowhere.yaml' does not exist"),
    ({"SCALESFT_DS_CONFIG": str(TEMPLATE)}, "SCALESFT_DS_CONFIG is set but SCALESFT_STRATEGY=ddp is not a DeepSpeed"),
])
def test_node_command_rejects_bad_variables(change, message):
    env = {**NODE_ENV, "SLURM_NODEID": "0", **change}
    with pytest.raises(slurm.SlurmError, match=re.escape(message)):
        slurm.node_command({k: v for k, v in env.items() if v is not None}, "/r.yaml", python="/py")


def test_node_entry_point_prints_or_refuses(tmp_path):
    """`python -m scalesft.launch.slurm node --print` prints what the node would exec; a recipe this node cannot
    read is one line naming the node, exit 2 (a node that does not mount the recipe's filesystem)."""
    import subprocess

    recipe = recipe_file(tmp_path)
    env = {**os.environ, **NODE_ENV, "SLURM_NODEID": "1", "SLURMD_NODENAME": "n7"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "scalesft.launch.slurm", "node", *args], env=env,
                                       capture_output=True, text=True, timeout=60)
    p = run("--print", str(recipe), "training.seed=3")
    assert p.returncode == 0, p.stderr
    assert shlex.split(p.stdout) == slurm.node_command(env, str(recipe), ["training.seed=3"],
                                                       python=sys.executable).argv
    for args in (["--print", str(tmp_path / "elsewhere.yaml")], [str(tmp_path / "elsewhere.yaml")]):
        p = run(*args)
        assert (p.returncode, p.stdout) == (2, "")
        assert p.stderr == (f"scalesft-slurm: error: recipe {tmp_path / 'elsewhere.yaml'} is not readable on node n7: "
                            "put it on a filesystem every node mounts\n")
    env.pop("SCALESFT_MAIN_HOST")
    p = run(str(recipe))
    assert p.returncode == 2 and p.stderr.startswith("scalesft-slurm: error: SCALESFT_MAIN_HOST is not set")


def test_exec_command_replaces_the_process_and_keeps_ignored_signals():
    """launch/run.py exec_command: same pid, the command's variables on top of the environment, and SIGUSR1
    still ignored after the exec (what `node` relies on: the launcher must not die of the USR1 for the trainers)."""
    import subprocess

    code = ("import os, signal\n"
            "from scalesft.launch.render import LaunchCommand\n"
            "from scalesft.launch.run import exec_command\n"
            "print(os.getpid(), flush=True)\n"
            "signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
            "exec_command(LaunchCommand(argv=['sh', '-c', 'echo $$ $FROM_CMD $FROM_ENV; kill -USR1 $$; "
            "grep SigIgn /proc/self/status'], env={'FROM_CMD': 'cmd'}))\n")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "FROM_ENV": "env"}, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    pid, line, ignored = p.stdout.splitlines()
    assert line == f"{pid} cmd env"
    assert int(ignored.split()[1], 16) & (1 << (signal.SIGUSR1 - 1))


def test_render_sbatch_is_pure_and_complete():
    cmd = slurm.render_sbatch(recipe="/r.yaml", overrides=["training.seed=1"], nodes=2, gpus_per_node=4,
                              time="1:00:00", account="acct", signal_seconds=300, profile="mycluster",
                              extra_sbatch_args=["--constraint=h100"], python="/venv/bin/python")
    assert cmd.argv == ["sbatch", "--nodes=2", "--gpus-per-node=4", "--time=1:00:00", "--account=acct",
                        "--signal=B:USR1@300", "--constraint=h100", "--export=ALL", str(TEMPLATE), "/r.yaml",
                        "training.seed=1"]
    assert cmd.env == {"SCALESFT_HOME": str(REPO), "SCALESFT_NODES": "2", "SCALESFT_GPUS_PER_NODE": "4",
                       "SCALESFT_PROFILE": "mycluster", "SCALESFT_PYTHON": "/venv/bin/python"}
    zero3 = slurm.render_sbatch(recipe="/r.yaml", nodes=2, gpus_per_node=4, strategy="zero3")
    assert zero3.env["SCALESFT_STRATEGY"] == "zero3"  # each node renders the strategy's configs itself
    assert not {"SCALESFT_ACCELERATE_CONFIG", "SCALESFT_DS_CONFIG"} & set(zero3.env)
    with pytest.raises(slurm.SlurmError, match="unknown strategy 'zero4'"):
        slurm.render_sbatch(recipe="/r.yaml", nodes=2, gpus_per_node=4, strategy="zero4")
    cpu = slurm.render_sbatch(recipe="/r.yaml", nodes=1, gpus_per_node=0)
    assert not any(a.startswith("--gpus") for a in cpu.argv)


@pytest.mark.parametrize("kwargs, message", [
    ({"nodes": 0, "gpus_per_node": 8}, "--nodes must be an integer >= 1"),
    ({"nodes": 2, "gpus_per_node": -1}, "--gpus-per-node must be an integer >= 0"),
    ({"nodes": 2, "gpus_per_node": 4, "procs_per_node": 8}, "exceeds --gpus-per-node 4"),
    ({"nodes": 2, "gpus_per_node": 4, "signal_seconds": 0}, "--signal-seconds must be >= 1"),
])
def test_render_sbatch_rejects_bad_counts(kwargs, message):
    with pytest.raises(slurm.SlurmError, match=re.escape(message)):
        slurm.render_sbatch(recipe="/r.yaml", **kwargs)


@pytest.mark.parametrize("env, gpus, expected", [
    ({"SLURM_NNODES": "4", "SCALESFT_NODES": "4", "SCALESFT_GPUS_PER_NODE": "8"}, 8, (4, 8, "gpu")),
    ({"SLURM_NNODES": "2"}, 0, (2, 1, "cpu")),
    ({"SLURM_NNODES": "1", "SCALESFT_PROCS_PER_NODE": "2"}, 0, (1, 2, "cpu")),
    ({"SLURM_NNODES": "2", "SCALESFT_PROCS_PER_NODE": "4"}, 8, (2, 4, "gpu")),
])
def test_resolve_allocation(env, gpus, expected):
    a = slurm.resolve_allocation(env, gpus)
    assert (a.nodes, a.procs_per_node, a.device) == expected


@pytest.mark.parametrize("env, gpus, message", [
    ({"SLURM_NNODES": "2", "SCALESFT_NODES": "4"}, 8, "asked for 4 node(s) but the allocation has 2"),
    ({"SLURM_NNODES": "2", "SCALESFT_GPUS_PER_NODE": "8"}, 4, "asked for 8 GPU(s) per node but the node has 4"),
    ({"SLURM_NNODES": "1", "SCALESFT_GPUS_PER_NODE": "8"}, 0, "asked for 8 GPU(s) per node but the node has 0"),
    ({"SLURM_NNODES": "1", "SCALESFT_PROCS_PER_NODE": "9"}, 8, "SCALESFT_PROCS_PER_NODE=9 but the node has 8"),
])
def test_resolve_allocation_mismatch(env, gpus, message):
    with pytest.raises(slurm.SlurmError, match=re.escape(message)):
        slurm.resolve_allocation(env, gpus)


def test_visible_gpus_from_slurm_and_cuda_env():
    assert slurm.visible_gpus({"SLURM_GPUS_ON_NODE": "8"}) == 8
    assert slurm.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2"}) == 3
    assert slurm.visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0


def test_output_dir_checks(tmp_path):
    slurm.check_output_dir(tmp_path / "new" / "deeper")         # creatable: fine
    assert not (tmp_path / "new").exists()                       # ... and the probe left nothing
    slurm.check_output_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(slurm.SlurmError, match="is not writable: .* is a file"):
        slurm.check_output_dir(blocker / "out")
    with pytest.raises(slurm.SlurmError, match="is not writable"):
        slurm.check_output_dir("/proc/scalesft-out")           # read-only even for root


def test_node_local_warning():
    mounts = "rootfs / ext4 rw 0 0\nserver:/home /home nfs4 rw 0 0\ntmpfs /tmp tmpfs rw 0 0\n"
    assert slurm.node_local_warning("/home/u/run", nodes=4, mounts=mounts) is None
    assert slurm.node_local_warning("/tmp/run", nodes=1, mounts=mounts) is None
    w = slurm.node_local_warning("/tmp/run", nodes=2, mounts=mounts)
    assert w and "node-local filesystem (tmpfs at /tmp)" in w
    assert "ext4 at /" in slurm.node_local_warning("/scratch/run", nodes=2, mounts=mounts)


def test_cli_bad_inputs(tmp_path, capsys):
    assert cli_main(["slurm", str(tmp_path / "missing.yaml"), "--nodes", "2", "--gpus-per-node", "8",
                     "--dry-run"]) == 2
    assert "missing.yaml' does not exist" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli_main(["slurm", str(recipe_file(tmp_path, blocker / "out")), "--nodes", "1", "--gpus-per-node",
                     "8", "--dry-run"]) == 2
    assert "is not writable" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's choices (the strategy spec's names), in one line
        cli_main(["slurm", str(recipe_file(tmp_path, tmp_path / "o")), "--nodes", "2", "--gpus-per-node", "8",
                  "--strategy", "nope", "--dry-run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "argument --strategy: invalid choice: 'nope' (choose from 'ddp', 'zero2', 'zero3'" in err


def test_latest_complete_checkpoint_skips_unfinished(tmp_path):
    for step in (5, 10, 15):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "adapter_model.safetensors").write_text("x")
    assert preemption.latest_complete_checkpoint(tmp_path) is None
    for step in (5, 10):
        preemption._atomic_write(tmp_path / f"checkpoint-{step}" / preemption.COMPLETE_MARKER, json.dumps({}))
    assert preemption.latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert preemption.remove_incomplete_after(tmp_path, str(tmp_path / "checkpoint-10")) == \
        [str(tmp_path / "checkpoint-15")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-5"]
    assert not list(tmp_path.glob("**/.*tmp*"))


def test_stop_request_stops_at_step_end(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    stop = tmp_path / "stop"
    cb = preemption.PreemptionCallback(stop_file=str(stop), install_handlers=False)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[])
    state = TrainerState(global_step=3, max_steps=10)
    control = cb.on_step_end(args, state, TrainerControl())
    assert not control.should_save and not control.should_training_stop
    stop.touch()
    control = cb.on_step_end(args, state, TrainerControl())
    assert control.should_save and control.should_training_stop and cb.preempted(state)
    assert not cb.preempted(TrainerState(global_step=10, max_steps=10))


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_sets_the_stop_flag_only(sig):
    old = {s: signal.getsignal(s) for s in preemption.PreemptionCallback.SIGNALS}
    try:
        cb = preemption.PreemptionCallback(stop_file="")
        assert not cb.requested_here()
        os.kill(os.getpid(), sig)          # handled in this (main) thread: the process lives on
        assert cb.requested_here() and cb.signal_received == sig
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_template_state_folder_is_private_and_unpredictable(tmp_path):
    """slurm/train.sh keeps the trainers' status and stop files in a fresh `mktemp -d` folder (mode 0700, random
    name), not in the predictable TMPDIR/scalesft-JOB.RESTART another local user could pre-create or symlink.
    The template runs for real (preflight included) with a stand-in `srun` that records the folder it was given
    and reports a completed run, as rank 0 does."""
    import stat
    import subprocess
    import sys

    bin_dir, tmp = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir()
    tmp.mkdir()
    seen = tmp_path / "seen"
    (bin_dir / "srun").write_text(
        "#!/bin/bash\n"
        f'd=$(dirname "$SCALESFT_STATUS_FILE"); stat -c "%a %u" "$d" > {seen}; echo "$d" >> {seen}\n'
        'echo "completed step=1" > "$SCALESFT_STATUS_FILE"\n')
    (bin_dir / "srun").chmod(0o755)
    # the old predictable name, planted as a symlink to someone else's folder
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious").write_text("x")
    (tmp / "scalesft-4242.0").symlink_to(victim)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SCALESFT_"))}
    env.update({"PATH": f"{bin_dir}{os.pathsep}{env['PATH']}", "TMPDIR": str(tmp), "SLURM_JOB_ID": "4242",
                "SLURM_NNODES": "1", "CUDA_VISIBLE_DEVICES": "", "SCALESFT_MAIN_HOST": "localhost",
                "SCALESFT_HOME": str(REPO), "SCALESFT_PYTHON": sys.executable})
    p = subprocess.run(["bash", str(TEMPLATE), str(recipe_file(tmp_path))], env=env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "trainer status: completed step=1" in p.stdout, p.stdout
    mode, uid, folder = seen.read_text().split()
    assert (mode, int(uid)) == ("700", os.getuid())
    folder = Path(folder)
    assert folder.parent == tmp and folder.name.startswith("scalesft-4242.0.") and folder.name != "scalesft-4242.0"
    assert not folder.exists()  # removed at exit
    assert sorted(p.name for p in victim.iterdir()) == ["precious"]  # the planted link was never followed
    assert stat.S_ISLNK((tmp / "scalesft-4242.0").lstat().st_mode)
