"""Resume identity: an output_dir remembers what produced it, so a rerun continues the same run or says why not.

A run records RUN_FILE (output_dir/scalesft_run.json) before it trains: its identity (the recipe minus the
run-length and bookkeeping fields, a content hash of the data file, the model's config/weights/tokenizer, the
scalesft version), the world size, and, once it finished, the step it finished at. A later run in the same
output_dir compares identities before any tokenizer or model loads (`plan`):

    same identity, finished (step >= max_steps)  -> nothing to do: one line saying where the adapter is
    same identity, unfinished                    -> continue from the newest complete checkpoint, exactly
    different identity (or none recorded)        -> one RecipeError naming each field old -> new and the ways out:
                                                    a fresh training.output_dir, training.resume=never (start
                                                    over here) or training.resume=force (continue anyway)

A world-size change at the same global batch continues exactly when every optimizer step sees the same rows:
true when the training rows are a multiple of the global batch (then each step takes the same consecutive
slice of the epoch's shuffled order whatever the micro batch x processes split; accelerate pads only the tail
of an epoch that does not divide). Otherwise it is refused (`check_world_size`).

Everything here is small and file-based: no torch, no model; `train.py` calls plan -> check_world_size ->
record -> ... -> mark_completed.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scalesft.core.recipe import Recipe, RecipeError

RUN_FILE = "scalesft_run.json"

NOT_IDENTITY = {
    "description",
    "model.name_or_path",  # replaced by the model's content (config, sampled weights, tokenizer): moving is fine
    "model.attn_implementation", "model.liger_kernel",  # same math, other kernels
    "data.path",  # replaced by the data's content hash
    "training.output_dir", "training.resume",
    "training.max_steps", "training.num_train_epochs",  # run length: raise it to train further
    "training.micro_batch_size",  # the global batch is the invariant; the split per process may change
    "training.gradient_checkpointing", "training.ddp_timeout",
    "training.logging_steps", "training.eval_steps", "training.save_steps", "training.save_total_limit",
    "training.report_to", "training.run_name", "training.wandb_project", "training.sample_prompts",
}
"""Recipe fields a continued run may change: run length, bookkeeping, and how (not what) it computes."""

MODEL_WEIGHTS = (".safetensors", ".bin", ".pt", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json")
SAMPLE = 1 << 20


# ---------------------------------------------------------------- fingerprints

def file_sha256(path: str | Path) -> str:
    from .data import file_digest  # one hashing function, memoised: the data cache key reads the same file

    return file_digest(path)


def _sampled_sha256(paths: list[Path]) -> str:
    """Names, sizes, and the first and last MiB of each file: tells weight files apart without reading GBs."""
    h = hashlib.sha256()
    for p in paths:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with open(p, "rb") as f:
            h.update(f.read(SAMPLE))
            if size > 2 * SAMPLE:
                f.seek(size - SAMPLE)
                h.update(f.read(SAMPLE))
    return h.hexdigest()


def data_fingerprint(recipe: Recipe, train_dataset=None) -> str:
    """sha256 of the data file's bytes; a name for builtin and HF-cache sets; datasets' own fingerprint when
    the caller passes a dataset."""
    if train_dataset is not None:
        return f"dataset:{getattr(train_dataset, '_fingerprint', len(train_dataset))}"
    path = recipe.data.path
    if path.startswith("builtin:"):
        return path
    if Path(path).is_file():
        return "sha256:" + file_sha256(path)
    if Path(path).suffix:
        return "missing"
    return f"hf-cache:{path}:{recipe.data.split}"


def _model_folder(name: str, revision: str | None) -> Path | None:
    if Path(name).is_dir():
        return Path(name)
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except Exception:  # not a valid repo id
        return None
    return Path(found).parent if isinstance(found, str) else None


def model_fingerprint(recipe: Recipe) -> dict[str, str]:
    """config.json, weights (sampled) and tokenizer files of a local folder or an HF-cache snapshot."""
    m = recipe.model
    if m.name_or_path.startswith("builtin:"):
        return {"model": m.name_or_path}
    folder = _model_folder(m.name_or_path, m.revision)
    if folder is None:
        return {"model": f"{m.name_or_path}@{m.revision or 'main'}"}
    files = sorted(p for p in folder.iterdir() if p.is_file())
    config = folder / "config.json"
    tok = [p for p in files if p.name in TOKENIZER_FILES]
    h = hashlib.sha256()
    for p in tok:
        h.update(f"{p.name}\0".encode() + p.read_bytes())
    return {"model.config": file_sha256(config) if config.is_file() else "none",
            "model.weights": _sampled_sha256([p for p in files if p.suffix in MODEL_WEIGHTS]),
            "model.tokenizer": h.hexdigest() if tok else "none"}


def code_version() -> str:
    try:
        from importlib.metadata import version

        return version("scalesft")
    except Exception:
        return "unknown"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in ("model", "quantization", "lora", "data", "training"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def identity(recipe: Recipe, train_dataset=None) -> dict[str, Any]:
    """What produced a run, as flat `field: value` pairs (JSON-safe). Reads files, loads nothing."""
    from scalesft.core.secrets import redacted

    fields = {k: v for k, v in _flatten(redacted(recipe.to_dict(), os.environ)).items() if k not in NOT_IDENTITY}
    return {**fields, "data.content": data_fingerprint(recipe, train_dataset), **model_fingerprint(recipe),
            "scalesft.version": code_version()}


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`field old -> new` for every field that differs (hashes shortened)."""
    def show(v):
        if v is None:
            return "(none)"
        s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
        for prefix in ("sha256:", ""):
            if s.startswith(prefix) and len(s) == len(prefix) + 64:
                return s[: len(prefix) + 12] + "..."
        return s
    return [f"{k} {show(old.get(k))} -> {show(new.get(k))}" for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)]


