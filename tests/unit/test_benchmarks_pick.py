"""benchmarks/pick.py's one-process profile of prepare_batch's steps runs on a small library
(it fell behind a rename in keeper_train.jobs.embed once, found only when the benchmark ran)."""

from __future__ import annotations

from pathlib import Path

from support import import_benchmark


def test_the_profile_times_every_step(tmp_path: Path) -> None:
    pick = import_benchmark("pick")
    manifest = pick.make_library(tmp_path / "library", n_bursts=3, seed=0, image_size=(96, 72))
    profile = pick.profile_prepare(manifest.parent, "keeper-tiny:random", 4, tmp_path / "scratch")
    assert profile["images"] == 4
    steps = profile["ms_per_image"]
    for step in ("read", "decode", "resize", "capture", "thumbnail_encode", "dhash", "xmp_sidecar"):
        assert steps[step] > 0, step
