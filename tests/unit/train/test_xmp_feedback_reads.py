"""keeper feedback-from-xmp reads each sidecar with one request (``storage.read_if_exists``):
on S3 a GET per sidecar, where an existence check first made it two, three for a missing one.
A failure of the store itself still stops the run; a file that cannot be read is one unreadable
sidecar."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import import_benchmark

from keeper_core import storage
from keeper_core.errors import StorageError
from keeper_core.handback import plan_sidecars, write_sidecar
from keeper_train.jobs import xmp_feedback


def _run(root: str, n: int) -> xmp_feedback.PickRun:
    """A mirror run's sidecars under ``root`` (its PickRun as ``plan`` makes it, built here)."""
    uris = [f"{root}/photos/IMG_{i}.CR2" for i in range(n)]
    plans = plan_sidecars(uris, input_root=f"{root}/photos", mode="mirror", out_dir=f"{root}/xmp")
    row_of = {u: i for i, u in enumerate(uris)}
    return xmp_feedback.PickRun("test", {}, {}, row_of, plans, "mirror", "basename")


def test_one_get_per_sidecar_on_s3(s3_bucket: str) -> None:
    run = _run(f"s3://{s3_bucket}", 6)
    for i, p in enumerate(run.plans):
        if i < 4:
            write_sidecar(p.sidecar_uri, rating=i, label=None, durable=False)
    storage.write_bytes(run.plans[4].sidecar_uri, b"\x00 not xmp")  # the 6th is missing
    counted = import_benchmark("sidecar_s3_requests").counted_s3_calls

    with counted() as calls:
        got = xmp_feedback.read_sidecars(run, io_threads=1)

    assert (got.read, got.missing, len(got.unreadable)) == (4, 1, 1)
    assert sorted(s.rating for s in got.sidecars) == [0, 1, 2, 3]
    # a GET per sidecar; the missing one's photo is then looked for (its own XMP is read where
    # it has no sidecar): that existence check is the only HEAD
    assert calls["GetObject"] == 6
    assert calls["HeadObject"] == 1


def test_a_missing_bucket_stops_the_run(s3_bucket: str) -> None:
    run = _run(f"s3://{s3_bucket}-not-there", 2)
    with pytest.raises(StorageError, match="bucket does not exist"):
        xmp_feedback.read_sidecars(run, io_threads=1)


def test_a_local_file_that_cannot_be_read_is_one_unreadable_sidecar(tmp_path: Path) -> None:
    run = _run(str(tmp_path), 3)
    write_sidecar(run.plans[0].sidecar_uri, rating=5, label=None)
    Path(run.plans[1].sidecar_uri).mkdir(parents=True)  # a folder by the sidecar's name

    got = xmp_feedback.read_sidecars(run, io_threads=1)

    assert (got.read, got.missing, len(got.unreadable)) == (1, 1, 1)
    assert "is a directory" in got.unreadable[0].reason