# ---------------------------------------------------------------- the record

def read_record(output_dir: str | Path) -> dict[str, Any] | None:
    path = Path(output_dir) / RUN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _write_record(output_dir: Path, record: dict[str, Any]) -> None:
    from .preemption import _atomic_write

    _atomic_write(output_dir / RUN_FILE, json.dumps(record, indent=1, ensure_ascii=False, default=str))


@dataclasses.dataclass
class Plan:
    """What this run does with its output_dir (decided by `plan`, identical on every rank)."""

    output_dir: Path
    identity: dict[str, Any]
    mode: str
    checkpoint: str | None = None
    """The complete checkpoint to continue from (None: start at step 0)."""
    step: int = 0
    finished: bool = False
    previous_world_size: int | None = None
    start_over: bool = False
    """training.resume=never over an existing run: its checkpoints are removed by `record`."""
    forced: list[str] = dataclasses.field(default_factory=list)
    """Differences that training.resume=force accepted."""
    data_path: str = ""
    model_path: str = ""
    run_length: dict[str, Any] = dataclasses.field(default_factory=dict)

    def finished_line(self) -> str:
        adapter = self.output_dir if (self.output_dir / "adapter_model.safetensors").is_file() else self.checkpoint
        return (f"[scalesft] {self.output_dir} already finished this run at step {self.step}: nothing to train; "
                f"the adapter is in {adapter} (raise training.max_steps to train further, or start over with "
                "training.resume=never or a fresh training.output_dir)")


