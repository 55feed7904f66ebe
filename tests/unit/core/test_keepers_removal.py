"""``handback.remove_keepers_export`` (``keeper unpick --keepers``): keeper's copies and links
taken back out of a keepers folder, and nothing else.

Copies go while they are byte for byte what keeper wrote (its record names every run's); a copy
edited since, a file keeper never put there, a symlink elsewhere stay and are listed; folders the
removals leave empty go; the record keeps what is left. Links (hard or symbolic) to an original
at its own path go, an earlier run's too; the originals stay. On S3 too (moto).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from keeper_core import storage
from keeper_core.handback import EXPORT_RECORD, export_keepers, remove_keepers_export


def _library(root: Path) -> list[str]:
    uris = []
    for i, rel in enumerate(["day1/A.JPG", "day1/B.JPG", "day2/C.JPG", "day2/D.JPG"]):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"photo {i}".encode() * 100)
        uris.append(str(path))
    return uris


def test_copies_of_every_run_go_and_an_edited_one_stays(tmp_path: Path) -> None:
    photos, dest = tmp_path / "photos", tmp_path / "keepers"
    a, b, c, d = _library(photos)
    export_keepers([a, b], input_root=str(photos), dest=str(dest), mode="copy")
    export_keepers([b, c], input_root=str(photos), dest=str(dest), mode="copy")  # A: not kept now
    (dest / "day2" / "C.JPG").write_bytes(b"edited in a photo tool")
    (dest / "day2" / "notes.txt").write_text("a person's file")
    before = sorted(str(p) for p in dest.rglob("*"))

    told = remove_keepers_export(str(dest), [b, c], input_root=str(photos), dry_run=True)
    assert sorted(str(p) for p in dest.rglob("*")) == before
    done = remove_keepers_export(str(dest), [b, c], input_root=str(photos))

    for r in (told, done):
        assert (r.removed, r.absent) == (2, 0)  # A (an earlier run's) and B
        assert [(Path(p).name, w) for p, w in r.left] == [
            ("C.JPG", "changed since keeper copied it (or not a file): left")
        ]
    assert done.folders_removed == 1  # day1, emptied; day2 holds C and the notes
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        EXPORT_RECORD, "day2", "day2/C.JPG", "day2/notes.txt"
    ]  # fmt: skip
    assert list(json.loads((dest / EXPORT_RECORD).read_text())["files"]) == ["day2/C.JPG"]
    assert all(Path(u).exists() for u in (a, b, c, d))  # originals untouched


def test_a_folder_of_keepers_copies_alone_goes_whole(tmp_path: Path) -> None:
    photos, dest = tmp_path / "photos", tmp_path / "keepers"
    uris = _library(photos)
    export_keepers(uris, input_root=str(photos), dest=str(dest), mode="copy")
    done = remove_keepers_export(str(dest), uris, input_root=str(photos))
    assert (done.removed, done.left, done.folders_removed) == (4, [], 3)
    assert not dest.exists()


@pytest.mark.parametrize("mode", ["hardlink", "symlink"])
def test_links_to_the_keepers_go_and_the_originals_stay(tmp_path: Path, mode: str) -> None:
    photos, dest = tmp_path / "photos", tmp_path / "keepers"
    a, b, c, _ = _library(photos)
    export_keepers([a, b], input_root=str(photos), dest=str(dest), mode=mode)  # type: ignore[arg-type]
    (dest / "day2").mkdir()
    (dest / "day2" / "C.JPG").symlink_to(a)  # a person's link, to another photo

    done = remove_keepers_export(str(dest), [a, b, c], input_root=str(photos))

    assert (done.removed, done.absent) == (2, 0)
    assert [(Path(p).name, w.split(":")[0]) for p, w in done.left] == [
        ("C.JPG", "a symlink to another file")
    ]
    assert not (dest / "day1").exists()
    assert Path(a).read_bytes() == b"photo 0" * 100
    assert Path(b).exists()


@pytest.mark.parametrize("mode", ["hardlink", "symlink"])
def test_links_an_earlier_run_made_go_too(tmp_path: Path, mode: str) -> None:
    """A link needs no record: one to the original at its own path is keeper's, whichever run
    made it (A was a keeper of the first run, not of the last); other links and files stay."""
    photos, dest = tmp_path / "photos", tmp_path / "keepers"
    a, b, c, d = _library(photos)
    export_keepers([a, b], input_root=str(photos), dest=str(dest), mode=mode)  # type: ignore[arg-type]
    export_keepers([b, c], input_root=str(photos), dest=str(dest), mode=mode)  # type: ignore[arg-type]
    (dest / "day2" / "D.JPG").symlink_to(a)  # a person's link, to another photo
    (dest / "day2" / "notes.txt").write_text("a person's file")

    done = remove_keepers_export(str(dest), [b, c], input_root=str(photos))

    assert (done.removed, done.absent) == (3, 0)  # A (the first run's), B, C
    assert [Path(p).name for p, _ in done.left] == []  # D is nobody's keeper: not looked at
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "day2", "day2/D.JPG", "day2/notes.txt"
    ]  # fmt: skip
    assert sorted(Path(u).name for u in done.unlinked) == (
        ["A.JPG", "B.JPG", "C.JPG"] if mode == "hardlink" else []
    )
    assert all(Path(u).read_bytes().startswith(b"photo") for u in (a, b, c, d))


def test_copies_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    uris = _library(photos)
    dest = f"s3://{s3_bucket}/keepers"
    export_keepers(uris[:2], input_root=str(photos), dest=dest, mode="copy")
    done = remove_keepers_export(dest, uris[:2], input_root=str(photos))
    assert (done.removed, done.left) == (2, [])
    assert storage.list_files(dest) == []  # the copies and the record
