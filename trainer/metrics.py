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


def count_tokens(inputs, counts=None):
    """Add one micro-batch's [loss-bearing tokens, processed tokens, causal attention pairs] to `counts`, a
    device tensor (no device-to-host sync: read it at log steps). A pair is one (query, key) of causal
    attention: a sequence of L tokens has L (L + 1) / 2, i.e. the sum of (position + 1) over its tokens."""
    import torch

    labels = inputs["labels"]
    loss = (labels[..., 1:] != -100).sum()
    mask, pos = inputs.get("attention_mask"), inputs.get("position_ids")
    if mask is None:  # padding-free / packed: every position is a real token, positions restart per sequence
        tokens = torch.tensor(labels.numel(), device=labels.device)
        pairs = (pos + 1).sum() if pos is not None else tokens * (tokens + 1) // 2
    else:  # padded rows: real tokens only, at each row's real length
        tokens = mask.sum()
        pairs = ((pos + 1) * mask).sum() if pos is not None else (mask.cumsum(-1) * mask).sum()
    new = torch.stack([loss, tokens, pairs]).to(torch.int64)
    return new if counts is None else counts.add_(new)


class ThroughputCallback(TrainerCallback):
    """Times the training loop and each optimizer step; the token counts come from the trainer (train.py: device
    tensors, see count_tokens). Once bound to the trainer it also adds, at every log step, the loss-bearing
    tokens/s since the last log (all ranks and per GPU), MFU (LoRA-correct FLOPs of every processed token at its
    real sequence length, attention included: core/flops.py) and the peak memory of every rank (gathered) to
    the logs, so the console, W&B and TensorBoard see them."""

    WARMUP_STEPS = 3
    """Steps left out of the steady-state numbers (allocator warm-up, first-step compilation, caches)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.end = 0.0
        self.trainer = None
        self.flops_terms: tuple[float, float] | None = None  # FLOPs per processed token, per causal pair
        self.device_name = "cpu"
        self.marks: list[tuple[float, Any]] = []  # (time, token counts on the device) per optimizer step
        self._last_log: tuple[float, list[int]] | None = None

    def bind(self, trainer, recipe=None) -> None:
        """Read token counts from `trainer`; run first among the callbacks so the log additions reach W&B."""
        from scalesft.core import flops

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
                self.flops_terms = flops.train_flops_terms(shape, lora_r=lo.r, lora_targets=lo.target_modules)
            except (TypeError, KeyError, ZeroDivisionError):
                self.flops_terms = None  # not a decoder config flops.py knows: no MFU

    def _counts(self):
        """The trainer's device counter (None before the first micro-step)."""
        counts = getattr(self.trainer, "token_counts", None) if self.trainer is not None else None
        return None if counts is None else counts.clone()

    @staticmethod
    def _read(counts) -> list[int]:
        return [0, 0, 0] if counts is None else [int(v) for v in counts.tolist()]

    def _flops(self, tokens: float, pairs: float) -> float | None:
        if not self.flops_terms:
            return None
        return self.flops_terms[0] * tokens + self.flops_terms[1] * pairs

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            self.device_name = torch.cuda.get_device_name()
        self.start = time.perf_counter()
        self._last_log = (self.start, self._read(self._counts()))

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer is None:
            return
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.marks.append((time.perf_counter(), self._counts()))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.trainer is None or logs is None or "loss" not in logs or self._last_log is None:
            return
        import torch

        from scalesft.core import flops

        acc = self.trainer.accelerator
        now, counts = time.perf_counter(), self._read(self._counts())  # the one read of the counters per log
        t0, counts0 = self._last_log
        self._last_log = (now, counts)
        delta = [a - b for a, b in zip(counts, counts0)]
        mine = torch.tensor([[*delta, peak_memory_gib()]], device=acc.device, dtype=torch.float64)
        every = acc.gather(mine).reshape(-1, 4).tolist()  # collective: every rank logs at the same steps
        dt = max(now - t0, 1e-9)
        total, processed, pairs = (sum(r[i] for r in every) for i in range(3))
        logs["tokens_per_second"] = round(total / dt, 1)
        logs["tokens_per_second_per_device"] = round(total / dt / len(every), 1)
        logs["processed_tokens_per_second"] = round(processed / dt, 1)
        work = self._flops(processed, pairs)
        if work is not None:
            m = flops.mfu(work, dt, self.device_name, len(every))
            if m is not None:
                logs["mfu"] = round(m, 4)
        logs["peak_memory_gib"] = round(max(r[3] for r in every), 3)
        for rank, r in enumerate(every):
            logs[f"peak_memory_gib/rank{rank}"] = round(r[3], 3)

    def on_train_end(self, args, state, control, **kwargs):
        self.end = time.perf_counter()

    def steady_state(self) -> dict[str, Any] | None:
        """This rank's tokens/s and s/step over the steps after WARMUP_STEPS (None if too few steps)."""
        m = self.marks
        w = min(self.WARMUP_STEPS, len(m) - 2)
        if w < 0 or len(m) < 2:
            return None
        (t0, c0), (t1, c1) = m[w], m[-1]
        (k0, p0, q0), (k1, p1, q1) = self._read(c0), self._read(c1)
        steps = len(m) - 1 - w
        out = {"from_step": w + 1, "steps": steps, "seconds_per_step": round((t1 - t0) / steps, 4),
               "tokens_per_second_per_device": round((k1 - k0) / (t1 - t0), 1) if t1 > t0 else None,
               "processed_tokens_per_second_per_device": round((p1 - p0) / (t1 - t0), 1) if t1 > t0 else None}
        work = self._flops(p1 - p0, q1 - q0)
        if work is not None and t1 > t0:
            from scalesft.core import flops

            m_ = flops.mfu(work, t1 - t0, self.device_name)
            out["mfu"] = round(m_, 4) if m_ is not None else None
        return out


def summarize(trainer, throughput: ThroughputCallback, loss_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Collective: every rank must call it. Returns the metrics dict (same on every rank)."""
    import torch

    acc = trainer.accelerator
    device = acc.device
    processed = ThroughputCallback._read(getattr(trainer, "token_counts", None))[1]
    tokens, processed = acc.reduce(torch.tensor([loss_tokens, processed], device=device, dtype=torch.float64),
                                   reduction="sum").tolist()
    peaks = acc.gather(torch.tensor([peak_memory_gib()], device=device, dtype=torch.float64))
    wall = throughput.end - throughput.start
    history = trainer.state.log_history
    return {
        "train_loss": [{"step": h["step"], "loss": h["loss"]} for h in history if "loss" in h],
        "eval_loss": [{"step": h["step"], "loss": h["eval_loss"]} for h in history if "eval_loss" in h],
        "global_step": trainer.state.global_step,
        "tokens_trained": int(tokens),
        "tokens_processed": int(processed),
        "tokens_per_second": round(tokens / wall, 2) if wall > 0 else None,
        "tokens_per_second_per_device": round(tokens / wall / acc.num_processes, 2) if wall > 0 else None,
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
