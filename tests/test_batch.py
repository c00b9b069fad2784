"""The batch plan: global = micro x accumulation x world_size, for any world size (pure, no processes)."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scalesft.core.batch import BatchError, plan_batch, steps_per_epoch

sizes = st.integers(min_value=1, max_value=4096)
worlds = st.integers(min_value=1, max_value=1024)


@settings(max_examples=2000, deadline=None)
@given(global_batch=sizes, micro=st.integers(min_value=1, max_value=64), world=worlds)
def test_plan_is_exact_or_refused(global_batch, micro, world):
    """Either the plan reproduces the global batch exactly, or it is refused exactly when it cannot."""
    divisible = global_batch % (micro * world) == 0
    if divisible:
        p = plan_batch(global_batch, micro, world)
        assert p.micro_batch_size * p.gradient_accumulation_steps * p.world_size == global_batch
        assert p.gradient_accumulation_steps >= 1
    else:
        with pytest.raises(BatchError):
            plan_batch(global_batch, micro, world)


@settings(max_examples=1000, deadline=None)
@given(global_batch=sizes, micro=st.integers(min_value=1, max_value=64), world=worlds)
def test_refusal_suggests_only_valid_and_nearest_choices(global_batch, micro, world):
    per_step = micro * world
    if global_batch % per_step == 0:
        return
    with pytest.raises(BatchError) as e:
        plan_batch(global_batch, micro, world)
    msg = str(e.value)
    assert f"global_batch_size={global_batch}" in msg and f"({micro})" in msg and f"({world})" in msg
    globals_ok = [int(x) for x in re.search(r"global_batch_size in \[([\d, ]+)\]", msg).group(1).split(", ")]
    for g in globals_ok:  # every suggested global batch works with the same micro batch and world size
        assert plan_batch(g, micro, world).global_batch_size == g
        assert abs(g - global_batch) < per_step  # and is one of the two nearest
    m = re.search(r"micro_batch_size in \[([\d, ]+)\]", msg)
    micro_ok = [int(x) for x in m.group(1).split(", ")] if m else []
    for mb in micro_ok:  # every suggested micro batch keeps the global batch at this world size
        assert plan_batch(global_batch, mb, world).global_batch_size == global_batch
    # and none is missed
    assert micro_ok == [mb for mb in range(1, global_batch + 1) if global_batch % (mb * world) == 0]


@settings(max_examples=500, deadline=None)
@given(global_batch=st.integers(min_value=1, max_value=512), world=st.integers(min_value=1, max_value=64))
def test_accumulation_shrinks_as_world_grows(global_batch, world):
    """Doubling the world size halves the accumulation whenever both plans exist: the global batch is fixed."""
    try:
        a = plan_batch(global_batch, 1, world)
        b = plan_batch(global_batch, 1, world * 2)
    except BatchError:
        return
    assert a.gradient_accumulation_steps == 2 * b.gradient_accumulation_steps


@pytest.mark.parametrize("world", [1, 2, 3, 4, 6, 8, 16, 64, 128, 512])
def test_plan_at_many_world_sizes(world):
    global_batch = 1536  # 2^9 x 3: divisible by all of them
    p = plan_batch(global_batch, 1, world)
    assert p.gradient_accumulation_steps == global_batch // world
    assert p.sequences_per_micro_step == world


def test_known_plans():
    assert plan_batch(8, 2, 1).gradient_accumulation_steps == 4
    assert plan_batch(8, 2, 2).gradient_accumulation_steps == 2
    assert plan_batch(12, 2, 3).gradient_accumulation_steps == 2
    assert plan_batch(32, 4, 8).gradient_accumulation_steps == 1


def test_not_divisible_message():
    with pytest.raises(BatchError, match=r"global_batch_size=8 is not divisible by micro_batch_size \(2\) x "
                                         r"world_size \(3\) = 6; use training.global_batch_size in \[6, 12\]"):
        plan_batch(8, 2, 3)
    with pytest.raises(BatchError, match=r"micro_batch_size in \[1, 3\] or training.global_batch_size in \[6, 12\]"):
        plan_batch(9, 2, 3)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "8"])
def test_non_positive_or_non_int_inputs(bad):
    with pytest.raises(BatchError, match="must be a positive integer"):
        plan_batch(bad, 1, 1)
    with pytest.raises(BatchError, match="must be a positive integer"):
        plan_batch(8, 1, bad)


@given(rows=st.integers(min_value=1, max_value=100_000), global_batch=st.integers(min_value=1, max_value=4096))
def test_steps_per_epoch_covers_every_row_once(rows, global_batch):
    steps = steps_per_epoch(rows, global_batch)
    assert (steps - 1) * global_batch < rows <= steps * global_batch


def test_empty_training_set():
    with pytest.raises(BatchError, match="empty"):
        steps_per_epoch(0, 8)


def test_repeated_rows_per_epoch():
    from scalesft.core.batch import repeated_rows_per_epoch

    assert repeated_rows_per_epoch(64, 2, 2) == 0
    assert repeated_rows_per_epoch(64, 2, 3) == 2   # measured: 3 ranks see 66 rows in the first epoch
    assert repeated_rows_per_epoch(64, 2, 1) == 0
    assert repeated_rows_per_epoch(5, 4, 2) == 3


@given(rows=st.integers(min_value=1, max_value=10_000), micro=st.integers(min_value=1, max_value=16),
       world=st.integers(min_value=1, max_value=256))
def test_repeated_rows_fill_exactly_whole_rounds(rows, micro, world):
    from scalesft.core.batch import repeated_rows_per_epoch

    extra = repeated_rows_per_epoch(rows, micro, world)
    assert 0 <= extra < micro * world and (rows + extra) % (micro * world) == 0


# ---- micro_batch_size: auto --------------------------------------------------------------------------------

from scalesft.core.batch import (deal, epoch_layouts, epoch_steps, interleave,  # noqa: E402
                                 max_token_accumulation, nearest_global_batches, plan_token_batches,
                                 split_rows)

MAX_LEN = 128


def _orders(rng, n, epochs):
    return [rng.sample(range(n), n) for _ in range(epochs)]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), world=st.integers(min_value=1, max_value=16), global_batch=st.integers(1, 48),
       n=st.integers(1, 120), budget=st.integers(MAX_LEN, 6 * MAX_LEN), epochs=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_token_micro_batches_are_equal_in_count_and_within_budget(data, world, global_batch, n, budget, epochs, seed):
    """Every rank runs the same number of micro-steps in every step (the plan's accumulation, or its tail
    accumulation in an epoch's last partial step), no micro-batch is empty or over the budget, and each step
    trains exactly the rows a fixed micro batch would (the same slice of the same order)."""
    import random

    rng = random.Random(seed)
    lengths = data.draw(st.lists(st.integers(1, MAX_LEN), min_size=n, max_size=n))
    orders = _orders(rng, n, epochs)
    if global_batch < world or n < world:
        with pytest.raises(BatchError):
            plan_token_batches(orders, lengths, global_batch_size=global_batch, world_size=world, budget=budget)
        return
    try:
        plan = plan_token_batches(orders, lengths, global_batch_size=global_batch, world_size=world, budget=budget)
    except BatchError as e:  # only when a rank is left short of rows: uneven counts and budget < 2 x max length
        assert budget < 2 * MAX_LEN and (global_batch % world or n % global_batch % world)
        assert "twice data.max_seq_length" in str(e)
        return
    k = plan.gradient_accumulation_steps
    assert 1 <= k <= max_token_accumulation(global_batch, world, budget, MAX_LEN)
    assert plan.steps_per_epoch == steps_per_epoch(n, global_batch)
    for order in orders:
        layouts = list(epoch_layouts(order, lengths, plan))
        assert len(layouts) == plan.steps_per_epoch
        assert sum(len(x[0]) for x in layouts) == plan.batches_per_epoch
        for i, (layout, rows) in enumerate(zip(layouts, epoch_steps(order, global_batch, world))):
            assert len(layout) == world
            steps = {len(r) for r in layout}
            last_partial = i == len(layouts) - 1 and n % global_batch
            assert steps == {plan.tail_accumulation_steps if last_partial else k}  # same count on every rank
            served = [row for r in layout for mb in r for row in mb]
            assert sorted(served) == sorted(rows)  # exactly the step's rows, each once
            if not last_partial:
                assert rows == order[i * global_batch:(i + 1) * global_batch]
            for r in layout:
                for mb in r:
                    assert mb and sum(lengths[x] for x in mb) <= budget
            counts = [len(r_rows) for r_rows in deal(rows, lengths, world)]
            assert max(counts) - min(counts) <= 1


def test_a_row_longer_than_the_budget_goes_alone():
    lengths = [300, 10, 20, 30]
    bins = split_rows([0, 1, 2, 3], lengths, 2, budget=100)
    assert bins[0] == [0] and sorted(bins[1]) == [1, 2, 3]


def test_short_rows_are_grouped_long_rows_are_not_over_packed():
    short = [20] * 32  # the case: 32 short rows, one GPU: one micro-step holds them all
    p = plan_token_batches([list(range(32))], short, global_batch_size=32, world_size=1, budget=4096)
    assert p.gradient_accumulation_steps == 1
    long = [1024] * 32  # 32 full rows: 4 per micro-step of 4096 tokens
    p = plan_token_batches([list(range(32))], long, global_batch_size=32, world_size=1, budget=4096)
    assert p.gradient_accumulation_steps == 8
    assert all(len(mb) == 4 for mb in next(epoch_layouts(list(range(32)), long, p))[0])


def test_the_tail_step_tops_up_only_when_ranks_would_be_empty():
    lengths = [50] * 19
    p = plan_token_batches([list(range(19))], lengths, global_batch_size=8, world_size=4, budget=128)
    assert (p.steps_per_epoch, p.repeated_rows_per_epoch) == (3, 1)  # 3 rows left for 4 ranks: one repeated
    p = plan_token_batches([list(range(19))], lengths, global_batch_size=8, world_size=2, budget=128)
    assert p.repeated_rows_per_epoch == 0 and p.tail_accumulation_steps == 1  # 3 rows: 2 + 1


def test_interleaved_batches_reach_each_rank_through_accelerate():
    """accelerate's BatchSamplerShard (what a DDP/ZeRO/FSDP rank iterates) hands rank r exactly its planned
    micro-batches, in order, and every rank the same number."""
    import random

    from accelerate.data_loader import BatchSamplerShard

    from scalesft.trainer.batching import TokenBatchSampler, row_order

    rng = random.Random(1)
    lengths = [rng.choice([8, 16, 120, 128]) for _ in range(50)]
    for world in (1, 2, 3, 4):
        plan = plan_token_batches([row_order(50, 7, 0)], lengths, global_batch_size=12, world_size=world,
                                  budget=256)
        sampler = TokenBatchSampler(lengths, plan, seed=7)
        layouts = list(epoch_layouts(row_order(50, 7, 0), lengths, plan))
        for r in range(world):
            sampler.set_epoch(0)  # each rank's own sampler starts the epoch
            got = list(BatchSamplerShard(sampler, num_processes=world, process_index=r))
            assert got == [mb for layout in layouts for mb in layout[r]]
            assert len(got) == plan.batches_per_epoch == len(BatchSamplerShard(sampler, world, r))
        sampler.set_epoch(0)
        epoch0 = list(sampler)
        assert [b for layout in layouts for b in interleave(layout)] == epoch0
        assert list(sampler) != epoch0  # the next epoch draws another order


@pytest.mark.parametrize("world", range(1, 65))
def test_auto_plans_at_every_world_size(world):
    """Token micro-batches hold any global batch >= world; padded rows need global % world == 0, and then the
    micro batch is the largest divisor of global / world that fits."""
    from scalesft.core.batch import plan_auto_rows

    for global_batch in (1, 8, 12, 32, 48, 64, 100):
        if global_batch < world:
            with pytest.raises(BatchError, match="smaller than the world size"):
                max_token_accumulation(global_batch, world, 4096, 1024)
        else:
            assert max_token_accumulation(global_batch, world, 4096, 1024) == math.ceil(
                math.ceil(global_batch / world) / 4)
        if global_batch >= world and global_batch % world == 0:
            for fit in (1, 3, 4, 16, 1000):
                p = plan_auto_rows(global_batch, world, fit)
                assert p.micro_batch_size * p.gradient_accumulation_steps * world == global_batch
                assert p.micro_batch_size <= max(1, fit)
                assert not any(d <= fit and d > p.micro_batch_size for d in range(1, global_batch // world + 1)
                               if (global_batch // world) % d == 0)
        else:
            with pytest.raises(BatchError) as e:
                plan_auto_rows(global_batch, world, 16)
            if global_batch >= world:
                assert str(nearest_global_batches(global_batch, world)) in str(e.value)



