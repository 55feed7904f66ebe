"""keeper feedback-from-xmp after ``keeper pick --xmp embed``: the ratings keeper wrote into the
JPEGs are keeper's (its ``keeper:xmp`` record beside them), not a person's, until a photo tool
changes one in the file; then that rating makes a decision, and taking it back undoes it.

The run is test_xmp_feedback's (``_write_run``: PHOTOS, IMG_1's RAW+JPEG pair sharing the RAW's
sidecar), its JPEGs made real files and written by pick's own ``write_sidecars`` with
``xmp=embed``; its summary records ``xmp: embed`` as pick's does. No Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import test_xmp_feedback
from support_jpeg import camera_jpeg, set_rating_as_a_tool_does
from test_xmp_feedback import PHOTOS, _rate, _standing, _write_run

from keeper_core.jpeg_xmp import write_jpeg_xmp
from keeper_train.jobs import pick
from keeper_train.jobs.xmp_feedback import XmpFeedbackConfig, XmpFeedbackSummary, describe, run

NONE = {"accepted": 0, "rejected": 0, "picked-as-keeper": 0}


def _counts_add_up(s: XmpFeedbackSummary) -> None:
    assert s.sidecars == s.read + s.missing + len(s.unreadable)
    assert s.missing == s.embedded + len(s.embedded_unreadable) + s.absent


def _embed_run(tmp_path: Path) -> tuple[Path, Path]:
    """A pick run of PHOTOS made with xmp=embed: keeper's XMP inside each JPEG that owns its
    sidecar name (IMG_2..IMG_8), the RAW's sidecar beside it; (run, photos)."""
    out, photos = _write_run(tmp_path)
    for i, (name, *_) in enumerate(PHOTOS):
        if name.endswith(".JPG"):
            (photos / name).write_bytes(camera_jpeg(seed=i))
    # The JPEGs' sidecars are an earlier beside run's: an embed run reads the files, not these.
    _rate(photos / "IMG_6.xmp", 5, 2)
    picks = pd.read_parquet(out / "picks.parquet")
    cfg = pick.PickJobConfig(input=str(photos), output=str(out), xmp="embed")
    done = pick.write_sidecars(cfg, picks, str(photos))
    assert (done.files_written, done.written, done.failed) == (7, 8, [])  # + the RAW's sidecar
    summary = json.loads((out / "_SUMMARY.json").read_text())
    summary.update(xmp="embed", xmp_naming="basename", xmp_root=None)
    (out / "_SUMMARY.json").write_text(json.dumps(summary))
    return out, photos


def test_keepers_own_ratings_in_the_files_are_no_persons(tmp_path: Path) -> None:
    out, _ = _embed_run(tmp_path)
    s = run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb")))

    _counts_add_up(s)
    assert (s.xmp, s.sidecars, s.in_jpegs, s.read, s.missing, s.unreadable) == (
        "embed",
        8,
        7,
        8,
        0,
        [],
    )
    assert (s.persons_ratings, s.decisions, s.events, s.offers) == (0, NONE, NONE, 0)
    assert "7 of them the XMP pick wrote into the JPEG itself" in describe(s)


def test_a_rating_changed_in_the_file_is_the_persons_and_taking_it_back_undoes_it(
    tmp_path: Path,
) -> None:
    out, photos = _embed_run(tmp_path)
    root = tmp_path / "fb"
    cfg = XmpFeedbackConfig(run=str(out), feedback=str(root))
    set_rating_as_a_tool_does(str(photos / "IMG_3.JPG"), -1)  # Lightroom's reject, in the file
    set_rating_as_a_tool_does(str(photos / "IMG_5.JPG"), 4)  # below keeper's 5 on IMG_4

    s = run(cfg)

    _counts_add_up(s)
    assert s.persons_ratings == 2
    assert s.events == {**NONE, "rejected": 1, "accepted": 1}
    assert _standing(root) == {"IMG_3.JPG": "rejected", "IMG_5.JPG": "accepted"}

    set_rating_as_a_tool_does(str(photos / "IMG_3.JPG"), 1)  # back at keeper's own 1
    again = run(cfg)
    assert (again.undone, again.events, again.persons_ratings) == (1, NONE, 1)
    assert _standing(root) == {"IMG_5.JPG": "accepted"}


