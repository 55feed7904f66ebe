"""export_keepers on threads (S3 or a network file system) ends as one at a time does: the same
files, counts, record and failures in the same order; on local disks it runs on one thread."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from keeper_core import handback, storage
from keeper_core.handback import EXPORT_RECORD, export_keepers


def _library(root: Path, n: int = 30) -> list[str]:
    uris = []
    for i in range(n):
        path = root / f"day{i % 3}" / f"IMG_{i:04d}.JPG"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(hashlib.sha256(str(i).encode()).digest() * (10 + i))
        uris.append(str(path))
    return uris


def _dest(tmp: Path, uris: list[str], root: Path) -> Path:
    """A destination as a second run finds it: keeper's copies of the first ten (two of their
    originals changed since), a person's file in the way of IMG_0012, a copy of IMG_0015 made
    by someone else."""
    dest = tmp / "keepers"
    assert not export_keepers(uris[:10], input_root=str(root), dest=str(dest), mode="copy").failed
    for u in uris[3:5]:
        Path(u).write_bytes(Path(u).read_bytes() + b" edited")
    (dest / "day0" / "IMG_0012.JPG").write_bytes(b"a person's own file")
    (dest / "day0" / "IMG_0015.JPG").write_bytes(Path(uris[15]).read_bytes())
    return dest


def _slowed(m: pytest.MonkeyPatch, order: list[str]) -> set[str]:
    """The first images' exports finish last; returns the threads that ran them."""
    real = handback._export_local
    used: set[str] = set()

    def slow(src: Path, dst: Path, *args: Any) -> Any:
        used.add(threading.current_thread().name)
        if src.name in order[:8]:
            time.sleep(0.01 * (8 - order.index(src.name)))
        return real(src, dst, *args)

    m.setattr(handback, "_export_local", slow)
    return used


def _run(tmp_path: Path, name: str, threads: int, monkeypatch: pytest.MonkeyPatch) -> Any:
    root = tmp_path / name / "photos"
    uris = _library(root)
    dest = _dest(tmp_path / name, uris, root)
    with monkeypatch.context() as m:
        m.setattr(storage, "io_threads_for", lambda uris, threads, **_: threads)  # a network disk
        used = _slowed(m, [Path(u).name for u in uris])
        res = export_keepers(
            uris, input_root=str(root), dest=str(dest), mode="copy", io_threads=threads
        )
    main = threading.current_thread().name
    assert used == {main} if threads == 1 else len(used - {main}) > 1
    files = {p.relative_to(dest).as_posix(): p.read_bytes() for p in sorted(dest.rglob("*.JPG"))}
    record = json.loads((dest / EXPORT_RECORD).read_text())
    failed = [
        (Path(f.image_uri).name, f.reason.replace(str(tmp_path / name), "")) for f in res.failed
    ]
    return res, failed, files, record


def test_threads_export_what_one_at_a_time_exports(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = _run(tmp_path, "one", 1, monkeypatch)
    eight = _run(tmp_path, "eight", 8, monkeypatch)
    for a, b in zip(one[2:], eight[2:], strict=True):  # files and record
        assert a == b
    assert eight[1] == one[1]  # failures, in order
    res = eight[0]
    assert (res.exported, res.already_there, res.updated) == (18, 9, 2)
    assert [name for name, _ in eight[1]] == ["IMG_0012.JPG"]


def test_on_local_disks_and_for_names_one_in_case_it_runs_on_one_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "photos"
    uris = _library(root, 12)
    main = threading.current_thread().name
    with monkeypatch.context() as m:
        used = _slowed(m, [])
        res = export_keepers(uris, input_root=str(root), dest=str(tmp_path / "k"), mode="copy",
                             io_threads=8)  # fmt: skip
    assert (res.exported, used) == (12, {main})

    twin = root / "day0" / "img_0000.jpg"  # IMG_0000.JPG's name on a case-insensitive disk
    twin.write_bytes(b"another photo")
    with monkeypatch.context() as m:
        m.setattr(storage, "io_threads_for", lambda uris, threads, **_: threads)
        used = _slowed(m, [])
        res = export_keepers([*uris, str(twin)], input_root=str(root), dest=str(tmp_path / "c"),
                             mode="copy", io_threads=8)  # fmt: skip
    assert used == {main}
    assert res.exported == 13  # this disk tells the two names apart


def test_at_most_eight_images_go_through_s3_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each export through S3 holds an image (two where a copy is there) in memory: 16 threads
    run at most 8 of them at once."""
    lock = threading.Lock()
    running, most = 0, 0

    def fake(src: str, dst: str, recorded: str | None) -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.01)
        with lock:
            running -= 1
        return handback._Exported("exported", "0" * 64)

    monkeypatch.setattr(handback, "_export_s3", fake)
    uris = [f"s3://bucket/photos/IMG_{i:04d}.JPG" for i in range(40)]
    res = export_keepers(
        uris, input_root="s3://bucket/photos", dest=str(tmp_path / "k"), mode="copy", io_threads=16
    )
    assert res.exported == 40
    assert most == handback._S3_EXPORTS_AT_ONCE == 8
