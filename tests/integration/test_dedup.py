"""keeper index and keeper dedup on a real table: planted copies are grouped, distinct photos are
not, the kept member is the best by the chosen column; the index grows in place; on S3 too.

The table is written by the embed job's own stage functions (decode tasks, model stage, part
writer) called directly: these jobs read a table, and Ray adds nothing to what is tested here.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image
from support import embed_files

from keeper_core import storage
from keeper_core.cli import main as keeper
from keeper_core.synthetic import PHOTOS, load_photos
from keeper_core.vector_index import VectorIndex
from keeper_train.jobs import dedup
from keeper_train.jobs import index as index_job

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
SPEC = "keeper-tiny:random"


def jpeg(im: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def crop(im: Image.Image, share: float) -> Image.Image:
    w, h = im.size
    dx, dy = max(1, int(w * share)), max(1, int(h * share))
    return im.crop((dx, dy, w - dx, h - dy))


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict[str, str]]:
    """17 distinct photos and planted copies: name -> bytes, and copy name -> its original."""
    photos = load_photos(PHOTOS)
    files = {f"{n}.jpg": jpeg(im) for n, im in photos.items()}
    copies = {}
    for n, how in [
        ("astronaut", "q60"),
        ("coffee", "half"),
        ("chelsea", "crop"),
        ("camera", "bytes"),
    ]:
        im = photos[n]
        if how == "q60":
            made = jpeg(im, 60)
        elif how == "half":
            made = jpeg(im.resize((im.width // 2, im.height // 2)))
        elif how == "crop":
            made = jpeg(crop(im, 0.005), 85)
        else:
            made = files[f"{n}.jpg"]
        files[f"copies/{n}-{how}.jpg"] = made
        copies[f"copies/{n}-{how}.jpg"] = f"{n}.jpg"
    return files, copies


def write_table(root: str, files: dict[str, bytes]) -> str:
    return embed_files(root, files, spec=SPEC, parts=2)  # two parts, as a real table has


def test_planted_copies_grouped_and_the_best_kept(
    tmp_path: Path, library: tuple[dict[str, bytes], dict[str, str]]
) -> None:
    files, copies = library
    table = write_table(str(tmp_path), files)
    out = str(tmp_path / "dedup")
    assert keeper(["index", "--table", table]) == 0
    meta = json.loads((tmp_path / "table" / "index" / "index.json").read_text())
    assert meta["count"] == len(files)
    assert meta["model_spec"] == SPEC
    assert (
        keeper(
            [
                "dedup",
                "--table",
                table,
                "--output",
                out,
                "--index",
                f"{table}/index",
                "--keep-by",
                "pixels",
            ]
        )
        == 0
    )

    groups = pd.read_parquet(tmp_path / "dedup" / "groups.parquet")
    photos = str(tmp_path / "photos")
    found = {
        frozenset(Path(u).relative_to(photos).as_posix() for u in g["image_uri"])
        for _, g in groups.groupby("group")
    }
    assert found == {frozenset({c, o}) for c, o in copies.items()}  # every copy; nothing else
    kept = groups[groups["kept"]].set_index("group")
    for _, g in groups.groupby("group"):
        # pixels decides: the original over the half-size copy; ties by URI (copies/ sorts first)
        assert g.loc[g["kept"], "score"].iloc[0] == g["score"].max()
    half = groups[groups["image_uri"].str.endswith("coffee-half.jpg")].iloc[0]
    assert half["duplicate_of"].endswith("/coffee.jpg")
    assert half["kind"] == "near"
    assert half["hamming"] <= 8
    exact = groups[groups["image_uri"].str.endswith("camera-bytes.jpg")].iloc[0]
    assert exact["kind"] == "exact" or kept.loc[exact["group"], "image_uri"] == exact["image_uri"]
    summary = json.loads((tmp_path / "dedup" / "_SUMMARY.json").read_text())
    assert summary["groups"] == len(copies)
    assert summary["duplicates"] == len(copies)
    assert summary["images"] == len(files)
    assert any("random weights" in n for n in summary["notes"])
    page = (tmp_path / "dedup" / "pages" / "page-0001.html").read_text()
    assert "coffee-half.jpg" in page
    assert list((tmp_path / "dedup" / "thumbs").rglob("*.jpg"))


def test_sharpness_decides_and_an_index_grows(
    tmp_path: Path, library: tuple[dict[str, bytes], dict[str, str]]
) -> None:
    files, copies = library
    first = {k: v for k, v in files.items() if not k.startswith("copies/")}
    table = write_table(str(tmp_path), first)
    s = index_job.run(index_job.IndexConfig(table=table, backend="usearch"))
    assert (s.added, s.rows, s.backend) == (len(first), len(first), "usearch")
    write_table(str(tmp_path), {c: files[c] for c in copies})  # the copies arrive: new parts
    grown = index_job.run(index_job.IndexConfig(table=table))
    assert (grown.added, grown.rows, grown.stale) == (len(copies), len(files), 0)
    assert grown.backend == "usearch"  # grown in place, not rebuilt with another backend
    assert len(VectorIndex.load(f"{table}/index")) == len(files)

    result = dedup.run(
        dedup.DedupConfig(table=table, output=str(tmp_path / "d"), index=f"{table}/index")
    )
    assert result.groups == len(copies)
    g = pd.read_parquet(tmp_path / "d" / "groups.parquet")
    for _, members in g.groupby("group"):
        assert members.loc[members["kept"], "score"].iloc[0] == members["score"].max()
    with pytest.raises(Exception, match="not a column of the table"):
        dedup.run(dedup.DedupConfig(table=table, output=str(tmp_path / "e"), keep_by="nope"))


def test_dedup_on_s3_with_an_index_built_in_memory(
    tmp_path: Path, s3_bucket: str, library: tuple[dict[str, bytes], dict[str, str]]
) -> None:
    files, copies = library
    root = f"s3://{s3_bucket}/lib"
    table = write_table(root, files)
    result = dedup.run(dedup.DedupConfig(table=table, output=f"{root}/dedup"))
    assert result.index.startswith("built in memory (exact)")
    assert (result.groups, result.duplicates) == (len(copies), len(copies))
    assert storage.exists(f"{root}/dedup/index.html")
    groups = storage.read_parquet(f"{root}/dedup/groups.parquet").to_pandas()
    assert groups["group_size"].eq(2).all()
