"""A photographer's library against keeper pick and feedback-from-xmp: outputs of earlier runs
inside the input are not photos, ``--xmp embed`` after ``--xmp beside`` leaves no sidecar that
contradicts its JPEG, a rating another tool saved is not rewritten, and a run that finished with
too many unreadable files still gives its ratings back. Real exiv2 via pyexiv2; no Ray."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support_jpeg import camera_jpeg

from keeper_core import storage
from keeper_core.errors import DataError
from keeper_core.feedback import decisions, read_feedback
from keeper_core.handback import read_sidecar, write_sidecar
from keeper_core.jpeg_xmp import write_jpeg_xmp
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs import embed, pick
from keeper_train.jobs.embed import embedding_table
from keeper_train.jobs.xmp_feedback import XmpFeedbackConfig, run

KEEP = {"group": "g0", "rank": "1", "decision": "keep"}
REJECT = {"group": "g0", "rank": "2", "decision": "reject"}


def _set_rating_with_exiv2(path: Path, rating: int) -> None:
    """Save a person's stars as exiv2-based tools do: the packet laid out anew."""
    import pyexiv2

    with pyexiv2.Image(str(path)) as img:
        img.modify_xmp({"Xmp.xmp.Rating": str(rating)})


# --------------------------------------------------------------------------------------------
# earlier outputs inside the input


def _pick_summary(folder: Path, keepers: Path | None) -> None:
    outputs = {"contact_sheet": str(folder / "index.html")}
    if keepers is not None:
        outputs["keepers"] = str(keepers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "_SUMMARY.json").write_text(json.dumps({"status": "ok", "outputs": outputs}))


def test_an_earlier_runs_thumbnails_and_keeper_copies_are_not_photos(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    photo = camera_jpeg(seed=1)
    for rel in ("DCIM/IMG_0001.JPG", "names/café.jpg"):
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_bytes(photo)
    # `keeper pick --output lib/culls --copy-keepers lib/keepers`, then a run into lib/culls2
    # without the flag: the copies sort before "names/" and were kept over their originals.
    _pick_summary(lib / "culls", lib / "keepers")
    (lib / "culls" / "thumbs" / "ab").mkdir(parents=True)
    (lib / "culls" / "thumbs" / "ab" / "ab12.jpg").write_bytes(camera_jpeg(seed=2))
    for rel in ("keepers/DCIM/IMG_0001.JPG", "keepers/names/café.jpg"):
        (lib / rel).parent.mkdir(parents=True, exist_ok=True)
        (lib / rel).write_bytes(photo)
    # a JSON file of the same name that keeper pick did not write: its folder is a photo folder
    (lib / "trip" / "_SUMMARY.json").parent.mkdir()
    (lib / "trip" / "_SUMMARY.json").write_text('{"note": "my own"}')
    (lib / "trip" / "IMG_0002.JPG").write_bytes(camera_jpeg(seed=3))

    cfg = pick.PickJobConfig(input=str(lib), output=str(lib / "culls2"), zero_shot=True)
    inputs, _ = embed.list_inputs(cfg.input, exclude=pick.excluded(cfg))
    assert sorted(os.path.relpath(u, lib) for u in inputs) == [
        "DCIM/IMG_0001.JPG",
        "names/café.jpg",
        "trip/IMG_0002.JPG",
    ]


def test_an_earlier_output_that_is_the_input_itself_is_not_excluded(tmp_path: Path) -> None:
    lib = tmp_path / "lib"
    _pick_summary(lib, lib / "keepers")  # a run whose output was the photo folder itself
    (lib / "IMG_0001.JPG").write_bytes(camera_jpeg(seed=1))
    (lib / "keepers").mkdir()
    (lib / "keepers" / "IMG_0001.JPG").write_bytes(camera_jpeg(seed=1))
    cfg = pick.PickJobConfig(input=str(lib), output=str(tmp_path / "out"), zero_shot=True)
    assert pick.earlier_outputs(cfg) == [str(lib / "keepers")]  # its copies only
    inputs, _ = embed.list_inputs(cfg.input, exclude=pick.excluded(cfg))
    assert [Path(u).name for u in inputs] == ["IMG_0001.JPG"]


# --------------------------------------------------------------------------------------------
# --xmp embed after --xmp beside


def _picks(uri: str, decision: str, rating: int, label: str | None) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_uri": [uri],
            "group_id": ["g0"],
            "rank": [2 if decision == "reject" else 1],
            "decision": [decision],
            "rating": [rating],
            "label": [label],
            "reasons": [[f"{decision} reason"]],
            "image_id": [hashlib.sha256(uri.encode()).hexdigest()],
        }
    )


