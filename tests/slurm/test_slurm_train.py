"""slurm/train.sh on a real two-node Slurm (tests/slurm/cluster.sh): equivalence, preemption -> requeue ->
exact resume, a dead rank, and bad input. CPU + gloo, a tiny random Llama; one process per node unless said.

Figures are printed (run with -s to see them) and appended to $SCALESFT_SLURM_FIGURES when set.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from slurm_helpers import adapter_max_diff, job_env, run_train, submit_train, write_recipe
from scalesft.launch.slurm import node_command
from scalesft.trainer.preemption import COMPLETE_MARKER, latest_complete_checkpoint

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 30


def figure(line: str) -> None:
    print(f"\n[slurm figure] {line}")
    path = os.environ.get("SCALESFT_SLURM_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def logged_steps(log_text: str) -> list[tuple[str, str, str]]:
    """(step, loss, learning rate) of every per-step line rank 0 printed (trainer/console.py step_line:
    `[scalesft] step 5/30 · loss 6.1234 · lr 2.00e-04 · ...`), in order."""
    return re.findall(r"\[scalesft\] step +(\d+)/\d+ · loss (\S+) · lr (\S+)", log_text)


@pytest.fixture(scope="module")
def reference(slurm_cluster, slurm_tiny, tmp_path_factory):
    """The uninterrupted 2-node run (1 process per node, global batch 8 = 2 x micro 2 x accumulation 2)."""
    tmp = tmp_path_factory.mktemp("ref2node")
    recipe = write_recipe(tmp / "recipe.yaml", slurm_tiny, tmp / "out")
    run = run_train(slurm_cluster, recipe, 2, job_env(tmp), tmp / "job.log")
    figure(f"2-node reference job {run.job}: {run.seconds:.1f} s")
    assert run.record.get("JobState") == "COMPLETED", run.text()[-3000:]
    return run


def test_two_nodes_equal_one_node_two_processes(slurm_cluster, slurm_tiny, reference, tmp_path):
    text = reference.text()
    # One process on each node: both ranks are local rank 0, in a world of 2.
    assert "rank 0 (local 0) of 2" in text and "rank 1 (local 0) of 2" in text, text[-3000:]
    assert "2 node(s) x 1 process(es) (cpu) = 2" in text
    assert re.search(r"node 0 of 2 execs: ACCELERATE_USE_CPU=true \S+ -m accelerate\.commands\.launch .*"
                     r"--machine_rank 0 ", text), text[-3000:]
    assert "node-local filesystem" in text  # output_dir under /tmp on a 2-node job: warned
    assert json.loads((reference.output_dir / "train_metrics.json").read_text())["global_step"] == STEPS

    # The 1-node run goes through `scalesft slurm --submit` (the CLI's one sbatch call site).
    recipe = write_recipe(tmp_path / "recipe.yaml", slurm_tiny, tmp_path / "out")
    log = tmp_path / "job.log"
    t0 = time.monotonic()
    p = slurm_cluster.run(sys.executable, "-m", "scalesft.launch.cli", "slurm", str(recipe), "--nodes", "1",
                          "--gpus-per-node", "0", "--procs-per-node", "2", f"--output={log}", "--time=10",
                          "--submit", env=job_env(tmp_path), cwd=tmp_path)
    job = re.search(r"submitted job (\d+): .*sbatch .*--nodes=1 ", p.stdout).group(1)
    rec = slurm_cluster.wait(job, timeout=240)
    text = log.read_text(errors="replace")
    figure(f"1-node 2-process job {job} (scalesft slurm --submit): {time.monotonic() - t0:.1f} s")
    assert rec.get("JobState") == "COMPLETED", text[-3000:]
    assert "1 node(s) x 2 process(es) (cpu) = 2" in text
    assert "rank 0 (local 0) of 2" in text and "rank 1 (local 1) of 2" in text
    diff = adapter_max_diff(reference.output_dir, tmp_path / "out")
    figure(f"adapter max abs diff, 2 nodes x 1 vs 1 node x 2 processes: {diff:.3g}")
    assert diff <= 1e-5


def test_preempt_requeue_resume_is_exact(slurm_cluster, slurm_tiny, reference, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", slurm_tiny, out, report_to="wandb", save_total_limit=None)
    log = tmp_path / "job.log"
    t0 = time.monotonic()
    job = submit_train(slurm_cluster, recipe, 2, job_env(tmp_path), log)
    # Signal once training is under way (the first complete checkpoint exists), well before the last step.
    deadline = time.monotonic() + 180
    while latest_complete_checkpoint(out) is None:
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.exists() else "no log"
        assert slurm_cluster.state(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), log.read_text()
        time.sleep(0.05)
    run_id = (out / "wandb_run_id").read_text().strip()
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    t_signal = time.monotonic()

    # Done: completed after one restart. Failing or cancelled at any point also ends the wait (while it is
    # requeued the job reads REQUEUED/PENDING, never one of these).
    rec = slurm_cluster.wait(job, timeout=240, until=lambda st: (
        st.get("JobState") == "COMPLETED" and st.get("Restarts") == "1")
        or st.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"))
    text = log.read_text(errors="replace")
    assert rec.get("JobState") == "COMPLETED" and rec.get("Restarts") == "1", text[-4000:]
    figure(f"preempted job {job}: {time.monotonic() - t0:.1f} s end to end (signal to done "
          f"{time.monotonic() - t_signal:.1f} s), restarts {rec.get('Restarts')}")

    stop = re.findall(r"preempted at step (\d+) of (\d+)", text)
    assert len(stop) == 1, text[-4000:]
    k = int(stop[0][0])
    assert 0 < k < STEPS and int(stop[0][1]) == STEPS
    assert f"requeueing job {job}" in text
    assert f"resuming from {out}/checkpoint-{k}" in text
    assert (out / f"checkpoint-{k}" / COMPLETE_MARKER).is_file()
    figure(f"preemption: stopped after step {k}, resumed from checkpoint-{k}, finished at step {STEPS}")

    # Exact step count: every optimizer step logged once over the two runs (no step twice, none skipped) ...
    epochs = logged_steps(text)
    ref_epochs = logged_steps(reference.text())
    assert len(ref_epochs) == STEPS and epochs == ref_epochs, (epochs, ref_epochs)
    state = json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    assert [h["step"] for h in state["log_history"] if "loss" in h] == list(range(1, STEPS + 1))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["global_step"] == STEPS and metrics["resumed_from"] == str(out / f"checkpoint-{k}")
    # ... and the same weights as the run that was never interrupted.
    diff = adapter_max_diff(reference.output_dir, out)
    figure(f"adapter max abs diff, preempted+resumed vs uninterrupted: {diff:.3g}")
    assert diff <= 1e-6

    # W&B: one offline run id before and after the requeue, kept in output_dir.
    assert (out / "wandb_run_id").read_text().strip() == run_id
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # Two offline runs (one per job start, rank 0 only: other ranks log nothing), both with the same id, and
    # both named/grouped by the Slurm job.
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs), runs
    for r in runs:
        assert f"slurm-{job}".encode() in (r / f"run-{run_id}.wandb").read_bytes()
    assert text.count(f"wandb run id {run_id} (resume=allow)") == 2


def test_sigterm_with_wandb_checkpoints_and_resumes(slurm_cluster, slurm_tiny, tmp_path):
    """`scontrol requeue`: Slurm's SIGTERM reaches every process of the job, W&B's wandb-core included. Before,
    rank 0 died in WandbCallback.on_log (ConnectionResetError) and the promised checkpoint was never written;
    now W&B logging stops and the ranks checkpoint, and the requeued job resumes there."""
    out = tmp_path / "out"
    steps = 200
    recipe = write_recipe(tmp_path / "recipe.yaml", slurm_tiny, out, report_to="wandb", max_steps=steps,
                          save_steps=1000)  # no periodic checkpoint: the only one is the SIGTERM's
    log = tmp_path / "job.log"
    job = submit_train(slurm_cluster, recipe, 2, job_env(tmp_path), log)
    deadline = time.monotonic() + 180
    while len(logged_steps(log.read_text(errors="replace") if log.exists() else "")) < 3:
        assert time.monotonic() < deadline and slurm_cluster.state(job).get("JobState") in (
            "PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.05)
    slurm_cluster.run("scontrol", "requeue", job)
    rec = slurm_cluster.wait(job, timeout=300, until=lambda st: (
        st.get("JobState") == "COMPLETED" and st.get("Restarts") == "1")
        or st.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"))
    text = log.read_text(errors="replace")
    assert rec.get("JobState") == "COMPLETED" and rec.get("Restarts") == "1", text[-4000:]
    stop = re.findall(r"preempted at step (\d+) of (\d+)", text)
    assert len(stop) == 1, text[-4000:]
    k = int(stop[0][0])
    assert 3 <= k < steps and f"resuming from {out}/checkpoint-{k}" in text, text[-4000:]
    assert (out / f"checkpoint-{k}" / COMPLETE_MARKER).is_file()
    assert json.loads((out / "train_metrics.json").read_text())["global_step"] == steps
    assert [int(s) for s, _, _ in logged_steps(text)] == list(range(1, steps + 1))
    figure(f"SIGTERM with W&B on (scontrol requeue): checkpoint-{k} written, resumed, finished at step {steps}")


def _rank_pid(job: str, rank: int) -> int | None:
    """The pid of the trainer process with this global rank in this job (all nodes live on this host)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
            cmd = (proc / "cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("RANK") == str(rank) and "trainer.train" in cmd \
                and "accelerate" not in cmd:
            return int(proc.name)
    return None


def _proc_argv_env(proc: Path) -> tuple[list[str], dict[str, str]] | None:
    try:
        env = dict(kv.split("=", 1) for kv in (proc / "environ").read_text().split("\0") if "=" in kv)
        argv = (proc / "cmdline").read_text().split("\0")[:-1]
    except OSError:
        return None
    return argv, env


def _node_launchers(job: str) -> dict[int, tuple[list[str], dict[str, str]]]:
    """SLURM_NODEID -> (argv, environment) of the launcher each node's srun task exec'd in this job: the
    processes running `python -m accelerate.commands.launch` (all nodes live on this host)."""
    found = {}
    for proc in Path("/proc").iterdir():
        got = proc.name.isdigit() and _proc_argv_env(proc)
        if got and got[1].get("SLURM_JOB_ID") == job and got[0][1:3] == ["-m", "accelerate.commands.launch"]:
            found[int(got[1]["SLURM_NODEID"])] = got
    return found


def test_dead_rank_fails_fast_and_keeps_a_loadable_checkpoint(slurm_cluster, slurm_tiny, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "recipe.yaml", slurm_tiny, out, max_steps=100000, save_steps=3)
    log = tmp_path / "job.log"
    job = submit_train(slurm_cluster, recipe, 2, job_env(tmp_path), log)
    deadline = time.monotonic() + 180
    while latest_complete_checkpoint(out) is None:
        assert time.monotonic() < deadline and slurm_cluster.state(job).get("JobState") in (
            "PENDING", "RUNNING", "CONFIGURING"), log.read_text()[-3000:] if log.exists() else "no log"
        time.sleep(0.05)
    # What really runs on each node is node_command's rendering of that node's environment, rank = its node id.
    launchers = _node_launchers(job)
    assert sorted(launchers) == [0, 1], launchers
    for node_id, (argv, env) in launchers.items():
        cmd = node_command(env, str(recipe), [], python=argv[0])
        assert argv == cmd.argv and argv[argv.index("--machine_rank") + 1] == str(node_id), (argv, cmd.argv)
        assert cmd.env == {"ACCELERATE_USE_CPU": "true"} and cmd.env.items() <= env.items()
    pid = _rank_pid(job, 1)
    assert pid, "rank 1's process not found"
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    rec = slurm_cluster.wait(job, timeout=90)
    elapsed = time.monotonic() - t_kill
    text = log.read_text(errors="replace")
    figure(f"dead rank: kill -9 of rank 1 -> job {rec.get('JobState')} after {elapsed:.1f} s")
    assert rec.get("JobState") == "FAILED", (rec, text[-3000:])
    assert rec.get("Restarts", "0") == "0" and "requeueing" not in text
    assert elapsed < 60

    # The newest complete checkpoint loads: adapter into the base model, optimizer, scheduler, every rank's RNG.
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ckpt = Path(latest_complete_checkpoint(out))
    step = int(ckpt.name.split("-")[1])
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["global_step"] == step
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(slurm_tiny["model"]), str(ckpt))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert opt["state"], "optimizer state present"
    torch.load(ckpt / "scheduler.pt", weights_only=True)
    for r in (0, 1):
        torch.load(ckpt / f"rng_state_{r}.pth", weights_only=False)
    figure(f"dead rank: newest complete checkpoint {ckpt.name} (step {step}) loads")


