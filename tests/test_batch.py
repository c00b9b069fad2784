"""The batch plan: global = micro x accumulation x world_size, for any world size (pure, no processes)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from launch.batch import BatchError, plan_batch, steps_per_epoch

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
    from launch.batch import repeated_rows_per_epoch

    assert repeated_rows_per_epoch(64, 2, 2) == 0
    assert repeated_rows_per_epoch(64, 2, 3) == 2   # measured: 3 ranks see 66 rows in the first epoch
    assert repeated_rows_per_epoch(64, 2, 1) == 0
    assert repeated_rows_per_epoch(5, 4, 2) == 3


@given(rows=st.integers(min_value=1, max_value=10_000), micro=st.integers(min_value=1, max_value=16),
       world=st.integers(min_value=1, max_value=256))
def test_repeated_rows_fill_exactly_whole_rounds(rows, micro, world):
    from launch.batch import repeated_rows_per_epoch

    extra = repeated_rows_per_epoch(rows, micro, world)
    assert 0 <= extra < micro * world and (rows + extra) % (micro * world) == 0