def test_embed_updates_the_sidecar_an_earlier_beside_run_left(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    jpeg, other = photos / "IMG_0001.JPG", photos / "IMG_0002.JPG"
    jpeg.write_bytes(camera_jpeg(seed=1))
    other.write_bytes(camera_jpeg(seed=2))
    # the first run, --xmp beside: keeper kept both
    write_sidecar(str(photos / "IMG_0001.xmp"), rating=3, label="Green", keeper_fields=KEEP)
    theirs = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="4"/></rdf:RDF></x:xmpmeta>'
    (photos / "IMG_0002.xmp").write_bytes(theirs)  # another tool's, keeper never wrote it

    cfg = pick.PickJobConfig(input=str(photos), output=str(tmp_path / "out"), xmp="embed")
    picks = pd.concat(
        [
            _picks(str(jpeg), "reject", -1, "Red"),
            _picks(str(other), "reject", -1, "Red"),
        ],
        ignore_index=True,
    )
    done = pick.write_sidecars(cfg, picks, str(photos))
    assert (done.written, done.files_written, done.failed) == (2, 2, [])

    # darktable, Capture One and Bridge read the sidecar, Lightroom the file: they agree
    beside = read_sidecar(str(photos / "IMG_0001.xmp"))
    assert (beside["Xmp.xmp.Rating"], beside["Xmp.keeper.decision"]) == ("-1", "reject")
    assert (photos / "IMG_0002.xmp").read_bytes() == theirs  # not keeper's: left alone
    assert not (photos / "IMG_0003.xmp").exists()
    before = {p.name: p.stat().st_mtime_ns for p in photos.iterdir()}
    again = pick.write_sidecars(cfg, picks, str(photos))
    assert (again.written, again.unchanged) == (0, 2)
    assert {p.name: p.stat().st_mtime_ns for p in photos.iterdir()} == before


# --------------------------------------------------------------------------------------------
# a person's stars saved by another tool


def test_a_jpeg_whose_stars_a_tool_saved_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.JPG"
    path.write_bytes(camera_jpeg(seed=1))
    assert write_jpeg_xmp(str(path), rating=3, label="Green", keeper_fields=KEEP).changed
    _set_rating_with_exiv2(path, 5)  # Lightroom's "Save Metadata to File"
    saved, mtime = path.read_bytes(), path.stat().st_mtime_ns

    done = write_jpeg_xmp(str(path), rating=3, label="Green", keeper_fields=KEEP)
    assert (done.changed, done.kept) == (False, ("rating",))
    assert path.read_bytes() == saved
    assert path.stat().st_mtime_ns == mtime
    # a decision that did change is still written, the person's stars kept
    assert write_jpeg_xmp(str(path), rating=-1, label="Red", keeper_fields=REJECT).changed
    assert path.read_bytes() != saved


def test_a_sidecar_a_tool_laid_out_anew_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.xmp"
    write_sidecar(str(path), rating=3, label="Green", keeper_fields=KEEP)
    _set_rating_with_exiv2(path, 5)
    saved = path.read_bytes()
    done = write_sidecar(str(path), rating=3, label="Green", keeper_fields=KEEP)
    assert (done.changed, done.kept) == (False, ("rating",))
    assert path.read_bytes() == saved


# --------------------------------------------------------------------------------------------
# feedback-from-xmp of a run with too many unreadable files


def _run(tmp_path: Path, *, lost: int) -> tuple[Path, Path]:
    """A pick run (beside) of two photos, a third unreadable, that exited 3: more than
    ``max_failure_fraction`` failed. Its picks and sidecars are whole unless ``lost``."""
    photos, out = tmp_path / "photos", tmp_path / "culls"
    photos.mkdir()
    names = ["IMG_1.JPG", "IMG_2.JPG"]
    uris = [str(photos / n) for n in names]
    ids = [hashlib.sha256(n.encode()).hexdigest() for n in names]
    quality = {f: np.full(2, 0.5) for f in FEATURE_NAMES}
    quality["width"], quality["height"] = np.full(2, 640), np.full(2, 480)
    emb = np.eye(2, 64)
    table = embedding_table(
        {
            "image_id": np.asarray(ids, dtype=object),
            "image_uri": np.asarray(uris, dtype=object),
            "embedding": emb,
            **quality,
        },
        "keeper-tiny:random",
    )
    storage.write_parquet(table, str(out / "table" / "embeddings" / "part-00000.parquet"))
    picks = {
        "group_id": ["g0", "g0"],
        "rank": [1, 2],
        "decision": ["keep", "reject"],
        "rating": [3, -1],
        "label": ["Green", "Red"],
        "score": [1.0, 0.0],
        "reasons": [["best"], ["worse"]],
        "image_uri": uris,
        "file_name": names,
        "image_id": ids,
        **quality,
    }
    pq.write_table(pa.table(picks), out / "picks.parquet")
    summary = {
        "status": "failed",
        "input": str(photos),
        "output": str(out),
        "table": str(out / "table"),
        "ranker": "zero-shot rule",
        "clip_model": "keeper-tiny:random",
        "counts": {"in": 3 + lost, "picked": 2, "failed": 1, "lost": lost, "sidecars_failed": 0},
        "embed": {"status": "failed", "lost": 0},
        "sidecars": {"written": 2, "unchanged": 0, "skipped": 0, "kept_ratings": 0},
        "outputs": {"picks_parquet": str(out / "picks.parquet")},
        "xmp": "beside",
        "xmp_naming": "basename",
    }
    (out / "_SUMMARY.json").write_text(json.dumps(summary))
    write_sidecar(str(photos / "IMG_1.xmp"), rating=3, label="Green", keeper_fields=KEEP)
    write_sidecar(str(photos / "IMG_2.xmp"), rating=-1, label="Red", keeper_fields=REJECT)
    _set_rating_with_exiv2(photos / "IMG_2.xmp", 5)  # the person prefers the rejected one
    return out, photos


def test_a_run_with_too_many_unreadable_files_gives_its_ratings_back(tmp_path: Path) -> None:
    out, _ = _run(tmp_path, lost=0)
    root = tmp_path / "feedback"
    s = run(XmpFeedbackConfig(run=str(out), feedback=str(root), client="ana"))
    assert (s.read, s.persons_ratings) == (2, 1)
    assert s.decisions == {"accepted": 0, "rejected": 0, "picked-as-keeper": 1}
    assert [r["action"] for r in decisions(read_feedback(str(root / "events"))).to_pylist()] == [
        "picked-as-keeper"
    ]


def test_a_run_that_lost_photos_is_still_refused(tmp_path: Path) -> None:
    out, _ = _run(tmp_path, lost=1)
    with pytest.raises(DataError, match="did not finish"):
        run(XmpFeedbackConfig(run=str(out), feedback=str(tmp_path / "feedback")))


# --------------------------------------------------------------------------------------------
# decode limits: a 100 MP body or a stitched panorama


class _Stop(Exception):
    pass


def test_pick_passes_its_decode_limits_and_retries_to_embed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "GFX_0001.JPG").write_bytes(camera_jpeg(seed=1))
    seen: list[embed.EmbedConfig] = []

    def capture(cfg: embed.EmbedConfig) -> None:
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(embed, "run", capture)
    # a file that failed on the first run (the limit, or cut short on the card and copied
    # again) is read again only when asked
    raised: dict[str, object] = {"max_pixels": 110_000_000, "retry_errors": True}
    for overrides, pixels, retry in (({}, 64_000_000, False), (raised, 110_000_000, True)):
        cfg = pick.PickJobConfig(
            input=str(photos), output=str(tmp_path / "out"), zero_shot=True, **overrides
        )
        with pytest.raises(_Stop):
            pick.run(cfg)
        assert (seen[-1].max_pixels, seen[-1].retry_errors) == (pixels, retry)
    assert seen[-1].max_bytes == embed.EmbedConfig.model_fields["max_bytes"].default


