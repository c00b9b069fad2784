"""Preemption and complete checkpoints.

On SIGUSR1 or SIGTERM (or when the file named by SCALESFT_STOP_FILE appears), every rank learns it at the next
optimizer-step end through an all-reduce of one flag, so all ranks stop at the SAME step: the Trainer saves a
full checkpoint there (adapter, optimizer, scheduler, RNG of every rank, trainer state with the step, from
which the data position follows) and leaves its loop; train.py then exits without writing a final adapter.

transformers 5.23 writes `checkpoint-N/` in place, file by file, from several ranks, with no barrier at the end
(`Trainer._save_checkpoint`), and `get_last_checkpoint` picks the highest N whether or not it was finished. So a
checkpoint counts as complete only once it holds COMPLETE_MARKER: written by rank 0 after a barrier that
follows every rank's writes, through a temp file + fsync + rename, so it exists whole or not at all.
`latest_complete_checkpoint` resumes from the newest checkpoint that has it. Rotation (save_total_limit) is
ours too (`rotate`, after the marker): transformers' own rotation runs inside the save, before any marker, and
could delete the last complete checkpoint while the new one is still being written.

The launcher (slurm/train.sh) reads SCALESFT_STATUS_FILE, which rank 0 writes at the end: "preempted step=N"
(requeue me) or "completed step=N".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from .console import say

COMPLETE_MARKER = "scalesft_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint-N folder, oldest first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def is_complete(checkpoint: str | Path) -> bool:
    return (Path(checkpoint) / COMPLETE_MARKER).is_file()


def latest_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest checkpoint-N in output_dir that holds the completion marker, or None."""
    for _, path in reversed(checkpoints(output_dir)):
        if is_complete(path):
            return str(path)
    return None


def remove_incomplete_after(output_dir: str | Path, resume: str | None) -> list[str]:
    """Delete checkpoint folders newer than `resume` that never completed (a save cut short by a crash or a
    kill): the run will write them again. Rank 0 only. Returns what was removed."""
    resume_step = int(_CHECKPOINT.match(Path(resume).name).group(1)) if resume else -1
    removed = []
    for step, path in checkpoints(output_dir):
        if step > resume_step and not is_complete(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(str(path))
    return removed


def rotate(output_dir: str | Path, limit: int | None) -> list[str]:
    """Keep the newest `limit` COMPLETE checkpoints; delete older complete ones (marker first, so a deletion cut
    short never looks complete). Checkpoints newer than the newest complete one (a save in flight) are never
    touched, nor counted. Rank 0 only. Returns what was removed."""
    if not limit or limit <= 0:
        return []
    complete = [path for _, path in checkpoints(output_dir) if is_complete(path)]
    removed = []
    for path in complete[: max(0, len(complete) - limit)]:
        (path / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(str(path))
    return removed


def write_status(text: str) -> None:
    """Rank 0: tell the launcher how this run ended (no-op outside slurm/train.sh)."""
    path = os.environ.get("SCALESFT_STATUS_FILE")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(Path(path), text + "\n")


class PreemptionCallback(TrainerCallback):
    """Stop all ranks at the same optimizer-step boundary after a signal, with a complete checkpoint; mark
    every checkpoint complete once all ranks have written it."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, stop_file: str | None = None, install_handlers: bool = True,
                 save_total_limit: int | None = None) -> None:
        self.stop_file = stop_file if stop_file is not None else os.environ.get("SCALESFT_STOP_FILE")
        self.save_total_limit = save_total_limit
        """Applied by `rotate` after each checkpoint is complete (give transformers save_total_limit=None)."""
        self.signal_received: int | None = None
        self.stopped_at: int | None = None
        """The global step at which all ranks agreed to stop (None: not stopped by a request)."""
        if install_handlers and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:  # async-signal context: only set a flag
        self.signal_received = signum

    def requested_here(self) -> bool:
        return self.signal_received is not None or bool(self.stop_file and os.path.exists(self.stop_file))

    @staticmethod
    def _any_rank(flag: bool, device) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank(self.requested_here(), args.device):
            self.stopped_at = state.global_step
            control.should_save = True
            control.should_training_stop = True
            if state.is_world_process_zero:
                why = signal.Signals(self.signal_received).name if self.signal_received else "stop request"
                say(f"{why}: all ranks stop after step {state.global_step}; saving a checkpoint", err=True)
        return control

    def on_save(self, args, state, control, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its part (RNG state, shards) of checkpoint-N
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                files = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
                _atomic_write(ckpt / COMPLETE_MARKER, json.dumps(
                    {"global_step": state.global_step, "world_size": args.world_size, "time": time.time(),
                     "files": files}, indent=1))
                rotate(args.output_dir, self.save_total_limit)
        return control

    def preempted(self, state) -> bool:
        """True when training stopped on a request before reaching its last step."""
        return self.stopped_at is not None and state.global_step < state.max_steps


# ---------------------------------------------------------------- helper processes and shutdown

_lost_trackers: list[str] = []


def trackers_lost() -> list[str]:
    """Names of tracker callbacks that failed during this process's training (their logging stopped)."""
    return list(_lost_trackers)


def _abandon_wandb() -> None:
    """Detach from a W&B service that died: stop its console capture and its atexit teardown (which would
    raise or hang on the dead socket), so the rest of the run and the exit never touch it again."""
    try:
        import wandb

        if wandb.run is not None:
            wandb.run._console_stop()
    except Exception:
        pass
    try:
        import wandb

        wandb.teardown()  # unregisters its atexit hook first, then fails on the dead socket
    except Exception:
        pass


def shield_trackers(trainer) -> None:
    """Keep the run alive when a tracker's helper process dies. Slurm delivers a job's SIGTERM (scancel,
    requeue, preemption) to every process of the step, W&B's wandb-core included (wandb starts it in its own
    session, but Slurm signals by process tree or cgroup, and Go programs cannot ignore SIGTERM); its next
    call from the Trainer then raised ConnectionResetError in WandbCallback.on_log, before the promised
    checkpoint. Here every callback event of a tracker after its set-up is guarded: the first failure prints
    one line, detaches the tracker and the run goes on (the preemption checkpoint included). A failing
    set-up (wandb.init: no key, no network) still stops the run: that is a configuration error."""
    _lost_trackers.clear()
    for cb in trainer.callback_handler.callbacks:
        if type(cb).__name__ in ("WandbCallback", "TensorBoardCallback"):
            _guard(cb, _abandon_wandb if type(cb).__name__ == "WandbCallback" else (lambda: None))


def _guard(cb, abandon) -> None:
    name = type(cb).__name__
    dead = []

    def wrap(event, fn):
        def call(*args, **kwargs):
            if dead:
                return None
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                dead.append(event)
                _lost_trackers.append(name)
                say(f"{name}.{event} failed ({type(e).__name__}: {str(e)[:160]}): its tracker is gone "
                    "(a helper process killed?); logging to it stops here, training and checkpoints go on",
                    err=True)
                abandon()
                return None
        return call

    for event in dir(type(cb)):
        if event.startswith("on_") and event != "on_train_begin" and callable(getattr(cb, event)):
            setattr(cb, event, wrap(event, getattr(cb, event)))


def shutdown() -> None:
    """After a successful run on every rank: meet, then destroy the process group, so no rank exits while
    another still uses the store or a backend thread is alive at interpreter exit (which aborted a rank with
    'terminate called without an active exception')."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
