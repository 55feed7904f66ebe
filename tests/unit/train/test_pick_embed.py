"""keeper pick --xmp embed: keeper's XMP goes into each JPEG original (Lightroom Classic reads a
JPEG's rating only there), every other photo gets its sidecar beside it, a JPEG that cannot be
written is recorded with its reason while the rest are written, the counts add up, and a re-run
touches nothing; S3 input is refused before any work. Real files and exiv2; no Ray.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pandas as pd
import pytest
from support_jpeg import camera_jpeg, lightroom_packet, segments
from test_pick_robustness import pick_summary

from keeper_core.cli import main as keeper
from keeper_core.embedded_xmp import read_embedded_xmp
from keeper_core.errors import ConfigError
from keeper_core.handback import export_keepers, read_sidecar
from keeper_train.config import load_config
from keeper_train.jobs import embed, pick

# name -> (decision, rank, rating, label); IMG_4's RAW+JPEG pair shares the RAW's sidecar
PHOTOS = {
    "day1/IMG_1.JPG": ("keep", 1, 5, "Green"),
    "day1/IMG_2.jpeg": ("reject", 2, 1, None),
    "day1/IMG_3.png": ("keep", 1, 4, None),
    "IMG_4.CR2": ("alternate", 2, 3, None),
    "IMG_4.JPG": ("keep", 1, 5, "Green"),
    "locked.jpg": ("keep", 1, 5, None),
    "cut.jpg": ("keep", 1, 5, None),
}


def _library(root: Path) -> list[str]:
    for i, name in enumerate(PHOTOS):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.lower().endswith((".jpg", ".jpeg")):
            path.write_bytes(camera_jpeg(lightroom_packet() if i == 0 else None, seed=i))
        else:
            path.write_bytes(b"not opened: a sidecar never reads its photo")
    (root / "locked.jpg").chmod(0o444)
    cut = root / "cut.jpg"
    cut.write_bytes(cut.read_bytes()[:-300])  # a copy interrupted mid-file
    return [str(root / n) for n in PHOTOS]


def _picks(uris: list[str]) -> pd.DataFrame:
    rows = list(PHOTOS.values())
    return pd.DataFrame(
        {
            "image_uri": uris,
            "group_id": [f"g{i:06d}" for i in range(len(uris))],
            "rank": [r[1] for r in rows],
            "decision": [r[0] for r in rows],
            "rating": [r[2] for r in rows],
            "label": [r[3] for r in rows],
            "reasons": [["sharpest of its group"]] * len(uris),
            "image_id": [hashlib.sha256(u.encode()).hexdigest() for u in uris],
        }
    )


def _state(root: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(root)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_jpegs_get_their_xmp_inside_and_the_others_a_sidecar_beside(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    uris = _library(root)
    originals = {n: (root / n).read_bytes() for n in PHOTOS}
    cfg = pick.PickJobConfig(input=str(root), output=str(tmp_path / "out"), xmp="embed")

    done = pick.write_sidecars(cfg, _picks(uris), str(root))

    # The two writable JPEGs hold keeper's XMP themselves, their images and other metadata as
    # they were, and no sidecar of their own.
    for name, rating, label in (("day1/IMG_1.JPG", "5", "Green"), ("day1/IMG_2.jpeg", "1", None)):
        fields = read_embedded_xmp(str(root / name))
        assert fields is not None
        assert (fields["Xmp.xmp.Rating"], fields.get("Xmp.xmp.Label")) == (rating, label)
        assert fields["Xmp.keeper.decision"] in ("keep", "reject")
        new = segments((root / name).read_bytes())
        assert (new[0], new[2]) == segments(originals[name])[0::2]
        assert not (root / name).with_suffix(".xmp").exists()
    lightroom = read_embedded_xmp(str(root / "day1/IMG_1.JPG")) or {}
    assert lightroom["Xmp.dc.subject"] == ["wedding", "first dance"]  # another tool's, kept
    # A PNG gets its sidecar beside it; the RAW+JPEG pair the RAW's, with the better decision,
    # and the pair's JPEG is left alone.
    assert read_sidecar(str(root / "day1/IMG_3.xmp"))["Xmp.xmp.Rating"] == "4"
    assert read_sidecar(str(root / "IMG_4.xmp"))["Xmp.keeper.decision"] == "keep"
    assert (root / "IMG_4.JPG").read_bytes() == originals["IMG_4.JPG"]
    # The read-only and the truncated JPEG: recorded with their reasons, left as they were.
    reasons = {Path(f.image_uri).name: f.reason for f in done.failed}
    assert set(reasons) == {"locked.jpg", "cut.jpg"}
    assert "read-only" in reasons["locked.jpg"]
    assert "truncated" in reasons["cut.jpg"]
    assert all(f.sidecar_uri == f.image_uri for f in done.failed)
    for name in ("locked.jpg", "cut.jpg"):
        assert (root / name).read_bytes() == originals[name]
        assert not (root / name).with_suffix(".xmp").exists()
    # Each photo counted once: 6 planned (the pair shares one) = 4 written + 2 failed.
    assert (done.written, done.unchanged, len(done.failed), done.skipped) == (4, 0, 2, 1)
    assert done.counts() == {
        "written": 4,
        "unchanged": 0,
        "skipped": 1,
        "kept_ratings": 0,
        "files_written": 2,
        "files_unchanged": 0,
    }

    # Again: nothing is rewritten (same bytes, same mtimes), the failures are the same.
    before = _state(root)
    again = pick.write_sidecars(cfg, _picks(uris), str(root))
    assert _state(root) == before
    assert (again.written, again.unchanged, len(again.failed)) == (0, 4, 2)
    assert (again.files_written, again.files_unchanged) == (0, 2)


def test_a_jpeg_beside_a_heic_of_its_name_gets_its_own_xmp(tmp_path: Path) -> None:
    """An iPhone library holds IMG_5.HEIC and IMG_5.JPG (an export, or a shot in both): the HEIC
    takes IMG_5.xmp, and the JPEG, which once got nothing (the HEIC was first by name), gets
    keeper's XMP in its own file. The HEIC's sidecar from an earlier --xmp beside run is the
    HEIC's, updated with the HEIC's decision, never the JPEG's."""
    root = tmp_path / "photos"
    root.mkdir()
    (root / "IMG_5.HEIC").write_bytes(b"not opened: a sidecar never reads its photo")
    (root / "IMG_5.JPG").write_bytes(camera_jpeg(seed=5))
    uris = [str(root / "IMG_5.HEIC"), str(root / "IMG_5.JPG")]
    picks = pd.DataFrame(
        {
            "image_uri": uris,
            "group_id": ["g000001", "g000002"],
            "rank": [2, 1],
            "decision": ["reject", "keep"],
            "rating": [1, 5],
            "label": [None, "Green"],
            "reasons": [["blurred"], ["sharpest of its group"]],
            "image_id": [hashlib.sha256(u.encode()).hexdigest() for u in uris],
        }
    )
    beside = pick.PickJobConfig(input=str(root), output=str(tmp_path / "out"), xmp="beside")
    pick.write_sidecars(beside, picks.assign(decision="alternate", rating=3), str(root))
    cfg = pick.PickJobConfig(input=str(root), output=str(tmp_path / "out"), xmp="embed")

    done = pick.write_sidecars(cfg, picks, str(root))

    inside = read_embedded_xmp(str(root / "IMG_5.JPG")) or {}
    assert (inside.get("Xmp.xmp.Rating"), inside.get("Xmp.keeper.decision")) == ("5", "keep")
    heic = read_sidecar(str(root / "IMG_5.xmp"))
    assert (heic["Xmp.xmp.Rating"], heic["Xmp.keeper.decision"]) == ("1", "reject")
    assert (done.written, done.skipped, done.failed, done.files_written) == (2, 0, [], 1)