# --------------------------------------------------------------------------------------------
# --xmp embed --link-keepers, run twice


def test_a_hard_linked_keeper_already_holding_keepers_xmp_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "photos" / "IMG_0001.JPG"
    path.parent.mkdir()
    path.write_bytes(camera_jpeg(seed=1))
    assert write_jpeg_xmp(str(path), rating=3, label="Green", keeper_fields=KEEP).changed
    (tmp_path / "keepers").mkdir()
    os.link(path, tmp_path / "keepers" / "IMG_0001.JPG")  # what --link-keepers made
    done = write_jpeg_xmp(str(path), rating=3, label="Green", keeper_fields=KEEP)
    assert not done.changed  # the re-run of the same command: nothing to write, no failure
    with pytest.raises(DataError, match="has 2 hard links"):  # a change is still refused
        write_jpeg_xmp(str(path), rating=-1, label="Red", keeper_fields=REJECT)


# --------------------------------------------------------------------------------------------
# one library, its folder spelled two ways


def test_a_table_holding_a_library_under_two_spellings_culls_each_photo_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lib = tmp_path / "lib"
    lib.mkdir()
    names = ["IMG_1.JPG", "IMG_2.JPG", "IMG_3.JPG"]
    for i, n in enumerate(names):
        (lib / n).write_bytes(camera_jpeg(seed=i))
    # an earlier keeper pick --input lib/ embedded IMG_1..3 under relative URIs and failed
    # IMG_3; a run typed with the absolute path embedded them all again
    monkeypatch.chdir(tmp_path)
    rel = [f"lib/{n}" for n in names[:2]]
    absolute = [str(lib / n) for n in names]
    uris = [*rel, *absolute]
    quality = {f: np.full(len(uris), 0.5) for f in FEATURE_NAMES}
    quality["width"], quality["height"] = np.full(len(uris), 64), np.full(len(uris), 48)
    table = embedding_table(
        {
            "image_id": np.asarray([hashlib.sha256(u.encode()).hexdigest() for u in uris]),
            "image_uri": np.asarray(uris, dtype=object),
            "embedding": np.eye(len(uris), 64),
            **quality,
        },
        "keeper-tiny:random",
    )
    out = tmp_path / "out"
    storage.write_parquet(table, str(out / "table" / "embeddings" / "part-00000.parquet"))
    (lib / "IMG_4.JPG").write_bytes(b"\xff\xd8 cut short")  # failed under both spellings
    failures = ["lib/IMG_3.JPG", "lib/IMG_4.JPG", str(lib / "IMG_4.JPG")]
    errors = pa.table(
        {
            "image_uri": failures,
            "stage": ["decode"] * 3,
            "reason": ["truncated"] * 3,
            "error": ["cut short"] * 3,
            "retryable": [False] * 3,
            "run_id": ["r1", "r1", "r2"],
            "at": ["2026-06-13T10:00:00Z"] * 3,
        }
    )
    storage.write_parquet(errors, str(out / "table" / "errors" / "part-00000.parquet"))

    cfg = pick.PickJobConfig(input=str(lib), output=str(out), zero_shot=True)
    monkeypatch.setattr(pick, "backfill", lambda _cfg, frame, _have: (frame, 0))
    lib_rows = pick.load_library(cfg, "keeper-tiny:random")
    assert sorted(lib_rows.frame["image_uri"]) == absolute  # as this run lists them
    # IMG_3 was embedded since; IMG_4 is one failure
    assert [Path(u).name for u in lib_rows.failed["image_uri"]] == ["IMG_4.JPG"]
    assert lib_rows.lost == 0


