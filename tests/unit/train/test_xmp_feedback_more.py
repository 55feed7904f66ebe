"""keeper feedback-from-xmp, what the first version left out: a rating taken back in the photo
tool takes back the decision recorded from it (``undone``), a changed one replaces it, and a
photo without a sidecar is read from the XMP packet in its own file (JPEG, TIFF, DNG, HEIC).

The pick run and its sidecars are test_xmp_feedback's (``_write_run``; the ``culled`` fixture:
IMG_2 5 beside keeper's 5 on IMG_1 -> accepted, IMG_3 rejected, IMG_4 down to 2 -> accepted,
IMG_5 5 -> picked-as-keeper). No Ray.
"""

from __future__ import annotations

import io
import shutil
import struct
from pathlib import Path

import pytest
import test_xmp_feedback as base
from PIL import Image, TiffImagePlugin
from support import xmp_packet
from test_xmp_feedback import _id, _rate, _standing, _write_run

from keeper_core import storage
from keeper_core.feedback import (
    FeedbackEvent,
    FeedbackLog,
    decisions,
    read_feedback,
    run_request_id,
)
from keeper_core.handback import write_sidecar
from keeper_train.jobs.xmp_feedback import XmpFeedbackConfig, XmpFeedbackSummary, describe, run

NONE = {"accepted": 0, "rejected": 0, "picked-as-keeper": 0}


def packet(rating: int | None, label: str | None = None) -> bytes:
    """An XMP packet as Lightroom embeds one in a file."""
    return xmp_packet(rating, label, padding=0)


def jpeg(xmp: bytes | None = None) -> bytes:
    out = io.BytesIO()
    kw = {} if xmp is None else {"xmp": xmp}
    Image.new("RGB", (16, 12), (120, 80, 40)).save(out, "JPEG", **kw)
    return out.getvalue()


def tiff(xmp: bytes, offset: int | None = None) -> bytes:
    """A minimal little-endian TIFF (a DNG's layout): IFD0 with tag 700 and its packet."""
    at = 8 + 2 + 12 + 4
    entry = struct.pack("<HHII", 700, 7, len(xmp), at if offset is None else offset)
    return b"II*\x00" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0) + xmp


def _tiff_with(xmp: bytes) -> bytes:
    """A TIFF PIL writes, with ``xmp`` as tag 700 (BYTE, as Lightroom writes it)."""
    info = TiffImagePlugin.ImageFileDirectory_v2()
    info[700] = xmp
    info.tagtype[700] = 1
    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, "TIFF", tiffinfo=info)
    return out.getvalue()


@pytest.fixture
def culled(tmp_path: Path) -> tuple[Path, Path]:
    """test_xmp_feedback's photographer's pass, less the deleted and the broken sidecar."""
    out, photos = _write_run(tmp_path)
    _rate(photos / "IMG_2.xmp", 3, 5)
    _rate(photos / "IMG_3.xmp", 1, -1)
    _rate(photos / "IMG_5.xmp", 3, 5)
    _rate(photos / "IMG_4.xmp", 5, 2)
    (photos / "IMG_7.xmp").unlink()  # no sidecar, no file: nothing read
    return out, photos


def _unrate(sidecar: Path, old: int) -> None:
    """Remove the rating from the sidecar, as a photo tool does when stars are cleared."""
    text = sidecar.read_text()
    assert f'xmp:Rating="{old}"' in text
    sidecar.write_text(text.replace(f'xmp:Rating="{old}"', ""))


def _actions(root: Path, name: str) -> list[str]:
    """Every event's action for one photo, oldest first."""
    rows = read_feedback(str(root / "events")).to_pylist()
    return [r["action"] for r in rows if r["image_id"] == _id(name)]


def _counts_add_up(s: XmpFeedbackSummary) -> None:
    assert s.sidecars == s.read + s.missing + len(s.unreadable)
    assert s.missing == s.embedded + len(s.embedded_unreadable) + s.absent
    assert s.embedded_packets <= s.embedded


# ----------------------------------------------------------------------------------------------
# Ratings taken back, and changed


