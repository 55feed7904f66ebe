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
from keeper_core.errors import ConfigError, DataError
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs.embed import write_batch
from keeper_train.jobs.export_embeddings import PAD, ExportEmbeddingsConfig, export

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
        for f in sorted(storage.list_files(storage.join(out, "img_emb"), suffixes=[".npy"]))
    ]
    metas = [
        storage.read_parquet(f)
        for f in sorted(storage.list_files(storage.join(out, "metadata"), suffixes=[".parquet"]))
    ]
    assert [len(a) for a in arrays] == [m.num_rows for m in metas]  # row i <-> row i
    paths = [p for m in metas for p in m.column("image_path").to_pylist()]
    return (
        np.concatenate(arrays),
        paths,
        json.loads(storage.read_bytes(storage.join(out, "keeper_export.json"))),
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
    m = pq.read_table(tmp_path / "cr" / "metadata" / "metadata_00000000.parquet")
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


def on_disk(out: str) -> dict[str, bytes]:
    """Every partition file autofaiss / clip-retrieval would read under OUTPUT, by relative path."""
    found = {}
    for sub, suffix in (("img_emb", ".npy"), ("text_emb", ".npy"), ("metadata", ".parquet")):
        folder = storage.join(out, sub)
        if storage.is_s3(out) or Path(folder).is_dir():
            for f in storage.list_files(folder, suffixes=[suffix]):
                found[f.removeprefix(out.rstrip("/") + "/")] = storage.read_bytes(f)
    return found


def assert_consistent(out: str, partitions: int, rows: int) -> None:
    """The files on disk are exactly the manifest's partitions, numbered in order."""
    files = sorted(on_disk(out))
    names = [str(k).zfill(PAD) for k in range(partitions)]
    assert files == sorted(
        [f"img_emb/img_emb_{n}.npy" for n in names]
        + [f"metadata/metadata_{n}.parquet" for n in names]
    )
    got, paths, meta = read_export(out)
    assert meta["partitions"] == partitions
    assert meta["rows"] == rows == len(got) == len(paths)


def test_a_fixed_pad_width_so_a_grown_table_overwrites_every_partition(tmp_path: Path) -> None:
    """The audit's case: 10 parts exported, the table grows to 11, exported again into OUTPUT."""
    out = str(tmp_path / "cr")
    write_table(str(tmp_path / "t10"), [3] * 10)
    export(ExportEmbeddingsConfig(table=str(tmp_path / "t10"), output=out))
    assert_consistent(out, 10, 30)
    emb = write_table(str(tmp_path / "t11"), [3] * 10 + [3])
    summary = export(ExportEmbeddingsConfig(table=str(tmp_path / "t11"), output=out))
    assert summary.partitions == 11
    assert_consistent(out, 11, 33)  # 22 files on disk, not 20 + 22 as with re-padded names
    got, paths, _ = read_export(out)
    assert len(set(paths)) == 33
    assert sorted(map(tuple, got.astype(np.float32).round(2))) == sorted(
        map(tuple, emb.astype(np.float16).astype(np.float32).round(2))
    )


def test_same_size_reexport_overwrites_in_place(tmp_path: Path) -> None:
    table, out = str(tmp_path / "t"), str(tmp_path / "cr")
    write_table(table, [4, 5, 6])
    export(ExportEmbeddingsConfig(table=table, output=out))
    before = on_disk(out)
    export(ExportEmbeddingsConfig(table=table, output=out))
    assert on_disk(out) == before
    assert_consistent(out, 3, 15)


def test_an_output_with_partitions_this_export_would_not_write_is_refused(tmp_path: Path) -> None:
    """A shrunk table would leave the old export's last partitions to be indexed with it."""
    out = str(tmp_path / "cr")
    write_table(str(tmp_path / "big"), [2, 2, 2, 2])
    export(ExportEmbeddingsConfig(table=str(tmp_path / "big"), output=out))
    before = on_disk(out)
    manifest = (tmp_path / "cr" / "keeper_export.json").read_bytes()
    write_table(str(tmp_path / "small"), [3, 3], seed=1)
    with pytest.raises(ConfigError, match="4 partition files") as e:
        export(ExportEmbeddingsConfig(table=str(tmp_path / "small"), output=out))
    msg = str(e.value)
    assert "img_emb_00000002.npy" in msg
    assert "metadata_00000003.parquet" not in msg  # a few of them are named
    assert "and 1 more" in msg
    assert "empty output" in msg
    assert "remove them" in msg
    # Refused before any work: the previous export is whole, and its manifest still true.
    assert on_disk(out) == before
    assert (tmp_path / "cr" / "keeper_export.json").read_bytes() == manifest
    assert_consistent(out, 4, 8)
    # Removing them, as the message says, lets it run; then disk and manifest agree again.
    for k in (2, 3):
        n = str(k).zfill(PAD)
        (tmp_path / "cr" / "img_emb" / f"img_emb_{n}.npy").unlink()
        (tmp_path / "cr" / "metadata" / f"metadata_{n}.parquet").unlink()
    export(ExportEmbeddingsConfig(table=str(tmp_path / "small"), output=out))
    assert_consistent(out, 2, 6)


def test_partitions_named_another_way_are_refused(tmp_path: Path) -> None:
    """An export by the old, re-padded writer, or clip-retrieval's own text embeddings."""
    table = str(tmp_path / "t")
    write_table(table, [2])
    for stale in (
        "img_emb/img_emb_0.npy",
        "metadata/metadata_0.parquet",
        "text_emb/text_emb_0.npy",
    ):
        out = tmp_path / stale.replace("/", "-")
        (out / stale).parent.mkdir(parents=True)
        (out / stale).write_bytes(b"x")
        (out / "img_emb" / "notes.txt").parent.mkdir(exist_ok=True)
        (out / "img_emb" / "notes.txt").write_text("not a partition")  # never read: left alone
        with pytest.raises(ConfigError, match=stale.split("/")[1]):
            export(ExportEmbeddingsConfig(table=table, output=str(out)))
        assert not (out / "keeper_export.json").exists()
        left = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
        assert left == {"img_emb/notes.txt", stale}
    out = tmp_path / "notes-only"
    (out / "img_emb").mkdir(parents=True)
    (out / "img_emb" / "notes.txt").write_text("not a partition")
    export(ExportEmbeddingsConfig(table=table, output=str(out)))
    assert_consistent(str(out), 1, 2)
    assert (out / "img_emb" / "notes.txt").exists()


def test_a_shrunk_reexport_on_s3_is_refused_through_the_cli(
    s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = f"s3://{s3_bucket}/emb-cr/"
    write_table(f"s3://{s3_bucket}/big", [2, 2, 2])
    write_table(f"s3://{s3_bucket}/small", [2, 2], seed=1)
    assert keeper(["export-embeddings", "--table", f"s3://{s3_bucket}/big", "--output", out]) == 0
    before = on_disk(out)
    capsys.readouterr()
    assert keeper(["export-embeddings", "--table", f"s3://{s3_bucket}/small", "--output", out]) == 2
    assert f"s3://{s3_bucket}/emb-cr/img_emb/img_emb_00000002.npy" in capsys.readouterr().err
    assert on_disk(out) == before
    assert_consistent(out, 3, 6)
    assert keeper(["export-embeddings", "--table", f"s3://{s3_bucket}/big", "--output", out]) == 0
    assert_consistent(out, 3, 6)


def test_a_failed_reexport_leaves_no_manifest_vouching_for_a_mix(tmp_path: Path) -> None:
    out = str(tmp_path / "cr")
    write_table(str(tmp_path / "good"), [2, 2])
    export(ExportEmbeddingsConfig(table=str(tmp_path / "good"), output=out))
    mixed = str(tmp_path / "mixed")
    write_table(mixed, [3], spec=SPEC)
    write_table(mixed, [2], spec="ViT-B-32:random", seed=2)
    with pytest.raises(DataError, match="model specs"):
        export(ExportEmbeddingsConfig(table=mixed, output=out))
    assert not (tmp_path / "cr" / "keeper_export.json").exists()
