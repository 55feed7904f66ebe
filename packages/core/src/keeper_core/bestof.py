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
from keeper_core.report import (
    MAX_IMAGES,
    MAX_THUMB_BYTES,
    SeriesView,
    ShotView,
    series_report_html,
    thumbnail_data_uri,
)

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


def _pick(scores: np.ndarray, best: int) -> int:
    """The shot a method is shown picking: its top score, a tie counted against the keeper as
    the metrics count it (``metrics.best_ranks``), so the report marks the keeper picked exactly
    when the keeper's rank is 1 (``argmax`` alone would pick the first tied shot, and show a
    constant scorer finding every keeper listed first)."""
    top = np.flatnonzero(scores == scores.max())
    others = top[top != best]
    return int(others[0]) if len(others) else int(top[0])


def _shown_order(
    comparison: Comparison, picks: list[dict[str, int]], methods: list[str]
) -> tuple[list[int], str]:
    """The series in the order the report shows them, and that order in one sentence.

    The informative series first: with several methods, those where they pick different shots,
    then those every method gets wrong, then those every method gets right; with one, those it
    gets wrong. Series-id order within each group, so the choice is deterministic.
    """

    def group(j: int) -> int:
        chosen = set(picks[j].values())
        if len(chosen) > 1:
            return 0
        return 1 if chosen and comparison.best[j] not in chosen else 2

    order = sorted(range(len(comparison.series)), key=lambda j: (group(j), j))
    if len(methods) > 1:
        text = (
            "Series where the methods pick different shots come first, then those every method "
            "gets wrong, then those every method gets right; by series id within each."
        )
    elif methods:
        text = (
            f"Series where {methods[0]} misses the keeper come first, then the rest; "
            "by series id within each."
        )
    else:
        text = "By series id."
    return order, text


def write_report(
    path: str | Path,
    title: str,
    comparison: Comparison,
    scores: Mapping[str, np.ndarray],
    load_image: Callable[[str], Image.Image | None],
    *,
    max_series: int = 60,
    max_images: int = MAX_IMAGES,
    max_thumb_bytes: int = MAX_THUMB_BYTES,
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
    note_column: str | None = "degradation",
) -> Path:
    """Write the HTML grid: per series the thumbnails, the true keeper, each method's pick.

    The page shows at most ``max_series`` series, ``max_images`` thumbnails and
    ``max_thumb_bytes`` of them: series are added whole, in the order ``_shown_order`` gives,
    until the next would pass a bound (always at least one series; one longer than
    ``max_images`` shows its keeper, its picks and its first shots). It says how many series and
    images it shows of how many; the metrics table is over every series of ``comparison``.
    """
    if max_images < 1 or max_thumb_bytes < 1:
        raise ValueError("max_images and max_thumb_bytes must be at least 1")
    methods = list(scores)
    arrays = {name: np.asarray(s) for name, s in scores.items()}
    picks = [
        {name: _pick(a[g.index.to_numpy()], b) for name, a in arrays.items()}
        for g, b in zip(comparison.series, comparison.best, strict=True)
    ]
    order, order_text = _shown_order(comparison, picks, methods)

    def view(j: int, cap: int | None) -> tuple[SeriesView, int]:
        g = comparison.series[j]
        keep = list(range(len(g)))
        if cap is not None and len(g) > cap:  # the first series alone passes the cap
            must = {comparison.best[j], *picks[j].values()}
            rest = [i for i in keep if i not in must][: max(cap - len(must), 0)]
            keep = sorted(must | set(rest))
        rows = list(g.itertuples())
        idx = g.index.to_numpy()
        shots, size = [], 0
        for pos in keep:
            row, i = rows[pos], idx[pos]
            img = load_image(str(row.image_uri))
            thumb = thumbnail_data_uri(img) if img is not None else None
            size += len(thumb) if thumb else 0
            shots.append(
                ShotView(
                    uri=str(row.image_uri),
                    thumbnail=thumb,
                    is_best=bool(row.is_best),
                    scores={name: float(a[i]) for name, a in arrays.items()},
                    note=str(getattr(row, note_column, "")) if note_column else "",
                )
            )
        at = {pos: n for n, pos in enumerate(keep)}
        shown_picks = {name: at[p] for name, p in picks[j].items()}
        sid = str(g["series_id"].iloc[0])
        return SeriesView(sid, shots, shown_picks, omitted=len(g) - len(keep)), size

    views: list[SeriesView] = []
    images = nbytes = 0
    for j in order[: max(max_series, 1)]:
        if views and images + len(comparison.series[j]) > max_images:
            break
        v, size = view(j, None if views else max_images)
        if views and nbytes + size > max_thumb_bytes:
            break  # this series' thumbnails were made for nothing: at most one series' worth
        views.append(v)
        images += len(v.shots)
        nbytes += size
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        series_report_html(
            title,
            views,
            metrics_rows={k: v.as_dict() for k, v in comparison.results.items()},
            warnings=warnings,
            notes=notes,
            total_series=len(comparison.series),
            total_images=sum(len(g) for g in comparison.series),
            shown_order=order_text,
        ),
        "utf-8",  # as the page declares, whatever the locale
    )
    return out