def _checkpoint_state(ckpt: str) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / "trainer_state.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _marker(ckpt: str) -> dict[str, Any]:
    from .preemption import COMPLETE_MARKER

    try:
        return json.loads((Path(ckpt) / COMPLETE_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def ways_out(ckpt: str | None) -> str:
    cont = f"training.resume=force to continue from {Path(ckpt).name} anyway" if ckpt else \
        "training.resume=force to keep going anyway"
    return (f"use a fresh training.output_dir, or set training.resume=never to start over in this one (its "
            f"checkpoints are deleted) or {cont}")


def plan(recipe: Recipe, *, train_dataset=None) -> Plan:
    """Compare this recipe with what produced training.output_dir. Raises RecipeError on a mismatch."""
    from .preemption import checkpoints, latest_complete_checkpoint

    t = recipe.training
    out = Path(t.output_dir)
    new = identity(recipe, train_dataset)
    p = Plan(output_dir=out, identity=new, mode=t.resume, data_path=recipe.data.path,
             model_path=recipe.model.name_or_path,
             run_length={"max_steps": t.max_steps, "num_train_epochs": t.num_train_epochs})
    record = read_record(out)
    ckpt = latest_complete_checkpoint(out)
    completed = (record or {}).get("completed")
    if t.resume == "never":
        p.start_over = bool(record or checkpoints(out))
        return p
    if ckpt is None and not completed:
        return p  # nothing to continue and nothing finished: a fresh run (an old record is replaced)
    if record is None:
        if t.resume != "force":
            raise RecipeError(f"training.output_dir '{out}' holds {Path(ckpt).name if ckpt else 'a finished run'} "
                              f"but no {RUN_FILE} saying what produced it, so continuing could mix two runs: "
                              + ways_out(ckpt))
        p.forced = ["(no record of the previous run)"]
    else:
        diff = differences(record.get("identity", {}), new)
        if diff and t.resume != "force":
            raise RecipeError(f"training.output_dir '{out}' holds a run that differs from this recipe: "
                              f"{'; '.join(diff)}. Continuing would mix the two runs: " + ways_out(ckpt))
        p.forced = diff
    p.previous_world_size = record.get("world_size") if record else None
    if ckpt:
        p.checkpoint = ckpt
        state = _checkpoint_state(ckpt)
        p.step = int(state.get("global_step", Path(ckpt).name.split("-")[1]))
        p.previous_world_size = _marker(ckpt).get("world_size", p.previous_world_size)
    p.finished = finished(t.max_steps, t.num_train_epochs, p.step, ckpt and _checkpoint_state(ckpt),
                          (record or {}).get("run_length"), completed)
    if p.finished:
        p.step = max(p.step, int((completed or {}).get("global_step", -1)))
    return p


def finished(max_steps: int, num_train_epochs: float, ckpt_step: int, ckpt_state: dict | None,
             run_length: dict | None, completed: dict | None) -> bool:
    """Whether the recorded run already reached this recipe's end (so training again would add steps)."""
    done = max(ckpt_step, int((completed or {}).get("global_step", -1)))
    if max_steps > 0:
        return done >= max_steps
    # Epochs: the end is known only for the same run length (the step count follows from the data).
    same = {"max_steps": max_steps, "num_train_epochs": num_train_epochs}
    if completed and {k: completed.get(k) for k in same} == same:
        return True
    return bool(ckpt_state) and run_length == same and ckpt_step >= int(ckpt_state.get("max_steps", 1 << 62))


def check_world_size(p: Plan, *, world_size: int, train_rows: int, global_batch: int, packing: bool) -> str | None:
    """None, or the one line announcing a world-size change that continues exactly. Raises when the change
    would alter which rows each optimizer step sees."""
    old = p.previous_world_size
    if p.checkpoint is None or old is None or old == world_size:
        return None
    exact = not packing and train_rows % global_batch == 0
    if exact:
        return (f"[scalesft] world size {old} -> {world_size} since {Path(p.checkpoint).name}, same global batch "
                f"{global_batch}: {train_rows} training rows divide into whole steps, so every step sees the same "
                "rows as before; continuing exactly")
    why = ("data.packing: the steps count bins, which cannot be checked before packing" if packing else
           f"{train_rows} training rows are not a multiple of the global batch {global_batch}, so the last step "
           "of each epoch takes different rows at a different world size")
    if p.mode == "force":
        return (f"[scalesft] world size {old} -> {world_size} since {Path(p.checkpoint).name} "
                f"(training.resume=force): the data order differs from an uninterrupted run ({why})")
    raise RecipeError(f"{Path(p.checkpoint).name} in '{p.output_dir}' was written by {old} process(es), this run "
                      f"has {world_size}: {why}. Resume with {old} process(es), or " + ways_out(p.checkpoint))


def record(p: Plan, *, world_size: int) -> list[str]:
    """Rank 0, after every check passed and before training: write RUN_FILE (and, for training.resume=never,
    remove the previous run's checkpoints). Returns lines to print."""
    from .preemption import checkpoints

    lines = []
    p.output_dir.mkdir(parents=True, exist_ok=True)
    if p.start_over:
        old = checkpoints(p.output_dir)
        for _, path in old:
            shutil.rmtree(path, ignore_errors=True)
        for name in ("wandb_run_id", "train_metrics.json"):
            (p.output_dir / name).unlink(missing_ok=True)
        lines.append(f"[scalesft] training.resume=never: starting over in {p.output_dir} "
                     f"({len(old)} checkpoint(s) of the previous run removed)")
    elif p.forced:
        lines.append(f"[scalesft] training.resume=force: continuing from {p.checkpoint or 'step 0'} although "
                     f"{'; '.join(p.forced)} (optimizer and scheduler state come from the checkpoint)")
    _write_record(p.output_dir, {
        "identity": p.identity, "world_size": world_size, "run_length": p.run_length, "completed": None,
        "data_path": p.data_path, "model_path": p.model_path, "updated": time.time()})
    return lines


def mark_completed(output_dir: str | Path, *, global_step: int, max_steps: int, num_train_epochs: float) -> None:
    """Rank 0, after the final adapter is saved."""
    rec = read_record(output_dir) or {}
    rec["completed"] = {"global_step": global_step, "max_steps": max_steps, "num_train_epochs": num_train_epochs,
                        "time": time.time()}
    _write_record(Path(output_dir), rec)


# ---------------------------------------------------------------- failing saves

class SaveError(RecipeError):
    """A checkpoint or adapter write failed for disk space or permissions: said by whichever rank hit it (it
    may be the only one)."""


DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
TORCH_WRITE_ERRORS = ("iostream error", "unexpected pos", "PytorchStreamWriter failed", "file write failed")


def save_failure(exc: BaseException) -> bool:
    """A write that failed for disk space or permissions (torch.save reports those as RuntimeError text)."""
    if isinstance(exc, OSError):
        return exc.errno in DISK_ERRNOS
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in TORCH_WRITE_ERRORS)


def save_failure_line(output_dir: str | Path, folder: str | Path, exc: BaseException) -> str:
    from .preemption import latest_complete_checkpoint

    out = Path(output_dir)
    probe = out if out.exists() else out.parent
    try:
        free = f"{shutil.disk_usage(probe).free / 2**30:.2f} GiB free on its disk"
    except OSError:
        free = "free space unknown"
    cause = os.strerror(exc.errno) if isinstance(exc, OSError) and exc.errno else str(exc).splitlines()[0][:120]
    ckpt = latest_complete_checkpoint(out)
    where = f"the newest complete checkpoint is {ckpt}: free space (or fix the permissions) and rerun to resume " \
            "there" if ckpt else "no complete checkpoint yet: free space (or fix the permissions) and rerun"
    return f"saving into {folder} failed ({cause}; {free}); {where}"


@contextmanager
def save_errors(output_dir: str | Path, trainer=None):
    """Turn a save that failed for disk space/permissions into one RecipeError line naming the folder: the
    checkpoint being written when `trainer` is given (a save inside trainer.train), else output_dir itself."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        if not save_failure(e):
            raise
        folder = Path(output_dir) / f"checkpoint-{trainer.state.global_step}" if trainer else output_dir
        raise SaveError(save_failure_line(output_dir, folder, e)) from None
