"""keeper pick's edges: WebDataset input is refused before any work, and one bad sidecar is
recorded with its reason while the others are written (real exiv2 via pyexiv2; no Ray)."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from keeper_core.errors import ConfigError, StorageError
from keeper_core.handback import read_sidecar, write_sidecar, xml_text
from keeper_train.jobs import embed, pick

# --------------------------------------------------------------------------------------------
# WebDataset input


def _shard(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        data = b"\xff\xd8\xff\xe0 a jpeg, as far as the index cares"
        info = tarfile.TarInfo("000000000.jpg")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def no_work(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if pick gets as far as the ranker or the embed step."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("pick did work before refusing its input")

    monkeypatch.setattr(pick, "resolve_ranker", refuse)
    monkeypatch.setattr(embed, "run", refuse)


@pytest.mark.parametrize("layout", ["folder", "single_tar", "brace"])
@pytest.mark.usefixtures("no_work")
def test_webdataset_input_is_refused_before_any_work(tmp_path: Path, layout: str) -> None:
    shards = tmp_path / "corpus"
    _shard(shards / "00000.tar")
    _shard(shards / "00001.tar")
    (shards / "00000_stats.json").write_text("{}")  # img2dataset's sidecars are no photos
    (shards / "00000.parquet").write_bytes(b"PAR1")
    src = {
        "folder": str(shards),
        "single_tar": str(shards / "00000.tar"),
        "brace": str(shards / "{00000..00001}.tar"),
    }[layout]
    out = tmp_path / "out"
    cfg = pick.PickJobConfig(input=src, output=str(out), zero_shot=True)
    with pytest.raises(ConfigError, match=r"WebDataset corpus.*culls photo folders.*keeper embed"):
        pick.check_input(cfg)
    with pytest.raises(ConfigError, match="WebDataset"):
        pick.run(cfg)
    assert not out.exists()  # nothing written: no table, no thumbnails, no summary


@pytest.mark.usefixtures("no_work")
def test_webdataset_input_exits_2_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "corpus"
    _shard(shards / "00000.tar")
    code = pick.main([f"input={shards}", f"output={tmp_path / 'out'}", "zero_shot=true"])
    assert code == 2
    assert "WebDataset" in capsys.readouterr().err


def test_photo_inputs_pass_the_check(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "IMG_1.JPG").write_bytes(b"\xff\xd8\xff")
    _shard(photos / "old-backup.tar")  # a stray archive beside loose photos: still a library
    manifest = tmp_path / "photos.csv"
    manifest.write_text(f"image_uri\n{photos / 'IMG_1.JPG'}\n")
    for src in (photos, manifest):
        pick.check_input(pick.PickJobConfig(input=str(src), output=str(tmp_path / "out")))


@pytest.mark.usefixtures("no_work")
def test_a_missing_input_is_refused_before_the_registry_is_asked(tmp_path: Path) -> None:
    cfg = pick.PickJobConfig(
        input=str(tmp_path / "Pictures" / "2026-06-wedding"),
        output=str(tmp_path / "out"),
        data_dir=str(tmp_path / "keeper-data"),
    )
    with pytest.raises(StorageError, match="2026-06-wedding: no such folder or manifest"):
        pick.run(cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no keeper-data


def test_looking_for_a_champion_in_no_store_makes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A first keeper pick in a folder leaves no keeper-data/ behind: no store, no champion."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = pick.PickJobConfig(
        input=str(tmp_path), output=str(tmp_path / "out"), data_dir=str(tmp_path / "kd")
    )
    ranker, line = pick.resolve_ranker(cfg)
    assert ranker is None
    assert "the zero-shot rule: no models:/keeper-ranker@champion" in line
    assert not (tmp_path / "kd").exists()


# --------------------------------------------------------------------------------------------
# Sidecars: per item, failures recorded, counts add up


def _picks(uris: list[str], reasons: dict[str, list[str]] | None = None) -> pd.DataFrame:
    reasons = reasons or {}
    return pd.DataFrame(
        {
            "image_uri": uris,
            "group_id": [f"g{i:06d}" for i in range(len(uris))],
            "rank": [1] * len(uris),
            "decision": ["keep"] * len(uris),
            "rating": [3] * len(uris),
            "label": ["Green"] * len(uris),
            "reasons": [reasons.get(u, ["single shot"]) for u in uris],
            "image_id": [hashlib.sha256(u.encode()).hexdigest() for u in uris],
        }
    )


def _adds_up(done: pick.Sidecars, n_picks: int, n_plans: int) -> None:
    assert done.written + done.unchanged + len(done.failed) == n_plans
    assert n_plans + done.skipped == n_picks


GARBAGE = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF <<< broken'


@pytest.mark.parametrize("mode", ["beside", "mirror"])
def test_one_bad_sidecar_is_recorded_and_the_rest_are_written(tmp_path: Path, mode: str) -> None:
    root = tmp_path / "photos"
    (root / "day").mkdir(parents=True)
    # No lone surrogates (bytes of a name that are not UTF-8): an Arrow table cannot hold them,
    # so such a name never reaches the picks.
    names = ["day/a.jpg", "day/b.jpg", "day/c\x01.jpg", "day/d\x7f.jpg", "IMG_1.CR2", "IMG_1.JPG"]
    uris = [str(root / n) for n in names]
    for u in uris:
        Path(u).write_bytes(b"bytes only: a sidecar never opens its image")
    out = tmp_path / "out"
    xmp_dir = root if mode == "beside" else out / "xmp"
    bad = xmp_dir / "day" / "a.xmp"
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_bytes(GARBAGE)  # a sidecar another tool left half-written
    # b's reasons quote c's and d's names (a duplicate's reason names the one it copies).
    reasons = {
        uris[1]: ["exact duplicate of c\x01.jpg", "near duplicate of d\x7f.jpg (cosine 0.99)"]
    }
    picks = _picks(uris, reasons)
    cfg = pick.PickJobConfig(input=str(root), output=str(out), xmp=mode)

    done = pick.write_sidecars(cfg, picks, str(root))

    # a: refused and named with its reason; the RAW+JPEG pair shares one sidecar.
    assert [(f.image_uri, f.sidecar_uri) for f in done.failed] == [(uris[0], str(bad))]
    assert "left as it is" in done.failed[0].reason
    assert bad.read_bytes() == GARBAGE
    assert (done.written, done.unchanged, done.skipped) == (4, 0, 1)
    _adds_up(done, n_picks=len(uris), n_plans=5)
    # The names with characters XML cannot store are written escaped, and their own sidecars
    # (named after them) are written too.
    fields = read_sidecar(str(xmp_dir / "day" / "b.xmp"))
    assert fields["Xmp.keeper.reasons"] == (
        "exact duplicate of c\\x01.jpg; near duplicate of d\\x7f.jpg (cosine 0.99)"
    )
    assert read_sidecar(str(xmp_dir / "day" / "c\x01.xmp"))["Xmp.xmp.Rating"] == "3"
    assert read_sidecar(str(xmp_dir / "day" / "d\x7f.xmp"))["Xmp.xmp.Rating"] == "3"
    assert read_sidecar(str(xmp_dir / "IMG_1.xmp"))["Xmp.keeper.decision"] == "keep"

    # Again: what was right is unchanged, the bad one is still left alone and still recorded.
    again = pick.write_sidecars(cfg, picks, str(root))
    assert (again.written, again.unchanged, len(again.failed)) == (0, 4, 1)
    _adds_up(again, n_picks=len(uris), n_plans=5)
    assert bad.read_bytes() == GARBAGE


def pick_summary(**over: Any) -> pick.PickSummary:
    """A finished run's summary of three photos, three keepers; ``counts`` entries given are
    merged into its counts, every other field given replaces the default."""
    counts = {
        "in": 3,
        "picked": 3,
        "failed": 0,
        "lost": 0,
        "groups": 3,
        "keepers": 3,
        "alternates": 0,
        "rejects": 0,
        "exact_duplicates": 0,
        "near_duplicates": 0,
        "sidecars_failed": 0,
        **over.pop("counts", {}),
    }
    fields: dict[str, Any] = {
        "status": "ok",
        "input": "/p",
        "output": "/o",
        "table": "/o/table",
        "ranker": "zero-shot rule",
        "zero_shot": True,
        "clip_model": "keeper-tiny:random",
        "random_weights": True,
        "counts": counts,
        "sidecars": {"written": 0, "unchanged": 0, "skipped": 0},
        "keepers_exported": None,
        "seconds": {"total": 1.0},
        "outputs": {"picks_parquet": "/o/picks.parquet", "contact_sheet": "/o/index.html"},
        "embed": {},
        "finished": "2026-01-01T00:00:00+00:00",
    }
    return pick.PickSummary(**{**fields, **over})


def test_sidecar_failures_reach_the_summary(tmp_path: Path) -> None:
    failure = pick.SidecarFailure(
        image_uri="/p/a.jpg", sidecar_uri="/p/a.xmp", reason="/p/a.xmp: XMP that exiv2 cannot..."
    )
    summary = pick_summary(
        counts={"sidecars_failed": 1},
        sidecars={"written": 2, "unchanged": 0, "skipped": 0},
        sidecar_failures=[failure],
    )
    text = pick.format_summary(summary)
    assert "2 XMP written, 0 unchanged, 1 FAILED" in text
    assert "/p/a.xmp: XMP that exiv2 cannot" in text
    back = pick.PickSummary.model_validate_json(summary.to_json())
    assert back.sidecar_failures == [failure]


def test_xml_text_escapes_only_what_xml_cannot_store() -> None:
    assert xml_text("IMG_0001.JPG; café\tß") == "IMG_0001.JPG; café\tß"
    assert xml_text("a\x01b\x1f\x7f\udcff\ufffe") == "a\\x01b\\x1f\\x7f\\udcff\\ufffe"


def test_the_writer_still_refuses_such_text_from_a_caller(tmp_path: Path) -> None:
    for bad in ("a\x01b", "a\udcffb"):  # a lone surrogate used to escape as UnicodeEncodeError
        with pytest.raises(ConfigError, match="control character"):
            write_sidecar(
                str(tmp_path / "IMG_1.xmp"), rating=3, label=None, keeper_fields={"why": bad}
            )
    assert not (tmp_path / "IMG_1.xmp").exists()


def test_the_sheet_header_names_the_first_failures_and_counts_the_rest() -> None:
    failures = [(f"/p/IMG_{i}.JPG", "a different file is already there") for i in range(8)]
    [line] = pick._failure_warnings("keeper(s) not exported", failures)
    assert line.startswith("8 keeper(s) not exported (all in _SUMMARY.json): /p/IMG_0.JPG: a diff")
    assert "/p/IMG_4.JPG" in line
    assert "/p/IMG_5.JPG" not in line
    assert line.endswith("; and 3 more")
    assert pick._failure_warnings("keeper(s) not exported", []) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_beside_sidecars_keep_a_persons_rating_unless_told(tmp_path: Path, overwrite: bool) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    uris = [str(root / "a.jpg"), str(root / "b.jpg")]
    write_sidecar(str(root / "a.xmp"), rating=1, label=None, overwrite_ratings=True)
    rated = (root / "a.xmp").read_text(encoding="utf-8").replace(' keeper:xmp="1|"', "")
    (root / "a.xmp").write_text(rated, encoding="utf-8")  # a person's one star, no record
    cfg = pick.PickJobConfig(
        input=str(root), output=str(tmp_path / "out"), xmp="beside", overwrite_ratings=overwrite
    )

    done = pick.write_sidecars(cfg, _picks(uris), str(root))

    assert (done.written, done.kept_ratings) == (2, 0 if overwrite else 1)
    assert done.counts()["kept_ratings"] == done.kept_ratings
    fields = read_sidecar(str(root / "a.xmp"))
    assert (fields["Xmp.xmp.Rating"], "Xmp.xmp.Label" in fields) == (
        ("3", True) if overwrite else ("1", True)
    )
    assert read_sidecar(str(root / "b.xmp"))["Xmp.xmp.Rating"] == "3"


def test_the_summary_counts_photos_timed_by_a_copy() -> None:
    text = pick.format_summary(pick_summary(counts={"copy_timed": 40}))
    assert "(40 photos timed by a copy's file time: each a group of its own)" in text
    assert "timed by a copy" not in pick.format_summary(pick_summary())


def test_the_mirror_loses_keepers_sidecars_of_photos_gone_and_keeps_others(tmp_path: Path) -> None:
    """xmp=mirror is rebuilt whole, as the picks are: the sidecar an earlier run wrote for a
    photo deleted or renamed since goes; a file there that is not keeper's stays."""
    root = tmp_path / "photos"
    root.mkdir()
    uris = [str(root / n) for n in ("IMG_1.JPG", "IMG_2.JPG", "IMG_3.JPG")]
    for u in uris:
        Path(u).write_bytes(b"bytes only: a sidecar never opens its image")
    cfg = pick.PickJobConfig(input=str(root), output=str(tmp_path / "out"), xmp="mirror")
    mirror = tmp_path / "out" / "xmp"
    first = pick.write_sidecars(cfg, _picks(uris), str(root))
    assert (first.written, first.stale_removed) == (3, 0)
    (mirror / "notes.xmp").write_text(_FOREIGN_SIDECAR)
    Path(uris[2]).unlink()  # deleted from the library

    again = pick.write_sidecars(cfg, _picks(uris[:2]), str(root))

    assert (again.unchanged, again.stale_removed) == (2, 1)
    assert sorted(p.name for p in mirror.iterdir()) == ["IMG_1.xmp", "IMG_2.xmp", "notes.xmp"]
    summary = pick_summary(sidecars={**again.counts()}, xmp="mirror")
    assert "1 stale removed (photos gone since)" in pick.format_summary(summary)


_FOREIGN_SIDECAR = """<x:xmpmeta xmlns:x="adobe:ns:meta/">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about="" xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="4"/>
 </rdf:RDF>
</x:xmpmeta>
"""


def test_the_summary_says_how_to_take_back_what_went_into_the_library() -> None:
    assert "undo" not in pick.format_summary(pick_summary(xmp="mirror"))  # all under OUTPUT
    beside = pick.format_summary(pick_summary(xmp="beside", output="/o/my culls"))
    assert "  undo      keeper unpick --run '/o/my culls'" in beside
    exported = {"exported": 3, "already_there": 0, "updated": 0, "failed": 0}
    text = pick.format_summary(
        pick_summary(
            xmp="mirror",
            keepers_exported=exported,
            outputs={"picks_parquet": "/o/p", "contact_sheet": "/o/i", "keepers": "/k"},
        )
    )
    assert "  undo      keeper unpick --run /o --keepers" in text
