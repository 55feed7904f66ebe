"""keeper_core.contact_sheet: thumbnails, paging, sizes at 10k/100k images, escaping, summary."""

from __future__ import annotations

import hashlib
import io
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from keeper_core import storage
from keeper_core.contact_sheet import (
    THUMB_SIZE,
    SheetSummary,
    thumbnail_jpeg,
    thumbnail_name,
    write_contact_sheet,
)
from keeper_core.errors import ConfigError, DataError

# ---------------------------------------------------------------------------------------------
# Helpers


def _ids(n: int, offset: int = 0) -> list[str]:
    return [hashlib.sha256(str(i + offset).encode()).hexdigest() for i in range(n)]


def _frame(group_sizes: list[int], *, folder: str = "s3://photos/2024/wedding") -> pd.DataFrame:
    """A pick frame: groups of the given sizes, one keeper and one alternate each, rest rejects."""
    sizes = np.asarray(group_sizes, dtype=np.int64)
    n = int(sizes.sum())
    group = np.repeat(np.arange(len(sizes)), sizes)
    starts = np.repeat(np.cumsum(sizes) - sizes, sizes)
    k = np.arange(n) - starts  # position within the group: 0 = keeper
    decision = np.where(k == 0, "keep", np.where(k == 1, "alternate", "reject"))
    ts = pd.Timestamp("2024-05-01T09:00:00") + pd.to_timedelta(group * 30 + k, unit="s")
    # Every 9th reject is a near duplicate of the row before it.
    dup = (k >= 2) & (np.arange(n) % 9 == 0)
    reasons = np.empty(n, dtype=object)
    for i in range(n):
        reasons[i] = (
            ["sharpest of the group (sharpness 6.1 vs 5.3)", "eyes open, well exposed"]
            if k[i] == 0
            else ["softer than the keeper (sharpness 4.2 vs 6.1)"]
        )
    return pd.DataFrame(
        {
            "image_uri": [f"{folder}/IMG_{i:06d}.CR3" for i in range(n)],
            "image_id": _ids(n),
            "group": group,
            "group_size": sizes[group],
            "capture_time": [t.isoformat() for t in ts],
            "camera": "Canon EOS R5",
            "rank": k + 1,
            "score": 1.0 - 0.1 * k,
            "prob": 1.0 / sizes[group],
            "decision": decision,
            "reasons": reasons,
            "duplicate_of": np.where(dup, np.arange(n) - 1, -1),
            "duplicate_kind": np.where(dup, "near", None),
        }
    )


def _summary(**overrides: Any) -> SheetSummary:
    values: dict[str, Any] = {
        "images": 12345,
        "groups": 3210,
        "keepers": 3210,
        "alternates": 2100,
        "rejects": 7035,
        "duplicates": 417,
        "failed": 23,
        "seconds": {"embed": 812.4, "group": 3.25, "rank": 41.0},
        "ranker": "zero-shot rule: sharpness + exposure (no trained model)",
    }
    values.update(overrides)
    return SheetSummary(**values)


