"""What a person sees: third-party noise off by default, one line per logged step, a summary at the end.

`quiet()` runs before the heavy imports. It keeps warnings a user can act on and drops the rest: deprecation
notices from inside the libraries, DeepSpeed's accelerator probe on CPU-only machines, bitsandbytes' optional
CPU-kernel notice, download/convert/save progress bars. Ranks other than 0 print no warnings at all, so a
warning appears once per run, not once per process. `--verbose` (SCALESFT_VERBOSE=1) keeps everything.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

VERBOSE_ENV = "SCALESFT_VERBOSE"


def say(line: str, *, err: bool = False) -> None:
    """Print one `[scalesft] ...` line in a single write, so lines from several ranks sharing one pipe never
    interleave mid-line (print() writes the text and the newline separately, which shows under
    PYTHONUNBUFFERED=1, as batch systems and containers often set)."""
    _write(sys.stderr if err else sys.stdout, f"[scalesft] {line}\n")


def error(line: str) -> None:
    """The one `scalesft: error: ...` line of a failed rank, on stderr, in a single write like say()."""
    _write(sys.stderr, f"scalesft: error: {line}\n")


def _write(stream, text: str) -> None:
    stream.write(text)
    stream.flush()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet(rank: int | None = None) -> None:
    """Silence third-party noise for this process (idempotent). Call before importing torch's stack."""
    if verbose():
        return
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # plain tqdm bars too (the one-time GGUF conversion's)
    os.environ.setdefault("ACCELERATE_LOG_LEVEL", "error")
    if "DS_ACCELERATOR" not in os.environ:
        try:
            import torch

            if not torch.cuda.is_available():
                # DeepSpeed probes for an accelerator on import and prints a warning to stdout when it finds none.
                os.environ["DS_ACCELERATOR"] = "cpu"
        except ImportError:
            pass
    # bitsandbytes: "Failed to load CPU gemm_4bit_forward from kernels-community" (an optional faster kernel).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for name in ("torch.distributed", "torch.distributed.elastic", "accelerate", "peft", "trl", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if rank != 0:
        warnings.simplefilter("ignore")
        return
    for category in (FutureWarning, DeprecationWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    # Library-internal notices a recipe cannot change.
    for pattern in (r".*use_reentrant.*", r".*torch\.utils\.checkpoint.*", r".*TypedStorage is deprecated.*",
                    r".*padding-free training.*", r".*`torch_dtype` is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)


def after_imports() -> None:
    """Progress bars and verbosity of the libraries themselves (they read the environment only at import)."""
    if verbose():
        return
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def one_line(text: str, limit: int = 160) -> str:
    """Whitespace folded, cut to `limit` characters with an ellipsis. Pure."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def step_line(step: int, max_steps: int, logs: dict, elapsed: float, start_step: int = 0) -> str:
    """One fixed human line per logged step: step, loss, lr, tokens/s, memory, ETA. Pure."""
    width = len(str(max_steps))
    parts = [f"step {step:>{width}}/{max_steps}"]
    if "loss" in logs:
        parts.append(f"loss {float(logs['loss']):.4f}")
    if "learning_rate" in logs:
        parts.append(f"lr {float(logs['learning_rate']):.2e}")
    if "tokens_per_second" in logs:
        parts.append(f"{float(logs['tokens_per_second']):,.0f} tok/s")
    if "peak_memory_gib" in logs:
        parts.append(f"mem {float(logs['peak_memory_gib']):.1f} GiB")
    done = step - start_step
    if 0 < done and step < max_steps:
        parts.append(f"ETA {duration(elapsed / done * (max_steps - step))}")
    return " · ".join(parts)


def console_callback():
    """A TrainerCallback (built lazily: this module is imported before transformers) with which rank 0 prints
    one line per logged step and one per evaluation, in place of transformers' progress bar and dicts."""
    from transformers import TrainerCallback

    class ConsoleCallback(TrainerCallback):
        def __init__(self) -> None:
            self.t0 = None
            self.start_step = 0

        def on_step_begin(self, args, state, control, **kwargs):
            if self.t0 is None:  # the first step of this process: after loading, resuming and eval_on_start
                self.t0 = time.perf_counter()
                self.start_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            elapsed = time.perf_counter() - (self.t0 or time.perf_counter())
            if "loss" in logs:
                line = step_line(state.global_step, state.max_steps, logs, elapsed, self.start_step)
                say(line)
            elif "eval_loss" in logs:
                say(f"eval at step {state.global_step}: loss {float(logs['eval_loss']):.4f}")

    return ConsoleCallback()


def install(trainer) -> None:
    """Swap transformers' console output (progress bar + dicts) for ConsoleCallback."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(console_callback())


def cli_command(path_env: str | None = None, executable: str | None = None, cwd: str | None = None) -> str:
    """How the user types this environment's `scalesft`: the bare name when PATH finds this very script (the venv is
    active), else its path (`.venv/bin/scalesft` after `./dev demo`, which runs it without activating)."""
    import shutil
    from pathlib import Path

    script = Path(executable or sys.executable).parent / "scalesft"
    found = shutil.which("scalesft", path=path_env if path_env is not None else os.environ.get("PATH", ""))
    if not script.is_file() or (found and Path(found).resolve() == script.resolve()):
        return "scalesft"
    try:
        return str(script.relative_to(cwd or os.getcwd()))
    except ValueError:
        return str(script)


def summary(result: dict, output_dir: str, demo_question: str | None = None, cli: str = "scalesft") -> list[str]:
    """The closing lines: loss first -> last, eval loss before -> after, speed, where the adapter is, next (each
    command as `cli` spells it). Pure."""
    losses = [x["loss"] for x in result.get("train_loss", [])]
    evals = [x["loss"] for x in result.get("eval_loss", [])]
    head = f"done in {duration(result.get('wall_seconds') or 0)}: {result['global_step']} steps"
    if losses:
        head += f", loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    if len(evals) >= 2:
        head += f", eval loss {evals[0]:.3f} -> {evals[-1]:.3f}"
    if result.get("tokens_per_second"):
        head += f", {result['tokens_per_second']:,.0f} loss tokens/s"
    if result.get("peak_memory_gib"):
        head += f", peak {result['peak_memory_gib']:.1f} GiB"
    q = demo_question or "질문을 입력하세요"
    return [head, f"adapter: {output_dir}",
            f'next: {cli} generate {output_dir} "{q}"  |  {cli} chat {output_dir}  |  '
            f"{cli} merge {output_dir} {output_dir}-merged"]
