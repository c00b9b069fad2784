"""Resume identity (trainer/resume.py), checkpoint rotation, failing saves and a lost W&B service.

An output_dir remembers what produced it: re-running a finished run is a no-op, a changed recipe or data stops
with one line before the model loads and writes nothing, training.resume=never|force are the deliberate ways
out, rotation never deletes the newest complete checkpoint, a full disk is one line, and SIGTERM with W&B on
(its service killed by the same signal) still writes the promised checkpoint. Tiny model, CPU, one process.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyrecipe import REPO, write_recipe
from scalesft.trainer import resume
from scalesft.core.recipe import RecipeError, load_recipe
from scalesft.trainer.preemption import COMPLETE_MARKER, latest_complete_checkpoint, rotate
from scalesft.trainer.train import main, train

STEPS = 3


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under folder -> sha256 of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def scalesft_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "scalesft" in line]


@pytest.fixture(scope="module")
def finished(tiny, tmp_path_factory):
    """A finished 3-step run (checkpoint-2 and the final checkpoint-3), constant learning rate."""
    root = tmp_path_factory.mktemp("finished")
    path = write_recipe(root / "r.yaml", tiny, root / "out", training={
        "max_steps": STEPS, "save_steps": 2, "lr_scheduler_type": "constant"})
    m = train(load_recipe(path))
    assert m["global_step"] == STEPS
    return {"root": root, "recipe": path, "out": root / "out", "metrics": m}


@pytest.fixture()
def copy(finished, tmp_path):
    """A private copy of the finished run's output_dir and a recipe pointing at it."""
    out = tmp_path / "out"
    shutil.copytree(finished["out"], out)
    text = finished["recipe"].read_text().replace(str(finished["out"]), str(out))
    (tmp_path / "r.yaml").write_text(text)
    return tmp_path / "r.yaml", out


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Loading the tokenizer or the model fails the test: proves the decision came first."""
    import scalesft.trainer.model

    def boom(*a, **k):
        raise AssertionError("the model/tokenizer was loaded")
    monkeypatch.setattr(scalesft.trainer.model, "load_tokenizer", boom)
    monkeypatch.setattr(scalesft.trainer.model, "load_model", boom)


def test_identity_record_is_written(finished):
    rec = json.loads((finished["out"] / resume.RUN_FILE).read_text())
    ident = rec["identity"]
    assert ident["lora.r"] == 8 and ident["training.learning_rate"] == 1e-2 and ident["training.global_batch_size"] == 8
    data = Path(load_recipe(finished["recipe"]).data.path)
    assert ident["data.content"] == "sha256:" + hashlib.sha256(data.read_bytes()).hexdigest()
    assert {"model.config", "model.weights", "model.tokenizer", "scalesft.version"} <= set(ident)
    assert not {"training.max_steps", "training.output_dir", "training.save_steps", "data.path"} & set(ident)
    assert rec["completed"]["global_step"] == STEPS and rec["world_size"] == 1


def test_rerun_of_a_finished_run_is_a_noop(copy, capsys, no_model_loads):
    """Before: each rerun trained one more step (3, 4, 5). Now: nothing trains, nothing is written."""
    path, out = copy
    before = snapshot(out)
    for _ in range(2):
        assert main([str(path)]) == 0
        captured = capsys.readouterr()
        lines = scalesft_lines(captured.out + captured.err)
        assert lines == [f"[scalesft] {out} already finished this run at step {STEPS}: nothing to train; the adapter "
                         f"is in {out} (raise training.max_steps to train further, or start over with "
                         "training.resume=never or a fresh training.output_dir)"], lines
    assert snapshot(out) == before  # same adapter bytes, same checkpoints, recipe.yaml untouched
    assert json.loads((out / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())["global_step"] == STEPS
    # A lower max_steps than what was trained is finished too.
    assert main([str(path), "training.max_steps=2"]) == 0
    assert "already finished this run at step 3" in capsys.readouterr().out and snapshot(out) == before


@pytest.mark.parametrize("overrides, difference", [
    (["training.learning_rate=0.02"], "training.learning_rate 0.01 -> 0.02"),
    (["lora.r=4"], "lora.r 8 -> 4"),
    (["training.global_batch_size=4"], "training.global_batch_size 8 -> 4"),
    (["data.template=Question {question} Answer {answer}"], "data.template ko-qa -> Question {question} Answer {answer}"),
    (["data.max_seq_length=48", "training.seed=1"], "data.max_seq_length 64 -> 48; training.seed 0 -> 1"),
])
def test_changed_recipe_stops_with_one_line_and_writes_nothing(copy, capsys, no_model_loads, overrides, difference):
    path, out = copy
    before = snapshot(out)
    assert main([str(path), *overrides, "training.max_steps=5"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"scalesft: error: training.output_dir '{out}' holds a run that "
                                               f"differs from this recipe: {difference}. Continuing would mix"), err
    assert ("use a fresh training.output_dir, or set training.resume=never to start over in this one (its "
            "checkpoints are deleted) or training.resume=force to continue from checkpoint-3 anyway") in err[0]
    assert scalesft_lines(captured.out) == []
    assert snapshot(out) == before


def test_changed_data_stops_and_leaves_the_adapter(copy, tiny, tmp_path, capsys, no_model_loads):
    """The issue's case: new data into a finished output_dir (with a longer max_steps) resumed, trained nothing
    and exited 0 while recipe.yaml claimed the new data."""
    path, out = copy
    rows = json.loads(Path(tiny["data"]).read_text())
    rows[5]["answer"] += " 그리고 더."
    new = tmp_path / "new.json"
    new.write_text(json.dumps(rows, ensure_ascii=False))
    before = snapshot(out)
    assert main([str(path), f"data.path={new}", "training.max_steps=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "differs from this recipe: data.content sha256:" in err[0], err
    old_hash = hashlib.sha256(Path(tiny["data"]).read_bytes()).hexdigest()[:12]
    new_hash = hashlib.sha256(new.read_bytes()).hexdigest()[:12]
    assert f"data.content sha256:{old_hash}... -> sha256:{new_hash}..." in err[0]
    assert snapshot(out) == before
    # The same bytes under another name are the same data: continues.
    same = tmp_path / "moved.json"
    shutil.copy(tiny["data"], same)
    p = resume.plan(load_recipe(path, [f"data.path={same}", "training.max_steps=5"]))
    assert p.checkpoint.endswith("checkpoint-3") and not p.finished


def test_checkpoints_without_a_record_are_not_continued(copy, capsys, no_model_loads):
    path, out = copy
    (out / resume.RUN_FILE).unlink()
    assert main([str(path), "training.max_steps=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"holds checkpoint-3 but no {resume.RUN_FILE} saying what produced it" in err[0], err


def test_unfinished_run_continues_exactly(finished, copy):
    """3 steps then 2 more == 5 steps straight (constant lr): same weights, each step logged once."""
    from safetensors.torch import load_file

    path, out = copy
    m = train(load_recipe(path, ["training.max_steps=5"]))
    assert m["resumed_from"] == str(out / "checkpoint-3") and m["global_step"] == 5
    assert [x["step"] for x in m["train_loss"]] == [1, 2, 3, 4, 5]  # each step once (3 from the checkpoint)
    straight = finished["root"] / "straight"
    train(load_recipe(finished["recipe"], ["training.max_steps=5", f"training.output_dir={straight}"]))
    a, b = load_file(out / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) == 0.0


def test_force_continues_and_never_starts_over(copy, capsys):
    path, out = copy
    m = train(load_recipe(path, ["training.learning_rate=0.02", "training.max_steps=4", "training.resume=force"]))
    assert m["resumed_from"] == str(out / "checkpoint-3") and m["global_step"] == 4
    assert ("[scalesft] training.resume=force: continuing from " + str(out / "checkpoint-3") +
            " although training.learning_rate 0.01 -> 0.02") in capsys.readouterr().out
    assert json.loads((out / resume.RUN_FILE).read_text())["identity"]["training.learning_rate"] == 0.02

    m = train(load_recipe(path, ["lora.r=4", "training.resume=never"]))
    assert m["resumed_from"] is None and m["global_step"] == STEPS
    assert "[scalesft] training.resume=never: starting over in " + str(out) in capsys.readouterr().out
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert json.loads((out / resume.RUN_FILE).read_text())["identity"]["lora.r"] == 4
    steps = [json.loads((c / "trainer_state.json").read_text())["global_step"] for c in sorted(out.glob("checkpoint-*"))]
    assert sorted(steps) == [2, 3]  # the new run's own checkpoints; the old checkpoint-4 is gone
    assert json.loads((out / "checkpoint-3" / "adapter_config.json").read_text())["r"] == 4


# ---------------------------------------------------------------- world size

def _plan(tmp_path, old_world: int, mode: str = "auto") -> resume.Plan:
    return resume.Plan(output_dir=tmp_path, identity={}, mode=mode, checkpoint=str(tmp_path / "checkpoint-4"),
                       step=4, previous_world_size=old_world)


def test_world_size_change_continues_only_when_the_steps_see_the_same_rows(tmp_path):
    line = resume.check_world_size(_plan(tmp_path, 2), world_size=1, train_rows=64, global_batch=8, packing=False)
    assert line == ("[scalesft] world size 2 -> 1 since checkpoint-4, same global batch 8: 64 training rows divide "
                    "into whole steps, so every step sees the same rows as before; continuing exactly")
    assert resume.check_world_size(_plan(tmp_path, 1), world_size=1, train_rows=60, global_batch=8,
                                   packing=False) is None
    with pytest.raises(RecipeError, match=r"checkpoint-4 in '.*' was written by 2 process\(es\), this run has 4: "
                                          r"60 training rows are not a multiple of the global batch 8"):
        resume.check_world_size(_plan(tmp_path, 2), world_size=4, train_rows=60, global_batch=8, packing=False)
    with pytest.raises(RecipeError, match="data.packing"):
        resume.check_world_size(_plan(tmp_path, 2), world_size=1, train_rows=64, global_batch=8, packing=True)
    forced = resume.check_world_size(_plan(tmp_path, 2, "force"), world_size=4, train_rows=60, global_batch=8,
                                     packing=False)
    assert "training.resume=force" in forced and "the data order differs" in forced


def test_checkpoint_marker_records_the_world_size(finished):
    marker = json.loads((finished["out"] / "checkpoint-3" / COMPLETE_MARKER).read_text())
    assert marker["world_size"] == 1 and marker["global_step"] == 3


# ---------------------------------------------------------------- rotation

def _fake_checkpoint(out: Path, step: int, complete: bool) -> Path:
    c = out / f"checkpoint-{step}"
    c.mkdir(parents=True)
    (c / "adapter_model.safetensors").write_bytes(b"x" * step)
    if complete:
        (c / COMPLETE_MARKER).write_text(json.dumps({"global_step": step}))
    return c


def test_rotate_deletes_only_complete_checkpoints_beyond_the_limit(tmp_path):
    for step, complete in ((5, True), (10, True), (15, False)):  # 15: a save in flight (or cut by a crash)
        _fake_checkpoint(tmp_path, step, complete)
    assert rotate(tmp_path, 1) == [str(tmp_path / "checkpoint-5")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-15"]
    assert latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")
    assert rotate(tmp_path, 1) == [] and rotate(tmp_path, None) == []
    (tmp_path / "checkpoint-15" / COMPLETE_MARKER).write_text("{}")
    assert rotate(tmp_path, 1) == [str(tmp_path / "checkpoint-10")]


def test_crash_between_save_and_marker_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    """save_total_limit=1: transformers' own rotation ran inside the save, before our completion marker, and
    deleted checkpoint-2 while checkpoint-4 was not yet complete."""
    from scalesft.trainer.preemption import PreemptionCallback

    original = PreemptionCallback.on_save

    def crash_at_4(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise KeyboardInterrupt("killed between the save and the marker")
        return original(self, args, state, control, **kwargs)
    monkeypatch.setattr(PreemptionCallback, "on_save", crash_at_4)
    out = tmp_path / "out"
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tiny, out, training={
        "max_steps": 6, "save_steps": 2, "save_total_limit": 1}))
    with pytest.raises(KeyboardInterrupt):
        train(recipe)
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-2")
    assert (out / "checkpoint-4").is_dir() and not (out / "checkpoint-4" / COMPLETE_MARKER).exists()
    monkeypatch.setattr(PreemptionCallback, "on_save", original)
    m = train(recipe)  # resumes from checkpoint-2, rotates after each complete save: one checkpoint left
    assert m["resumed_from"] == str(out / "checkpoint-2") and m["global_step"] == 6
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-6"]


# ---------------------------------------------------------------- failing saves

def test_save_failure_classification():
    assert resume.save_failure(OSError(errno.ENOSPC, "No space left on device"))
    assert resume.save_failure(PermissionError(errno.EACCES, "Permission denied"))
    assert resume.save_failure(RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"))
    assert resume.save_failure(RuntimeError("basic_ios::clear: iostream error"))
    assert not resume.save_failure(OSError(errno.ENOENT, "No such file"))
    assert not resume.save_failure(RuntimeError("CUDA out of memory"))


def test_full_disk_fails_with_one_line_naming_folder_space_and_checkpoint(tiny, tmp_path, capsys, monkeypatch):
    import torch

    real_save = torch.save

    def full_at_4(obj, f, *a, **k):
        if "checkpoint-4" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1536 vs 1420")
        return real_save(obj, f, *a, **k)
    monkeypatch.setattr(torch, "save", full_at_4)
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", tiny, out, training={"max_steps": 6, "save_steps": 2})
    assert main([str(path)]) == 2
    # (an open tqdm bar may precede the line on the terminal: no newline of its own)
    err = [line[line.find("scalesft"):] for line in capsys.readouterr().err.splitlines()
           if "scalesft" in line or "Traceback" in line]
    free = shutil.disk_usage(out).free / 2**30
    assert len(err) == 1, err
    assert err[0].startswith(f"scalesft: error: saving into {out}/checkpoint-4 failed ([enforce fail at "
                             "inline_container.cc:664] . unexpected pos 1536 vs 1420; "), err
    assert f"GiB free on its disk); the newest complete checkpoint is {out}/checkpoint-2: free space" in err[0]
    shown = float(err[0].split("; ")[1].split(" GiB")[0])
    assert abs(shown - free) < 1.0


# ---------------------------------------------------------------- SIGTERM with W&B on

def _descendants(pid: int) -> list[int]:
    kids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(proc.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids + [k for kid in kids for k in _descendants(kid)]


def _gone(pid: int) -> bool:
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) in ("Z", "X")
    except OSError:
        return True


def test_sigterm_with_wandb_still_writes_the_promised_checkpoint(tiny, tmp_path):
    """Slurm's SIGTERM reaches every process of the step: W&B's wandb-core dies of it, and the trainer's next
    W&B call raised ConnectionResetError before the preemption checkpoint was saved (then hung at exit)."""
    out = tmp_path / "out"
    path = write_recipe(tmp_path / "r.yaml", tiny, out, training={
        "max_steps": 400, "save_steps": 1000, "report_to": "wandb"})
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "trainer.train", str(path)], cwd=REPO, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        lines = []
        for line in p.stdout:  # training under way: two logged steps ('[scalesft] step  2/400 · loss ...')
            lines.append(line)
            if sum(x.startswith("[scalesft] step ") for x in lines) >= 2:
                break
        core = [k for k in _descendants(p.pid) if b"wandb-core" in Path(f"/proc/{k}/cmdline").read_bytes()]
        assert core, "".join(lines)[-3000:]
        # The job's SIGTERM as Slurm delivers it: W&B's service gets it too (first here, so its death is certain
        # before the trainer's next step), then the trainer.
        for pid in core:
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while not all(_gone(pid) for pid in core):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGTERM)
        rest, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    text = "".join(lines) + rest
    assert p.returncode == 0, text[-4000:]
    stops = [line for line in text.splitlines() if "preempted at step" in line]
    assert len(stops) == 1, text[-4000:]
    step = int(stops[0].split("preempted at step ")[1].split()[0])
    assert 2 <= step < 400
    assert latest_complete_checkpoint(out) == str(out / f"checkpoint-{step}")
    assert json.loads((out / f"checkpoint-{step}" / "trainer_state.json").read_text())["global_step"] == step
    assert sum("WandbCallback.on_log failed (ConnectionResetError" in x for x in text.splitlines()) == 1, text[-4000:]
    assert "Traceback" not in text, text[-4000:]


@pytest.mark.slow
def test_world_size_change_at_the_same_global_batch_continues_exactly(tiny, tmp_path, capsys):
    """3 steps on 2 processes (micro 2 x accumulation 2), then 3 more on 1 (micro 2 x accumulation 4): the
    change is announced and the adapter equals 6 steps straight on 1 process (64 rows = 8 whole steps)."""
    from safetensors.torch import load_file

    out = tmp_path / "out"
    training = {"max_steps": STEPS, "save_steps": 100, "lr_scheduler_type": "constant"}
    path = write_recipe(tmp_path / "r.yaml", tiny, out, training=training)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run([sys.executable, "-m", "scalesft.launch.cli", "train", str(path), "--gpus", "2", "--strategy", "ddp",
                           "--device", "cpu", "--port", "0"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / f"checkpoint-{STEPS}" / COMPLETE_MARKER).read_text())["world_size"] == 2

    m = train(load_recipe(path, ["training.max_steps=6"]))
    assert m["resumed_from"] == str(out / f"checkpoint-{STEPS}") and m["global_step"] == 6 and m["world_size"] == 1
    lines = [x for x in capsys.readouterr().out.splitlines() if "world size 2 -> 1" in x]
    assert lines == [f"[scalesft] world size 2 -> 1 since checkpoint-{STEPS}, same global batch 8: 64 training rows "
                     "divide into whole steps, so every step sees the same rows as before; continuing exactly"]
    straight = tmp_path / "straight"
    train(load_recipe(path, ["training.max_steps=6", f"training.output_dir={straight}"]))
    a, b = load_file(out / "adapter_model.safetensors"), load_file(straight / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # The same change where the rows do not divide into whole steps is refused before anything loads.
    shutil.rmtree(out)
    proc = subprocess.run([sys.executable, "-m", "scalesft.launch.cli", "train", str(path), "--gpus", "2", "--strategy", "ddp",
                           "--device", "cpu", "--port", "0", "data.limit=60"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before = snapshot(out)
    assert main([str(path), "data.limit=60", "training.max_steps=6"]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if "scalesft" in x]
    assert len(err) == 1 and "was written by 2 process(es), this run has 1: 60 training rows are not a multiple of " \
                              "the global batch 8" in err[0], err
    assert snapshot(out) == before


def test_finished_by_steps_or_by_epochs():
    epochs = {"max_steps": -1, "num_train_epochs": 1.0}
    assert resume.finished(3, 1.0, 3, {"max_steps": 3}, None, None)
    assert not resume.finished(5, 1.0, 3, {"max_steps": 3}, None, None)
    assert resume.finished(5, 1.0, 0, None, None, {"global_step": 6})  # checkpoints deleted, completed at 6
    # Epoch runs: finished at the checkpoint's own end only for the same run length.
    assert resume.finished(-1, 1.0, 8, {"max_steps": 8}, epochs, None)
    assert not resume.finished(-1, 2.0, 8, {"max_steps": 8}, epochs, None)
    assert not resume.finished(-1, 1.0, 5, {"max_steps": 8}, epochs, None)
    assert resume.finished(-1, 1.0, 8, None, None, {"global_step": 8, **epochs})
    assert not resume.finished(-1, 3.0, 8, None, None, {"global_step": 8, **epochs})
