"""keeper_core.bestof.write_report: the pick a report marks agrees with the metrics on
ties. The metrics count every tie against the keeper (a constant scorer has top-1 = 0); the report
used to mark ``argmax``'s pick, the first tied shot, so on a manifest listing keepers first it
showed a constant scorer picking every keeper ("a method picked the keeper") and filed those
series last, among "every method gets right"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from keeper_core.bestof import compare_methods, write_report

# Two series, keeper listed first in each.
MANIFEST = pd.DataFrame(
    {
        "series_id": ["a", "a", "a", "b", "b"],
        "image_uri": [f"img/{i}.jpg" for i in range(5)],
        "is_best": [1, 0, 0, 1, 0],
    }
)


def _load(_uri: str) -> Image.Image:
    return Image.new("RGB", (8, 8), (90, 90, 90))


def test_a_constant_scorer_is_never_shown_picking_the_keeper(tmp_path: Path) -> None:
    scores = {"flat": np.zeros(5)}
    c = compare_methods(MANIFEST, scores)
    assert c.results["flat"].top1 == 0.0  # the metric: no keeper found
    html = write_report(tmp_path / "r.html", "t", c, scores, _load, note_column=None).read_text()
    assert "<span class='tag pick'>flat</span>" not in html  # the report agreed it found both
    assert html.count("<span class='tag miss'>flat</span>") == 2


def test_a_tie_at_the_top_is_a_miss_and_a_strict_top_is_a_pick(tmp_path: Path) -> None:
    # Series a: the keeper ties the best other shot (rank 2 in the metrics); series b: the keeper
    # alone on top (rank 1). One miss, one pick, and the pick mark sits on b's keeper.
    scores = {"m": np.array([0.9, 0.9, 0.1, 0.8, 0.2])}
    c = compare_methods(MANIFEST, scores)
    assert c.results["m"].top1 == 0.5
    html = write_report(tmp_path / "r.html", "t", c, scores, _load, note_column=None).read_text()
    assert html.count("<span class='tag pick'>m</span>") == 1
    assert html.count("<span class='tag miss'>m</span>") == 1
    # The series the method misses comes first, as the page says.
    assert html.index("series a") < html.index("series b")
