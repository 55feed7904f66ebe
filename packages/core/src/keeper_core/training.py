"""The training step for series heads, shared by the Ray Train loop and single-process runs.

A dataset is a list of series: ``(features (L_i, D), best index)``. Batches pad series to the
longest in the batch; the loss is the series softmax (or the pairwise baseline).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

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