def test_a_rating_taken_back_is_undone_and_a_second_run_writes_nothing(
    culled: tuple[Path, Path], tmp_path: Path
) -> None:
    out, photos = culled
    root = tmp_path / "fb"
    cfg = XmpFeedbackConfig(run=str(out), feedback=str(root), client="ana")
    run(cfg)
    assert _standing(root)["IMG_3.JPG"] == "rejected"

    _rate(photos / "IMG_3.xmp", -1, 1)  # back to keeper's own 1 (keeper:xmp="1|")
    _unrate(photos / "IMG_5.xmp", 5)  # the person's 5 cleared
    s = run(cfg)
    # IMG_3 and IMG_5 say nothing now; with IMG_5 unrated, IMG_4's 2 is g1's unique top
    assert s.undone == 2
    assert s.events == {**NONE, "picked-as-keeper": 1}
    assert s.decisions == {"accepted": 1, "rejected": 0, "picked-as-keeper": 1}
    assert s.already_recorded == 1  # IMG_2 accepted (the tie in g0); IMG_4's is new
    assert _standing(root) == {"IMG_2.JPG": "accepted", "IMG_4.JPG": "picked-as-keeper"}
    standing = decisions(read_feedback(str(root / "events"))).to_pylist()
    assert _id("IMG_3.JPG") not in {d["image_id"] for d in standing}
    assert _actions(root, "IMG_3.JPG") == ["rejected", "undone"]
    assert _actions(root, "IMG_5.JPG") == ["picked-as-keeper", "undone"]
    assert "2 undone" in describe(s)

    again = run(cfg)
    assert (again.events, again.undone, again.offers) == (NONE, 0, 0)
    assert read_feedback(str(root / "events")).num_rows == 4 + 3


def test_a_tie_turns_picked_as_keeper_into_accepted_without_an_undo(
    culled: tuple[Path, Path], tmp_path: Path
) -> None:
    out, photos = culled
    root = tmp_path / "fb"
    cfg = XmpFeedbackConfig(run=str(out), feedback=str(root))
    run(cfg)
    assert _standing(root)["IMG_5.JPG"] == "picked-as-keeper"

    # IMG_4 up to 4, IMG_5 down to 4: no unique top in g1 (5 on IMG_4 would be keeper's own
    # rating: taken back)
    _rate(photos / "IMG_4.xmp", 2, 4)
    _rate(photos / "IMG_5.xmp", 5, 4)
    s = run(cfg)
    assert (s.events, s.undone) == ({**NONE, "accepted": 1}, 0)
    # the new action alone supersedes the old one: decisions() takes the latest
    assert _actions(root, "IMG_5.JPG") == ["picked-as-keeper", "accepted"]
    assert _standing(root)["IMG_5.JPG"] == "accepted"
    assert _standing(root)["IMG_4.JPG"] == "accepted"

    # ...and taking IMG_5's rating back (to keeper's 3) takes back both of its decisions
    _rate(photos / "IMG_5.xmp", 4, 3)
    s = run(cfg)
    assert s.undone == 2
    assert s.events == {**NONE, "picked-as-keeper": 1}  # IMG_4's 4 is g1's top now
    assert "IMG_5.JPG" not in _standing(root)
    assert _standing(root)["IMG_4.JPG"] == "picked-as-keeper"
    again = run(cfg)
    assert (again.events, again.undone) == (NONE, 0)


def test_a_decision_made_on_the_review_page_is_not_undone(
    culled: tuple[Path, Path], tmp_path: Path
) -> None:
    out, photos = culled
    root = tmp_path / "fb"
    request_id = run_request_id((out / "_SUMMARY.json").read_bytes())
    # ana accepted IMG_6 and rejected IMG_7 on the review page before rating in the tool
    log = FeedbackLog(str(root / "events"), writer="ui")
    log.append(
        [
            FeedbackEvent(
                event_id=f"ui-{name}",
                request_id=request_id,
                image_id=_id(name),
                action=action,  # type: ignore[arg-type]
                group_id="g2",
                client="ana",
            )
            for name, action in (("IMG_6.JPG", "accepted"), ("IMG_7.JPG", "rejected"))
        ]
    )
    log.flush(raise_errors=True)
    cfg = XmpFeedbackConfig(run=str(out), feedback=str(root), client="ana")
    s = run(cfg)
    # IMG_6's sidecar holds keeper's 5 (no decision): the review page's accepted stands
    assert s.undone == 0
    assert _standing(root)["IMG_6.JPG"] == "accepted"

    _rate(photos / "IMG_6.xmp", 5, -1)  # then rejected in the tool...
    assert run(cfg).events["rejected"] == 1
    assert _standing(root)["IMG_6.JPG"] == "rejected"
    _rate(photos / "IMG_6.xmp", -1, 5)  # ...and taken back: the review page's decision again
    s = run(cfg)
    assert s.undone == 1
    assert _standing(root)["IMG_6.JPG"] == "accepted"
    assert _standing(root)["IMG_7.JPG"] == "rejected"  # no sidecar read: left as it stands
    assert run(cfg).undone == 0


