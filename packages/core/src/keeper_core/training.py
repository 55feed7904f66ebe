"""The training step for series heads, shared by the Ray Train loop and single-process runs.

A dataset is a list of series: ``(features (L_i, D), best index)``. Batches pad series to the
longest in the batch; the loss is the series softmax (or the pairwise baseline).

Data-parallel training needs every worker to make the same number of optimizer steps per epoch
(each step is an all-reduce; a worker with one step more waits forever). ``shard_order`` pads the
train series to a multiple of the worker count, as torch's ``DistributedSampler`` does, so equal
shards hold ``ceil(n / world)`` series each and ``steps_per_epoch`` is the same on every worker.
Padding (a few series seen twice an epoch) rather than dropping: with few series, dropping the
remainder would drop the same series every epoch. Series travel to the workers as Arrow rows,
one per series (``series_to_arrow``): the flattened ``(L, D)`` features, ``L``, the best index
and the series' position in its split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor, nn

from keeper_core.errors import DataError
from keeper_core.heads import pad_series, pairwise_logistic_loss, series_softmax_loss
from keeper_core.metrics import SeriesMetrics, series_metrics

LossKind = Literal["series-softmax", "pairwise"]
Series = tuple[np.ndarray, int]


def batches(
    data: Sequence[Series], batch_size: int, rng: np.random.Generator | None = None
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """Padded batches ``(x, mask, best)``; shuffled when ``rng`` is given."""
    order = rng.permutation(len(data)) if rng is not None else np.arange(len(data))
    for i in range(0, len(order), batch_size):
        chunk = [data[j] for j in order[i : i + batch_size]]
        x, mask = pad_series([s for s, _ in chunk])
        yield x, mask, torch.tensor([b for _, b in chunk], dtype=torch.long)


def loss_fn(kind: LossKind, scores: Tensor, mask: Tensor, best: Tensor) -> Tensor:
    if kind == "pairwise":
        return pairwise_logistic_loss(scores, mask, best)
    return series_softmax_loss(scores, mask, best)


def train_epoch(
    head: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Sequence[Series],
    *,
    batch_size: int,
    loss: LossKind,
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
) -> float:
    """One pass over ``data``; returns the mean loss per series."""
    head.train()
    total, n = 0.0, 0
    for x, mask, best in batches(data, batch_size, rng):
        x, mask, best = x.to(device), mask.to(device), best.to(device)
        optimizer.zero_grad(set_to_none=True)
        value = loss_fn(loss, head(x, mask), mask, best)
        value.backward()
        optimizer.step()
        total += float(value.detach()) * len(x)
        n += len(x)
    return total / max(n, 1)


@torch.inference_mode()
def evaluate(
    head: nn.Module, data: Sequence[Series], *, batch_size: int = 256, device: str = "cpu"
) -> SeriesMetrics:
    """Series metrics of ``head`` on ``data`` (eval mode)."""
    head.eval()
    scores: list[np.ndarray] = []
    for x, mask, _ in batches(data, batch_size):
        s = head(x.to(device), mask.to(device)).float().cpu().numpy()
        scores += [s[j, : int(mask[j].sum())] for j in range(len(x))]
    return series_metrics(scores, [b for _, b in data])


def shard_order(n: int, world: int, seed: int) -> np.ndarray:
    """Row order of a train set of ``n`` series for ``world`` data-parallel workers.

    A seeded permutation of ``range(n)`` (so each contiguous shard is a random sample, not a run
    of the manifest), padded by repeating its first positions up to ``world * ceil(n / world)``
    rows: an equal split then gives every worker ``ceil(n / world)`` series and nothing is left
    out. With ``n < world`` some workers train on repeats.

    Raises:
        DataError: ``n < 1`` or ``world < 1``.
    """
    if n < 1 or world < 1:
        raise DataError(f"need n >= 1 series and world >= 1 workers, got n={n}, world={world}")
    order = np.random.default_rng([seed, n]).permutation(n)
    total = world * math.ceil(n / world)
    return np.resize(order, total)  # np.resize repeats from the start


def steps_per_epoch(n: int, world: int, batch_size: int) -> int:
    """Optimizer steps of every worker per epoch over ``shard_order(n, world, seed)``."""
    return math.ceil(math.ceil(n / world) / batch_size)


SERIES_SCHEMA = pa.schema(
    [
        ("index", pa.int64()),  # the series' position in its split
        ("best", pa.int32()),
        ("length", pa.int32()),
        ("x", pa.large_list(pa.float32())),  # (length, D) features, row-major; int64 offsets
    ]
)


def series_to_arrow(data: Sequence[Series], order: np.ndarray | None = None) -> pa.Table:
    """``data`` (or ``data[i] for i in order``) as one Arrow row per series (``SERIES_SCHEMA``).

    The features go in as one float32 buffer with list offsets, no per-value Python objects.
    """
    idx = np.arange(len(data)) if order is None else np.asarray(order, dtype=np.int64)
    lengths = np.array([len(data[i][0]) for i in idx], dtype=np.int32)
    dims = {data[i][0].shape[1] for i in idx}
    if len(dims) > 1:
        raise DataError(f"series have different feature widths {sorted(dims)}")
    dim = dims.pop() if dims else 0
    values = (
        np.concatenate([np.asarray(data[i][0], dtype=np.float32).reshape(-1) for i in idx])
        if len(idx)
        else np.zeros(0, np.float32)
    )
    offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lengths.astype(np.int64) * dim, out=offsets[1:])
    return pa.table(
        {
            "index": pa.array(idx, pa.int64()),
            "best": pa.array([data[i][1] for i in idx], pa.int32()),
            "length": pa.array(lengths, pa.int32()),
            "x": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.float32())),
        },
        schema=SERIES_SCHEMA,
    )


def series_from_arrow(tables: Sequence[pa.Table]) -> list[Series]:
    """The series held by ``series_to_arrow`` rows, ordered by ``index``.

    Ordering by index makes a worker's shard independent of the order its blocks arrived in.
    """
    if not tables:
        return []
    table = pa.concat_tables(tables).combine_chunks()
    if table.num_rows == 0:
        return []
    x = table.column("x").chunk(0)
    # offsets index .values; one copy so the arrays are writable (torch warns on read-only ones)
    offsets, values = x.offsets.to_numpy(), x.values.to_numpy().copy()
    lengths = table.column("length").to_numpy()
    best = table.column("best").to_numpy()
    order = np.argsort(table.column("index").to_numpy(), kind="stable")
    return [
        (values[offsets[i] : offsets[i + 1]].reshape(int(lengths[i]), -1), int(best[i]))
        for i in order
    ]
