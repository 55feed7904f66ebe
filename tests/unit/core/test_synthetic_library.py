"""Generated photo library: camera layout, EXIF, timeline, copies, determinism."""

from __future__ import annotations

import csv
import itertools
import os
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keeper_core.errors import ConfigError
from keeper_core.synthetic_library import LIBRARY_COLUMNS, generate_library, main

pytest.importorskip("skimage")

_EXIF_IFD, _DTO, _OFFSET, _SUBSEC, _SERIAL = 0x8769, 0x9003, 0x9011, 0x9291, 0xA431


def _read(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


def _exif(path: str) -> tuple[dict[int, object], dict[int, object]]:
    with Image.open(path) as img:
        exif = img.getexif()
        return dict(exif), dict(exif.get_ifd(_EXIF_IFD))


def _seconds(capture_time: str) -> float:
    """ISO capture time -> seconds; a naive time counts as UTC (one camera's own clock)."""
    when = datetime.fromisoformat(capture_time)
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_library(
        tmp_path_factory.mktemp("lib"),
        n_bursts=16,
        seed=4,
        image_size=(64, 48),
        singles_fraction=0.25,
        exact_duplicates=2,
        near_duplicates=2,
        mtime_only_fraction=0.25,
    )


def test_layout_exif_and_truth(small: Path) -> None:
    assert small.name == "library.csv"
    assert small.read_text().splitlines()[0] == ",".join(LIBRARY_COLUMNS)
    rows = _read(small)
    camera_rows = [r for r in rows if not r["duplicate_of"]]
    series: dict[str, list[dict[str, str]]] = {}
    for r in camera_rows:
        series.setdefault(r["series_id"], []).append(r)
    assert len(series) == 16
    assert sum(len(s) == 1 for s in series.values()) == 4  # round(0.25 * 16) singles
    for shots in series.values():
        assert len(shots) == 1 or 2 <= len(shots) <= 8
        assert sum(r["is_best"] == "1" for r in shots) == 1
        assert all((r["is_best"] == "1") == (r["degradation"] == "none") for r in shots)
        assert len({r["camera"] for r in shots}) == 1
    no_time = {sid for sid, shots in series.items() if "+00:00" in shots[0]["capture_time"]}
    assert len(no_time) == 4  # round(0.25 * 16) series without EXIF time

    names = {
        "Canon EOS R6": r"DCIM/100CANON/IMG_\d{4}\.JPG",
        "NIKON Z 6_2": r"DCIM/100NIKON/DSC_\d{4}\.JPG",
    }
    for r in camera_rows:
        path = Path(r["image_uri"])
        assert path.is_absolute()
        ifd0, ifd = _exif(r["image_uri"])
        model = str(ifd0[0x0110])
        assert re.fullmatch(names[model], path.relative_to(small.parent).as_posix())
        assert r["camera"].startswith(model)
        assert ifd[_SERIAL]
        with Image.open(path) as img:
            assert (img.format, img.size) == ("JPEG", (64, 48))
        mtime = os.stat(path).st_mtime_ns / 1e9
        if r["series_id"] in no_time:
            assert _DTO not in ifd
            assert 0x0132 not in ifd0
            assert mtime == pytest.approx(_seconds(r["capture_time"]), abs=1e-6)
            continue
        # EXIF time, sub-seconds and offset spell the manifest's capture_time.
        subsec = str(ifd[_SUBSEC])
        assert len(subsec) == (2 if model == "Canon EOS R6" else 3)
        stamp = datetime.strptime(str(ifd[_DTO]), "%Y:%m:%d %H:%M:%S").isoformat()
        text = f"{stamp}.{subsec.ljust(3, '0')}" + str(ifd.get(_OFFSET, ""))
        assert text == r["capture_time"]
        assert (_OFFSET in ifd) == (model == "Canon EOS R6")  # one camera writes no offset
        # The mtime is the clock reading at the shoot's zone, UTC+2.
        local = datetime.fromisoformat(r["capture_time"][:23])
        assert mtime == pytest.approx(local.replace(tzinfo=UTC).timestamp() - 7200)

    # Per camera, files are numbered in capture order from 0001.
    for model in names:
        mine = [r for r in camera_rows if r["camera"].startswith(model)]
        numbers = [int(re.findall(r"\d{4}", Path(r["image_uri"]).name)[0]) for r in mine]
        assert numbers == list(range(1, len(mine) + 1))


def test_copies(small: Path) -> None:
    rows = _read(small)
    by_uri = {r["image_uri"]: r for r in rows}
    copies = [r for r in rows if r["duplicate_of"]]
    assert len(copies) == 4
    exact = [r for r in copies if "reencode" not in r["degradation"]]
    near = [r for r in copies if "reencode" in r["degradation"]]
    assert len(exact) == 2
    assert len(near) == 2
    sources = [by_uri[r["duplicate_of"]] for r in copies]
    assert all(not s["duplicate_of"] for s in sources)
    assert len({s["image_uri"] for s in sources}) == 4
    for r, src in zip(copies, sources, strict=True):
        assert (r["series_id"], r["camera"], r["is_best"]) == (src["series_id"], src["camera"], "0")
        assert "/export/" in r["image_uri"]
    for r in exact:
        src = by_uri[r["duplicate_of"]]
        assert Path(r["image_uri"]).read_bytes() == Path(src["image_uri"]).read_bytes()
        assert Path(r["image_uri"]).name == Path(src["image_uri"]).name
    for r in near:
        src = by_uri[r["duplicate_of"]]
        assert r["degradation"].startswith(src["degradation"].replace("none", "reencode"))
        ifd0, ifd = _exif(r["image_uri"])
        assert not ifd0
        assert not ifd
        with Image.open(r["image_uri"]) as img:
            assert 0.45 * 64 <= img.width <= 0.95 * 64
        # Exports are written after the shoot; their time is the file's mtime, in UTC.
        assert r["capture_time"].endswith("+00:00")
        mtime = os.stat(r["image_uri"]).st_mtime_ns / 1e9
        assert mtime == pytest.approx(_seconds(r["capture_time"]), abs=1e-6)
        assert mtime > max(os.stat(s["image_uri"]).st_mtime for s in rows if not s["duplicate_of"])


def test_timeline_is_realistic(tmp_path: Path) -> None:
    rows = _read(generate_library(tmp_path, n_bursts=150, seed=2, image_size=(16, 16)))
    cams = sorted({r["camera"] for r in rows})
    assert len(cams) == 2
    series: dict[str, list[float]] = {}
    camera_of: dict[str, str] = {}
    for r in rows:
        series.setdefault(r["series_id"], []).append(_seconds(r["capture_time"]))
        camera_of[r["series_id"]] = r["camera"]
    singles = [s for s in series.values() if len(s) == 1]
    assert len(singles) == round(0.15 * 150)
    pauses = 0
    for times in series.values():
        gaps = np.diff(times)
        if not len(gaps):
            continue
        quick = gaps[gaps < 0.3]
        # 5-15 frames/s, a few ms of jitter, truncation to centi- or milliseconds.
        assert np.all(quick > 1 / 15 - 0.025)
        assert np.all(quick < 1 / 5 + 0.025)
        assert len(gaps) - len(quick) <= 1  # at most one pause (shutter pressed again)
        pauses += len(gaps) - len(quick)
        assert np.all(gaps > 0.04)
        assert np.all(gaps < 1.5 + 0.25)
    assert 5 <= pauses <= 40
    # Scenes: per camera, at least 2 s apart, minutes on average.
    for cam in cams:
        spans = sorted((t[0], t[-1]) for sid, t in series.items() if camera_of[sid] == cam)
        between = np.array([b[0] - a[1] for a, b in itertools.pairwise(spans)])
        assert between.min() >= 2.0 - 0.01
        assert 60 < np.median(between) < 600
    # The two cameras interleave: the camera changes often from one scene to the next.
    order = [camera_of[f"b{i:05d}"] for i in range(150)]
    switches = sum(a != b for a, b in itertools.pairwise(order))
    assert 40 < switches < 110


def test_consecutive_scenes_use_different_photos(tmp_path: Path) -> None:
    rows = _read(
        generate_library(
            tmp_path, n_bursts=60, seed=1, image_size=(16, 16), photos=["coffee", "rocket", "moon"]
        )
    )
    first = {}
    for r in rows:
        first.setdefault(r["series_id"], r)
    photos = [first[f"b{i:05d}"]["base_photo"] for i in range(60)]
    cams = [first[f"b{i:05d}"]["camera"] for i in range(60)]
    assert set(photos) == {"coffee", "rocket", "moon"}
    assert all(a != b for a, b in itertools.pairwise(photos))
    for cam in set(cams):
        mine = [p for p, c in zip(photos, cams, strict=True) if c == cam]
        assert all(a != b for a, b in itertools.pairwise(mine))


def test_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    kw = {
        "n_bursts": 8,
        "image_size": (32, 24),
        "exact_duplicates": 1,
        "near_duplicates": 1,
        "mtime_only_fraction": 0.2,
    }
    a = generate_library(tmp_path / "a", seed=5, **kw)
    b = generate_library(tmp_path / "b", seed=5, **kw)
    c = generate_library(tmp_path / "c", seed=6, **kw)

    def files(root: Path) -> dict[str, tuple[bytes, int]]:
        return {
            p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "library.csv"
        }

    fa = files(a.parent)
    assert fa == files(b.parent)
    assert len(fa) >= 10
    assert a.read_text().replace(str(a.parent), "") == b.read_text().replace(str(b.parent), "")
    assert files(c.parent) != fa
    # Again into the same folder: byte-identical manifest.
    manifest = a.read_bytes()
    assert generate_library(tmp_path / "a", seed=5, **kw).read_bytes() == manifest


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_bursts": 0}, "n_bursts"),
        ({"cameras": 0}, "cameras"),
        ({"cameras": 5}, "cameras"),
        ({"singles_fraction": 1.5}, "singles_fraction"),
        ({"mtime_only_fraction": -0.1}, "mtime_only_fraction"),
        ({"exact_duplicates": -1}, "exact_duplicates"),
        ({"exact_duplicates": 2, "near_duplicates": 2}, "n_bursts"),
        ({"image_size": (8, 8)}, "image_size"),
        ({"photos": ["coffee", "lena", "moon"]}, "photos"),
        ({"photos": ["coffee", "moon"]}, "photos"),  # 2 cameras need 3 photos
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        generate_library(tmp_path, **{"n_bursts": 3, **kwargs})
    assert not list(tmp_path.iterdir())


def test_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--bursts", "3", "--size", "24x16", "--cameras", "1"]
    assert main([*argv, "--exact-duplicates", "1"]) == 0
    manifest = Path(capsys.readouterr().out.strip())
    assert manifest == (out / "library.csv").resolve()
    rows = _read(manifest)
    assert len({r["camera"] for r in rows}) == 1
    assert sum(bool(r["duplicate_of"]) for r in rows) == 1
    assert main(["--out", str(out), "--bursts", "0"]) == 2
    assert "n_bursts" in capsys.readouterr().err
    assert main(["--out", str(out), "--bursts", "1", "--size", "big"]) == 2
    assert "--size" in capsys.readouterr().err
