"""keeper unpick: what a pick run wrote into a library's XMP taken out again, a person's
ratings left, every file counted once.

The runs are test_xmp_feedback's (``_write_run``: sidecars beside PHOTOS, IMG_1's RAW+JPEG pair
sharing the RAW's) and test_xmp_feedback_embed's (``_embed_run``: pick's own ``write_sidecars``
with ``xmp=embed``). No Ray.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support_jpeg import camera_jpeg, set_rating_as_a_tool_does
from test_xmp_feedback import PHOTOS, ROOT, _rate, _write_run
from test_xmp_feedback_embed import _embed_run

from keeper_core.cli import main as keeper
from keeper_core.embedded_xmp import content_digest, read_embedded_xmp
from keeper_core.handback import read_sidecar
from keeper_train.jobs import pick
from keeper_train.jobs.unpick import UnpickConfig, UnpickSummary, describe, run


def _adds_up(s: UnpickSummary) -> None:
    assert s.files == s.cleaned + s.deleted + s.untouched + s.absent + len(s.failed)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture
def culled(tmp_path: Path) -> tuple[Path, Path]:
    """A beside run after the photographer's pass: IMG_2 rated up (a person's 5), IMG_7's
    sidecar deleted, IMG_8's overwritten by something that is not XMP, and a keyword added to
    IMG_4's by a photo tool."""
    out, photos = _write_run(tmp_path)
    _rate(photos / "IMG_2.xmp", 3, 5)
    (photos / "IMG_7.xmp").unlink()
    (photos / "IMG_8.xmp").write_bytes(b"\x00\x01 not xmp")
    text = (photos / "IMG_4.xmp").read_text()
    (photos / "IMG_4.xmp").write_text(text.replace(' xmp:Rating="5"', ' xmp:Rating="5" xmp:Nickname="first dance"'))  # fmt: skip
    return out, photos


def test_a_beside_run_is_undone_and_a_persons_rating_stays(culled: tuple[Path, Path]) -> None:
    out, photos = culled
    before = _snapshot(photos)

    told = run(UnpickConfig(run=str(out), dry_run=True))
    assert _snapshot(photos) == before  # a dry run writes nothing
    s = run(UnpickConfig(run=str(out)))

    for summary in (told, s):
        _adds_up(summary)
        assert (summary.xmp, summary.photos, summary.files) == ("beside", 9, 8)  # a pair's one
        # IMG_2: the person's 5 stays; IMG_4: the tool's nickname stays
        assert (summary.cleaned, summary.deleted, summary.absent) == (2, 4, 1)
        assert summary.kept_ratings == 1
        assert [f.uri.rpartition("/")[2] for f in summary.failed] == ["IMG_8.xmp"]
    assert told.dry_run
    assert not s.dry_run
    left = sorted(p.name for p in photos.glob("*.xmp"))
    assert left == ["IMG_2.xmp", "IMG_4.xmp", "IMG_8.xmp"]
    assert read_sidecar(str(photos / "IMG_2.xmp")) == {"Xmp.xmp.Rating": "5"}
    assert read_sidecar(str(photos / "IMG_4.xmp")) == {"Xmp.xmp.Nickname": "first dance"}
    assert (photos / "IMG_8.xmp").read_bytes() == b"\x00\x01 not xmp"
    assert "would be removed" in describe(told)
    # the summary docs/picking.md shows is this run's
    docs = (ROOT / "docs" / "picking.md").read_text()
    shown = docs.split("The summary counts every file once")[1].split("```")[1].strip("\n")
    shown = shown.replace("/home/ana/culls/wedding", str(out))
    assert describe(s) == shown.replace("/home/ana/Pictures/2026-06-wedding", str(photos))

    again = run(UnpickConfig(run=str(out)))  # nothing of keeper's is left
    _adds_up(again)
    assert (again.cleaned, again.deleted, again.untouched, again.absent) == (0, 0, 2, 5)