def test_renumbered_groups_rewrite_nothing_and_copied_keepers_follow_their_jpegs(
    tmp_path: Path,
) -> None:
    """--xmp embed with --copy-keepers, as pick writes its outputs (XMP first, then the export).
    Photos of an earlier moment added to the library renumber the groups (group_id): the XMP
    names each group by its shots, not its number, so no JPEG, sidecar or copy is rewritten for
    that, nor for reasons whose figures moved (spreads are pooled over the library). Then a
    keeper's label changes (a re-run with another keep label): the JPEG is rewritten, and
    keeper's copy from the first run, which now differs from it, is replaced, not refused as
    "a different file"."""
    root = tmp_path / "photos"
    uris = _library(root)
    picks = _picks(uris)
    keepers = tmp_path / "keepers"
    cfg = pick.PickJobConfig(input=str(root), output=str(tmp_path / "out"), xmp="embed")

    def run(picks: pd.DataFrame) -> tuple[int, int, int, list[str]]:
        pick.write_sidecars(cfg, picks, str(root))
        kept = picks.loc[picks["decision"] == "keep", "image_uri"].tolist()
        res = export_keepers(kept, input_root=str(root), dest=str(keepers), mode="copy")
        return res.exported, res.already_there, res.updated, [f.image_uri for f in res.failed]

    assert run(picks) == (5, 0, 0, [])
    before = _state(tmp_path)
    renumbered = picks.assign(group_id=[f"g{i + 7:06d}" for i in range(len(picks))])
    renumbered["reasons"] = [["best of 3: sharpest of its group, p 0.88"]] * len(picks)
    assert run(renumbered) == (0, 5, 0, [])
    assert _state(tmp_path) == before

    relabelled = renumbered.copy()
    relabelled.at[0, "label"] = "Yellow"
    # IMG_1.JPG's XMP changed; the PNG's and the pair's are sidecars, and the read-only and the
    # cut JPEG are not written, so their copies stand as they are.
    assert run(relabelled) == (0, 4, 1, [])
    fields = read_embedded_xmp(str(root / "day1/IMG_1.JPG")) or {}
    assert fields["Xmp.keeper.reasons"] == "best of 3: sharpest of its group, p 0.88"  # with it
    assert (keepers / "day1" / "IMG_1.JPG").read_bytes() == (root / "day1/IMG_1.JPG").read_bytes()


