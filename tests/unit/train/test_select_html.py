"""keeper_train.jobs.select's index.html: bounded thumbnails at any top_n and top_k, inlined once.

Built as the job's finish step builds it (``finish_query`` over a Plan of random embeddings), with
a judged pass that has a distinct fake data URI per survivor, so a duplicate is countable.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import numpy as np

from keeper_train.jobs import select as S

X = "\"'><script>alert(1)</script><img src=x onerror=alert(2)>&amp;"


def _page(
    tmp_path: Path,
    n: int,
    top_n: int,
    top_k: int,
    *,
    uri: Callable[[int], str] = lambda i: f"s3://photos/day{i // 500}/IMG_{i:06d}.jpg",
    query: S.Query | None = None,
) -> str:
    q = query or S.Query(name="beach", positive=["a photo of a beach"], negative=["a street"])
    cfg = S.SelectJobConfig(
        table=str(tmp_path / "table"),
        queries=[q],
        output=str(tmp_path / "out"),
        cascade={"top_n": top_n, "top_k": top_k, "dedup_threshold": None, "beta": 0.0},
        vlm=None,
    )
    rng = np.random.default_rng(0)
    d = 16
    emb = rng.normal(size=(n, d)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    c = S.Candidates(
        image_id=[f"{i:064x}" for i in range(n)],
        image_uri=[uri(i) for i in range(n)],
        width=np.full(n, 4000.0),
        height=np.full(n, 3000.0),
        embeddings=emb,
        spec="keeper-tiny:random",
    )
    pos = rng.normal(size=(1, d)).astype(np.float32)
    neg = rng.normal(size=(2, d)).astype(np.float32)
    neg /= np.linalg.norm(neg, axis=1, keepdims=True)
    pq = S.PreparedQuery(q, pos / np.linalg.norm(pos), neg, np.zeros(0, np.int64))
    pq.survivors = S.survivors(S.cascade_for(c, pq, cfg.cascade))
    thumbs = {int(i): f"data:image/jpeg;base64,THUMB{int(i)}END" for i in pq.survivors}
    judged = S.Judged({}, thumbs, None, len(pq.survivors), 0.0)
    p = S.Plan(cfg, c, [pq], cfg.cascade, "config", {})
    S.finish_query(p, 0, judged, S._vlm_note(cfg, judged), None)
    return (tmp_path / "out" / q.name / S.INDEX).read_text()


def _topn_rows(page: str) -> int:
    table = page[page.index("id='topn'") :]
    return table[: table.index("</table>")].count("<tr><td")


def _thumbs(page: str) -> list[str]:
    return re.findall(r"THUMB\d+END", page)


def test_default_picks_inlined_once(tmp_path: Path) -> None:
    page = _page(tmp_path, 1000, 20, 10)
    # 10 cards, and the 10 top-N rows that are not picks; the picks' rows link to their cards.
    assert page.count("<img ") == 20
    assert len(_thumbs(page)) == len(set(_thumbs(page))) == 20
    assert page.count("<a href='#pick") == 10
    assert all(f"id='pick{r}'" in page for r in range(1, 11))
    assert "loading='lazy'" not in page  # useless on data: URIs
    assert "more picks" not in page
    assert "more (all in scored.parquet)" not in page
    assert "topn-bounds" not in page


def test_10000_picks_stay_bounded(tmp_path: Path) -> None:
    page = _page(tmp_path, 10_000, 10_000, 10_000)
    thumbs = _thumbs(page)
    assert page.count("<img ") == len(thumbs) <= S.PAGE_PICKS + S.PAGE_ROW_THUMBS
    assert len(thumbs) == len(set(thumbs))  # each thumbnail once
    assert page.count("<div class='pick' ") == S.PAGE_PICKS
    assert _topn_rows(page) == S.PAGE_ROWS
    assert "... and 9,800 more picks without a card (all in scored.parquet" in page
    assert "... and 9,000 more (all in scored.parquet)." in page
    assert "<h2>Picks: 10,000</h2>" in page
    assert "Top-N: 10,000 reached the VLM stage" in page
    assert len(page) < 1_000_000


def test_many_rows_few_picks(tmp_path: Path) -> None:
    page = _page(tmp_path, 5000, 1000, 100)
    # 100 cards; the first 200 rows: the 100 picks link to them, 100 others get thumbnails.
    assert page.count("<img ") == 200
    assert len(set(_thumbs(page))) == 200
    assert "Thumbnails on the first 200 rows" in page
    assert "rows are listed" not in page  # all 1,000 rows are
    assert _topn_rows(page) == 1000
    assert "more (all in scored.parquet)" not in page


def test_escaping(tmp_path: Path) -> None:
    q = S.Query(name="q1", positive=[X + "pos"], negative=[X + "neg"], vlm_query=X)
    page = _page(tmp_path, 300, 250, 220, uri=lambda i: f"s3://b/{X}/{i}.jpg", query=q)
    tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            tags.append((tag, attrs))

    Tags().feed(page)
    assert not [t for t, _ in tags if t == "script"]
    assert not [a for _, attrs in tags for a, _ in attrs if a == "onerror"]
    assert "<script>" not in page
    assert "&amp;amp;" in page
    assert page.count("<img ") <= S.PAGE_PICKS + S.PAGE_ROW_THUMBS