def test_an_embed_run_gives_the_jpegs_back_as_they_were(tmp_path: Path) -> None:
    out, photos = _embed_run(tmp_path)
    originals = {n: camera_jpeg(seed=i) for i, (n, *_) in enumerate(PHOTOS) if n.endswith(".JPG")}
    _give_the_table_content_ids(out, photos)
    set_rating_as_a_tool_does(str(photos / "IMG_5.JPG"), 4)  # a person's 4 in Lightroom
    (photos / "IMG_8.xmp").unlink()  # a JPEG without an earlier sidecar: nothing to count

    s = run(UnpickConfig(run=str(out)))

    _adds_up(s)
    # 7 JPEGs, the RAW's sidecar, and the 6 sidecars an earlier beside run left by the JPEGs,
    # which pick updated too: all keeper's but IMG_6's, where a person's 2 stays
    assert (s.xmp, s.files, s.in_jpegs) == ("embed", 14, 7)
    assert (s.deleted, s.cleaned, s.absent, s.failed, s.kept_ratings) == (12, 2, 0, [], 2)
    for name, photo in originals.items():
        if name in ("IMG_1.JPG", "IMG_5.JPG"):  # the RAW's pair was not written; a tool wrote
            continue
        assert (photos / name).read_bytes() == photo, name
    assert read_embedded_xmp(str(photos / "IMG_5.JPG")) == {"Xmp.xmp.Rating": "4"}
    assert not (photos / "IMG_1.xmp").exists()  # the RAW's: keeper made it
    assert read_sidecar(str(photos / "IMG_6.xmp")) == {"Xmp.xmp.Rating": "2"}  # a person's 2
    assert s.restamped == 7  # every JPEG rewritten: XMP aside, their content is the same


def _give_the_table_content_ids(out: Path, photos: Path) -> None:
    """The run's table as keeper embed writes it: each JPEG's content digest (XMP aside), so
    the JPEGs unpick rewrites can be restamped."""
    part = out / "table" / "embeddings" / "part-00000.parquet"
    t = pq.read_table(part)
    ids = []
    for uri in t.column("image_uri").to_pylist():
        data = Path(uri).read_bytes() if Path(uri).exists() else b""
        ids.append(content_digest(data, uri) if uri.endswith(".JPG") else None)
    pq.write_table(t.append_column("content_id", pa.array(ids, pa.string())), part)