class _Page(HTMLParser):
    """What a test needs from a page: figures (id, class, title), img srcs/alts, links, scripts."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.figures: list[dict[str, str]] = []
        self.imgs: list[dict[str, str]] = []
        self.links: dict[str, str] = {}  # id -> href
        self.hrefs: list[str] = []
        self.sections: list[dict[str, str]] = []
        self.h2: list[str] = []
        self.scripts = 0
        self._in_h2 = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "figure":
            self.figures.append(a)
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "a":
            self.hrefs.append(a.get("href", ""))
            if "id" in a:
                self.links[a["id"]] = a["href"]
        elif tag == "section":
            self.sections.append(a)
        elif tag == "h2":
            self._in_h2 = True
            self.h2.append("")
        elif tag == "script":
            self.scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "h2":
            self._in_h2 = False

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.h2[-1] += data


def _pages(out: Path) -> list[tuple[str, str]]:
    files = sorted((out / "pages").glob("page-*.html"))
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


def _row_ids(page: _Page) -> list[int]:
    return [int(f["id"].removeprefix("r")) for f in page.figures]


# ---------------------------------------------------------------------------------------------
# Thumbnails


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1000, 500), (256, 128)),
        ((300, 900), (85, 256)),
        ((100, 50), (100, 50)),
        ((256, 256), (256, 256)),
    ],
)
def test_thumbnail_jpeg_fits_longest_side_and_keeps_aspect(
    size: tuple[int, int], expected: tuple[int, int]
) -> None:
    image = Image.new("RGB", size, (200, 30, 30))
    data = thumbnail_jpeg(image)
    thumb = Image.open(io.BytesIO(data))
    assert thumb.format == "JPEG"
    assert thumb.mode == "RGB"
    assert thumb.size == expected
    assert max(thumb.size) <= THUMB_SIZE
    assert image.size == size  # the input is not resized in place


def test_thumbnail_jpeg_composites_alpha_on_white_and_honours_size() -> None:
    rgba = Image.new("RGBA", (400, 200), (0, 0, 0, 0))  # fully transparent black
    thumb = Image.open(io.BytesIO(thumbnail_jpeg(rgba, size=64, quality=90)))
    assert thumb.size == (64, 32)
    assert thumb.mode == "RGB"
    assert min(thumb.getpixel((32, 16))) > 240  # white, not black

    grey = Image.new("L", (50, 50), 128)
    assert Image.open(io.BytesIO(thumbnail_jpeg(grey))).mode == "RGB"


@pytest.mark.parametrize(("size", "quality"), [(0, 80), (-5, 80), (True, 80), (64, 0), (64, 96)])
def test_thumbnail_jpeg_rejects_bad_settings(size: int, quality: int) -> None:
    with pytest.raises(ConfigError):
        thumbnail_jpeg(Image.new("RGB", (10, 10)), size=size, quality=quality)


def test_thumbnail_name_fans_out_by_first_two_hex_digits() -> None:
    image_id = hashlib.sha256(b"x").hexdigest()
    assert thumbnail_name(image_id) == f"thumbs/{image_id[:2]}/{image_id}.jpg"


@pytest.mark.parametrize("bad", ["", "a", "../../etc/passwd", "ABCDEF", "ab/cd", "zz11", "ab cd"])
def test_thumbnail_name_refuses_anything_but_hex(bad: str) -> None:
    with pytest.raises(DataError):
        thumbnail_name(bad)


# ---------------------------------------------------------------------------------------------
# Summary model


def test_summary_is_validated() -> None:
    with pytest.raises(ValidationError):
        _summary(keepers=-1)
    with pytest.raises(ValidationError):
        _summary(seconds={"embed": float("nan")})
    with pytest.raises(ValidationError):
        _summary(colour="red")  # extra fields are typos
    assert _summary().notes == []


# ---------------------------------------------------------------------------------------------
# Scale


def test_ten_thousand_images_page_sizes_and_each_image_once(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    sizes: list[int] = []
    while sum(sizes) < 10_000:
        sizes.append(int(min(rng.geometric(0.25), 10_000 - sum(sizes))))
    picks = _frame(sizes)
    assert len(picks) == 10_000

    index = write_contact_sheet(str(tmp_path), picks, _summary())

    assert index == str(tmp_path / "index.html")
    pages = _pages(tmp_path)
    assert len(pages) == -(-len(sizes) // 100)  # 100 groups a page; no group is over 1000
    page_sizes = [len(text.encode()) for _, text in pages]
    assert max(page_sizes) < 1_000_000
    # Measured ~380 bytes an image with these (realistic) names and reasons.
    assert sum(page_sizes) < 4_000_000
    assert len((tmp_path / "index.html").read_bytes()) < 50_000

    seen: list[int] = []
    for _, text in pages:
        page = _Page(text)
        assert page.scripts == 1  # ours only
        ids = _row_ids(page)
        seen += ids
        assert [img["src"] for img in page.imgs] == [
            "../" + thumbnail_name(picks["image_id"].iloc[i]) for i in ids
        ]
        assert all(img["loading"] == "lazy" for img in page.imgs)
    assert sorted(seen) == list(range(len(picks)))  # every image exactly once


def test_hundred_thousand_images_keep_the_index_small(tmp_path: Path) -> None:
    picks = _frame([4] * 25_000)

    write_contact_sheet(str(tmp_path), picks, _summary(images=100_000), failed=None)

    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert len(index.encode()) < 100_000
    assert len(_pages(tmp_path)) == 250
    assert "pages/page-0250.html" in index


def test_a_huge_group_is_split_into_parts_and_pages_stay_bounded(tmp_path: Path) -> None:
    picks = _frame([3, 25, 2, 4])

    write_contact_sheet(str(tmp_path), picks, _summary(), images_per_page=10)

    pages = [_Page(text) for _, text in _pages(tmp_path)]
    per_page = [_row_ids(p) for p in pages]
    assert [len(ids) for ids in per_page] == [3, 10, 10, 7, 4]  # 5-image tail + next group of 2
    assert all(len(ids) <= 10 for ids in per_page)
    headers = [h for p in pages for h in p.h2]
    assert [h.split(" \u00b7 ")[0] for h in headers] == ["#0", "#1", "#1", "#1", "#2", "#3"]
    assert [("part 1/3" in h, "part 3/3" in h) for h in headers[1:4]] == [
        (True, False),
        (False, False),
        (False, True),
    ]
    assert all("25 images" in h for h in headers[1:4])
    assert sorted(i for ids in per_page for i in ids) == list(range(len(picks)))


# ---------------------------------------------------------------------------------------------
# Paging


@pytest.mark.parametrize(
    ("groups", "per_page", "expected"),
    [(7, 3, [3, 3, 1]), (6, 3, [3, 3]), (1, 3, [1]), (5, 1, [1, 1, 1, 1, 1]), (3, 100, [3])],
)
def test_groups_per_page_boundaries(
    tmp_path: Path, groups: int, per_page: int, expected: list[int]
) -> None:
    picks = _frame([2] * groups)

    write_contact_sheet(str(tmp_path), picks, _summary(), groups_per_page=per_page)

    pages = [(name, _Page(text)) for name, text in _pages(tmp_path)]
    assert [name for name, _ in pages] == [
        f"page-{i:04d}.html" for i in range(1, len(expected) + 1)
    ]
    assert [len(p.sections) for _, p in pages] == expected
    order = [int(s["id"].split("-")[0].removeprefix("g")) for _, p in pages for s in p.sections]
    assert order == list(range(groups))  # time order, each group once
    for number, (_, page) in enumerate(pages, start=1):
        assert page.links.get("prev") == (f"page-{number - 1:04d}.html" if number > 1 else None)
        assert page.links.get("next") == (
            f"page-{number + 1:04d}.html" if number < len(pages) else None
        )
        assert "../index.html" in page.hrefs
    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    for name, _ in pages:
        assert f"href='pages/{name}'" in index


def test_groups_follow_group_numbers_not_row_order(tmp_path: Path) -> None:
    picks = _frame([2, 3, 2]).iloc[::-1].reset_index(drop=True)
    picks["duplicate_of"] = -1
    picks["duplicate_kind"] = None

    write_contact_sheet(str(tmp_path), picks, _summary(), groups_per_page=2)

    pages = [_Page(text) for _, text in _pages(tmp_path)]
    groups = [int(s["id"].split("-")[0].removeprefix("g")) for p in pages for s in p.sections]
    assert groups == [0, 1, 2]
    first = pages[0].figures
    # Keeper first, then the alternate, then rejects, whatever the row order was.
    assert [f["class"] for f in first[:2]] == ["s k", "s a"]
    assert [f["class"] for f in first[2:5]] == ["s k", "s a", "s r"]


# ---------------------------------------------------------------------------------------------
# What a page shows


def test_marks_keepers_alternates_rejects_and_links_duplicates_across_pages(
    tmp_path: Path,
) -> None:
    picks = _frame([3, 3])
    picks.loc[5, ["duplicate_of", "duplicate_kind"]] = [0, "exact"]  # on page 2, dup of page 1
    picks.loc[5, "reasons"] = ["exact duplicate"]
    picks.loc[4, ["rank", "score", "prob", "capture_time"]] = [np.nan, np.nan, np.nan, None]

    write_contact_sheet(str(tmp_path), picks, _summary(), groups_per_page=1)

    (_, first), (_, second) = _pages(tmp_path)
    p1, p2 = _Page(first), _Page(second)
    assert [f["class"] for f in p1.figures] == ["s k", "s a", "s r"]
    assert p1.figures[0]["tabindex"] == "0"  # focusable: reasons show on tap / Tab
    assert p1.figures[0]["title"].splitlines() == [
        "IMG_000000.CR3",
        "rank 1 \u00b7 score 1 \u00b7 p 0.33",
        "sharpest of the group (sharpness 6.1 vs 5.3)",
        "eyes open, well exposed",
    ]
    dup = next(f for f in p2.figures if f["id"] == "r5")
    assert "exact duplicate of s3://photos/2024/wedding/IMG_000000.CR3" in dup["title"]
    assert "page-0001.html#r0" in p2.hrefs
    assert "class='d' href='page-0001.html#r0'>DUP</a>" in second
    unranked = next(f for f in p2.figures if f["id"] == "r4")
    assert "rank \u2013 \u00b7 score \u2013 \u00b7 p \u2013" in unranked["title"]
    assert p2.sections[0]["class"] == "g hr hd"  # what the page filter keys on
    assert "s3://photos/2024/wedding" in p2.h2[0]  # the common folder, once per group
    assert "<select id='f'>" in second


def test_notes_warnings_and_ranker_are_banners_on_every_page(tmp_path: Path) -> None:
    summary = _summary(
        notes=["random CLIP weights: similarities are not meaningful"],
        warnings=["312 images have no capture time: grouped by embedding only"],
    )

    write_contact_sheet(str(tmp_path), _frame([2, 2]), summary, groups_per_page=1)

    for text in [(tmp_path / "index.html").read_text(encoding="utf-8")] + [
        t for _, t in _pages(tmp_path)
    ]:
        assert (
            "<div class='warn'>random CLIP weights: similarities are not meaningful</div>" in text
        )
        assert "<div class='alert'>312 images have no capture time" in text
        assert "Ranked by: <b>zero-shot rule: sharpness + exposure (no trained model)</b>" in text


def test_summary_numbers_are_rendered(tmp_path: Path) -> None:
    write_contact_sheet(str(tmp_path), _frame([2]), _summary())

    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    summary = re.search(r"<table class='m' id='summary'>(.*?)</table>", index)
    assert summary is not None
    heads = re.findall(r"<th>(.*?)</th>", summary.group(1))
    cells = re.findall(r"<td class='n'>(.*?)</td>", summary.group(1))
    assert dict(zip(heads, cells, strict=True)) == {
        "images": "12,345",
        "groups": "3,210",
        "keepers": "3,210",
        "alternates": "2,100",
        "rejects": "7,035",
        "duplicates": "417",
        "failed": "23",
    }
    stages = re.search(r"<table class='m' id='stages'>(.*?)</table>", index)
    assert stages is not None
    rows = re.findall(r"<tr><td>(.*?)</td><td class='n'>(.*?)</td></tr>", stages.group(1))
    assert rows == [("embed", "13 min 32 s"), ("group", "3.2 s"), ("rank", "41.0 s")]
    assert "<th>total</th><th>14 min 16 s</th>" in stages.group(1)


def test_failed_files_are_counted_by_reason_and_capped(tmp_path: Path) -> None:
    n = 250
    failed = pd.DataFrame(
        {
            "image_uri": [f"/photos/bad_{i}.jpg" for i in range(n)],
            "stage": "decode",
            "reason": np.where(np.arange(n) < 240, "truncated", "not_image"),
            "error": "image file is truncated",
        }
    )

    write_contact_sheet(str(tmp_path), _frame([2]), _summary(failed=n), failed=failed)

    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "Files keeper could not read: 250" in index
    assert "<td>decode</td><td>truncated</td><td class='n'>240</td>" in index
    assert "<td>decode</td><td>not_image</td><td class='n'>10</td>" in index
    assert index.count("<td>/photos/bad_") == 200
    assert "/photos/bad_199.jpg" in index
    assert "/photos/bad_200.jpg" not in index
    assert "and 50 more failed files" in index


def test_empty_picks_give_an_index_without_pages(tmp_path: Path) -> None:
    picks = _frame([1]).iloc[:0]

    index = write_contact_sheet(str(tmp_path), picks, _summary(images=0))

    assert "No images to show." in Path(index).read_text(encoding="utf-8")
    assert not (tmp_path / "pages").exists()


# ---------------------------------------------------------------------------------------------
# Escaping


def test_user_data_is_escaped_everywhere(tmp_path: Path) -> None:
    evil_uri = """/photos/<script>alert("x")</script>/a'b"c&d<img src=x onerror=alert(1)>.jpg"""
    evil_reason = """<b>bold</b> & 'quoted' "double" </figure>"""
    picks = _frame([2], folder="/photos")
    picks.loc[0, "image_uri"] = evil_uri
    picks.loc[0, "reasons"] = [evil_reason]
    picks.loc[0, "camera"] = "<i>Cam</i>"
    picks.loc[0, "capture_time"] = "<script>t</script>"
    failed = pd.DataFrame(
        {"image_uri": [evil_uri], "stage": ["<s>"], "reason": ["<r>"], "error": ["<script>e"]}
    )
    summary = _summary(ranker="<script>r</script>", notes=["<script>n</script>"], warnings=["<w>"])

    write_contact_sheet(
        str(tmp_path), picks, summary, failed=failed, title="<script>title</script>"
    )

    index = (tmp_path / "index.html").read_text(encoding="utf-8")
    ((_, text),) = _pages(tmp_path)
    for doc in (index, text):
        for raw in ("<script>alert", "<script>t", "<script>r", "<script>n", "<w>", "<i>Cam"):
            assert raw not in doc
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in index
    for raw in ("<script>e", "<s>", "<r>"):
        assert raw not in index
    page = _Page(text)
    assert page.scripts == 1  # only the page's own script
    assert len(page.figures) == 2  # the reason's </figure> did not close anything
    title_lines = page.figures[0]["title"].splitlines()
    assert title_lines[0] == evil_uri  # the attribute round-trips to exactly the original text
    assert title_lines[-1] == evil_reason
    assert page.imgs[0]["alt"] == """a'b"c&d<img src=x onerror=alert(1)>.jpg"""
    assert len(page.imgs) == 2  # the file name's <img> stayed text


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize(
    ("column", "value", "row"),
    [
        ("decision", "maybe", 1),
        ("image_id", "../../x", 0),
        ("group", -1, 1),
        ("group", np.nan, 0),
        ("duplicate_of", 99, 1),
    ],
)
def test_bad_picks_are_refused_naming_the_row_before_anything_is_written(
    tmp_path: Path, column: str, value: Any, row: int
) -> None:
    picks = _frame([2])
    picks[column] = picks[column].astype(object)
    picks.loc[row, column] = value
    out = tmp_path / "sheet"

    with pytest.raises(DataError) as e:
        write_contact_sheet(str(out), picks, _summary())

    assert e.value.rows == [row]
    assert not out.exists()


def test_missing_columns_and_bad_settings_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="reasons"):
        write_contact_sheet(str(tmp_path), _frame([2]).drop(columns="reasons"), _summary())
    bad_failed = pd.DataFrame({"image_uri": ["a"], "stage": ["x"], "reason": ["y"]})
    with pytest.raises(DataError, match="error"):
        write_contact_sheet(str(tmp_path), _frame([2]), _summary(), failed=bad_failed)
    for kwargs in ({"groups_per_page": 0}, {"images_per_page": 0}, {"groups_per_page": 2.5}):
        with pytest.raises(ConfigError):
            write_contact_sheet(str(tmp_path), _frame([2]), _summary(), **kwargs)
    assert not (tmp_path / "index.html").exists()


def test_writes_to_s3(s3_bucket: str) -> None:
    out = f"s3://{s3_bucket}/runs/pick-1/sheet"

    index = write_contact_sheet(out, _frame([2, 2]), _summary(), groups_per_page=1)

    assert index == f"{out}/index.html"
    assert b"pages/page-0002.html" in storage.read_bytes(index)
    assert b"<figure" in storage.read_bytes(f"{out}/pages/page-0001.html")