def test_bad_input_fails_in_the_batch_step(slurm_cluster, slurm_tiny, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    good = write_recipe(tmp_path / "good.yaml", slurm_tiny, tmp_path / "out")
    unwritable = write_recipe(tmp_path / "unwritable.yaml", slurm_tiny, blocker / "out")
    cases = {
        "nodes": (good, 2, {"SCALESFT_NODES": "3"}, "asked for 3 node(s) but the allocation has 2"),
        "gpus": (good, 1, {"SCALESFT_GPUS_PER_NODE": "8"}, "asked for 8 GPU(s) per node but the node has 0"),
        "recipe": (tmp_path / "nowhere.yaml", 1, {}, "nowhere.yaml' does not exist on"),
        "output_dir": (unwritable, 1, {}, "is not writable"),
        "strategy": (good, 2, {"SCALESFT_STRATEGY": "zero4"}, "SCALESFT_STRATEGY='zero4' is not a strategy"),
    }
    # A recipe that exists on the first node (where the batch step checks it) but not on the second one.
    (slurm_cluster.dir / "nodes" / "n1" / "recipe.yaml").write_text(good.read_text())
    cases["recipe_on_one_node"] = (slurm_cluster.dir / "local" / "recipe.yaml", 2, {},
                                   "is not readable on node n2: put it on a filesystem every node mounts")
    jobs = {name: submit_train(slurm_cluster, recipe, nodes, job_env(tmp_path, **env), tmp_path / f"{name}.log")
            for name, (recipe, nodes, env, _) in cases.items()}
    for name, job in jobs.items():
        rec = slurm_cluster.wait(job, timeout=60)
        text = (tmp_path / f"{name}.log").read_text()
        assert rec.get("JobState") == "FAILED", (name, rec, text)
        assert cases[name][3] in text, (name, text)
        if name != "recipe_on_one_node":  # stopped in the batch step, before any node started
            assert rec.get("ExitCode", "").startswith("2:") and "srun" not in text, (name, rec, text)
