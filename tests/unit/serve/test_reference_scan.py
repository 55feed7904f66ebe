"""keeper_serve.references.scan on collections written in tmp_path: what a replica loads, keeps,
refuses and drops as the root changes, and which versions it does not try again.

Collections are keeper embed's tables written with pyarrow plus a ``reference.json`` (as in
tests/unit/core/test_references.py); ``load_collection`` is wrapped (not replaced) to count the
loads scan starts. No Ray is started: scan is a plain function.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from support import write_reference_collection

from keeper_core import storage
from keeper_core.errors import StorageError
from keeper_core.references import (
    ReferenceCollection,
    ReferenceMeta,
    collection_uri,
    meta_uri,
    remove_collection,
    write_meta,
)
from keeper_serve import references as serve_refs
from keeper_serve.references import Collections, prompts_fingerprint, scan

SPEC = "keeper-tiny:random"
OTHER = "ViT-B-32:laion2b_s34b_b79k"
D = 8
DAY1 = "2026-01-02T00:00:00+00:00"
DAY2 = "2026-01-03T00:00:00+00:00"
DAY3 = "2026-01-04T00:00:00+00:00"


def write_collection(
    root: str,
    name: str,
    *,
    n: int = 6,
    spec: str = SPEC,
    row_spec: str | None = None,
    updated_at: str = DAY1,
) -> None:
    """``n`` random unit embeddings in two Parquet parts (always two: a rewrite replaces both)."""
    write_reference_collection(
        root, name, dim=D, spec=spec, n=n, row_spec=row_spec, features={}, seed=n,
        updated_at=updated_at,
    )  # fmt: skip


def version(root: str, name: str) -> str:
    return hashlib.sha256(Path(meta_uri(root, name)).read_bytes()).hexdigest()


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names scan calls load_collection for, in order (the real loader still runs)."""
    calls: list[str] = []
    real = serve_refs.load_collection

    def spy(root: str, name: str, *, model_spec: str | None = None) -> ReferenceCollection:
        calls.append(name)
        return real(root, name, model_spec=model_spec)

    monkeypatch.setattr(serve_refs, "load_collection", spy)
    return calls


@pytest.fixture
def root(tmp_path: Path) -> str:
    return str(tmp_path / "refs")


# --------------------------------------------------------------------------------- first scan


def test_first_scan_loads_refuses_and_ignores_unfinished(root: str, loads: list[str]) -> None:
    write_collection(root, "a")
    write_collection(root, "b", n=4)
    write_collection(root, "other", spec=OTHER)
    storage.write_bytes(f"{root}/unfinished/embeddings/part-0.parquet", b"x")  # no reference.json

    state = scan(root, SPEC, Collections())

    assert sorted(state.loaded) == ["a", "b"]
    assert (len(state.loaded["a"]), len(state.loaded["b"])) == (6, 4)
    assert state.loaded["a"].version == version(root, "a")
    assert list(state.refused) == ["other"]
    refusal = state.refused["other"]
    assert SPEC in refusal.reason
    assert OTHER in refusal.reason
    assert refusal.version == version(root, "other")  # refused for its content: not retried
    assert state.stale == {}
    assert sorted(loads) == ["a", "b", "other"]  # the unfinished folder is never loaded


# --------------------------------------------------------------------------------- rescans


def test_rescan_keeps_unchanged_objects_and_reloads_a_changed_one(
    root: str, loads: list[str]
) -> None:
    write_collection(root, "a")
    write_collection(root, "b")
    first = scan(root, SPEC, Collections())
    write_collection(root, "b", n=9, updated_at=DAY2)
    loads.clear()

    second = scan(root, SPEC, first)

    assert second.loaded["a"] is first.loaded["a"]  # the same object: nothing read again
    b = second.loaded["b"]
    assert b is not first.loaded["b"]
    assert (len(b), b.meta.updated_at, b.version) == (9, DAY2, version(root, "b"))
    assert loads == ["b"]
    assert (second.refused, second.stale) == ({}, {})


def test_removed_collection_disappears(root: str, loads: list[str]) -> None:
    write_collection(root, "a")
    write_collection(root, "b")
    first = scan(root, SPEC, Collections())
    assert remove_collection(root, "a") > 0
    loads.clear()

    second = scan(root, SPEC, first)

    assert list(second.loaded) == ["b"]
    assert second.loaded["b"] is first.loaded["b"]
    assert (second.refused, second.stale, loads) == ({}, {}, [])


def break_invalid_json(root: str, name: str) -> str:
    storage.write_bytes(meta_uri(root, name), b'{"format": 1, "name": ')
    return "not a keeper reference.json"


def break_rows_of_another_spec(root: str, name: str) -> str:
    write_collection(root, name, row_spec=OTHER, updated_at=DAY2)
    return "its rows hold"


