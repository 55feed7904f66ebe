"""SearchIndex follows a newer index through passing faults: a table read that times out, or a
checkpoint that cannot be reached for a moment, is tried again at the next poll. One timeout
refused the new index for good (the replica served the old one until the next keeper index), and
a ModelLoadError killed the poll thread (the replica never followed again, saying nothing)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import write_embed_table

from keeper_core import storage
from keeper_core.errors import StorageError
from keeper_core.models import TABLE_META
from keeper_core.vector_index import IndexParams, build
from keeper_serve import search
from keeper_serve.config import SearchArgs

SPEC = "keeper-tiny:random"
S3_SPEC = "keeper-tiny:s3://models/clip.safetensors"


def publish(table: Path, n: int, spec: str) -> None:
    """keeper embed and keeper index: ``n`` rows and their exact index."""
    uris = [f"/photos/{i}.jpg" for i in range(n)]
    write_embed_table(table, uris, spec=spec)
    v = np.random.default_rng(n).normal(size=(n, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    build(v, uris, model_spec=spec, params=IndexParams(backend="exact")).save(str(table / "index"))
    if spec == S3_SPEC:
        meta = {"model_spec": spec, "embed_dim": 8, "format": 1, "weights_version": "etag:abc"}
        (table / TABLE_META).write_text(json.dumps(meta))


def follower(table: Path, spec: str) -> Any:
    return search.SearchIndex.func_or_class(SearchArgs(index=str(table / "index"), poll_s=0), spec)


def test_a_table_read_that_times_out_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(tmp_path, 6, SPEC)
    idx = follower(tmp_path, SPEC)
    publish(tmp_path, 9, SPEC)
    real = storage.read_bytes
    left = [1]

    def flaky(uri: str, **kw: Any) -> bytes:
        if "/embeddings/" in uri and left[0]:
            left[0] -= 1
            raise StorageError(uri, "Read timeout on endpoint URL", retryable=True)
        return real(uri, **kw)

    monkeypatch.setattr(storage, "read_bytes", flaky)
    assert not idx.refresh()
    assert idx.info()["count"] == 6
    assert "Read timeout" in idx.info()["last_error"]
    assert idx.refresh()  # the next poll
    assert (idx.info()["count"], idx.info()["last_error"]) == (9, None)


def test_a_checkpoint_out_of_reach_for_a_moment_is_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = [True]

    class Info:
        etag, size = "abc", 1

    def head(uri: str) -> Info:
        if not up[0]:
            raise StorageError(uri, "Could not connect to the endpoint URL", retryable=True)
        return Info()

    monkeypatch.setattr(storage, "object_info", head)
    publish(tmp_path, 6, S3_SPEC)
    idx = follower(tmp_path, S3_SPEC)
    publish(tmp_path, 9, S3_SPEC)
    up[0] = False
    assert not idx.refresh()  # was: ModelLoadError out of refresh, and the poll thread gone
    assert "cannot read checkpoint" in idx.info()["last_error"]
    up[0] = True
    assert idx.refresh()
    assert idx.info()["count"] == 9


def test_the_poll_outlives_an_unexpected_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(tmp_path, 6, SPEC)
    idx = follower(tmp_path, SPEC)
    calls = [0]

    def refresh() -> bool:
        calls[0] += 1
        if calls[0] == 1:
            raise MemoryError("a larger index")
        idx._stop.set()
        return False

    monkeypatch.setattr(idx, "refresh", refresh)
    idx.args = SearchArgs(index=idx.args.index, poll_s=0.01)
    idx._follow()  # returns once the second poll stops it; the first one's error is kept
    assert calls[0] == 2
    assert idx.info()["last_error"] == "MemoryError: a larger index"
