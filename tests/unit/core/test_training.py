"""Data-parallel sharding: every worker makes the same number of steps, and series survive the
Arrow row layout the Ray Train workers read."""

from __future__ import annotations

import math

import numpy as np
import pytest

from keeper_core.errors import DataError
from keeper_core.training import (
    batches,
    series_from_arrow,
    series_to_arrow,
    shard_order,
    steps_per_epoch,
)


def _series(n: int, dim: int = 3, seed: int = 0) -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 6, size=n)
    return [(rng.normal(size=(k, dim)).astype(np.float32), int(k) - 1) for k in lengths]


def _equal_split(rows: np.ndarray, world: int) -> list[np.ndarray]:
    """What Ray's streaming_split(world, equal=True) hands the workers, in order (contiguous,
    len // world rows each, any remainder truncated)."""
    size = len(rows) // world
    return [rows[r * size : (r + 1) * size] for r in range(world)]


# (train series, workers, batch): 65 train series of the 91-series manifest at batch 32 made
# shards of 33 and 32 series, 2 and 1 all-reduce steps, and the job hung.
CASES = [(65, 2, 32), (21, 2, 10), (17, 2, 8), (100, 3, 7), (5, 4, 2), (1, 4, 8), (64, 2, 32)]


@pytest.mark.parametrize(("n", "world", "batch"), CASES)
def test_every_worker_makes_the_same_number_of_steps(n: int, world: int, batch: int) -> None:
    order = shard_order(n, world, seed=3)
    shards = _equal_split(order, world)
    assert sum(map(len, shards)) == len(order), "equal split truncates nothing after padding"
    data = _series(n)
    steps = [len(list(batches([data[i] for i in shard], batch))) for shard in shards]
    assert steps == [steps_per_epoch(n, world, batch)] * world
    # Equal shards also give equal batch sizes step by step, so averaging the workers' mean
    # losses (DDP) is the mean over the global batch.
    sizes = {tuple(len(x) for x, _, _ in batches([data[i] for i in s], batch)) for s in shards}
    assert len(sizes) == 1
    assert set(order.tolist()) == set(range(n)), "every series is trained on"
    assert len(order) - n < world, "padding repeats fewer series than there are workers"


def test_one_worker_gets_every_series_once_in_a_seeded_order() -> None:
    a, b = shard_order(30, 1, seed=0), shard_order(30, 1, seed=0)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(30))
    assert not np.array_equal(a, shard_order(30, 1, seed=1))
    assert steps_per_epoch(30, 1, 8) == math.ceil(30 / 8)


def test_shard_order_refuses_nothing_to_split() -> None:
    with pytest.raises(DataError, match="n >= 1"):
        shard_order(0, 2, seed=0)


def test_series_round_trip_through_arrow_rows_in_any_block_order() -> None:
    data = _series(7, dim=5)
    order = shard_order(7, 2, seed=1)
    table = series_to_arrow(data, order)
    assert table.num_rows == len(order)
    assert table.column("x").type.value_type.bit_width == 32
    # Blocks can reach a worker in any order; the series come back in split order.
    blocks = [table.slice(4, 4), table.slice(0, 4)]
    back = series_from_arrow(blocks)
    expected = sorted(order.tolist())
    assert len(back) == len(expected)
    for (x, best), i in zip(back, expected, strict=True):
        np.testing.assert_array_equal(x, data[i][0])
        assert best == data[i][1]


def test_series_to_arrow_refuses_mixed_widths() -> None:
    data = [*_series(2, dim=3), *_series(1, dim=4)]
    with pytest.raises(DataError, match="feature widths"):
        series_to_arrow(data)
