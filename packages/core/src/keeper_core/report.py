"""Self-contained HTML reports: a grid per series with thumbnails, the true keeper and each
method's pick. Thumbnails are embedded as data URIs, so the file can be mailed or opened from S3.

A data URI is ~5 KB a thumbnail and a browser decodes every one on load (``loading='lazy'`` does
nothing for them), so a page holds at most ``MAX_IMAGES`` thumbnails and ``MAX_THUMB_BYTES`` of
them (a few MB, a second or two to open); ``keeper_core.bestof.write_report`` chooses the series
that fit and the page says how many it shows of how many.
"""

from __future__ import annotations

import base64
import io
import numbers
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from keeper_core import htmltext

#: Thumbnails on one report page: series are added whole until the next would pass either bound.
MAX_IMAGES = 1_000
#: Bytes of thumbnail data URIs on one page (~5 KB each for a 160 px JPEG at quality 80).
MAX_THUMB_BYTES = 5_000_000
# What a thumbnail may be: the page loads nothing from outside and runs no script.
_IMAGE_DATA_URI = re.compile(r"data:image/(?:jpeg|png|webp|gif);base64,[A-Za-z0-9+/]*={0,2}")


def thumbnail_data_uri(image: Image.Image, size: int = 160, quality: int = 80) -> str:
    """A JPEG thumbnail (longest side ``size``) as a ``data:`` URI."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class ShotView:
    """One image of a series as the report shows it."""

    uri: str
    # An image data URI (thumbnail_data_uri), or None when the image could not be decoded;
    # anything else is shown as no image.
    thumbnail: str | None
    is_best: bool
    scores: dict[str, float] = field(default_factory=dict)  # method -> score
    note: str = ""  # e.g. the degradation, or the decode error


@dataclass
class SeriesView:
    series_id: str
    shots: list[ShotView]
    picks: dict[str, int]  # method -> index into shots
    omitted: int = 0  # shots of this series left off the page (one series longer than the cap)


_CSS = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px} .warn{background:#fff3cd;border:1px solid #e0c060;padding:8px 12px;margin:12px 0}
table.m{border-collapse:collapse;margin:12px 0} table.m td,table.m th{border:1px solid #ccc;padding:4px 10px;text-align:right}
.series{border-top:1px solid #ddd;padding:10px 0} .sid{font-weight:600;margin-bottom:6px}
.shots{display:flex;flex-wrap:wrap;gap:10px} .shot{width:170px;font-size:11px;border:3px solid transparent;padding:3px}
.shot.best{border-color:#2a9d3a} .shot img{max-width:160px;display:block}
.tag{display:inline-block;padding:1px 5px;border-radius:3px;margin:1px;color:#fff;font-size:10px}
.keep{background:#2a9d3a} .pick{background:#3564c4} .miss{background:#c44}
.legend span{margin-right:12px} .shown{font-weight:600}
.more{font-size:12px;color:#555;margin-top:4px}
"""


def format_metric(value: object) -> str:
    """A count (an integer) with thousands separators and no decimals, anything else to 3."""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    if isinstance(value, numbers.Real):
        return f"{float(value):.3f}"
    return str(value)


def _shown_line(
    series: Sequence[SeriesView],
    total_series: int | None,
    total_images: int | None,
    with_metrics: bool,
) -> str:
    k = len(series)
    m = sum(len(s.shots) for s in series)
    n = k if total_series is None else total_series
    t = m + sum(s.omitted for s in series) if total_images is None else total_images
    if k == n and m == t:
        return f"Showing all {n:,} series ({t:,} images)."
    line = f"Showing {k:,} of {n:,} series ({m:,} of {t:,} images)"
    if with_metrics:
        line += f"; the metrics above are over all {n:,} series"
    return line + "."


def series_report_html(
    title: str,
    series: Sequence[SeriesView],
    *,
    metrics_rows: Mapping[str, Mapping[str, float]] | None = None,
    warnings: Sequence[str] = (),
    notes: Sequence[str] = (),
    total_series: int | None = None,
    total_images: int | None = None,
    shown_order: str = "",
) -> str:
    """Render a series report.

    Args:
        title: page heading.
        series: the series to show, in display order.
        metrics_rows: method -> {metric: value} shown as a table at the top (ints, the counts,
            without decimals; the rest to 3 decimals).
        warnings: shown prominently (e.g. "random weights: prompt scores are meaningless").
        notes: shown as plain paragraphs.
        total_series: series the metrics are over, when ``series`` shows only some of them.
        total_images: images in those series.
        shown_order: one sentence saying which series are shown, and in what order.
    """
    esc = htmltext.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"]
    parts.append(f"<style>{_CSS}</style></head><body><h1>{esc(title)}</h1>")
    parts += [f"<div class='warn'>{esc(w)}</div>" for w in warnings]
    parts += [f"<p>{esc(n)}</p>" for n in notes]
    if metrics_rows:
        cols = list(next(iter(metrics_rows.values())).keys())
        parts.append("<table class='m'><tr><th>method</th>")
        parts += [f"<th>{esc(c)}</th>" for c in cols]
        parts.append("</tr>")
        for name, row in metrics_rows.items():
            cells = "".join(
                f"<td>{esc(format_metric(row.get(c, float('nan'))))}</td>" for c in cols
            )
            parts.append(f"<tr><th>{esc(name)}</th>{cells}</tr>")
        parts.append("</table>")
    shown = _shown_line(series, total_series, total_images, bool(metrics_rows))
    order = f" {esc(shown_order)}" if shown_order else ""
    parts.append(f"<p id='shown'><span class='shown'>{esc(shown)}</span>{order}</p>")
    parts.append(
        "<p class='legend'><span class='tag keep'>keeper</span> the true best shot "
        "<span class='tag pick'>method</span> a method picked the keeper "
        "<span class='tag miss'>method</span> a method picked another shot</p>"
    )
    for s in series:
        parts.append(f"<div class='series'><div class='sid'>series {esc(s.series_id)}</div>")
        parts.append("<div class='shots'>")
        for i, shot in enumerate(s.shots):
            cls = "shot best" if shot.is_best else "shot"
            parts.append(f"<div class='{cls}' title='{esc(shot.uri)}'>")
            if shot.thumbnail and _IMAGE_DATA_URI.fullmatch(shot.thumbnail):
                parts.append(f"<img src='{shot.thumbnail}' alt='{esc(shot.uri)}'>")
            else:
                parts.append("<div>(no image)</div>")
            if shot.is_best:
                parts.append("<span class='tag keep'>keeper</span>")
            for method, idx in s.picks.items():
                if idx == i:
                    kind = "pick" if shot.is_best else "miss"
                    parts.append(f"<span class='tag {kind}'>{esc(method)}</span>")
            score_txt = ", ".join(f"{esc(k)} {v:.3f}" for k, v in shot.scores.items())
            parts.append(f"<div>{score_txt}</div>")
            if shot.note:
                parts.append(f"<div>{esc(shot.note)}</div>")
            parts.append("</div>")
        parts.append("</div>")
        if s.omitted:
            parts.append(
                f"<div class='more'>... and {s.omitted:,} more shots of this series, not shown "
                "(the keeper and every pick are)</div>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    return "".join(parts)
