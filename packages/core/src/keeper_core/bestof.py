"""Best-of-series comparisons: rank every series by several methods, measure, and report.

Used by the demo and by evaluation jobs; the inputs are a validated series manifest and one score
array per method, aligned with the manifest's rows (NaN where an image has no score, e.g. it
failed to decode: such a series is left out, and the count of left-out series is reported).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from keeper_core.metrics import SeriesMetrics, format_table, series_metrics
from keeper_core.report import SeriesView, ShotView, series_report_html, thumbnail_data_uri

RANDOM_WEIGHTS_WARNING = (
    "model weights are RANDOM ({spec}): aesthetic prompt scores are meaningless until real "
    "weights are given (--model ViT-B-32:laion2b_s34b_b79k, or ViT-B-32:/path/to/checkpoint)."
)


@dataclass
class Comparison:
    """Per-method metrics over the series every method could score."""

    results: dict[str, SeriesMetrics]
    series: list[pd.DataFrame]  # one frame per scored series, rows in manifest order
    best: list[int]  # index of the keeper within each series
    left_out: int  # series dropped because an image (maybe the keeper) has no score

    def table(self) -> str:
        return format_table(self.results)


def compare_methods(manifest: pd.DataFrame, scores: Mapping[str, np.ndarray]) -> Comparison:
    """Rank every series by each method's scores and compute the series metrics.

    Args:
        manifest: validated series manifest (``series_id, image_uri, is_best``), 0..n-1 index.
        scores: method name -> (n,) scores aligned with the manifest rows; NaN = unscored.
    """
    n = len(manifest)
    for name, s in scores.items():
        if np.shape(s) != (n,):
            raise ValueError(f"scores for {name!r} have shape {np.shape(s)}, expected ({n},)")
    scored = np.all([np.isfinite(np.asarray(s, dtype=np.float64)) for s in scores.values()], axis=0)
    groups, left_out = [], 0
    for _, g in manifest.groupby("series_id", sort=True):
        if scored[g.index.to_numpy()].all() and len(g) > 1:
            groups.append(g)
        else:
            left_out += 1
    best = [int(np.argmax(g["is_best"].to_numpy())) for g in groups]
    results = {
        name: series_metrics([np.asarray(s)[g.index.to_numpy()] for g in groups], best)
        for name, s in scores.items()
    }
    return Comparison(results=results, series=groups, best=best, left_out=left_out)


def write_report(
    path: str | Path,
    title: str,
    comparison: Comparison,
    scores: Mapping[str, np.ndarray],
    load_image: Callable[[str], Image.Image | None],
    *,
    max_series: int = 60,
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
    note_column: str | None = "degradation",
) -> Path:
    """Write the HTML grid: per series the thumbnails, the true keeper, each method's pick."""
    views = []
    for g in comparison.series[:max_series]:
        idx = g.index.to_numpy()
        shots = []
        for i, row in zip(idx, g.itertuples(), strict=True):
            img = load_image(str(row.image_uri))
            shots.append(
                ShotView(
                    uri=str(row.image_uri),
                    thumbnail=thumbnail_data_uri(img) if img is not None else None,
                    is_best=bool(row.is_best),
                    scores={name: float(s[i]) for name, s in scores.items()},
                    note=str(getattr(row, note_column, "")) if note_column else "",
                )
            )
        picks = {name: int(np.argmax(np.asarray(s)[idx])) for name, s in scores.items()}
        views.append(SeriesView(series_id=str(g["series_id"].iloc[0]), shots=shots, picks=picks))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        series_report_html(
            title,
            views,
            metrics_rows={k: v.as_dict() for k, v in comparison.results.items()},
            warnings=warnings,
            notes=notes,
        )
    )
    return out