def test_the_summary_says_how_many_originals_were_written() -> None:
    summary = pick_summary(
        sidecars={
            "written": 2,
            "unchanged": 1,
            "skipped": 0,
            "files_written": 1,
            "files_unchanged": 1,
        },
        xmp="embed",
    )
    assert "2 XMP written, 1 unchanged (1 written into and 1 unchanged in JPEG originals)" in (
        pick.format_summary(summary)
    )


def _refuse(*_: object, **__: object) -> None:
    raise AssertionError("pick did work before refusing its config")


def test_embed_with_s3_input_fails_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(pick, "resolve_ranker", _refuse)
    monkeypatch.setattr(embed, "run", _refuse)
    monkeypatch.setattr(pick, "load_library", _refuse)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="xmp=embed writes into and next to the originals"):
        load_config(
            pick.PickJobConfig, None, ["input=s3://photos/trip/", f"output={out}", "xmp=embed"]
        )
    # A manifest of S3 photos: refused by the plan step, before the ranker or the embed.
    manifest = tmp_path / "photos.csv"
    manifest.write_text("image_uri\ns3://photos/trip/IMG_1.JPG\n")
    cfg = load_config(
        pick.PickJobConfig,
        None,
        [f"input={manifest}", f"output={out}", "xmp=embed", "zero_shot=true"],
    )
    with pytest.raises(ConfigError, match=r"xmp=embed.*s3://photos/trip/IMG_1\.JPG is on S3"):
        pick.run(cfg)
    # The command line: exit 2, the reason named.
    assert (
        keeper(["pick", "--input", "s3://photos/trip/", "--output", str(out), "--xmp", "embed"])
        == 2
    )
    assert "xmp=embed" in capsys.readouterr().err
    assert not out.exists()


def test_a_symlinked_jpeg_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    root = tmp_path / "photos"
    root.mkdir()
    target = tmp_path / "archive" / "IMG_9.JPG"
    target.parent.mkdir()
    target.write_bytes(camera_jpeg())
    (root / "IMG_9.JPG").symlink_to(target)
    before = target.read_bytes(), os.stat(target).st_mtime_ns
    cfg = pick.PickJobConfig(input=str(root), output=str(tmp_path / "out"), xmp="embed")
    uri = str(root / "IMG_9.JPG")
    picks = pd.DataFrame(
        {
            "image_uri": [uri],
            "group_id": ["g0"],
            "rank": [1],
            "decision": ["keep"],
            "rating": [5],
            "label": [None],
            "reasons": [["single shot"]],
            "image_id": [hashlib.sha256(uri.encode()).hexdigest()],
        }
    )

    done = pick.write_sidecars(cfg, picks, str(root))

    assert [f.image_uri for f in done.failed] == [uri]
    assert "a symlink" in done.failed[0].reason
    assert (target.read_bytes(), os.stat(target).st_mtime_ns) == before
    assert (root / "IMG_9.JPG").is_symlink()


def test_the_summary_names_copies_of_photos_no_longer_kept() -> None:
    summary = pick_summary(
        keepers_exported={"exported": 0, "already_there": 2, "updated": 1, "failed": 0},
        keeper_copies_not_kept=["/k/IMG_7.JPG", "/k/IMG_9.JPG"],
        outputs={
            "picks_parquet": "/o/picks.parquet",
            "contact_sheet": "/o/index.html",
            "keepers": "/k",
        },
    )
    text = pick.format_summary(summary)
    assert "0 exported, 2 already there, 1 updated, 0 failed -> /k" in text
    assert "2 copies there of photos no longer kept, left in place" in text
