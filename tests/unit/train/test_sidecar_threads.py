"""Sidecars written (keeper pick) and read back (keeper feedback-from-xmp) on threads give exactly
what one at a time gives: the same files, counts, failures in the same order, the same events.

Each run is slowed so that the first photo's I/O finishes last: a fold by completion, not by
plan order, would show. No Ray; real exiv2.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_xmp_feedback as base
from test_xmp_feedback import _rate, _write_run
from test_xmp_feedback_more import FILES, jpeg, packet, tiff

from keeper_core import storage
from keeper_core.feedback import read_feedback, read_offers
from keeper_core.handback import SidecarPlan
from keeper_core.progress import Progress
from keeper_train.jobs import pick, xmp_feedback
from keeper_train.jobs.xmp_feedback import XmpFeedbackConfig, run

NOT_XMP = b"\x00\x01 not xmp"


def _later_first(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str, order: list[str]
) -> set[str]:
    """``module.name(uri, ...)`` sleeps longer the earlier ``uri``'s photo is in ``order`` (the
    first ten photos: the rest at once); returns the names of the threads that call it."""
    real = getattr(module, name)
    threads: set[str] = set()

    def slow(uri: str, *args: Any, **kwargs: Any) -> Any:
        stem = Path(uri).stem.split(".")[0]
        if stem in order:
            threads.add(threading.current_thread().name)
            time.sleep(0.01 * max(0, 10 - order.index(stem)))
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(module, name, slow)
    return threads


def _as_on_a_network(m: pytest.MonkeyPatch) -> None:
    """``io_threads`` threads for the temporary folder, as for a network file system: on a local
    disk ``storage.io_threads_for`` gives one (the slowed calls above stand in for the network)."""
    m.setattr(storage, "io_threads_for", lambda uris, threads, **_: threads)


# --------------------------------------------------------------------------------------------
# map_in_threads: order, bounded submission, exceptions


def test_results_come_in_the_items_order_whatever_finishes_first() -> None:
    def fn(i: int) -> int:
        time.sleep(0.001 * (40 - i))  # the first item finishes last
        return i * i

    assert list(storage.map_in_threads(fn, range(40), 8)) == [i * i for i in range(40)]


def test_at_most_four_items_per_thread_are_taken_before_the_first_result() -> None:
    taken = 0

    def items() -> Any:
        nonlocal taken
        for i in range(10_000):
            taken += 1
            yield i

    it = storage.map_in_threads(lambda i: i, items(), 4)
    assert next(it) == 0
    assert taken <= 16
    it.close()  # the rest is cancelled, not run
    assert taken <= 17


def test_the_first_exception_in_the_items_order_is_raised() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def fn(i: int) -> int:
        with lock:
            started.append(i)
        if i == 3:
            time.sleep(0.05)  # finishes after item 5 has failed
            raise RuntimeError("item 3")
        if i == 5:
            raise KeyError("item 5")
        return i

    with pytest.raises(RuntimeError, match="item 3"):
        list(storage.map_in_threads(fn, range(1000), 4))
    assert len(started) < 1000  # what was not started yet never is


# --------------------------------------------------------------------------------------------
# keeper pick: write_sidecars


def _library(root: Path) -> tuple[Any, Path]:
    """60 photos under ``root``: a RAW+JPEG pair, four spots already holding something that is
    not XMP (two written at once, the first finishing last), one sidecar with a person's rating;
    returns (picks, photos)."""
    photos = root / "photos"
    photos.mkdir(parents=True)
    names = ["IMG_0000.CR2", "IMG_0000.JPG", *(f"IMG_{i:04d}.JPG" for i in range(1, 59))]
    uris = [str(photos / n) for n in names]
    for u in uris:
        Path(u).write_bytes(b"bytes only: a sidecar never opens its image")
    for i in (2, 5, 30, 57):
        (photos / f"IMG_{i:04d}.xmp").write_bytes(NOT_XMP)
    picks = base_picks(uris)
    picks.loc[1, ["decision", "rank", "rating"]] = ["keep", 1, 5]  # the JPEG beats its RAW
    (photos / "IMG_0010.xmp").write_text(
        '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
        'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
        'xmlns:xmp="http://ns.adobe.com/xap/1.0/" xmp:Rating="4"/></rdf:RDF></x:xmpmeta>'
    )
    return picks, photos


def base_picks(uris: list[str]) -> Any:
    import pandas as pd

    n = len(uris)
    return pd.DataFrame(
        {
            "image_uri": uris,
            "group_id": [f"g{i // 3:04d}" for i in range(n)],
            "rank": [i % 3 + 1 for i in range(n)],
            "decision": [("keep", "alternate", "reject")[i % 3] for i in range(n)],
            "rating": [(5, 3, 1)[i % 3] for i in range(n)],
            "label": [("Green", None, "Red")[i % 3] for i in range(n)],
            "reasons": [[f"reason {i}"] for i in range(n)],
            "image_id": [hashlib.sha256(u.rpartition("/")[2].encode()).hexdigest() for u in uris],
        }
    )


def _write(
    tmp_path: Path, name: str, threads: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[pick.Sidecars, dict[str, bytes], Path]:
    picks, photos = _library(tmp_path / name)
    order = [Path(u).stem for u in picks["image_uri"]]
    with monkeypatch.context() as m:
        _as_on_a_network(m)
        threads_used = _later_first(m, pick, "write_sidecar", order)
        cfg = pick.PickJobConfig(
            input=str(photos), output=str(tmp_path / name / "out"), xmp="beside", io_threads=threads
        )
        done = pick.write_sidecars(cfg, picks, str(photos))
    files = {p.name: p.read_bytes() for p in sorted(photos.glob("*.xmp"))}
    main = threading.current_thread().name
    assert threads_used == {main} if threads == 1 else len(threads_used - {main}) > 1
    return done, files, photos


def test_threads_write_the_same_sidecars_and_summary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one, files_one, photos_one = _write(tmp_path, "one", 1, monkeypatch)
    eight, files_eight, photos_eight = _write(tmp_path, "eight", 8, monkeypatch)

    assert files_eight == files_one
    assert eight.counts() == one.counts()
    assert (one.written, one.skipped, one.kept_ratings, len(one.failed)) == (55, 1, 1, 4)

    def failures(done: pick.Sidecars, photos: Path) -> list[tuple[str, str, str]]:
        return [
            tuple(x.replace(str(photos), "PHOTOS") for x in (f.image_uri, f.sidecar_uri, f.reason))
            for f in done.failed
        ]

    assert failures(eight, photos_eight) == failures(one, photos_one)
    assert [Path(f.sidecar_uri).name for f in eight.failed] == [
        "IMG_0002.xmp",
        "IMG_0005.xmp",
        "IMG_0030.xmp",
        "IMG_0057.xmp",
    ]
    assert (photos_eight / "IMG_0030.xmp").read_bytes() == NOT_XMP  # left as it is
    # The pair's one sidecar holds the better of the two decisions (the JPEG's keep).
    assert b'keeper:decision="keep"' in files_eight["IMG_0000.xmp"]


def test_two_plans_for_one_sidecar_are_refused_before_any_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks, photos = _library(tmp_path)
    real = pick.plan_sidecars

    def twice(*args: Any, **kwargs: Any) -> list[SidecarPlan]:
        plans = real(*args, **kwargs)
        clash = plans[5]._replace(sidecar_uri=plans[4].sidecar_uri.upper())  # one file on macOS
        return [*plans[:5], clash, *plans[6:]]

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("a sidecar was written")

    monkeypatch.setattr(pick, "plan_sidecars", twice)
    monkeypatch.setattr(pick, "write_sidecar", refuse)
    cfg = pick.PickJobConfig(input=str(photos), output=str(tmp_path / "out"), xmp="beside")
    with pytest.raises(AssertionError, match="a sidecar twice"):
        pick.write_sidecars(cfg, picks, str(photos))


def test_an_unexpected_error_in_a_writer_is_raised_not_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    picks, photos = _library(tmp_path)
    real = pick.write_sidecar

    def broken(uri: str, **kwargs: Any) -> Any:
        if uri.endswith("IMG_0020.xmp"):
            raise RuntimeError("a bug, not a bad sidecar")
        return real(uri, **kwargs)

    monkeypatch.setattr(pick, "write_sidecar", broken)
    _as_on_a_network(monkeypatch)
    cfg = pick.PickJobConfig(
        input=str(photos), output=str(tmp_path / "out"), xmp="beside", io_threads=8
    )
    with pytest.raises(RuntimeError, match="a bug"):
        pick.write_sidecars(cfg, picks, str(photos))


# --------------------------------------------------------------------------------------------
# keeper feedback-from-xmp: read_sidecars


@pytest.fixture
def rated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """test_xmp_feedback_more's FILES, every way of reading at once: sidecars a person rated,
    keeper's own sidecars beside files rated in the file, missing and unreadable sidecars, files
    with and without XMP, damaged files and a photo not there; returns the run."""
    monkeypatch.setattr(base, "PHOTOS", FILES)
    out, photos = _write_run(tmp_path)
    for name in ("IMG_2", "IMG_3", "IMG_6", "IMG_7", "IMG_8", "IMG_9"):
        (photos / f"{name}.xmp").unlink()
    _rate(photos / "IMG_5.xmp", 3, 5)
    (photos / "IMG_3.xmp").write_bytes(NOT_XMP)  # an unreadable sidecar
    (photos / "IMG_1.JPG").write_bytes(jpeg(packet(2, None)))  # beside keeper's own sidecar
    (photos / "IMG_2.JPG").write_bytes(jpeg(packet(5, "Red")))
    (photos / "IMG_4.DNG").write_bytes(tiff(packet(-1, None)))
    (photos / "IMG_6.JPG").write_bytes(jpeg())
    (photos / "IMG_7.JPG").write_bytes(jpeg(packet(4))[:60])  # cut inside its XMP segment
    (photos / "IMG_8.TIF").write_bytes(tiff(packet(4), offset=0x7FFF_0000))
    return out


def _feedback(
    out: Path, root: Path, threads: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    order = [Path(f).stem for f, *_ in FILES]
    with monkeypatch.context() as m:
        _as_on_a_network(m)
        used = _later_first(m, storage, "exists", order)
        s = run(XmpFeedbackConfig(run=str(out), feedback=str(root), io_threads=threads))
    main = threading.current_thread().name
    assert used == {main} if threads == 1 else len(used - {main}) > 1
    summary = s.model_dump(exclude={"feedback"})
    # Less what differs between any two writes: the time, and the writer's random name (and
    # an offer's id, made from them); an xmp event's id is its hash, compared.
    events = [
        {k: v for k, v in e.items() if k not in ("received_at", "writer")}
        for e in read_feedback(str(root / "events")).to_pylist()
    ]
    offers = [
        {k: v for k, v in o.items() if k not in ("event_id", "received_at", "writer")}
        for o in read_offers(str(root / "offers")).to_pylist()
    ]
    return summary, events, offers


def test_threads_read_the_same_ratings_problems_and_events(
    rated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    one = _feedback(rated, tmp_path / "fb1", 1, monkeypatch)
    eight = _feedback(rated, tmp_path / "fb8", 8, monkeypatch)

    assert eight[0] == one[0]
    assert eight[1] == one[1]
    assert eight[2] == one[2]
    s = one[0]
    # every branch of the read was taken, and the lists hold more than one entry each
    assert (s["read"], s["missing"], len(s["unreadable"])) == (3, 5, 1)
    assert (s["embedded"], s["embedded_packets"], s["absent"], s["in_file"]) == (2, 1, 1, 2)
    assert [p["image_uri"].rpartition("/")[2] for p in s["embedded_unreadable"]] == [
        "IMG_7.JPG",
        "IMG_8.TIF",
    ]
    assert s["persons_ratings"] == 4
    assert len(one[1]) == 4  # events


def test_an_unexpected_error_in_a_reader_is_raised_not_recorded(
    rated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real: Callable[..., Any] = xmp_feedback.parse_rating

    def broken(fields: Any) -> Any:
        if fields.get("Xmp.keeper.group") == "g1":
            raise RuntimeError("a bug, not a bad sidecar")
        return real(fields)

    monkeypatch.setattr(xmp_feedback, "parse_rating", broken)
    _as_on_a_network(monkeypatch)
    with pytest.raises(RuntimeError, match="a bug"):
        run(XmpFeedbackConfig(run=str(rated), feedback=str(tmp_path / "fb"), io_threads=8))


def test_on_a_local_disk_a_mirror_is_written_and_sidecars_read_one_at_a_time(
    rated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where every file is on a local disk and nothing is fsynced (a mirror; reading), threads
    would only take turns at the GIL: io_threads then gives way to one thread
    (storage.io_threads_for). Beside the originals each sidecar is fsynced: threads stay."""
    picks, photos = _library(tmp_path / "w")
    order = [Path(u).stem for u in picks["image_uri"]]
    main = threading.current_thread().name
    for xmp, one_thread in (("mirror", True), ("beside", False)):
        with monkeypatch.context() as m:
            used = _later_first(m, pick, "write_sidecar", order)
            cfg = pick.PickJobConfig(
                input=str(photos), output=str(tmp_path / "w" / "out"), xmp=xmp, io_threads=8
            )
            assert pick.write_sidecars(cfg, picks, str(photos)).written > 50
        assert (used == {main}) is one_thread, (xmp, used)
    with monkeypatch.context() as m:
        used = _later_first(m, storage, "exists", [Path(f).stem for f, *_ in FILES])
        s = run(XmpFeedbackConfig(run=str(rated), feedback=str(tmp_path / "fb"), io_threads=8))
    assert used == {main}
    assert s.read == 3


def test_long_writes_and_reads_say_how_far_they_got(
    rated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A line every few seconds (here: every step) while sidecars are written and read back,
    and one at the end: a million sidecars are minutes."""
    every_step = functools.partial(Progress, every=0.0)
    monkeypatch.setattr(pick, "Progress", every_step)
    monkeypatch.setattr(xmp_feedback, "Progress", every_step)
    picks, photos = _library(tmp_path / "w")
    cfg = pick.PickJobConfig(input=str(photos), output=str(tmp_path / "w" / "out"), xmp="mirror")
    with caplog.at_level(logging.INFO):
        pick.write_sidecars(cfg, picks, str(photos))
        run(XmpFeedbackConfig(run=str(rated), feedback=str(tmp_path / "fb")))
    lines = [r.getMessage() for r in caplog.records]
    written = [t for t in lines if t.startswith("sidecars: ")]
    assert written[0].startswith("sidecars: 1 of 59 (1 %), ")  # 60 photos, a RAW+JPEG pair
    assert written[-1].startswith("sidecars: 59 done in ")
    read = [t for t in lines if t.startswith("sidecars read: ")]
    assert read[0].startswith("sidecars read: 1 of ")
    assert read[-1].startswith("sidecars read: ")
    assert "done in" in read[-1]