@pytest.mark.parametrize("breakage", [break_invalid_json, break_rows_of_another_spec])
def test_broken_new_version_keeps_the_loaded_one_until_fixed(
    root: str, loads: list[str], breakage: Callable[[str, str], str]
) -> None:
    write_collection(root, "a")
    first = scan(root, SPEC, Collections())
    old = first.loaded["a"]
    expected = breakage(root, "a")
    broken = version(root, "a")
    loads.clear()

    second = scan(root, SPEC, first)

    assert second.loaded["a"] is old  # still serving the version it had
    assert list(second.stale) == ["a"]
    assert expected in second.stale["a"].reason
    assert second.stale["a"].version == broken
    assert second.refused == {}
    assert loads == ["a"]

    third = scan(root, SPEC, second)  # the same broken file: not tried again

    assert loads == ["a"]
    assert third.loaded["a"] is old
    assert third.stale == second.stale

    write_collection(root, "a", n=7, updated_at=DAY3)  # fixed
    fourth = scan(root, SPEC, third)

    assert loads == ["a", "a"]
    assert len(fourth.loaded["a"]) == 7
    assert fourth.loaded["a"].version == version(root, "a")
    assert (fourth.stale, fourth.refused) == ({}, {})


def test_reverting_to_the_loaded_version_clears_stale(root: str, loads: list[str]) -> None:
    write_collection(root, "a")
    good = Path(meta_uri(root, "a")).read_bytes()
    first = scan(root, SPEC, Collections())
    break_invalid_json(root, "a")
    second = scan(root, SPEC, first)
    assert "a" in second.stale
    storage.write_bytes(meta_uri(root, "a"), good)
    loads.clear()

    third = scan(root, SPEC, second)

    assert third.loaded["a"] is first.loaded["a"]
    assert (third.stale, loads) == ({}, [])


def test_refused_collection_is_not_reloaded_until_its_file_changes(
    root: str, loads: list[str]
) -> None:
    write_collection(root, "other", spec=OTHER)
    first = scan(root, SPEC, Collections())
    assert list(first.refused) == ["other"]
    loads.clear()

    second = scan(root, SPEC, first)

    assert loads == []
    assert second.refused == first.refused
    assert second.loaded == {}

    write_collection(root, "other", spec=SPEC, updated_at=DAY2)  # added again with SPEC
    third = scan(root, SPEC, second)

    assert loads == ["other"]
    assert list(third.loaded) == ["other"]
    assert third.loaded["other"].meta.model_spec == SPEC
    assert third.refused == {}


def test_table_without_a_required_column_is_refused_not_fatal(root: str) -> None:
    write_collection(root, "a")
    folder = storage.join(collection_uri(root, "bad"), "embeddings")
    emb = np.eye(2, D, dtype=np.float32)
    cols = {
        "image_id": pa.array(["x", "y"]),
        "image_uri": pa.array(["/x.jpg", "/y.jpg"]),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.ravel()), D),
    }  # no model_spec column
    storage.write_parquet(pa.table(cols), storage.join(folder, "part-0.parquet"))
    write_meta(
        root,
        ReferenceMeta(
            name="bad", model_spec=SPEC, embed_dim=D, images=2, created_at=DAY1, updated_at=DAY1
        ),
    )

    state = scan(root, SPEC, Collections())

    assert list(state.loaded) == ["a"]
    assert "model_spec" in state.refused["bad"].reason


# --------------------------------------------------------------------------------- roots


def test_missing_local_root_is_an_error(tmp_path: Path, loads: list[str]) -> None:
    """A mistyped root fails the first scan (the replica), and a root that vanishes under a
    server is a listing error (the caller keeps what it has), never an empty set."""
    missing = str(tmp_path / "nope")
    with pytest.raises(StorageError, match="no such directory"):
        scan(missing, SPEC, Collections())
    root = tmp_path / "refs"
    write_collection(str(root), "a")
    first = scan(str(root), SPEC, Collections())
    assert list(first.loaded) == ["a"]
    remove_collection(str(root), "a")
    root.rmdir()
    with pytest.raises(StorageError):
        scan(str(root), SPEC, first)
    assert loads == ["a"]


def test_s3_root_in_a_missing_bucket_raises(s3_bucket: str) -> None:
    assert scan(f"s3://{s3_bucket}/refs", SPEC, Collections()) == Collections()  # empty prefix
    with pytest.raises(StorageError, match="bucket does not exist"):
        scan("s3://keeper-no-such-bucket/refs", SPEC, Collections())


# --------------------------------------------------------------------------------- prompts


def test_prompts_fingerprint_follows_embeddings_not_dict_order() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=D).astype(np.float32), rng.normal(size=D).astype(np.float32)
    base = prompts_fingerprint({"a sharp photo": x, "a blurry photo": y})

    assert prompts_fingerprint({"a blurry photo": y, "a sharp photo": x}) == base
    assert prompts_fingerprint({"a sharp photo": x.astype(np.float64), "a blurry photo": y}) == (
        base
    )  # the bytes hashed are float32's
    changed = x.copy()
    changed[3] += 1e-3
    assert prompts_fingerprint({"a sharp photo": changed, "a blurry photo": y}) != base
    assert prompts_fingerprint({"a sharp photo": y, "a blurry photo": x}) != base  # swapped
    assert prompts_fingerprint({"a crisp photo": x, "a blurry photo": y}) != base  # renamed
    assert prompts_fingerprint({"a sharp photo": x}) != base  # one prompt fewer
