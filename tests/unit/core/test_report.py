"""keeper_core.report: the series page's metric formatting, its "showing K of N" line, escaping."""

from __future__ import annotations

from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from keeper_core.report import (
    SeriesView,
    ShotView,
    format_metric,
    series_report_html,
    thumbnail_data_uri,
)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1000, "1,000"),
        (np.int64(12345), "12,345"),
        (0.5, "0.500"),
        (1.0, "1.000"),  # a rate of 1 is still a rate
        (np.float32(0.25), "0.250"),
        (float("nan"), "nan"),
        (True, "True"),
        ("n/a", "n/a"),
    ],
)
def test_format_metric(value: object, text: str) -> None:
    assert format_metric(value) == text


X = "\"'><script>alert(1)</script>&amp;"


def _view(sid: str, n: int, omitted: int = 0) -> SeriesView:
    shots = [ShotView(f"s3://b/{X}{i}.jpg", None, i == 0, {X: 0.5}, X) for i in range(n)]
    return SeriesView(sid, shots, {X: 1}, omitted=omitted)


def test_shown_line_and_escaping() -> None:
    page = series_report_html(
        X,
        [_view(X, 3, omitted=2)],
        metrics_rows={X: {"top1": 0.5, "n_series": 4000}},
        warnings=[X],
        notes=[X],
        total_series=4000,
        total_images=20_000,
        shown_order=X,
    )
    assert "<script>" not in page
    assert "&amp;amp;" in page  # escaped once, as before
    assert "<td>0.500</td><td>4,000</td>" in page
    assert (
        "Showing 1 of 4,000 series (3 of 20,000 images); the metrics above are over all 4,000 "
        "series." in page
    )
    assert "... and 2 more shots of this series, not shown" in page


def test_shown_line_without_totals() -> None:
    page = series_report_html("t", [_view("a", 2), _view("b", 3)])
    assert "Showing all 2 series (5 images)." in page
    assert "metrics above" not in page
    page = series_report_html("t", [_view("a", 2, omitted=3)])
    assert "Showing 1 of 1 series (2 of 5 images)." in page


class _Imgs(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.imgs: list[dict[str, str | None]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.imgs.append(dict(attrs))


@pytest.mark.parametrize(
    "thumbnail",
    [
        "x' onerror='alert(1)",  # breaks out of the quoted src
        "javascript:alert(1)",
        "https://tracker.example/pixel.gif",  # a report must not load anything from outside
        "data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==",
    ],
)
def test_a_thumbnail_that_is_not_an_image_data_uri_is_not_rendered(thumbnail: str) -> None:
    shot = ShotView("a.jpg", thumbnail, True, {}, "")

    page = series_report_html("t", [SeriesView("s", [shot], {})])

    assert _Imgs(page).imgs == []
    assert "(no image)" in page


def test_a_data_uri_thumbnail_is_rendered_unchanged() -> None:
    uri = thumbnail_data_uri(Image.new("RGB", (40, 30), (10, 100, 200)))
    shot = ShotView("a'b.jpg", uri, True, {}, "")

    page = series_report_html("t", [SeriesView("s", [shot], {})])

    assert f"<img src='{uri}' alt='a&#x27;b.jpg'>" in page
    assert _Imgs(page).imgs == [{"src": uri, "alt": "a'b.jpg"}]