def test_event_ids_are_deterministic_and_a_retried_write_counts_once(
    culled: tuple[Path, Path], tmp_path: Path
) -> None:
    out, photos = culled
    root, copy = tmp_path / "fb", tmp_path / "fb-copy"
    run(XmpFeedbackConfig(run=str(out), feedback=str(root)))
    shutil.copytree(root, copy)
    _rate(photos / "IMG_3.xmp", -1, 1)
    before = set(storage.list_files(str(root / "events")))
    for r in (root, copy):
        assert run(XmpFeedbackConfig(run=str(out), feedback=str(r))).undone == 1
    ids = [
        {e["event_id"] for e in read_feedback(str(r / "events")).to_pylist()} for r in (root, copy)
    ]
    assert ids[0] == ids[1]
    # a write retried after its answer was lost lands twice: its events count once
    (new_part,) = set(storage.list_files(str(root / "events"))) - before
    shutil.copy(new_part, root / "events" / "part-retried.parquet")
    assert read_feedback(str(root / "events")).num_rows == 4 + 1
    assert "IMG_3.JPG" not in _standing(root)
    again = run(XmpFeedbackConfig(run=str(out), feedback=str(root)))
    assert (again.events, again.undone) == (NONE, 0)


# ----------------------------------------------------------------------------------------------
# Ratings in the files themselves

# (file, group, rank, decision, keeper's rating); what each file holds is in the test
FILES = [
    ("IMG_1.JPG", "g0", 1, "keep", 5),  # sidecar: keeper's 5; the JPEG's XMP 2: the file's read
    ("IMG_2.JPG", "g0", 2, "alternate", 3),  # no sidecar; the JPEG's XMP: 5
    ("IMG_3.TIF", "g0", 3, "reject", 1),  # no sidecar; the TIFF's tag 700: -1
    ("IMG_4.DNG", "g1", 1, "keep", 5),  # sidecar: keeper's 5; the DNG's XMP -1: the file's read
    ("IMG_5.HEIC", "g1", 2, "alternate", 3),  # no sidecar; the HEIC's XMP item: 5
    ("IMG_6.JPG", "g1", 3, "reject", 1),  # no sidecar; a JPEG without XMP
    ("IMG_7.JPG", "g2", 1, "keep", 5),  # no sidecar; a JPEG cut inside its XMP segment
    ("IMG_8.TIF", "g2", 2, "alternate", 3),  # no sidecar; tag 700 points past the file's end
    ("IMG_9.JPG", "g2", 3, "reject", 1),  # no sidecar, no file
]