def test_the_command_line_as_the_docs_give_it(
    culled: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, photos = culled
    args = ["unpick", "--run", str(out), "--dry-run"]
    assert keeper(args) == 1  # IMG_8's sidecar cannot be read: a failure, exit 1
    assert "dry run: nothing written" in capsys.readouterr().out
    assert (photos / "IMG_3.xmp").exists()
    docs = (ROOT / "docs" / "picking.md").read_text()
    assert "keeper unpick --run ~/culls/wedding --dry-run" in docs  # as shown there
    (photos / "IMG_8.xmp").unlink()
    assert keeper(shlex.split(f"unpick --run {out}")) == 0
    assert sorted(p.name for p in photos.glob("*.xmp")) == ["IMG_2.xmp", "IMG_4.xmp"]


def test_a_mirror_is_undone_where_pick_put_it(tmp_path: Path) -> None:
    """xmp=mirror: the sidecars under OUTPUT/xmp, undone where they are."""
    out, photos = _write_run(tmp_path)
    for sidecar in photos.glob("*.xmp"):
        sidecar.unlink()
    picks = pq.read_table(out / "picks.parquet").to_pandas()
    cfg = pick.PickJobConfig(input=str(photos), output=str(out), xmp="mirror")
    done = pick.write_sidecars(cfg, picks, str(photos))
    assert done.written == 8
    summary = json.loads((out / "_SUMMARY.json").read_text())
    summary.update(xmp="mirror", xmp_root=str(photos), outputs={"xmp": str(out / "xmp")})
    (out / "_SUMMARY.json").write_text(json.dumps(summary))

    s = run(UnpickConfig(run=str(out)))

    _adds_up(s)
    assert (s.xmp, s.files, s.deleted) == ("mirror", 8, 8)
    assert not list((out / "xmp").rglob("*.xmp"))


def test_keepers_takes_back_the_copies_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from keeper_core.handback import export_keepers

    out, photos = _write_run(tmp_path)
    for name, *_ in PHOTOS:
        (photos / name).write_bytes(name.encode() * 50)
    keepers = [str(photos / n) for n, _, _, decision, _ in PHOTOS if decision == "keep"]
    dest = tmp_path / "keepers"
    export_keepers(keepers, input_root=str(photos), dest=str(dest), mode="copy")
    summary = json.loads((out / "_SUMMARY.json").read_text())
    summary["outputs"]["keepers"] = str(dest)
    (out / "_SUMMARY.json").write_text(json.dumps(summary))

    assert keeper(["unpick", "--run", str(out), "--keepers"]) == 0

    printed = capsys.readouterr().out
    assert f"keepers   3 of keeper's copies and links removed from {dest}, 0 left" in printed
    assert not dest.exists()
    assert all(Path(u).exists() for u in keepers)


def test_keepers_without_a_keepers_folder_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, photos = _write_run(tmp_path)
    assert keeper(["unpick", "--run", str(out), "--keepers"]) == 2
    assert "made no keepers folder" in capsys.readouterr().err
    assert len(list(photos.glob("*.xmp"))) == 8  # nothing done


def test_keepers_hard_linked_after_an_embed_run_are_unlinked_first(tmp_path: Path) -> None:
    """pick --xmp embed --link-keepers: each keeper JPEG has a second name, so its rewrite is
    refused (the other name would keep the old bytes) unless --keepers takes the links first."""
    from keeper_core.handback import export_keepers

    out, photos = _embed_run(tmp_path)
    keepers = [str(photos / n) for n, _, _, d, _ in PHOTOS if d == "keep" and n.endswith(".JPG")]
    dest = tmp_path / "keepers"
    export_keepers(keepers, input_root=str(photos), dest=str(dest), mode="hardlink")
    summary = json.loads((out / "_SUMMARY.json").read_text())
    summary["outputs"]["keepers"] = str(dest)
    (out / "_SUMMARY.json").write_text(json.dumps(summary))

    told = run(UnpickConfig(run=str(out), dry_run=True))  # says what the real run will do
    assert sorted(f.reason.split(":")[0] for f in told.failed) == ["has 2 hard links"] * 2
    told = run(UnpickConfig(run=str(out), dry_run=True, keepers=True))
    assert told.failed == []
    assert told.keepers is not None
    assert told.keepers.removed == 2
    assert dest.exists()

    s = run(UnpickConfig(run=str(out), keepers=True))

    assert s.failed == []
    assert s.keepers is not None
    assert (s.keepers.removed, s.keepers.left) == (2, [])
    assert not dest.exists()
    assert all(read_embedded_xmp(u) is None for u in keepers)


def test_a_mirror_into_the_librarys_own_bucket_is_undone(s3_bucket: str, tmp_path: Path) -> None:
    """A library on S3 whose sidecars pick mirrored into its own prefix (out_dir=input_root),
    the run's folder in the bucket too: undone there, the run's lock held in the bucket."""
    import io

    from keeper_core import storage
    from keeper_core.handback import plan_sidecars, write_sidecar

    local_out, _ = _write_run(tmp_path)
    photos, out = f"s3://{s3_bucket}/photos", f"s3://{s3_bucket}/culls"
    picks = pq.read_table(local_out / "picks.parquet").to_pandas()
    picks["image_uri"] = [f"{photos}/{n}" for n in picks["file_name"]]
    buf = io.BytesIO()
    picks.to_parquet(buf)
    storage.write_bytes(f"{out}/picks.parquet", buf.getvalue())
    summary = json.loads((local_out / "_SUMMARY.json").read_text())
    summary.update(input=photos, output=out, xmp="mirror", xmp_root=photos, outputs={"xmp": photos})
    storage.write_bytes(f"{out}/_SUMMARY.json", json.dumps(summary).encode())
    uris = picks["image_uri"].tolist()
    for p in plan_sidecars(uris, input_root=photos, mode="mirror", out_dir=photos):
        write_sidecar(p.sidecar_uri, rating=3, label=None, keeper_fields={"rank": "1"})
    storage.write_bytes(f"{photos}/notes.txt", b"a person's file")

    s = run(UnpickConfig(run=out))

    _adds_up(s)
    assert (s.xmp, s.files, s.deleted, s.failed) == ("mirror", 8, 8, [])
    assert storage.list_files(photos) == [f"{photos}/notes.txt"]
    assert not storage.exists(f"{out}/_LOCK.json")
