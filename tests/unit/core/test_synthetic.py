"""Synthetic best-of-series corpus: layout, labels, reproducibility, and that it is learnable."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from keeper_core.errors import ConfigError
from keeper_core.quality import FEATURE_NAMES, quality_features
from keeper_core.synthetic import (
    DEFAULT_PHOTOS,
    DEGRADATIONS,
    MANIFEST_COLUMNS,
    PHOTOS,
    generate_corpus,
    main,
)

pytest.importorskip("skimage")


def _read(manifest: Path) -> list[dict[str, str]]:
    with manifest.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    return generate_corpus(out, n_series=12, seed=3, min_shots=3, max_shots=5, image_size=(96, 64))


def test_manifest_layout_and_labels(corpus: Path) -> None:
    assert corpus.name == "manifest.csv"
    assert corpus.read_text().splitlines()[0] == ",".join(MANIFEST_COLUMNS)
    rows = _read(corpus)
    series: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        series.setdefault(r["series_id"], []).append(r)
    assert sorted(series) == [f"s{i:05d}" for i in range(12)]
    for sid, shots in series.items():
        assert 3 <= len(shots) <= 5
        assert sum(int(r["is_best"]) for r in shots) == 1
        # Round-robin over the default base photos, one per series.
        assert {r["base_photo"] for r in shots} == {
            DEFAULT_PHOTOS[int(sid[1:]) % len(DEFAULT_PHOTOS)]
        }
        for shot, r in enumerate(shots):
            path = Path(r["image_uri"])
            assert path.is_absolute()
            assert path == corpus.parent / "images" / sid / f"{shot:02d}.jpg"
            with Image.open(path) as img:
                img.load()
                assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (96, 64))
            if r["is_best"] == "1":
                assert r["degradation"] == "none"
            else:
                parts = r["degradation"].split("+")
                kinds = [p.split(":")[0] for p in parts]
                assert 1 <= len(parts) <= 2
                assert set(kinds) <= set(DEGRADATIONS)
                assert kinds == sorted(kinds, key=DEGRADATIONS.index)  # capture order
                assert not {"underexpose", "overexpose"} <= set(kinds)
    # The keeper is not always in the same position.
    positions = {[r["is_best"] for r in s].index("1") for s in series.values()}
    assert len(positions) > 1


def test_severities_in_documented_ranges(corpus: Path) -> None:
    ranges = {
        "defocus": (0.6, 3.0),
        "underexpose": (0.35, 0.8),
        "overexpose": (1.3, 2.2),
        "noise": (3.0, 25.0),
        "jpeg": (5, 20),
        "haze": (0.15, 0.6),
        "motion": (3.0, 15.0),
    }
    seen = set()
    for r in _read(corpus):
        if r["degradation"] == "none":
            continue
        for part in r["degradation"].split("+"):
            kind, value = part.split(":")
            lo, hi = ranges[kind]
            assert lo <= float(value.split("@")[0]) <= hi, part
            seen.add(kind)
    assert len(seen) >= 5  # ~45 degraded shots cover most kinds


def test_reproducible_and_seed_dependent(tmp_path: Path) -> None:
    kw = {"n_series": 3, "image_size": (64, 48), "max_shots": 3}
    a = generate_corpus(tmp_path / "a", seed=7, **kw)
    b = generate_corpus(tmp_path / "b", seed=7, **kw)
    c = generate_corpus(tmp_path / "c", seed=8, **kw)
    manifest_a = a.read_bytes()
    rows_a, rows_b, rows_c = _read(a), _read(b), _read(c)
    strip = ["series_id", "is_best", "base_photo", "degradation"]
    assert [[r[k] for k in strip] for r in rows_a] == [[r[k] for k in strip] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert Path(ra["image_uri"]).read_bytes() == Path(rb["image_uri"]).read_bytes()
    # Same out_dir twice: byte-identical manifest too.
    assert generate_corpus(tmp_path / "a", seed=7, **kw).read_bytes() == manifest_a
    assert [r["degradation"] for r in rows_a] != [r["degradation"] for r in rows_c]
    # Series are independent of n_series: the first series of a longer corpus is the same.
    longer = _read(generate_corpus(tmp_path / "d", seed=7, **{**kw, "n_series": 5}))
    first = [r for r in longer if r["series_id"] == "s00000"]
    assert [r["degradation"] for r in first] == [
        r["degradation"] for r in rows_a if r["series_id"] == "s00000"
    ]
    assert Path(first[0]["image_uri"]).read_bytes() == Path(rows_a[0]["image_uri"]).read_bytes()


def test_keeper_is_sharper_than_blurred_shots(corpus: Path) -> None:
    rows = _read(corpus)
    images = []
    for r in rows:
        with Image.open(r["image_uri"]) as img:
            images.append(img.convert("RGB"))
    feats = quality_features(images, size=64)
    sharp = feats[:, FEATURE_NAMES.index("sharpness")]
    keeper = {r["series_id"]: s for r, s in zip(rows, sharp, strict=True) if r["is_best"] == "1"}
    blurred = [
        (keeper[r["series_id"]] - s, "noise" in r["degradation"])
        for r, s in zip(rows, sharp, strict=True)
        if "defocus" in r["degradation"] or "motion" in r["degradation"]
    ]
    assert len(blurred) >= 5
    assert np.mean([gap for gap, _ in blurred]) > 1.0
    # Noise adds Laplacian energy back, so only blur without noise must lose every time.
    assert all(gap > 0 for gap, noisy in blurred if not noisy)


def test_every_photo_ships_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("generate_corpus tried to download a photo")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert len(set(PHOTOS)) == len(PHOTOS) == 17
    assert set(DEFAULT_PHOTOS) < set(PHOTOS)
    assert "clock_motion" not in PHOTOS  # already motion-blurred: no clean keeper
    n = len(PHOTOS)
    manifest = generate_corpus(
        tmp_path, n_series=n, seed=0, min_shots=2, max_shots=2, image_size=(64, 48), photos=PHOTOS
    )
    rows = _read(manifest)
    assert [r["base_photo"] for r in rows[::2]] == list(PHOTOS)
    images = []
    for r in rows:
        with Image.open(r["image_uri"]) as img:
            assert (img.mode, img.size) == ("RGB", (64, 48))
            images.append(img.convert("RGB"))
    # Greyscale photos become grey RGB: their clean keepers have (near) zero colourfulness,
    # the colour photos' keepers do not.
    colour = quality_features(images, size=32)[:, FEATURE_NAMES.index("colorfulness")]
    keeper = {r["base_photo"]: c for r, c in zip(rows, colour, strict=True) if r["is_best"] == "1"}
    grey = PHOTOS[PHOTOS.index("camera") :]
    assert max(keeper[p] for p in grey) < 0.01, keeper
    assert min(keeper[p] for p in PHOTOS if p not in grey) > 0.01, keeper


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n_series": 0}, "n_series"),
        ({"min_shots": 1}, "min_shots"),
        ({"min_shots": 4, "max_shots": 3}, "max_shots"),
        ({"photos": ["astronaut", "lena"]}, "photos"),
        ({"photos": []}, "photos"),
        ({"image_size": (8, 240)}, "image_size"),
        ({"jpeg_quality": 0}, "jpeg_quality"),
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        generate_corpus(tmp_path, **{"n_series": 1, **kwargs})
    assert not (tmp_path / "manifest.csv").exists()


def test_main_prints_manifest_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--out", str(out), "--series", "2", "--seed", "1", "--size", "48x32"]
    assert main([*argv, "--min-shots", "2", "--max-shots", "2", "--photos", "coffee"]) == 0
    manifest = Path(capsys.readouterr().out.strip())
    assert manifest == (out / "manifest.csv").resolve()
    rows = _read(manifest)
    assert len(rows) == 4
    assert {r["base_photo"] for r in rows} == {"coffee"}
    with Image.open(rows[0]["image_uri"]) as img:
        assert img.size == (48, 32)
    # "all" means every photo, round-robin in PHOTOS order.
    argv = ["--out", str(tmp_path / "all"), "--series", "3", "--size", "32x32"]
    assert main([*argv, "--photos", "all"]) == 0
    rows = _read(Path(capsys.readouterr().out.strip()))
    assert list(dict.fromkeys(r["base_photo"] for r in rows)) == list(PHOTOS[:3])
    # A ConfigError becomes exit code 2 with the message on stderr.
    assert main(["--out", str(out), "--series", "0"]) == 2
    assert "n_series" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--out", str(out), "--series", "1", "--size", "big"])
