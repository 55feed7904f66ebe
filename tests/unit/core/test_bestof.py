"""keeper_core.bestof: per-method series metrics and the HTML report, on hand-computed cases."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from keeper_core.bestof import compare_methods, write_report
from keeper_core.report import MAX_IMAGES, thumbnail_data_uri

# Three series of 2, 3 and 4 shots; keepers at positions 1, 0 and 2.
# Series ids sort differently from manifest order: results follow the sorted ids.
MANIFEST = pd.DataFrame(
    {
        "series_id": ["s2", "s2", "s1", "s1", "s1", "s3", "s3", "s3", "s3"],
        "image_uri": [f"img/{i}.jpg" for i in range(9)],
        "is_best": [False, True, True, False, False, False, False, True, False],
        "degradation": ["defocus", "", "", "noise", "haze", "jpeg", "motion", "", "noise"],
    }
)
# good: s2 rank 1; s1 rank 2 (0.7 > 0.5); s3 rank 3 (0.8, 0.9 > 0.6).
GOOD = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.8, 0.6, 0.9])
# bad = -good: s2 rank 2; s1 rank 2 (-0.2 > -0.5); s3 rank 2 (-0.3 > -0.6).
BAD = -GOOD
# flat: ties count against the keeper when the competitor comes first:
# s2 rank 2 (index 0 ties first); s1 rank 1 (keeper is first); s3 rank 3.
FLAT = np.zeros(9)


def test_compare_methods_hand_computed() -> None:
    c = compare_methods(MANIFEST, {"good": GOOD, "bad": BAD, "flat": FLAT})
    assert c.left_out == 0
    assert [g["series_id"].iloc[0] for g in c.series] == ["s1", "s2", "s3"]
    assert [list(g.index) for g in c.series] == [[2, 3, 4], [0, 1], [5, 6, 7, 8]]
    assert c.best == [0, 1, 2]

    good = c.results["good"]  # ranks (s1, s2, s3) = (2, 1, 3)
    assert good.n_series == 3
    assert good.top1 == pytest.approx(1 / 3)
    assert good.top2 == pytest.approx(2 / 3)
    assert good.top3 == pytest.approx(1.0)
    assert good.mean_rank == pytest.approx(2.0)
    assert good.mrr == pytest.approx((1 / 2 + 1 + 1 / 3) / 3)
    assert good.random_top1 == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert good.random_mean_rank == pytest.approx((2 + 1.5 + 2.5) / 3)

    bad = c.results["bad"]  # ranks (2, 2, 2)
    assert (bad.top1, bad.top2, bad.mean_rank, bad.mrr) == (0.0, 1.0, 2.0, 0.5)

    flat = c.results["flat"]  # every shot tied: the keeper ranks last, (3, 2, 4)
    assert flat.top1 == 0.0
    assert flat.mrr == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert flat.mean_rank == pytest.approx(3.0)

    table = c.table()
    assert "good" in table
    assert "bad" in table


def test_nan_scores_leave_the_series_out_for_every_method() -> None:
    good = GOOD.copy()
    good[3] = np.nan  # s1 (not its keeper): the whole series goes, for both methods
    bad = BAD.copy()
    bad[5] = np.nan  # s3
    c = compare_methods(MANIFEST, {"good": good, "bad": bad})
    assert c.left_out == 2
    assert [g["series_id"].iloc[0] for g in c.series] == ["s2"]
    assert c.best == [1]
    assert c.results["good"].n_series == 1
    assert c.results["good"].top1 == 1.0
    assert c.results["bad"].top1 == 0.0
    assert c.results["bad"].mean_rank == 2.0

    inf = GOOD.copy()
    inf[0] = np.inf  # not finite either
    c = compare_methods(MANIFEST, {"good": inf})
    assert c.left_out == 1
    assert c.results["good"].n_series == 2
    assert c.results["good"].mean_rank == pytest.approx((2 + 3) / 2)


def test_single_shot_series_is_left_out() -> None:
    extra = pd.DataFrame(
        {"series_id": ["s4"], "image_uri": ["img/9.jpg"], "is_best": [True], "degradation": [""]}
    )
    manifest = pd.concat([MANIFEST, extra], ignore_index=True)
    c = compare_methods(manifest, {"good": np.append(GOOD, 1.0)})
    assert c.left_out == 1
    assert c.results["good"].n_series == 3
    assert c.results["good"].mean_rank == pytest.approx(2.0)


@pytest.mark.parametrize("bad", [np.zeros(8), np.zeros(10), np.zeros((9, 1)), np.zeros((3, 3))])
def test_wrong_shaped_scores_raise(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"'oops' have shape .* expected \(9,\)"):
        compare_methods(MANIFEST, {"good": GOOD, "oops": bad})


def _loader(missing: set[str]) -> tuple[list[str], Callable[[str], Image.Image | None]]:
    calls: list[str] = []

    def load(uri: str) -> Image.Image | None:
        calls.append(uri)
        if uri in missing:
            return None
        return Image.new("RGB", (40, 30), (10 * len(calls), 100, 200))

    return calls, load


def test_write_report(tmp_path: Path) -> None:
    scores = {"good": GOOD, "bad": BAD}
    c = compare_methods(MANIFEST, scores)
    calls, load = _loader({"img/3.jpg"})
    out = write_report(
        tmp_path / "sub" / "report.html",
        "My <report>",
        c,
        scores,
        load,
        max_series=2,
        warnings=["weights are RANDOM"],
        notes=["a note"],
    )
    assert out == tmp_path / "sub" / "report.html"
    html = out.read_text()
    # Only the first two series (sorted ids s1, s2): five shots, one without an image.
    assert calls == ["img/2.jpg", "img/3.jpg", "img/4.jpg", "img/0.jpg", "img/1.jpg"]
    assert html.count("<div class='series'>") == 2
    assert "series s1" in html
    assert "series s2" in html
    assert "series s3" not in html
    assert html.count("(no image)") == 1
    assert html.count("src='data:image/jpeg;base64,") == 4
    # The keeper tag: once in the legend, once per shown series.
    assert html.count("<span class='tag keep'>keeper</span>") == 1 + 2
    assert html.count("class='shot best'") == 2
    # good picks the keeper in s2 (a "pick"); bad misses in both series.
    assert html.count("<span class='tag pick'>good</span>") == 1
    assert html.count("<span class='tag miss'>bad</span>") == 2
    assert "My &lt;report&gt;" in html
    assert "<div class='warn'>weights are RANDOM</div>" in html
    assert "<p>a note</p>" in html
    assert "noise" in html  # the degradation note of img/3
    assert "good 0.700" in html


def test_write_report_default_shows_every_series(tmp_path: Path) -> None:
    scores = {"good": GOOD}
    c = compare_methods(MANIFEST, scores)
    calls, load = _loader(set())
    html = write_report(tmp_path / "r.html", "t", c, scores, load, note_column=None).read_text()
    assert html.count("<div class='series'>") == 3
    assert len(calls) == 9
    assert "(no image)" not in html
    assert "defocus" not in html  # note_column=None: no degradation notes


def _many(n_series: int, per: int) -> pd.DataFrame:
    n = n_series * per
    return pd.DataFrame(
        {
            "series_id": np.repeat([f"s{i:05d}" for i in range(n_series)], per),
            "image_uri": [f"img/{i}.jpg" for i in range(n)],
            "is_best": np.tile([True] + [False] * (per - 1), n_series),
        }
    )


def test_report_at_10000_images_is_capped_and_says_so(tmp_path: Path) -> None:
    manifest = _many(1000, 10)
    rng = np.random.default_rng(0)
    scores = {"a": rng.random(len(manifest)), "b": rng.random(len(manifest))}
    c = compare_methods(manifest, scores)
    calls, load = _loader(set())
    html = write_report(
        tmp_path / "r.html", "t", c, scores, load, max_series=1000, note_column=None
    ).read_text()
    # Series go in whole: 100 of them fill the 1,000 thumbnails; no image beyond is even read.
    assert html.count("<img ") == MAX_IMAGES == len(calls) == 1000
    assert html.count("<div class='series'>") == 100
    assert (
        "Showing 100 of 1,000 series (1,000 of 10,000 images); the metrics above are over all "
        "1,000 series." in html
    )
    assert "<td>1,000</td>" in html  # n_series, a count: no decimals
    assert "1000.000" not in html
    assert len(html) < 2_000_000  # these test thumbnails are tiny; the byte cap is tested below


def test_report_byte_cap_stops_at_a_whole_series(tmp_path: Path) -> None:
    manifest = _many(20, 5)
    scores = {"a": np.arange(len(manifest), dtype=np.float64)}
    c = compare_methods(manifest, scores)
    _, load = _loader(set())
    one = len(thumbnail_data_uri(Image.new("RGB", (40, 30), (10, 100, 200))))
    html = write_report(
        tmp_path / "r.html", "t", c, scores, load, max_thumb_bytes=int(one * 12.5)
    ).read_text()
    # Two series (10 thumbnails) fit under 12.5 thumbnails' bytes; the third would pass it.
    assert html.count("<div class='series'>") == 2
    assert "Showing 2 of 20 series (10 of 100 images)" in html


def test_one_series_longer_than_the_cap_shows_keeper_and_picks(tmp_path: Path) -> None:
    per = 50
    manifest = _many(1, per)
    good = np.zeros(per)
    good[0] = 1.0  # picks the keeper (position 0)
    late = np.zeros(per)
    late[40] = 1.0  # picks position 40, beyond the first shots
    scores = {"good": good, "late": late}
    c = compare_methods(manifest, scores)
    calls, load = _loader(set())
    html = write_report(
        tmp_path / "r.html", "t", c, scores, load, max_images=10, note_column=None
    ).read_text()
    assert html.count("<img ") == 10
    assert "img/40.jpg" in calls
    assert "img/0.jpg" in calls
    assert "... and 40 more shots of this series, not shown" in html
    assert "Showing 1 of 1 series (10 of 50 images)" in html
    assert html.count("<span class='tag pick'>good</span>") == 1
    assert html.count("<span class='tag miss'>late</span>") == 1


def test_report_order_disagreements_first_then_misses(tmp_path: Path) -> None:
    # s1: both right; s2: both wrong on the same shot; s3: they disagree.
    manifest = pd.DataFrame(
        {
            "series_id": ["s1", "s1", "s2", "s2", "s3", "s3"],
            "image_uri": [f"img/{i}.jpg" for i in range(6)],
            "is_best": [True, False, True, False, True, False],
        }
    )
    a = np.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    b = np.array([1.0, 0.0, 0.0, 1.0, 0.0, 1.0])
    c = compare_methods(manifest, {"a": a, "b": b})
    _, load = _loader(set())
    html = write_report(tmp_path / "r.html", "t", c, {"a": a, "b": b}, load).read_text()
    where = [html.index(f"series {s}</div>") for s in ("s3", "s2", "s1")]
    assert where == sorted(where)
    assert "Showing all 3 series (6 images)." in html
    assert "methods pick different shots come first" in html

    # One method: the series it gets wrong first, named (and escaped).
    c = compare_methods(manifest, {"<a>": b})
    html = write_report(tmp_path / "r1.html", "t", c, {"<a>": b}, load).read_text()
    where = [html.index(f"series {s}</div>") for s in ("s2", "s3", "s1")]
    assert where == sorted(where)
    assert "Series where &lt;a&gt; misses the keeper come first" in html
    assert "<a>" not in html


def test_the_report_is_utf_8_whatever_the_locale(tmp_path: Path) -> None:
    """The page declares charset utf-8; under an ASCII locale (LC_ALL=C without Python's UTF-8
    mode) a title or name outside ASCII made write_text raise instead."""
    import subprocess
    import sys

    code = f"""
import numpy as np, pandas as pd
from keeper_core.bestof import compare_methods, write_report
m = pd.DataFrame({{"series_id": ["s", "s"], "image_uri": ["/p/caf\\u00e9.jpg", "/p/b.jpg"],
                   "is_best": [1, 0]}})
s = {{"rule": np.array([1.0, 0.0])}}
write_report({str(tmp_path / "r.html")!r}, "Caf\\u00e9 \\u2014 \\u00e9t\\u00e9", compare_methods(m, s), s,
             lambda uri: None)
"""
    env = {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Café — été" in (tmp_path / "r.html").read_text("utf-8")