@pytest.fixture
def in_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A pick run of FILES whose photos are real files, rated in the files as listed."""
    pillow_heif = pytest.importorskip("pillow_heif")
    monkeypatch.setattr(base, "PHOTOS", FILES)
    out, photos = _write_run(tmp_path)
    for name in ("IMG_2", "IMG_3", "IMG_5", "IMG_6", "IMG_7", "IMG_8", "IMG_9"):
        (photos / f"{name}.xmp").unlink()
    (photos / "IMG_1.JPG").write_bytes(jpeg(packet(2, None)))  # beside keeper's own sidecar
    (photos / "IMG_2.JPG").write_bytes(jpeg(packet(5, "Red")))
    (photos / "IMG_3.TIF").write_bytes(_tiff_with(packet(-1, None)))
    (photos / "IMG_4.DNG").write_bytes(tiff(packet(-1, None)))
    heic = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", (16, 16))).save(heic, xmp=packet(5, None), quality=50)
    (photos / "IMG_5.HEIC").write_bytes(heic.getvalue())
    (photos / "IMG_6.JPG").write_bytes(jpeg())
    (photos / "IMG_7.JPG").write_bytes(jpeg(packet(4))[:60])  # cut inside its XMP segment
    (photos / "IMG_8.TIF").write_bytes(tiff(packet(4), offset=0x7FFF_0000))
    return out, photos


def test_ratings_in_the_files_themselves_are_read_where_no_sidecar_is(
    in_files: tuple[Path, Path], tmp_path: Path
) -> None:
    out, _ = in_files
    root = tmp_path / "fb"
    s = run(XmpFeedbackConfig(run=str(out), feedback=str(root)))
    _counts_add_up(s)
    assert (s.photos, s.sidecars, s.read, s.missing, s.unreadable) == (9, 9, 2, 7, [])
    assert (s.embedded, s.embedded_packets, s.absent) == (4, 3, 1)
    failed = {p.image_uri.rpartition("/")[2]: p.reason for p in s.embedded_unreadable}
    assert set(failed) == {"IMG_7.JPG", "IMG_8.TIF"}
    assert "runs past the end" in failed["IMG_7.JPG"]
    assert "the XMP packet (tag 700)" in failed["IMG_8.TIF"]
    # IMG_1 and IMG_4: their sidecars still hold keeper's 5, so their files' ratings are read
    assert (s.in_file, s.in_file_unreadable) == (2, [])
    assert s.persons_ratings == 5
    assert s.decisions == {"accepted": 1, "rejected": 2, "picked-as-keeper": 2}
    assert s.events == s.decisions
    assert _standing(root) == {
        "IMG_1.JPG": "accepted",  # the file's 2, not keeper's 5
        "IMG_2.JPG": "picked-as-keeper",  # 5, above IMG_1's 2 and IMG_3's -1
        "IMG_3.TIF": "rejected",
        "IMG_4.DNG": "rejected",  # the DNG's -1, not keeper's 5
        "IMG_5.HEIC": "picked-as-keeper",  # 5, above IMG_4's -1 and keeper's 1 on IMG_6
    }
    text = describe(s)
    assert "7 photos without a sidecar: 4 read (3 with XMP), 2 unreadable, 1 not there" in text
    assert "2 ratings in photos beside keeper's own sidecar values, 0 unreadable" in text


def test_a_rating_taken_back_in_the_file_is_undone_and_a_file_without_xmp_says_nothing(
    in_files: tuple[Path, Path], tmp_path: Path
) -> None:
    out, photos = in_files
    root = tmp_path / "fb"
    cfg = XmpFeedbackConfig(run=str(out), feedback=str(root))
    run(cfg)
    (photos / "IMG_3.TIF").write_bytes(_tiff_with(packet(None, None)))  # the reject cleared
    (photos / "IMG_2.JPG").write_bytes(jpeg())  # re-saved without any XMP: no rating read
    s = run(cfg)
    _counts_add_up(s)
    # IMG_3's reject undone; IMG_2 says nothing now (its decision stands), so IMG_1's 2 is the
    # top of the ratings read in g0
    assert (s.undone, s.events) == (1, {**NONE, "picked-as-keeper": 1})
    assert _standing(root) == {
        "IMG_1.JPG": "picked-as-keeper",
        "IMG_2.JPG": "picked-as-keeper",
        "IMG_4.DNG": "rejected",
        "IMG_5.HEIC": "picked-as-keeper",
    }
    assert run(cfg).undone == 0


def test_a_persons_sidecar_rating_wins_over_the_file(
    in_files: tuple[Path, Path], tmp_path: Path
) -> None:
    out, photos = in_files
    _rate(photos / "IMG_4.xmp", 5, 4)  # rated 4 in the sidecar: the DNG's -1 is not read
    # IMG_2 gets keeper's sidecar (keeper's 3, untouched): its file's 5 is still the person's
    write_sidecar(str(photos / "IMG_2.xmp"), rating=3, label=None, keeper_fields={"g": "0"})
    s = run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb")))
    assert (s.read, s.missing, s.embedded, s.in_file) == (3, 6, 3, 2)
    standing = _standing(tmp_path / "fb")
    assert standing["IMG_4.DNG"] == "accepted"  # the sidecar's 4
    assert standing["IMG_2.JPG"] == "picked-as-keeper"  # the file's 5
    # A damaged file beside keeper's sidecar: keeper's rating stands, the file is listed
    (photos / "IMG_1.JPG").write_bytes(jpeg(packet(2))[:60])
    s = run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "fb2")))
    assert [p.image_uri.rpartition("/")[2] for p in s.in_file_unreadable] == ["IMG_1.JPG"]
    assert "IMG_1.JPG" not in _standing(tmp_path / "fb2")
