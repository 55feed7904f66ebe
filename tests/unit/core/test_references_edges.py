"""Reference collections at their edges: a checkpoint replaced since the
collection was embedded, equal cosines at the k-th place, a table an add is still writing into
(a duplicated row, rows reference.json does not count), and a replaced collection's profile kept
in memory after the swap. Hand-written tables (tests/support.py), no model and no Ray."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from support import write_reference_collection

from keeper_core import storage
from keeper_core.errors import DataError, StorageError
from keeper_core.models import TABLE_META, weights_version
from keeper_core.references import (
    ReferenceCollection,
    ReferenceMeta,
    collection_uri,
    load_collection,
)
from keeper_serve.config import ReferenceArgs
from keeper_serve.references import Collections, ReferenceCollections, scan

SPEC = "keeper-tiny:random"
D = 8


def collection(emb: np.ndarray) -> ReferenceCollection:
    n = len(emb)
    meta = ReferenceMeta(
        name="c", model_spec=SPEC, embed_dim=emb.shape[1], images=n, created_at="a", updated_at="a"
    )
    ids = [f"id{i}" for i in range(n)]
    return ReferenceCollection(meta, "v", ids, [f"/p/{i}.jpg" for i in range(n)], emb, {})


def test_a_collection_of_a_replaced_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "clip.safetensors"
    ckpt.write_bytes(b"the weights the collection was embedded with")
    spec = f"keeper-tiny:{ckpt}"
    root = str(tmp_path / "refs")
    write_reference_collection(root, "p", dim=D, spec=spec, n=6)
    record = {"model_spec": spec, "embed_dim": D, "format": 1}
    record["weights_version"] = weights_version(spec)
    (Path(collection_uri(root, "p")) / TABLE_META).write_text(json.dumps(record))
    assert len(load_collection(root, "p", model_spec=spec)) == 6  # the same checkpoint
    ckpt.write_bytes(b"other weights, same path")
    with pytest.raises(DataError, match=r"made with weights sha256:.*now holds sha256:"):
        load_collection(root, "p", model_spec=spec)
    # The server lists it as refused, with the reason, rather than comparing against it.
    state = scan(root, spec, Collections())
    assert "p" not in state.loaded
    assert "replaced" in state.refused["p"].reason


def test_nearest_orders_equal_cosines_by_row_at_every_k() -> None:
    rng = np.random.default_rng(0)
    for _ in range(100):
        n = int(rng.integers(3, 300))
        base = rng.normal(size=(4, D)).astype(np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        emb = base[rng.integers(0, 4, n)]  # few distinct vectors: many exact ties
        c = collection(emb)
        k = int(rng.integers(1, n + 2))
        rows, sims = c.nearest(base[0], k)
        expect = np.lexsort((np.arange(n), -(emb @ base[0])))[: min(k, n)]
        np.testing.assert_array_equal(rows, expect)
        np.testing.assert_array_equal(sims, (emb @ base[0])[expect])


def test_nearest_with_k_below_one_answers_none() -> None:
    emb = np.eye(D, dtype=np.float32)[:5]
    for k in (0, -1, -7):
        rows, sims = collection(emb).nearest(emb[0], k)
        assert (len(rows), len(sims)) == (0, 0)


def test_a_row_left_twice_by_an_add_counts_once(tmp_path: Path) -> None:
    root = str(tmp_path / "refs")
    emb = write_reference_collection(root, "t", dim=D, spec=SPEC, n=4, parts=1)
    folder = storage.join(collection_uri(root, "t"), "embeddings")
    t = storage.read_parquet(folder)
    storage.write_parquet(t.slice(0, 1), storage.join(folder, "part-zz.parquet"))  # a retry's
    c = load_collection(root, "t", model_spec=SPEC)
    assert c.image_uri == [f"/photos/{i}.jpg" for i in range(4)]
    rows, _ = c.nearest(emb[0], 2)
    assert c.image_uri[rows[0]] == "/photos/0.jpg"
    assert c.image_uri[rows[1]] != "/photos/0.jpg"  # not itself twice


def test_rows_reference_json_does_not_count_are_an_add_in_progress(tmp_path: Path) -> None:
    root = str(tmp_path / "refs")
    write_reference_collection(root, "t", dim=D, spec=SPEC, n=4, parts=1)
    served = scan(root, SPEC, Collections())
    assert len(served.loaded["t"]) == 4
    # An add writes a new part before it rewrites reference.json.
    new = write_reference_collection(str(tmp_path / "tmp"), "t", dim=D, spec=SPEC, n=3, seed=9)
    assert len(new) == 3
    part = storage.read_parquet(
        storage.join(collection_uri(str(tmp_path / "tmp"), "t"), "embeddings")
    )
    part = part.set_column(
        part.column_names.index("image_uri"), "image_uri", [[f"/new/{i}.jpg" for i in range(3)]]
    )
    folder = storage.join(collection_uri(root, "t"), "embeddings")
    storage.write_parquet(part, storage.join(folder, "part-new.parquet"))
    with pytest.raises(StorageError, match=r"holds 7 images, its reference\.json 4"):
        load_collection(root, "t", model_spec=SPEC)
    fresh = scan(root, SPEC, Collections())  # a replica starting mid-add: tried again next poll
    assert "t" not in fresh.loaded
    assert fresh.refused["t"].version is None
    assert scan(root, SPEC, served).loaded["t"] is served.loaded["t"]  # the loaded one serves


def test_a_replaced_collections_profile_is_dropped_at_the_swap(tmp_path: Path) -> None:
    root = str(tmp_path / "refs")
    write_reference_collection(root, "p", dim=D, spec=SPEC, n=6)
    rc = ReferenceCollections.func_or_class(ReferenceArgs(root=root, poll_s=0), SPEC)
    rng = np.random.default_rng(0)
    prompts = {}
    for text in rc.config.all_prompts():
        v = rng.normal(size=D).astype(np.float32)
        prompts[text] = v / np.linalg.norm(v)
    query = next(iter(prompts.values()))
    asyncio.run(rc.compare("p", query, None, prompts, 3))
    assert len(rc._profiles) == 1
    write_reference_collection(
        root, "p", dim=D, spec=SPEC, n=7, updated_at="2026-02-01T00:00:00+00:00"
    )
    assert rc.refresh()
    assert not rc._profiles  # the old version's members are not held any more
    got = asyncio.run(rc.compare("p", query, None, prompts, 3))
    assert got.meta.images == 7
    assert [k[1] for k in rc._profiles] == [rc._state.loaded["p"].version]
