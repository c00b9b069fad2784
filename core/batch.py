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


# ---------------------------------------------------------------- micro_batch_size: auto
#
# The micro-batch is a plan output. For padded (or packed) data it is a row count: the largest divisor of
# global / world whose rows fit the token budget. For padding-free data it is a TOKEN budget: each optimizer
# step's global batch (the same rows a fixed micro batch would take, in the same order) is dealt to the ranks,
# row counts equal to within one and tokens balanced, and each rank's share is split into exactly k
# micro-batches of at most `budget` tokens. k (the gradient accumulation the Trainer sees) is the same for every
# step and rank, computed up front from the dataset's real lengths: every rank runs the same number of
# forward/backward passes, so no collective is ever missed. The loss is normalised over the whole global batch
# (num_items_in_batch), so how the rows are grouped changes only the floating-point summation order.


def nearest_global_batches(global_batch_size: int, multiple: int) -> list[int]:
    """The two global batches nearest to global_batch_size that are multiples of `multiple` (> 0)."""
    lower = (global_batch_size // multiple) * multiple
    return sorted({g for g in (lower, lower + multiple) if g > 0})


def _world_refusal(global_batch_size: int, world_size: int) -> BatchError:
    return BatchError(f"training.global_batch_size={global_batch_size} is smaller than the world size "
                      f"({world_size}): every process needs at least one sequence per optimizer step; use "
                      f"training.global_batch_size >= {world_size} or at most {global_batch_size} processes")


def plan_auto_rows(global_batch_size: int, world_size: int, rows_that_fit: int) -> BatchPlan:
    """micro_batch_size auto on padded/packed data: the largest micro batch that divides global / world and
    holds at most rows_that_fit rows (at least 1)."""
    if global_batch_size < world_size:
        raise _world_refusal(global_batch_size, world_size)
    if global_batch_size % world_size:
        raise BatchError(f"training.global_batch_size={global_batch_size} is not divisible by the world size "
                         f"({world_size}), which padded batches (data.padding_free: false or data.packing: true) "
                         "need; use training.global_batch_size in "
                         f"{nearest_global_batches(global_batch_size, world_size)} or data.padding_free: true")
    per_rank = global_batch_size // world_size
    micro = max(d for d in _divisors(per_rank) if d <= max(1, rows_that_fit))
    return plan_batch(global_batch_size, micro, world_size)


@dataclass(frozen=True, kw_only=True, slots=True)
class TokenPlan:
    """Micro-batches sized by tokens, fixed for a whole run (core/batch.py, micro_batch_size auto)."""

    global_batch_size: int
    world_size: int
    micro_batch_tokens: int
    gradient_accumulation_steps: int
    """Micro-steps of every optimizer step (the last step of an epoch: tail_accumulation_steps)."""
    tail_accumulation_steps: int
    """Micro-steps of an epoch's last, partial optimizer step (0: the epoch has none)."""
    steps_per_epoch: int
    repeated_rows_per_epoch: int
    """Rows an epoch serves twice so every rank holds a row in its last step (0 unless that step has fewer
    rows than processes)."""
    num_rows: int

    @property
    def micro_batch_size(self) -> int:
        """Rows per micro-step on average (what the Trainer and DeepSpeed are told as the per-device batch)."""
        return max(1, self.global_batch_size // (self.world_size * self.gradient_accumulation_steps))

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches one rank runs in an epoch."""
        full = self.num_rows // self.global_batch_size
        return full * self.gradient_accumulation_steps + self.tail_accumulation_steps


def check_token_budget(budget: int, max_seq_length: int) -> None:
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < max_seq_length:
        raise BatchError(f"training.micro_batch_tokens={budget!r} is below data.max_seq_length={max_seq_length}: "
                         "one row must fit one micro-batch; raise it or set training.micro_batch_tokens: auto")


def max_token_accumulation(global_batch_size: int, world_size: int, budget: int, max_seq_length: int) -> int:
    """The largest accumulation any data can need: every row max_seq_length long (first-fit-decreasing packs
    at least budget // max_seq_length rows into every micro-batch but the last of a rank)."""
    if global_batch_size < world_size:
        raise _world_refusal(global_batch_size, world_size)
    rows = math.ceil(global_batch_size / world_size)
    return math.ceil(rows / max(1, budget // max_seq_length))


def epoch_steps(order: list[int], global_batch_size: int, world_size: int) -> list[list[int]]:
    """An epoch's row order cut into optimizer steps of global_batch_size rows (as the Trainer cuts a fixed
    micro batch's epoch); a last step with fewer rows than processes is topped up from the epoch's start."""
    steps = [order[i:i + global_batch_size] for i in range(0, len(order), global_batch_size)]
    if steps and len(steps[-1]) < world_size:
        need = world_size - len(steps[-1])
        steps[-1] = steps[-1] + (order * math.ceil(need / len(order)))[:need]
    return steps


def deal(rows: list[int], lengths, world_size: int) -> list[list[int]]:
    """Deal one step's rows to the ranks: counts equal to within one, tokens balanced (longest row first to the
    rank with the fewest tokens that may still take one). Deterministic; each rank's rows keep step order."""
    import heapq

    base, extra = divmod(len(rows), world_size)
    pos = {r: i for i, r in enumerate(rows)}
    ranks: list[list[int]] = [[] for _ in range(world_size)]
    heap = [(0, 0, k) for k in range(world_size)]  # (tokens, rows, rank): a rank leaves it once it is full
    big = 0  # ranks already holding base + 1 rows
    for r in sorted(rows, key=lambda r: (-lengths[r], pos[r])):
        while True:
            tokens, n, k = heapq.heappop(heap)
            if n < base or (n == base and big < extra):
                break  # a rank at base rows once the base + 1 places are taken never takes another
        big += n == base
        ranks[k].append(r)
        heapq.heappush(heap, (tokens + lengths[r], n + 1, k))
    return [sorted(x, key=pos.__getitem__) for x in ranks]


def ffd(rows: list[int], lengths, budget: int) -> list[list[int]]:
    """First-fit-decreasing bins of at most `budget` tokens (a row longer than the budget goes alone)."""
    bins: list[list[int]] = []
    loads: list[int] = []
    for r in sorted(rows, key=lambda r: -lengths[r]):
        n = lengths[r]
        for i, load in enumerate(loads):
            if load + n <= budget:
                bins[i].append(r)
                loads[i] += n
                break
        else:
            bins.append([r])
            loads.append(n)
    return bins


def split_rows(rows: list[int], lengths, k: int, budget: int) -> list[list[int]]:
    """Exactly k non-empty micro-batches of at most `budget` tokens each, tokens balanced, largest first; each
    keeps its rows in step order. Needs k <= len(rows) and k >= len(ffd(rows, lengths, budget))."""
    if not 1 <= k <= len(rows):
        raise BatchError(f"cannot split {len(rows)} rows into {k} micro-batches")
    import heapq

    pos = {r: i for i, r in enumerate(rows)}
    ordered = sorted(rows, key=lambda r: (-lengths[r], pos[r]))
    heap = [(0, i) for i in range(k)]
    bins: list[list[int]] = [[] for _ in range(k)]
    loads = [0] * k
    for r in ordered:  # longest processing time first: each row to the least-loaded micro-batch
        load, i = heapq.heappop(heap)
        bins[i].append(r)
        loads[i] = load + lengths[r]
        heapq.heappush(heap, (loads[i], i))
    if max(loads) > budget and any(len(b) > 1 and loads[i] > budget for i, b in enumerate(bins)):
        bins = ffd(rows, lengths, budget)  # feasible by construction; then split until there are k
        if len(bins) > k:
            raise BatchError(f"{len(rows)} rows need {len(bins)} micro-batches of {budget} tokens, more than {k}")
        while len(bins) < k:
            i = max(range(len(bins)), key=lambda j: (len(bins[j]), sum(lengths[r] for r in bins[j]), -j))
            bins.append([bins[i].pop()])  # the shortest row of the fullest micro-batch starts a new one
    bins = [sorted(b, key=pos.__getitem__) for b in bins]
    return sorted(bins, key=lambda b: (-sum(lengths[r] for r in b), pos[b[0]]))


def step_need(rows: list[int], lengths, world_size: int, budget: int) -> tuple[int, int]:
    """(micro-batches the neediest rank needs, rows of the rank holding fewest) for one step."""
    ranks = deal(rows, lengths, world_size)
    return max(len(ffd(x, lengths, budget)) for x in ranks), min(len(x) for x in ranks)


def layout_step(rows: list[int], lengths, world_size: int, budget: int, k: int) -> list[list[list[int]]]:
    """[rank][micro-step] -> row indices for one optimizer step."""
    return [split_rows(x, lengths, k, budget) for x in deal(rows, lengths, world_size)]


def plan_token_batches(orders, lengths, *, global_batch_size: int, world_size: int, budget: int) -> TokenPlan:
    """The accumulation every step of the run needs, from the row orders of every epoch it touches."""
    if global_batch_size < world_size:
        raise _world_refusal(global_batch_size, world_size)
    n = len(lengths)
    if n < 1:
        raise BatchError("the training set is empty (0 rows)")
    if n < world_size:
        raise BatchError(f"{n} training rows for {world_size} processes: every process needs at least one row")
    k_full = k_tail = 0
    needs = []  # per step: (micro-batches its neediest rank needs, rows of its rank with fewest, last partial?)
    for order in orders:
        steps = epoch_steps(list(order), global_batch_size, world_size)
        tail = n % global_batch_size != 0
        for i, rows in enumerate(steps):
            need, fewest = step_need(rows, lengths, world_size, budget)
            is_tail = tail and i == len(steps) - 1
            needs.append((need, fewest, is_tail))
            if is_tail:
                k_tail = max(k_tail, need)
            else:
                k_full = max(k_full, need)
    k = max(k_full, k_tail)
    short = [(fewest, is_tail) for need, fewest, is_tail in needs if (k_tail if is_tail else k) > fewest]
    if short:
        fewest, is_tail = short[0]
        where = ("the epoch's last, partial step" if is_tail else "a step")
        raise BatchError(f"with training.micro_batch_tokens={budget} a rank needs {k_tail if is_tail else k} "
                         f"micro-steps in {where} but another holds only {fewest} rows there: raise "
                         "training.micro_batch_tokens to at least twice data.max_seq_length (then any two rows "
                         "share a micro-batch and this cannot happen)")
    t = n % global_batch_size
    repeated = world_size - t if 0 < t < world_size else 0
    return TokenPlan(global_batch_size=global_batch_size, world_size=world_size, micro_batch_tokens=budget,
                     gradient_accumulation_steps=k, tail_accumulation_steps=k_tail,
                     steps_per_epoch=steps_per_epoch(n, global_batch_size), repeated_rows_per_epoch=repeated,
                     num_rows=n)


def epoch_layouts(order, lengths, plan: TokenPlan):
    """Per optimizer step of one epoch: [rank][micro-step] -> row indices (plan.gradient_accumulation_steps
    micro-steps, or plan.tail_accumulation_steps in the epoch's last, partial step)."""
    steps = epoch_steps(list(order), plan.global_batch_size, plan.world_size)
    tail = plan.num_rows % plan.global_batch_size != 0
    for i, rows in enumerate(steps):
        k = plan.tail_accumulation_steps if tail and i == len(steps) - 1 else plan.gradient_accumulation_steps
        yield layout_step(rows, lengths, plan.world_size, plan.micro_batch_tokens, k)


def interleave(layout: list[list[list[int]]]) -> list[list[int]]:
    """One step's micro-batches in the order accelerate's BatchSamplerShard deals them (batch i to rank
    i % world): rank0-mb0, rank1-mb0, ..., rank0-mb1, ..."""
    return [layout[r][j] for j in range(len(layout[0])) for r in range(len(layout))]


@dataclass(frozen=True, kw_only=True, slots=True)
class Batching:
    """What one world size runs: rows per micro-batch (a BatchPlan), or a token budget per micro-batch whose
    accumulation the trainer fixes from the data's lengths (at most max_accumulation)."""

    global_batch_size: int
    world_size: int
    rows: BatchPlan | None = None
    micro_batch_tokens: int | None = None
    max_accumulation: int | None = None
    auto: bool = False
    budget_source: str = ""
    """Where micro_batch_tokens came from (recipe, memory model, CPU default)."""

    @property
    def by_tokens(self) -> bool:
        return self.rows is None