def test_a_jpeg_whose_packet_is_gone_or_damaged_is_counted_as_a_sidecar_would_be(
    tmp_path: Path,
) -> None:
    out, photos = _embed_run(tmp_path)
    (photos / "IMG_2.JPG").write_bytes(camera_jpeg(seed=9))  # re-saved without XMP
    (photos / "IMG_3.JPG").write_bytes((photos / "IMG_3.JPG").read_bytes()[:300])  # cut short
    (photos / "IMG_4.JPG").unlink()

    s = run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb")))

    _counts_add_up(s)
    assert (s.read, s.missing, s.embedded, s.absent) == (5, 2, 1, 1)
    assert [p.image_uri.rpartition("/")[2] for p in s.unreadable] == ["IMG_3.JPG"]
    assert s.persons_ratings == 0


def test_beside_keepers_sidecar_a_file_holding_keepers_own_rating_is_not_read_as_a_persons(
    tmp_path: Path,
) -> None:
    """A run with sidecars beside JPEGs that an earlier embed run wrote into: the file's rating
    is keeper's (its record matches), so the sidecar's keeper value stands; one a person changed
    in the file is read in its place."""
    out, photos = _write_run(tmp_path)  # beside: keeper's sidecars for every photo
    for i, (name, *_) in enumerate(PHOTOS):
        if name.endswith(".JPG"):
            (photos / name).write_bytes(camera_jpeg(seed=i))
            write_jpeg_xmp(str(photos / name), rating=2, label=None)
    set_rating_as_a_tool_does(str(photos / "IMG_8.JPG"), -1)

    s = run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb")))

    assert (s.xmp, s.in_file, s.persons_ratings) == ("beside", 1, 1)
    assert _standing(tmp_path / "fb") == {"IMG_8.JPG": "rejected"}


def test_a_jpeg_beside_a_heic_is_read_from_its_file_and_the_heic_from_the_sidecar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """IMG_9.HEIC + IMG_9.JPG (an iPhone's pair): pick wrote the JPEG's XMP into it and gave the
    HEIC IMG_9.xmp; a person's rating in either is read where pick put it."""
    photos_list = [*PHOTOS, ("IMG_9.HEIC", "g3", 1, "keep", 5), ("IMG_9.JPG", "g3", 2, "reject", 1)]
    monkeypatch.setattr(test_xmp_feedback, "PHOTOS", photos_list)
    out, photos = _write_run(tmp_path)
    for i, (name, *_) in enumerate(photos_list):
        if name.endswith(".JPG"):
            (photos / name).write_bytes(camera_jpeg(seed=i))
    picks = pd.read_parquet(out / "picks.parquet")
    cfg = pick.PickJobConfig(input=str(photos), output=str(out), xmp="embed")
    done = pick.write_sidecars(cfg, picks, str(photos))
    assert (done.files_written, done.written, done.failed) == (8, 10, [])
    summary = json.loads((out / "_SUMMARY.json").read_text())
    summary.update(xmp="embed", xmp_naming="basename", xmp_root=None)
    (out / "_SUMMARY.json").write_text(json.dumps(summary))
    set_rating_as_a_tool_does(str(photos / "IMG_9.JPG"), 5)  # the person keeps the JPEG
    _rate(photos / "IMG_9.xmp", 5, -1)  # and rejects the HEIC

    s = run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb")))

    _counts_add_up(s)
    assert (s.sidecars, s.in_jpegs, s.read, s.persons_ratings) == (10, 8, 10, 2)
    assert _standing(tmp_path / "fb") == {"IMG_9.JPG": "picked-as-keeper", "IMG_9.HEIC": "rejected"}
