"""The effective-batch math. Pure functions: world size is a parameter, never read from the environment.

The global batch (sequences per optimizer step) is the invariant a recipe fixes. The gradient accumulation
is derived from it for each world size: global = micro x accumulation x world_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class BatchError(ValueError):
    """A global batch that no accumulation can reach at this world size."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchPlan:
    global_batch_size: int
    micro_batch_size: int
    world_size: int
    gradient_accumulation_steps: int

    @property
    def sequences_per_micro_step(self) -> int:
        """Sequences all ranks process together in one forward/backward."""
        return self.micro_batch_size * self.world_size


def _divisors(n: int) -> list[int]:
    return sorted({d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)})


def plan_batch(global_batch_size: int, micro_batch_size: int, world_size: int) -> BatchPlan:
    """Return the batch plan, or raise BatchError naming every factor and the nearest valid choices."""
    for name, value in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                        ("world_size", world_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BatchError(f"training.{name} must be a positive integer, got {value!r}")
    per_step = micro_batch_size * world_size
    if global_batch_size % per_step:
        micro_ok = [m for m in _divisors(global_batch_size) if (global_batch_size // m) % world_size == 0]
        lower = (global_batch_size // per_step) * per_step
        globals_ok = sorted({g for g in (lower, lower + per_step) if g > 0})
        hint = []
        if micro_ok:
            hint.append(f"training.micro_batch_size in {micro_ok}")
        hint.append(f"training.global_batch_size in {globals_ok}")
        raise BatchError(
            f"training.global_batch_size={global_batch_size} is not divisible by micro_batch_size "
            f"({micro_batch_size}) x world_size ({world_size}) = {per_step}; use " + " or ".join(hint)
        )
    return BatchPlan(global_batch_size=global_batch_size, micro_batch_size=micro_batch_size,
                     world_size=world_size, gradient_accumulation_steps=global_batch_size // per_step)


def steps_per_epoch(num_rows: int, global_batch_size: int) -> int:
    """Optimizer steps in one epoch over num_rows training rows (the last partial batch counts as a step,
    as transformers' Trainer does)."""
    if num_rows < 1:
        raise BatchError(f"the training set is empty (0 rows); it needs at least {global_batch_size}")
    return math.ceil(num_rows / global_batch_size)


def repeated_rows_per_epoch(num_rows: int, micro_batch_size: int, world_size: int) -> int:
    """Rows that an epoch serves twice so every rank gets the same number of full micro batches (accelerate's
    even_batches cycles back to the first rows). Non-zero means an N-process epoch is not the 1-process epoch
    at its very end: its last optimizer step differs from the 1-process run's."""
    per_round = micro_batch_size * world_size
    return math.ceil(num_rows / per_round) * per_round - num_rows
