"""Series rankers: a trained head plus everything needed to turn table rows into its features.

A ranker is saved as plain artifacts, ``ranker.json`` (head config, feature set, feature
standardisation, the embedding ModelSpec) and ``weights.safetensors``, so it loads without pickle
and without keeper_train: a Serve replica or the MLflow pyfunc wrapper needs only keeper_core.

Rows are scored with the columns of the embedding table (``embedding`` and the quality features),
grouped by ``series_id``; within a series the scores become a softmax distribution.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from keeper_core.errors import DataError
from keeper_core.heads import HeadConfig, make_head, pad_series
from keeper_core.tower import TowerConfig

FeatureSet = Literal["embedding", "embedding+quality", "quality"]
#: Quality features a ranker may use. Width and height are left out: within a burst they are
#: the same for every shot, so they could only teach a head about corpus composition.
QUALITY_INPUTS = (
    "sharpness",
    "brightness",
    "clip_dark",
    "clip_bright",
    "contrast",
    "noise",
    "colorfulness",
    "blockiness",
)
CONFIG_FILE, WEIGHTS_FILE = "ranker.json", "weights.safetensors"
#: The key the ranker folder is logged under in the MLflow pyfunc (its artifacts/ entry).
ARTIFACT_KEY = "ranker"


def unreadable_errors(*more: type[BaseException]) -> tuple[type[BaseException], ...]:
    """What reading a saved ranker's files raises when one is missing or corrupt (not keeper's),
    and ``more`` (the exception types a caller also turns into ``DataError``).

    ``OSError`` (a missing file), ``ValueError`` (bad UTF-8, JSON or config: pydantic's
    ``ValidationError`` is one), ``RecursionError`` (JSON nested too deep for ``json.loads``) and
    ``safetensors.SafetensorError`` (a corrupt or truncated ``.safetensors``: a plain
    ``Exception``). The loaders turn them into ``DataError`` naming the file or folder.
    """
    from safetensors import SafetensorError

    return (OSError, ValueError, RecursionError, SafetensorError, *more)


class RankerConfig(BaseModel):
    """What a saved ranker is: enough to rebuild its head and its inputs exactly."""

    model_config = ConfigDict(extra="forbid")

    format: Literal[1] = 1
    kind: Literal["keeper-series-ranker"] = "keeper-series-ranker"
    head: HeadConfig
    features: FeatureSet
    embedding_spec: str | None = Field(description="ModelSpec of the embeddings it was trained on")
    embed_dim: int = Field(ge=0)
    quality_names: list[str] = Field(default_factory=list)
    quality_mean: list[float] = Field(default_factory=list)
    quality_std: list[float] = Field(default_factory=list)
    tower: TowerConfig | None = Field(
        None,
        description=(
            "a fine-tuned ranker's own vision tower (base spec + what trained); embedding_spec "
            "then names that tower, so embeddings of any other model are refused"
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> RankerConfig:
        if self.tower is not None and self.features == "quality":
            raise ValueError("a fine-tuned tower needs features with the embedding")
        uses_emb = self.features != "quality"
        uses_q = self.features != "embedding"
        if uses_emb and (self.embed_dim <= 0 or not self.embedding_spec):
            raise ValueError(f"features={self.features} needs embed_dim > 0 and embedding_spec")
        n = len(self.quality_names)
        if uses_q and (n == 0 or len(self.quality_mean) != n or len(self.quality_std) != n):
            raise ValueError("quality_names, quality_mean and quality_std must have one length")
        if self.head.in_dim != (self.embed_dim if uses_emb else 0) + (n if uses_q else 0):
            raise ValueError(f"head.in_dim {self.head.in_dim} does not match the features")
        return self


def fit_standardizer(quality: np.ndarray) -> tuple[list[float], list[float]]:
    """Mean and std of each quality column (train rows only).

    A column that does not vary on the train rows (no training shot had crushed blacks:
    ``clip_dark`` 0 throughout) gets std 0, which :func:`inverse_std` reads as "contributes
    nothing": the head never saw it move, so its weight on it is its random start, and a
    floored std (1e-6, before) turned a shot with 0.5 % crushed pixels into a feature of 5,000.
    """
    q = np.asarray(quality, dtype=np.float64)
    if q.ndim != 2 or len(q) == 0 or not np.isfinite(q).all():
        raise DataError(f"quality features must be a finite non-empty (N, F) array, got {q.shape}")
    std = q.std(axis=0)
    scale = np.maximum(np.abs(q).max(axis=0), 1.0)
    return q.mean(axis=0).tolist(), np.where(std > 1e-9 * scale, std, 0.0).tolist()


def inverse_std(std: Sequence[float]) -> np.ndarray:
    """What standardised quality features are multiplied by: ``1 / std``, and 0 for a column
    that was constant in training (std 0: :func:`fit_standardizer`)."""
    s = np.asarray(std, dtype=np.float64)
    return np.divide(1.0, s, out=np.zeros_like(s), where=s > 0)


def feature_matrix(table: pd.DataFrame, config: RankerConfig) -> np.ndarray:
    """Rows of the embedding table -> the head's input features (N, in_dim) float32."""
    parts = []
    if config.features != "quality":
        if "embedding" not in table.columns:
            raise DataError("the table has no 'embedding' column")
        if "model_spec" in table.columns:
            specs = set(table["model_spec"].astype(str))
            if specs - {config.embedding_spec}:
                raise DataError(
                    f"embeddings of {sorted(specs)} given to a ranker trained on "
                    f"{config.embedding_spec!r}: specs never mix"
                )
        emb = np.stack([np.asarray(e, dtype=np.float32) for e in table["embedding"]])
        if emb.shape[1] != config.embed_dim:
            raise DataError(f"embedding width {emb.shape[1]} != ranker's {config.embed_dim}")
        parts.append(emb)
    if config.features != "embedding":
        missing = [c for c in config.quality_names if c not in table.columns]
        if missing:
            raise DataError(f"the table lacks quality feature columns {missing}")
        q = table[config.quality_names].to_numpy(dtype=np.float64)
        mean = np.asarray(config.quality_mean)
        parts.append(((q - mean) * inverse_std(config.quality_std)).astype(np.float32))
    x = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    bad = np.where(~np.isfinite(x).all(axis=1))[0]
    if len(bad):
        raise DataError(f"non-finite features in rows {bad[:10].tolist()}", rows=bad.tolist())
    return x


