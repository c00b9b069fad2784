"""What a person sees: the step line, the closing summary, --json that parses, one-line errors for the folders
generate/chat are given, Slurm options checked before rendering, no broken characters when streaming."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tinyrecipe import REPO
from scalesft.trainer.console import duration, step_line, summary


def test_step_line_has_step_loss_lr_speed_memory_eta():
    logs = {"loss": 1.23456, "learning_rate": 0.0009855, "tokens_per_second": 1234.5, "peak_memory_gib": 3.61}
    assert step_line(10, 40, logs, elapsed=20.0) == \
        "step 10/40 · loss 1.2346 · lr 9.86e-04 · 1,234 tok/s · mem 3.6 GiB · ETA 1m00s"
    # resumed at step 30: the ETA uses only the steps this process ran; no ETA on the last step
    assert step_line(35, 40, {"loss": 1.0}, elapsed=10.0, start_step=30).endswith("ETA 10s")
    assert "ETA" not in step_line(40, 40, {"loss": 1.0}, elapsed=10.0)


def test_duration():
    assert [duration(s) for s in (0.4, 59, 61, 3600 + 120)] == ["0s", "59s", "1m01s", "1h02m"]


def test_summary_names_losses_eval_speed_adapter_and_next_commands():
    result = {"train_loss": [{"step": 1, "loss": 2.5}, {"step": 9, "loss": 0.75}],
              "eval_loss": [{"step": 0, "loss": 2.4}, {"step": 9, "loss": 1.9}], "global_step": 9,
              "tokens_per_second": 1500.4, "peak_memory_gib": 3.6, "wall_seconds": 125}
    head, where, nxt = summary(result, "outputs/x", "AI가 뭐지?")
    assert head == ("done in 2m05s: 9 steps, loss 2.500 -> 0.750, eval loss 2.400 -> 1.900, "
                    "1,500 loss tokens/s, peak 3.6 GiB")
    assert where == "adapter: outputs/x"
    assert 'scalesft generate outputs/x "AI가 뭐지?"' in nxt and "scalesft chat outputs/x" in nxt
    *_, nxt = summary(result, "outputs/x", "AI가 뭐지?", cli=".venv/bin/scalesft")
    assert nxt.count(".venv/bin/scalesft ") == 3 and " scalesft " not in nxt.replace("/scalesft ", "")


def test_next_commands_work_without_an_activated_venv(tmp_path):
    """`./dev demo` runs the venv's scalesft without activating it: the closing `next:` line then names
    `.venv/bin/scalesft` (a bare `scalesft` would be 'command not found'); once PATH finds that script, the name."""
    from scalesft.trainer.console import cli_command

    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text("")
    (bin_dir / "scalesft").write_text("#!/bin/sh\n")
    (bin_dir / "scalesft").chmod(0o755)
    py = str(bin_dir / "python")
    assert cli_command("/usr/bin:/bin", py, str(tmp_path)) == ".venv/bin/scalesft"
    assert cli_command(f"{bin_dir}:/usr/bin", py, str(tmp_path)) == "scalesft"
    elsewhere = tmp_path / "elsewhere"
    assert cli_command("/usr/bin", py, str(elsewhere)) == str(bin_dir / "scalesft")  # not below: the full path
    (bin_dir / "scalesft").unlink()  # no console script beside this Python (a bare checkout): the plain name
    assert cli_command("/usr/bin", py, str(tmp_path)) == "scalesft"


def _cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "scalesft.launch.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, **kw)


def test_plan_json_is_json_on_stdout_errors_included(tmp_path):
    env_home = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}  # a fresh HOME: first-import notices are printed
    import os

    env = {**os.environ, **env_home}
    ok = _cli("plan", "recipes/seed-000-kanana-qlora.yaml", "--gpus-per-node", "1,2", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    entries = json.loads(ok.stdout)
    assert [e["world_size"] for e in entries] == [1, 2]
    assert entries[0]["memory"] is None and "config.json" in entries[0]["memory_unavailable"]
    bad = _cli("plan", "recipes/seed-000-kanana-qlora.yaml", "training.learning_rat=1", "--json", env=env)
    assert bad.returncode == 2
    assert "learning_rate" in json.loads(bad.stdout)["error"]
    assert bad.stderr.strip().splitlines()[-1].startswith("scalesft plan: error:")


@pytest.mark.parametrize("options, message", [
    (["--time", "12h"], "--time '12h' is not a Slurm time limit"),
    (["--partition", "gpu;rm -rf"], "is not a partition name"),
    (["--gpus-per-node", "3", "training.micro_batch_size=4"],  # a fixed micro batch of 4: 32 % 12 != 0
     "1 node(s) x 3 process(es): training.global_batch_size=32 is not divisible"),
    (["--gpus-per-node", "64"], "1 node(s) x 64 process(es): training.global_batch_size=32 is smaller than the world "
                                "size (64)"),  # micro_batch_size auto: any global batch >= the world size
])
def test_slurm_checks_options_and_batch_before_rendering(options, message):
    argv = ["slurm", "recipes/seed-000-kanana-qlora.yaml", "--nodes", "1", "--gpus-per-node", "1", *options,
            "--dry-run"]
    run = _cli(*argv)
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and message in run.stderr, run.stderr


def test_slurm_time_syntax():
    from scalesft.launch.slurm import SlurmError, check_job_options

    for ok in ("30", "30:00", "12:00:00", "2-00", "2-12:30", "2-12:30:00", "UNLIMITED"):
        check_job_options(partition="gpu,debug", time=ok, nodes=1, gpus_per_node=8, procs_per_node=None)
    for bad in ("12h", "1:2:3:4", "-5", ""):
        with pytest.raises(SlurmError):
            check_job_options(partition=None, time=bad, nodes=1, gpus_per_node=8, procs_per_node=None)


def test_generate_folder_kinds(tmp_path):
    from scalesft.core.recipe import RecipeError
    from scalesft.trainer.generate import folder_kind

    with pytest.raises(RecipeError, match="is not a folder"):
        folder_kind(tmp_path / "missing")
    with pytest.raises(RecipeError, match="has no recipe.yaml"):
        folder_kind(tmp_path)
    (tmp_path / "recipe.yaml").write_text("{}")
    with pytest.raises(RecipeError, match="holds no adapter yet"):
        folder_kind(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert folder_kind(tmp_path) == "merged"
    (tmp_path / "adapter_config.json").write_text("{}")
    assert folder_kind(tmp_path) == "adapter"


def test_streamer_drops_a_character_cut_by_the_token_limit(capsys):
    from scalesft.trainer.generate import _streamer

    class Tok:  # bytes-level decode of a Korean word cut in its last character
        def decode(self, ids, **kw):
            return bytes(ids).decode("utf-8", errors="replace")

    import torch

    s = _streamer(Tok())
    data = "안녕 세계".encode()[:-1]  # the last character's final byte is missing
    s.put(torch.tensor([[0]]))  # the prompt (skipped)
    for b in data:
        s.put(torch.tensor([b]))
    s.end()
    out = capsys.readouterr().out
    assert "\ufffd" not in out and out.startswith("안녕 ") and out.endswith("\n")


WRITER = """
import sys
from scalesft.trainer.console import say
tag = sys.argv[1]
line = f"rank {tag} " + "x" * 200
for _ in range(3000):
    say(line) if sys.argv[2] == "say" else print(f"[scalesft] {line}", flush=True)
"""


def _two_writers(how: str) -> list[str]:
    """Two unbuffered processes writing to one pipe, as ranks under `accelerate launch` do."""
    import os

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = f"{sys.executable} -c '{WRITER}' 0 {how} & {sys.executable} -c '{WRITER}' 1 {how} & wait"
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, check=True).stdout
    return out.splitlines()


def test_lines_from_several_ranks_never_interleave():
    """say() writes each line in one call; lines from two ranks on one pipe stay whole (the start-line check in
    test_distributed_launch.py once failed on `...liger=False[scalesft] rank 0 ...`)."""
    whole = {f"[scalesft] rank {r} " + "x" * 200 for r in (0, 1)}
    lines = _two_writers("say")
    assert len(lines) == 6000 and set(lines) == whole


def test_the_interleaving_say_prevents_is_real():
    """The control: print() writes text and newline separately, and unbuffered writers do split lines. A few
    tries (it split lines in 18 of 20 runs here), since it is a race."""
    whole = {f"[scalesft] rank {r} " + "x" * 200 for r in (0, 1)}
    assert any(set(_two_writers("print")) != whole for _ in range(20))
