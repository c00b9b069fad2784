"""Slurm rendering and checks that need no cluster: the sbatch invocation, the template's dry run for 4 nodes x 8
GPUs, allocation checks, output_dir checks, and the complete-checkpoint rule. (tests/slurm/ runs real jobs.)"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
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
    assert "SCALESFT_NODES=4" in argv and "SCALESFT_GPUS_PER_NODE=8" in argv
    srun = next(ln for ln in out.splitlines() if ln.startswith("srun "))
    words = shlex.split(srun)
    assert words[words.index("--num_processes") + 1] == "32"
    assert words[words.index("--num_machines") + 1] == "4"
    assert "--nodes=4" in words and "--ntasks-per-node=1" in words and "--kill-on-bad-exit=1" in words
    # The machine rank is NOT resolved in the batch step: the node command keeps "$SLURM_NODEID" for each node.
    node_cmd = words[words.index("-c") + 1]
    assert '--machine_rank "$SLURM_NODEID"' in node_cmd
    assert "--machine_rank" not in words[words.index("-c") + 2:]
    assert words[-2:] == [str(recipe.resolve()), "training.max_steps=7"]
    assert "4 node(s) x 8 process(es) (gpu) = 32" in out
    assert "ACCELERATE_USE_CPU" not in out


def test_dry_run_cpu_nodes_set_use_cpu(tmp_path, capsys):
    rc = cli_main(["slurm", str(recipe_file(tmp_path)), "--nodes", "2", "--gpus-per-node", "0",
                   "--procs-per-node", "3", "--dry-run", "training.global_batch_size=12"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "export ACCELERATE_USE_CPU=true" in out
    words = shlex.split(next(ln for ln in out.splitlines() if ln.startswith("srun ")))
    assert words[words.index("--num_processes") + 1] == "6"


def test_render_sbatch_is_pure_and_complete():
    cmd = slurm.render_sbatch(recipe="/r.yaml", overrides=["training.seed=1"], nodes=2, gpus_per_node=4,
                              time="1:00:00", account="acct", signal_seconds=300, profile="mycluster",
                              extra_sbatch_args=["--constraint=h100"], python="/venv/bin/python")
    assert cmd.argv == ["sbatch", "--nodes=2", "--gpus-per-node=4", "--time=1:00:00", "--account=acct",
                        "--signal=B:USR1@300", "--constraint=h100", "--export=ALL", str(TEMPLATE), "/r.yaml",
                        "training.seed=1"]
    assert cmd.env == {"SCALESFT_HOME": str(REPO), "SCALESFT_NODES": "2", "SCALESFT_GPUS_PER_NODE": "4",
                       "SCALESFT_PROFILE": "mycluster", "SCALESFT_PYTHON": "/venv/bin/python"}
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
    assert cli_main(["slurm", str(recipe_file(tmp_path, tmp_path / "o")), "--nodes", "2", "--gpus-per-node", "8",
                     "--strategy", "nope", "--dry-run"]) == 2
    assert "unknown strategy 'nope'" in capsys.readouterr().err


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