def series_arrays(
    table: pd.DataFrame, features: np.ndarray
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    """Group rows by ``series_id`` (sorted): ids, per-series features, per-series row positions."""
    if "series_id" not in table.columns:
        raise DataError("the table has no 'series_id' column")
    ids, xs, rows = [], [], []
    for sid, idx in table.groupby("series_id", sort=True).indices.items():
        ids.append(str(sid))
        xs.append(features[idx])
        rows.append(np.asarray(idx))
    return ids, xs, rows


def ranked_frame(
    table: pd.DataFrame, rows: Sequence[np.ndarray], scores: Sequence[np.ndarray]
) -> pd.DataFrame:
    """``series_id, image_uri, score, prob, rank`` in ``table``'s order from per-series scores.

    ``prob`` is the softmax of the scores within each series; ``rank`` 1 is the pick.
    """
    score = np.empty(len(table))
    prob = np.empty(len(table))
    rank = np.empty(len(table), dtype=np.int64)
    for r, s in zip(rows, scores, strict=True):
        p = np.exp(s - s.max())
        score[r], prob[r] = s, p / p.sum()
        order = np.argsort(-s, kind="stable")  # ties: the earlier row ranks first
        rank[r[order]] = np.arange(1, len(s) + 1)
    out = pd.DataFrame({"series_id": table["series_id"].astype(str).to_numpy()})
    if "image_uri" in table.columns:
        out["image_uri"] = table["image_uri"].astype(str).to_numpy()
    out["score"], out["prob"], out["rank"] = score, prob, rank
    return out


class SeriesRanker:
    """A head in eval mode with its feature recipe. ``rank(table)`` scores series."""

    def __init__(self, config: RankerConfig, head: torch.nn.Module | None = None) -> None:
        self.config = config
        self.head = head if head is not None else make_head(config.head)
        self.head.eval()

    @torch.inference_mode()
    def score(self, series: Sequence[np.ndarray], batch_size: int = 256) -> list[np.ndarray]:
        """Raw scores, one array per series of (L_i, in_dim) features."""
        out: list[np.ndarray] = []
        for i in range(0, len(series), batch_size):
            x, mask = pad_series(series[i : i + batch_size])
            s = self.head(x, mask).float().numpy()
            out += [s[j, : int(mask[j].sum())] for j in range(len(x))]
        return out

    def rank(self, table: pd.DataFrame) -> pd.DataFrame:
        """Score every row; returns ``series_id, image_uri, score, prob, rank`` in input order.

        ``prob`` is the softmax of the scores within each series; ``rank`` 1 is the pick.
        """
        x = feature_matrix(table, self.config)
        _, xs, rows = series_arrays(table, x)
        return ranked_frame(table, rows, self.score(xs))

    def save(self, folder: str | Path) -> Path:
        """Write ``ranker.json`` and ``weights.safetensors`` into ``folder``."""
        from safetensors.torch import save_file

        d = Path(folder)
        d.mkdir(parents=True, exist_ok=True)
        (d / CONFIG_FILE).write_text(self.config.model_dump_json(indent=2), "utf-8")
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, str(d / WEIGHTS_FILE))
        return d

    @classmethod
    def load(cls, folder: str | Path) -> SeriesRanker:
        """Load a saved ranker (no pickle: JSON + safetensors).

        Raises:
            DataError: missing files, an invalid config, a corrupt ``weights.safetensors``, or
                weights that do not fit the head.
        """
        from safetensors.torch import load_file

        d = Path(folder)
        try:
            config = read_config(d)
            if config.tower is not None:
                raise ValueError(
                    f"a fine-tuned ranker (its own {config.tower.base_spec} tower): load it with "
                    "keeper_core.ranker.load_ranker"
                )
            ranker = cls(config)
        except unreadable_errors(RuntimeError) as e:
            raise DataError(f"cannot load ranker: {e}", source=str(d)) from e
        weights = d / WEIGHTS_FILE
        try:
            ranker.head.load_state_dict(load_file(str(weights)))
        except unreadable_errors(RuntimeError) as e:  # RuntimeError: tensors do not fit
            raise DataError(f"cannot load ranker weights: {e}", source=str(weights)) from e
        ranker.head.eval()
        return ranker


def read_config(folder: str | Path) -> RankerConfig:
    """A saved ranker's ``ranker.json``, validated."""
    return RankerConfig.model_validate(json.loads((Path(folder) / CONFIG_FILE).read_text("utf-8")))


def load_ranker(folder: str | Path, *, device: str | None = None) -> Any:
    """A saved ranker of either kind: a ``SeriesRanker`` over embeddings, or a fine-tuned
    ``keeper_core.finetune.TunedRanker`` that embeds with its own tower (``device`` is its).

    Raises:
        DataError: missing files, an invalid config, weights that do not fit.
        ModelLoadError: a fine-tuned ranker's base tower cannot load.
    """
    try:
        config = read_config(folder)
    except unreadable_errors() as e:
        raise DataError(f"cannot load ranker: {e}", source=str(folder)) from e
    if config.tower is None:
        return SeriesRanker.load(folder)
    from keeper_core.finetune import TunedRanker

    return TunedRanker.load(folder, device=device)
