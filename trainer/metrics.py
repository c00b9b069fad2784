"""Throughput and memory: counted during training, summed/gathered over ranks, written to train_metrics.json."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


def peak_memory_gib() -> float:
    """This process's peak: CUDA allocated memory on a GPU, else the CPU resident set."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class ThroughputCallback(TrainerCallback):
    """Times the training loop and each optimizer step; the loss-bearing token count comes from the trainer (see
    train.py). Once bound to the trainer it also adds, at every log step, the tokens/s since the last log (all
    ranks and per GPU), MFU (LoRA-correct FLOPs of the linear layers, trainer/flops.py) and the peak memory of
    every rank (gathered) to the logs, so the console, W&B and TensorBoard see them."""

    WARMUP_STEPS = 3
    """Steps left out of the steady-state numbers (allocator warm-up, first-step compilation, caches)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.end = 0.0
        self.trainer = None
        self.flops_per_token = None
        self.device_name = "cpu"
        self.marks: list[tuple[float, int]] = []
        self._last_log: tuple[float, int] | None = None

    def bind(self, trainer, recipe=None) -> None:
        """Read token counts from `trainer`; run first among the callbacks so the log additions reach W&B."""
        from . import flops

        self.trainer = trainer
        handler = trainer.callback_handler
        if self in handler.callbacks:
            handler.callbacks.remove(self)
            handler.callbacks.insert(0, self)
        cfg = getattr(getattr(trainer.model, "config", None), "to_dict", lambda: None)()
        if cfg and recipe is not None:
            try:
                shape = flops.Shape.from_config(cfg)
                lo = recipe.lora
                self.flops_per_token = flops.train_flops(shape, [1], lora_r=lo.r, lora_targets=lo.target_modules)
            except (TypeError, KeyError, ZeroDivisionError):
                self.flops_per_token = None  # not a decoder config flops.py knows: no MFU

    def _tokens(self) -> int:
        return int(getattr(self.trainer, "loss_tokens", 0)) if self.trainer is not None else 0

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            self.device_name = torch.cuda.get_device_name()
        self.start = time.perf_counter()
        self._last_log = (self.start, self._tokens())

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is None:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), self._tokens()))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.trainer is None or logs is None or "loss" not in logs or self._last_log is None:
            return
        import torch

        from . import flops

        acc = self.trainer.accelerator
        now, tok = time.perf_counter(), self._tokens()
        t0, tok0 = self._last_log
        self._last_log = (now, tok)
        mine = torch.tensor([[tok - tok0, peak_memory_gib()]], device=acc.device, dtype=torch.float64)
        every = acc.gather(mine).reshape(-1, 2).tolist()  # collective: every rank logs at the same steps
        dt = max(now - t0, 1e-9)
        total = sum(r[0] for r in every)
        logs["tokens_per_second"] = round(total / dt, 1)
        logs["tokens_per_second_per_device"] = round(total / dt / len(every), 1)
        if self.flops_per_token:
            m = flops.mfu(self.flops_per_token * total, dt, self.device_name, len(every))
            if m is not None:
                logs["mfu"] = round(m, 4)
        logs["peak_memory_gib"] = round(max(r[1] for r in every), 3)
        for rank, r in enumerate(every):
            logs[f"peak_memory_gib/rank{rank}"] = round(r[1], 3)

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    def steady_state(self) -> dict[str, Any] | None:
        """This rank's tokens/s and s/step over the steps after WARMUP_STEPS (None if too few steps)."""
        m = self.marks
        w = min(self.WARMUP_STEPS, len(m) - 2)
        if w < 0 or len(m) < 2:
            return None
        (t0, k0), (t1, k1) = m[w], m[-1]
        steps = len(m) - 1 - w
        out = {"from_step": w + 1, "steps": steps, "seconds_per_step": round((t1 - t0) / steps, 4),
               "tokens_per_second_per_device": round((k1 - k0) / (t1 - t0), 1) if t1 > t0 else None}
        if self.flops_per_token and t1 > t0:
            from . import flops

            m_ = flops.mfu(self.flops_per_token * (k1 - k0), t1 - t0, self.device_name)
            out["mfu"] = round(m_, 4) if m_ is not None else None
        return out


def summarize(trainer, throughput: ThroughputCallback, loss_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Collective: every rank must call it. Returns the metrics dict (same on every rank)."""
    import torch

    acc = trainer.accelerator
    device = acc.device
    tokens = acc.reduce(torch.tensor([loss_tokens], device=device, dtype=torch.float64), reduction="sum")
    peaks = acc.gather(torch.tensor([peak_memory_gib()], device=device, dtype=torch.float64))
    wall = throughput.end - throughput.start
    history = trainer.state.log_history
    return {
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_loss": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "global_step": trainer.state.global_step,
        "tokens_trained": int(tokens.item()),
        "tokens_per_second": round(tokens.item() / wall, 2) if wall > 0 else None,
        "tokens_per_second_per_device": round(tokens.item() / wall / acc.num_processes, 2) if wall > 0 else None,
        "peak_memory_gib": round(float(peaks.max()), 3),
        "peak_memory_gib_per_rank": [round(float(p), 3) for p in peaks.tolist()],
        "wall_seconds": round(wall, 2),
        "steady_state": throughput.steady_state(),
        "world_size": acc.num_processes,
        **extra,
    }


def write(path: Path, metrics: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    tmp.replace(path)
