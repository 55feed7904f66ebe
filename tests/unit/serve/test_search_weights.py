"""/v1/search's index over a table embedded with a checkpoint that has since been replaced at the
same path (same spec string): the snapshot is refused, naming both weights versions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from support import write_embed_table

from keeper_core.errors import DataError
from keeper_core.models import TABLE_META, weights_version
from keeper_core.vector_index import IndexParams, build
from keeper_serve.config import SearchArgs
from keeper_serve.search import load_snapshot


def _indexed_table(root: Path, spec: str, weights: str | None) -> Path:
    uris = [f"/photos/{i}.jpg" for i in range(6)]
    table = write_embed_table(root / "table", uris, spec=spec)
    meta = {"model_spec": spec, "embed_dim": 8, "format": 1}
    if weights:
        meta["weights_version"] = weights
    (table / TABLE_META).write_text(json.dumps(meta))
    v = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    build(v, uris, model_spec=spec, params=IndexParams(backend="exact")).save(str(table / "index"))
    return table


def test_a_table_of_a_replaced_checkpoint_is_refused(tmp_path: Path) -> None:
    ckpt = tmp_path / "clip.safetensors"
    ckpt.write_bytes(b"the weights the table was embedded with")
    spec = f"keeper-tiny:{ckpt}"
    table = _indexed_table(tmp_path, spec, weights_version(spec))
    args = SearchArgs(index=str(table / "index"))
    assert len(load_snapshot(args, spec).index) == 6  # the same checkpoint: served
    ckpt.write_bytes(b"other weights, same path")
    with pytest.raises(DataError, match=r"made with weights sha256:.*now holds sha256:"):
        load_snapshot(args, spec)


def test_a_table_without_a_weights_record_is_served(tmp_path: Path) -> None:
    ckpt = tmp_path / "clip.safetensors"
    ckpt.write_bytes(b"weights")
    spec = f"keeper-tiny:{ckpt}"
    table = _indexed_table(tmp_path, spec, None)  # written before weights were recorded
    assert len(load_snapshot(SearchArgs(index=str(table / "index")), spec).index) == 6


def test_a_table_of_images_prepared_otherwise_is_refused(tmp_path: Path) -> None:
    """Its record names another preprocessing than the served spec's: its vectors would not be
    comparable with the queries' (keeper_core.models.check_table)."""
    from keeper_core.models import preprocess_record

    spec = "keeper-tiny:random"
    table = _indexed_table(tmp_path, spec, None)
    meta = json.loads((table / TABLE_META).read_text())
    args = SearchArgs(index=str(table / "index"))
    (table / TABLE_META).write_text(json.dumps({**meta, "preprocess": preprocess_record(spec)}))
    assert len(load_snapshot(args, spec).index) == 6  # prepared alike: served
    other = {**preprocess_record(spec), "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
    (table / TABLE_META).write_text(json.dumps({**meta, "preprocess": other}))
    with pytest.raises(DataError, match=r"prepared as .*0\.5.*this run prepares them as"):
        load_snapshot(args, spec)
