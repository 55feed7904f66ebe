"""A VLM judge loaded from ``s3://`` (a real moto_server) scores exactly as the same checkpoint
loaded from disk, downloads once, and downloads again only what changed."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
from PIL import Image

from keeper_core import storage
from keeper_core.errors import ModelLoadError
from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_core.vlm import VlmConfig, VlmJudge, load_vlm, parameter_count

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm-s3") / "tiny")


@pytest.fixture(scope="module")
def local_judge(tiny_dir: Path) -> VlmJudge:
    return load_vlm(VlmConfig(source=str(tiny_dir)))


@contextlib.contextmanager
def s3_requests() -> Iterator[Counter[str]]:
    """Counts the S3 operations keeper_core.storage's client sends, by name (GetObject...)."""
    calls: Counter[str] = Counter()
    events = storage.s3_client().meta.events
    handler_id = f"count-{uuid.uuid4().hex}"

    def count(model: Any, **_: Any) -> None:
        calls[model.name] += 1

    events.register("before-call.s3", count, unique_id=handler_id)
    try:
        yield calls
    finally:
        events.unregister("before-call.s3", unique_id=handler_id)


def _upload(folder: Path, bucket: str, prefix: str) -> int:
    s3 = boto3.client("s3")
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()]
    for p in files:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{p.relative_to(folder)}", Body=p.read_bytes())
    return len(files)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    }


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [
        Image.fromarray(rng.integers(0, 256, (36 + 5 * i, 40, 3), dtype=np.uint8)) for i in range(n)
    ]


def test_s3_model_scores_like_local_and_downloads_once_per_version(
    s3_bucket: str, tiny_dir: Path, local_judge: VlmJudge, tmp_path: Path
) -> None:
    n_files = _upload(tiny_dir, s3_bucket, "models/tiny")
    source = f"s3://{s3_bucket}/models/tiny"
    cache = tmp_path / "cache"
    images, queries = _images(5), ["a dog", "a red car", "sky", "a cat", "a house by a lake"]

    with s3_requests() as first:
        judge = load_vlm(VlmConfig(source=source), cache_dir=cache)
    assert first["GetObject"] == n_files
    assert judge.local_dir is not None
    assert judge.local_dir.is_relative_to(cache / "vlm" / "models" / s3_bucket)
    assert judge.describe()["source"] == source
    assert judge.describe()["random_weights"] is True
    np.testing.assert_array_equal(
        judge.relevance(images, queries), local_judge.relevance(images, queries)
    )
    np.testing.assert_array_equal(judge.quality(images), local_judge.quality(images))
    before = _snapshot(judge.local_dir)
    assert len(before) == n_files

    with s3_requests() as second:
        again = load_vlm(VlmConfig(source=source), cache_dir=cache)
    assert second["GetObject"] == 0  # a listing and HEADs only
    assert second["ListObjectsV2"] == 1
    assert second["HeadObject"] == n_files
    assert again.local_dir == judge.local_dir
    assert _snapshot(judge.local_dir) == before  # same files, not rewritten

    # A changed object is a new version of the model: only it is fetched, into a new folder.
    meta = json.loads((tiny_dir / "keeper.json").read_text()) | {"revision": 2}
    boto3.client("s3").put_object(
        Bucket=s3_bucket, Key="models/tiny/keeper.json", Body=json.dumps(meta).encode()
    )
    with s3_requests() as third:
        changed = load_vlm(VlmConfig(source=source), cache_dir=cache)
    assert third["GetObject"] == 1
    assert changed.local_dir is not None
    assert changed.local_dir != judge.local_dir
    assert json.loads((changed.local_dir / "keeper.json").read_text())["revision"] == 2
    unchanged = (changed.local_dir / "model.safetensors").stat().st_ino
    assert unchanged == before["model.safetensors"][0]  # hard link to the cached object
    np.testing.assert_array_equal(
        changed.relevance(images, queries), local_judge.relevance(images, queries)
    )
    assert _snapshot(judge.local_dir) == before  # the old version is left for whoever uses it
    assert not list(cache.joinpath("vlm").glob(".staging-*"))


def test_empty_prefix_and_missing_bucket_are_load_errors(s3_bucket: str, tmp_path: Path) -> None:
    empty = f"s3://{s3_bucket}/models/none"
    with pytest.raises(ModelLoadError, match="no objects under this prefix") as e:
        load_vlm(VlmConfig(source=empty), cache_dir=tmp_path)
    assert e.value.spec == empty
    with pytest.raises(ModelLoadError, match="bucket does not exist"):
        load_vlm(VlmConfig(source=f"s3://{s3_bucket}-gone/models/tiny"), cache_dir=tmp_path)


def test_a_key_outside_the_model_folder_is_a_load_error(s3_bucket: str, tmp_path: Path) -> None:
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="models/evil/../../escape", Body=b"x")
    with pytest.raises(ModelLoadError, match="does not name a file inside the model folder"):
        load_vlm(VlmConfig(source=f"s3://{s3_bucket}/models/evil"), cache_dir=tmp_path)


def test_parameter_count_reads_only_the_config_from_s3(
    s3_bucket: str, tiny_dir: Path, local_judge: VlmJudge
) -> None:
    """What keeper select's driver sizes a VLM actor's memory request from: one GetObject."""
    _upload(tiny_dir, s3_bucket, "models/count")
    with s3_requests() as calls:
        n = parameter_count(f"s3://{s3_bucket}/models/count")
    assert n == sum(p.numel() for p in local_judge.model.parameters())
    assert dict(calls) == {"GetObject": 1}
    with pytest.raises(ModelLoadError, match="cannot read its config"):
        parameter_count(f"s3://{s3_bucket}/models/absent")
