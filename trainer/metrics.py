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
    """Times the training loop; the loss-bearing token count comes from the trainer (see train.py)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.end = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()


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
        "world_size": acc.num_processes,
        **extra,
    }


def write(path: Path, metrics: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, ensure_ascii=False))
    tmp.replace(path)
