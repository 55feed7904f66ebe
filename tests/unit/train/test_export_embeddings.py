"""keeper export-embeddings: keeper's table in clip-retrieval's layout, local and on S3."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from keeper_core import storage
from keeper_core.cli import main as keeper
from keeper_core.errors import DataError
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs.embed import write_batch
from keeper_train.jobs.export_embeddings import ExportEmbeddingsConfig, export

SPEC = "keeper-tiny:random"


def write_table(dst: str, sizes: list[int], *, spec: str = SPEC, seed: int = 0) -> np.ndarray:
    """Parts written by the embed job's own writer; returns every row's embedding, in order."""
    rng = np.random.default_rng(seed)
    out = []
    for p, n in enumerate(sizes):
        emb = rng.normal(size=(n, 64)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        batch = {
            "image_uri": np.array([f"s3://photos/{p}/{i}.jpg" for i in range(n)], dtype=object),
            "image_id": np.array([f"id-{p}-{i}" for i in range(n)], dtype=object),
            "embedding": emb,
            "t_decode": np.zeros(n),
            "t_embed": np.zeros(n),
            "caption": np.array([f"caption {p} {i}" for i in range(n)], dtype=object),
        }
        for name in FEATURE_NAMES:
            batch[name] = rng.integers(1, 4000, n) if name in ("width", "height") else rng.random(n)
        write_batch(batch, spec=spec, embeddings_dir=storage.join(dst, "embeddings"))
        out.append(emb)
    return np.concatenate(out)


def read_export(out: str) -> tuple[np.ndarray, list[str], dict[str, object]]:
    """What autofaiss / clip-retrieval read: the arrays and metadata, partition by partition."""
    arrays = [
        np.load(io.BytesIO(storage.read_bytes(f)), allow_pickle=False)
        for f in sorted(storage.list_files(storage.join(out, "img_emb")))
    ]
    metas = [
        storage.read_parquet(f) for f in sorted(storage.list_files(storage.join(out, "metadata")))
    ]
    assert [len(a) for a in arrays] == [m.num_rows for m in metas]  # row i <-> row i
    paths = [p for m in metas for p in m.column("image_path").to_pylist()]
    return (
        np.concatenate(arrays),
        paths,
        json.loads(storage.read_bytes(f"{out}/keeper_export.json")),
    )


def test_every_row_once_in_order_as_float16(tmp_path: Path) -> None:
    table = str(tmp_path / "table")
    emb = write_table(table, [5, 7, 3])
    parts = sorted((tmp_path / "table" / "embeddings").glob("*.parquet"))
    expected_paths = [p for f in parts for p in pq.read_table(f).column("image_uri").to_pylist()]
    expected = np.concatenate([pq.read_table(f).column("embedding").to_pylist() for f in parts])
    summary = export(ExportEmbeddingsConfig(table=table, output=str(tmp_path / "cr")))

    got, paths, meta = read_export(str(tmp_path / "cr"))
    assert got.dtype == np.float16
    assert paths == expected_paths
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(got.astype(np.float32), axis=1), 1.0, atol=2e-3)
    assert len(got) == len(emb) == summary.rows == 15
    assert meta["model_spec"] == SPEC
    assert meta["dim"] == 64
    assert meta["partitions"] == 3
    m = pq.read_table(tmp_path / "cr" / "metadata" / "metadata_0.parquet")
    assert m.column_names[:3] == ["image_path", "caption", "image_id"]
    assert "sharpness" in m.column_names
    assert "embedding" not in m.column_names


def test_on_s3_through_the_cli(tmp_path: Path, s3_bucket: str) -> None:
    table, out = f"s3://{s3_bucket}/emb", f"s3://{s3_bucket}/emb-cr"
    emb = write_table(table, [4, 6], seed=1)
    assert (
        keeper(["export-embeddings", "--table", table, "--output", out, "--dtype", "float32"]) == 0
    )
    got, paths, meta = read_export(out)
    assert got.dtype == np.float32
    assert sorted(paths) == sorted(
        f"s3://photos/{p}/{i}.jpg" for p, n in [(0, 4), (1, 6)] for i in range(n)
    )
    assert sorted(map(tuple, got.round(5))) == sorted(map(tuple, emb.round(5)))
    assert meta["rows"] == 10


def test_no_table_and_mixed_specs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no embedding table here"):
        export(ExportEmbeddingsConfig(table=str(tmp_path / "none"), output=str(tmp_path / "o")))
    table = str(tmp_path / "mixed")
    write_table(table, [3], spec=SPEC)
    write_table(table, [2], spec="ViT-B-32:random", seed=2)
    with pytest.raises(DataError, match="model specs"):
        export(ExportEmbeddingsConfig(table=table, output=str(tmp_path / "o2")))
