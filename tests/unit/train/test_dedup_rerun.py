"""keeper dedup re-run into its own OUTPUT: no page or thumbnail of an earlier run is left."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs.dedup import DedupConfig, prune, run
from keeper_train.jobs.embed import write_batch

GROUPS = 150  # two pages at the sheet's 100 groups a page


def _table(tmp_path: Path) -> str:
    """GROUPS pairs of byte-identical copies (same image_id), each a small real JPEG."""
    pics = tmp_path / "pics"
    pics.mkdir()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(GROUPS, 16)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    uris, ids, emb = [], [], []
    for g in range(GROUPS):
        image_id = hashlib.sha256(f"img{g}".encode()).hexdigest()[:32]
        for c in range(2):
            p = pics / f"g{g}_{c}.jpg"
            Image.new("RGB", (24, 24), (g, 100 * c, 50)).save(p)
            uris.append(str(p))
            ids.append(image_id)
            emb.append(base[g])
    n = len(uris)
    batch = {
        "image_uri": np.array(uris, dtype=object),
        "image_id": np.array(ids, dtype=object),
        "embedding": np.stack(emb),
        "t_decode": np.zeros(n),
        "t_embed": np.zeros(n),
    }
    for name in FEATURE_NAMES:
        batch[name] = rng.integers(1, 4000, n) if name in ("width", "height") else rng.random(n)
    table = tmp_path / "table"
    write_batch(batch, spec="keeper-tiny:random", embeddings_dir=str(table / "embeddings"))
    return str(table)


def _files(out: Path, sub: str) -> set[str]:
    return {p.relative_to(out).as_posix() for p in (out / sub).rglob("*") if p.is_file()}


def test_dedup_rerun_leaves_no_page_or_thumbnail_of_an_earlier_run(tmp_path: Path) -> None:
    table, out = _table(tmp_path), tmp_path / "out"
    first = run(DedupConfig(table=table, output=str(out)))
    assert first.groups == GROUPS
    assert first.duplicates == GROUPS
    assert _files(out, "pages") == {"pages/page-0001.html", "pages/page-0002.html"}
    assert len(_files(out, "thumbs")) == GROUPS

    # Other settings into the same output: 10 groups shown, one page.
    second = run(DedupConfig(table=table, output=str(out), report_groups=10))
    assert second.groups == GROUPS
    assert _files(out, "pages") == {"pages/page-0001.html"}
    groups = pd.read_parquet(out / "groups.parquet")
    shown = groups[groups["group"] < 10]
    want = {f"thumbs/{i[:2]}/{i}.jpg" for i in shown["image_id"]}
    assert _files(out, "thumbs") == want
    html = (out / "index.html").read_text()
    assert "pages/page-0001.html" in html
    assert "page-0002" not in html

    # The same command again (a re-run after a kill): the same files, nothing removed it shows.
    run(DedupConfig(table=table, output=str(out), report_groups=10))
    assert _files(out, "pages") == {"pages/page-0001.html"}
    assert _files(out, "thumbs") == want


def test_prune_removes_only_sheet_names(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for rel in (
        "pages/page-0001.html",
        "pages/page-0002.html",
        "pages/notes.html",
        "thumbs/ab/abcd.jpg",
        "thumbs/ab/abcd.png",
        "thumbs/README",
        "groups.parquet",
    ):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("x")
    assert prune(str(out), {"page-0001.html"}, set()) == 2
    left = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert left == {
        "pages/page-0001.html",
        "pages/notes.html",
        "thumbs/ab/abcd.png",
        "thumbs/README",
        "groups.parquet",
    }
    assert prune(str(tmp_path / "empty"), set(), set()) == 0
