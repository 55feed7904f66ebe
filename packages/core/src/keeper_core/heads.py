"""Series ranking heads and their losses.

A batch holds B series padded to the longest one: ``x`` (B, L, D) features, ``mask`` (B, L)
bool with True on real images. Every head maps them to scores (B, L) with ``-inf`` on padding,
so a softmax over a row gives padding zero probability. Padded feature values never matter:
heads zero them before use, so even NaN there changes nothing and gets no gradient.

    head = make_head(HeadConfig(kind="transformer", in_dim=512))
    x, mask = pad_series([emb_of_series_1, emb_of_series_2])
    loss = series_softmax_loss(head(x, mask), mask, best_index)
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from keeper_core.errors import DataError


class HeadConfig(BaseModel):
    """Which head to build, validated at construction.

    Attributes:
        kind: "linear" and "mlp" score each image alone; "transformer" lets the images of a
            series attend to each other before scoring.
        in_dim: feature dimension D.
        hidden: hidden width (mlp, transformer).
        layers: hidden layers (mlp) or encoder layers (transformer).
        heads: attention heads (transformer); must divide ``hidden``.
        dropout: dropout probability (mlp, transformer).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["linear", "mlp", "transformer"]
    in_dim: int = Field(gt=0)
    hidden: int = Field(default=256, gt=0)
    layers: int = Field(default=2, ge=1)
    heads: int = Field(default=4, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> HeadConfig:
        if self.kind == "transformer" and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


class PerImageHead(nn.Module):
    """Scores each image independently with ``net`` (a map from D features to 1 score)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Scores (B, L), ``-inf`` where ``mask`` is False."""
        _check_batch(x, mask)
        scores = self.net(x.masked_fill(~mask[..., None], 0.0)).squeeze(-1)
        return scores.masked_fill(~mask, float("-inf"))


class SeriesTransformerHead(nn.Module):
    """Images of one series attend to each other, then each gets a score.

    No positional encoding: a series is a set, so permuting its images permutes the scores.
    The key padding mask keeps real images from attending to padding.
    """

    def __init__(self, config: HeadConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(config.in_dim, config.hidden)
        layer = nn.TransformerEncoderLayer(
            config.hidden,
            config.heads,
            dim_feedforward=4 * config.hidden,
            dropout=config.dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors do not support norm_first layers; asking for them only warns.
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.hidden)  # pre-norm blocks leave the output unnormalised
        self.score = nn.Linear(config.hidden, 1)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Scores (B, L), ``-inf`` where ``mask`` is False. Each row needs a real image."""
        _check_batch(x, mask)
        h = self.proj(x.masked_fill(~mask[..., None], 0.0))
        h = self.encoder(h, src_key_padding_mask=~mask)
        return self.score(self.norm(h)).squeeze(-1).masked_fill(~mask, float("-inf"))


def make_head(config: HeadConfig) -> nn.Module:
    """Builds the head a config names.

    Args:
        config: the head config.

    Returns:
        A module with ``forward(x (B, L, D), mask (B, L) bool) -> scores (B, L)``.
    """
    if config.kind == "linear":
        return PerImageHead(nn.Linear(config.in_dim, 1))
    if config.kind == "mlp":
        dims = [config.in_dim] + [config.hidden] * config.layers
        blocks: list[nn.Module] = []
        for d_in, d_out in itertools.pairwise(dims):
            blocks += [nn.Linear(d_in, d_out), nn.GELU(), nn.Dropout(config.dropout)]
        return PerImageHead(nn.Sequential(*blocks, nn.Linear(config.hidden, 1)))
    return SeriesTransformerHead(config)


def pad_series(series: Sequence[np.ndarray | Tensor]) -> tuple[Tensor, Tensor]:
    """Pads series of different lengths into one batch.

    Args:
        series: B arrays or tensors of shape (L_i, D), L_i >= 1, one D for all.

    Returns:
        ``x`` (B, max L_i, D) float32 with zeros on padding, and ``mask`` (B, max L_i) bool,
        True on real images.

    Raises:
        DataError: no series, a series that is not 2-D or is empty, or mismatched D.
    """
    if len(series) == 0:
        raise DataError("pad_series needs at least one series")
    tensors = [torch.as_tensor(s, dtype=torch.float32) for s in series]
    dim = tensors[0].shape[-1] if tensors[0].ndim == 2 else None
    bad = [i for i, t in enumerate(tensors) if t.ndim != 2 or len(t) == 0 or t.shape[1] != dim]
    if bad:
        shapes = ", ".join(f"{i}: {tuple(tensors[i].shape)}" for i in bad[:10])
        raise DataError(
            f"series must be non-empty (L, D) with one D ({dim}); bad: {shapes}", rows=bad
        )
    x = nn.utils.rnn.pad_sequence(tensors, batch_first=True)
    lengths = torch.tensor([len(t) for t in tensors], device=x.device)
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return x, mask


def series_softmax_loss(scores: Tensor, mask: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of a softmax over each series, averaged over series.

    Args:
        scores: (B, L) scores; padded positions are ignored whatever they hold.
        mask: (B, L) bool, True on real images.
        target: (B,) int index of the best image in each row, or (B, L) float preference
            distribution over the real images of each row (>= 0, sums to 1, zero on padding).

    Returns:
        Scalar loss.

    Raises:
        DataError: shapes disagree, a target index points at padding, or a target
            distribution is negative, puts mass on padding or does not sum to 1.
    """
    _check_scores(scores, mask)
    log_p = F.log_softmax(scores.masked_fill(~mask, float("-inf")), dim=1)
    if target.shape == (scores.shape[0],) and not target.is_floating_point():
        _check_index(target, mask)
        return -log_p.gather(1, target.long()[:, None]).mean()
    if target.shape != scores.shape or not target.is_floating_point():
        raise DataError(
            f"target must be (B,)={tuple(scores.shape[:1])} int or (B, L)={tuple(scores.shape)} "
            f"float, got {tuple(target.shape)} {target.dtype}"
        )
    bad = (target < 0).any(1) | (target.masked_fill(mask, 0) != 0).any(1)
    bad |= (target.sum(1) - 1).abs() > 1e-4
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten().tolist()
        raise DataError(
            f"target distributions must be >= 0, sum to 1 over real images and be 0 on "
            f"padding; bad rows {rows[:10]}",
            rows=rows,
        )
    # Zero the -inf log-probs of padding before multiplying, or 0 * -inf makes NaN.
    return -(target * log_p.masked_fill(~mask, 0.0)).sum(1).mean()


def pairwise_logistic_loss(scores: Tensor, mask: Tensor, target_index: Tensor) -> Tensor:
    """Mean over all (best, other) pairs of ``softplus(-(s_best - s_other))``: the baseline.

    Pairs are pooled over the batch, so a series of n images weighs n - 1 pairs.

    Args:
        scores: (B, L) scores; padded positions are ignored whatever they hold.
        mask: (B, L) bool, True on real images.
        target_index: (B,) int index of the best image in each row.

    Returns:
        Scalar loss.

    Raises:
        DataError: shapes disagree, a target points at padding, or the batch has no pairs.
    """
    _check_scores(scores, mask)
    if target_index.shape != (scores.shape[0],) or target_index.is_floating_point():
        raise DataError(
            f"target_index must be int (B,)={tuple(scores.shape[:1])}, got "
            f"{tuple(target_index.shape)} {target_index.dtype}"
        )
    _check_index(target_index, mask)
    s = scores.masked_fill(~mask, 0.0)  # finite everywhere, so no inf - inf on padding
    s_best = s.gather(1, target_index.long()[:, None])
    others = mask.clone()
    others[torch.arange(len(s), device=s.device), target_index.long()] = False
    n_pairs = others.sum()
    if int(n_pairs) == 0:
        raise DataError("no (best, other) pairs: every series has a single image")
    return (F.softplus(s - s_best) * others).sum() / n_pairs


def _check_batch(x: Tensor, mask: Tensor) -> None:
    if x.ndim != 3 or mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise DataError(
            f"expected x (B, L, D) and bool mask (B, L); got x {tuple(x.shape)}, "
            f"mask {tuple(mask.shape)} {mask.dtype}"
        )


def _check_scores(scores: Tensor, mask: Tensor) -> None:
    if scores.ndim != 2 or mask.shape != scores.shape or mask.dtype != torch.bool:
        raise DataError(
            f"expected scores (B, L) and bool mask (B, L); got scores {tuple(scores.shape)}, "
            f"mask {tuple(mask.shape)} {mask.dtype}"
        )


def _check_index(target: Tensor, mask: Tensor) -> None:
    t = target.long()
    in_range = (t >= 0) & (t < mask.shape[1])
    real = mask.gather(1, t.clamp(0, mask.shape[1] - 1)[:, None]).squeeze(1) & in_range
    if not bool(real.all()):
        rows = torch.nonzero(~real).flatten().tolist()
        raise DataError(f"target index out of range or on padding in rows {rows[:10]}", rows=rows)