# --------------------------------------------------------------------------------------------
# a run killed while it replaced a JPEG


def test_a_killed_runs_hidden_copies_of_jpegs_are_removed_by_the_next(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    jpeg = photos / "IMG_0001.JPG"
    jpeg.write_bytes(camera_jpeg(seed=1))
    # what storage's atomic write leaves when SIGTERM or SIGKILL lands before its rename: a
    # full copy of the photo, hidden beside it
    old = photos / ".IMG_0001.JPG.a1b2c3d4.tmp"
    old.write_bytes(jpeg.read_bytes())
    stale = time.time() - pick.STALE_TEMP_S - 60
    os.utime(old, (stale, stale))
    fresh = photos / ".IMG_0001.JPG.e5f6g7h8.tmp"  # another writer's, still at work
    fresh.write_bytes(b"in flight")
    others = photos / ".notes.txt.a1b2c3d4.tmp"  # not a file this run writes
    others.write_bytes(b"someone else's")
    os.utime(others, (stale, stale))

    cfg = pick.PickJobConfig(input=str(photos), output=str(tmp_path / "out"), xmp="embed")
    done = pick.write_sidecars(cfg, _picks(str(jpeg), "keep", 3, "Green"), str(photos))
    assert (done.files_written, done.failed) == (1, [])
    assert sorted(p.name for p in photos.iterdir()) == [
        ".IMG_0001.JPG.e5f6g7h8.tmp",
        ".notes.txt.a1b2c3d4.tmp",
        "IMG_0001.JPG",
    ]
