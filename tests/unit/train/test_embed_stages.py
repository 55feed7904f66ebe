"""keeper_train.jobs.embed: the stage functions, called directly (Ray is never started)."""

from __future__ import annotations

import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support import photo, png_declaring

from keeper_core import storage
from keeper_core.decoders import GpuDecoder
from keeper_core.device_preparation import DevicePreparation
from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import ConfigError, DataError
from keeper_core.images import DecodeLimits, decode_image
from keeper_core.preparation import ImagePreparation
from keeper_core.quality import FEATURE_NAMES, quality_features
from keeper_train.jobs.embed import (
    Counts,
    EmbedConfig,
    EmbedStage,
    EmbedSummary,
    StageCpus,
    _unconverted,
    check_table_meta,
    format_summary,
    list_inputs,
    node_counts,
    prepare_batch,
    prepare_on_device,
    write_batch,
)
from keeper_train.table import EmbeddedParts

SPEC = "keeper-tiny:random"
SIZE = 64  # keeper-tiny's image size
LIMITS = {"max_pixels": 64_000_000, "max_bytes": 64 * 1024 * 1024, "min_side": 16}
# What prepare_batch drafts to with draft=True: max(image size, QUALITY_SIZE=256) per side.
DRAFT = (256, 256)
FLOAT_FEATURES = [n for n in FEATURE_NAMES if n not in ("width", "height")]


def encode(im: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def run_prepare(uris: list[str], errors_dir: Path, run_id: str = "run-1") -> dict[str, np.ndarray]:
    return prepare_batch(
        {"image_uri": np.array(uris, dtype=object)},
        spec=SPEC,
        limits=LIMITS,
        draft=True,
        errors_dir=str(errors_dir),
        run_id=run_id,
    )


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name -> path of a mixed set of good and bad files (the 'missing' one is never written)."""
    root = tmp_path_factory.mktemp("corpus")
    noise = Image.fromarray(np.random.default_rng(9).integers(0, 256, (200, 300, 3), np.uint8))
    files: dict[str, bytes] = {
        "big.jpg": encode(photo(1200, 900, 0), "JPEG", quality=90),
        "wide.png": encode(photo(80, 50, 1), "PNG"),
        "tall.jpg": encode(photo(40, 120, 2), "JPEG", quality=90),
        "rgba.png": encode(photo(70, 70, 3).convert("RGBA"), "PNG"),
        "corrupt.jpg": encode(noise, "JPEG", quality=95)[:5000],
        "text.jpg": b"this is not an image at all",
        "empty.jpg": b"",
        "tiny.png": encode(photo(10, 10, 4), "PNG"),
        "bomb.png": png_declaring(30000, 30000),
    }
    out = {}
    for name, data in files.items():
        (root / name).write_bytes(data)
        out[name] = str(root / name)
    out["missing.jpg"] = str(root / "missing.jpg")
    return out


@pytest.fixture(scope="module")
def stage() -> EmbedStage:
    return EmbedStage(SPEC, 8)


@pytest.fixture(scope="module")
def reference() -> ClipEmbedder:
    return ClipEmbedder(SPEC)


GOOD = ["big.jpg", "wide.png", "tall.jpg", "rgba.png"]
BAD = {  # name -> (stage, reason)
    "corrupt.jpg": ("decode", "truncated"),
    "text.jpg": ("decode", "not_image"),
    "empty.jpg": ("decode", "empty"),
    "missing.jpg": ("read", "unreadable"),
    "tiny.png": ("decode", "too_small"),
    "bomb.png": ("decode", "too_many_pixels"),
}
SIZES = {"big.jpg": (1200, 900), "wide.png": (80, 50), "tall.jpg": (40, 120), "rgba.png": (70, 70)}
# Good and bad interleaved: output order must follow input order.
MIXED = [
    "corrupt.jpg",
    "big.jpg",
    "text.jpg",
    "wide.png",
    "empty.jpg",
    "missing.jpg",
    "tall.jpg",
    "tiny.png",
    "bomb.png",
    "rgba.png",
]


# ---------------------------------------------------------------- list_inputs


def test_list_inputs_local_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    png = encode(photo(20, 20, 0), "PNG")
    jpg = encode(photo(20, 20, 1), "JPEG")
    (src / "z.jpg").write_bytes(jpg)
    (src / "a" / "one.PNG").write_bytes(png)
    (src / "a" / "b" / "deep.jpeg").write_bytes(jpg)
    (src / "a" / "noext_image").write_bytes(jpg)  # found by sniffing
    (src / "a" / "noext_text").write_bytes(b"plain text, no extension")
    (src / ".hidden.jpg").write_bytes(jpg)  # hidden: never a photo
    (src / "notes.txt").write_bytes(jpg)  # a .txt is never sniffed, even holding JPEG bytes
    (src / "meta.json").write_bytes(b"{}")
    (src / "MVI_0001.THM").write_bytes(jpg)  # a video's thumbnail: JPEG bytes, not a photo
    (src / "corrupt.jpg").write_bytes(b"garbage")  # image extension: taken, fails at decode
    # The job's own output under SRC: skipped, not counted as ignored.
    (src / "out" / "embeddings").mkdir(parents=True)
    (src / "out" / "embeddings" / "part-x.parquet").write_bytes(b"PAR1")
    (src / "out" / "thumb.jpg").write_bytes(jpg)
    # A sibling that only shares the prefix string is not excluded.
    (src / "outside").mkdir()
    (src / "outside" / "keep.jpg").write_bytes(jpg)

    uris, ignored = list_inputs(str(src), exclude=str(src / "out") + "/")
    s = str(src)
    assert uris == [
        f"{s}/a/b/deep.jpeg",
        f"{s}/a/noext_image",
        f"{s}/a/one.PNG",
        f"{s}/corrupt.jpg",
        f"{s}/outside/keep.jpg",
        f"{s}/z.jpg",
    ]
    assert ignored == 5  # noext_text, .hidden.jpg, notes.txt, meta.json, MVI_0001.THM
    assert list_inputs(str(src), exclude=str(src / "out")) == (uris, ignored)  # stable

    # Without the exclusion the output's thumbnail is an input, and its part file is ignored.
    all_uris, all_ignored = list_inputs(str(src))
    assert all_uris == sorted([*uris, f"{s}/out/thumb.jpg"])
    assert all_ignored == 6


def test_list_inputs_leaves_out_hidden_and_nas_folders(tmp_path: Path) -> None:
    # A Synology keeps a thumbnail of every photo in @eaDir, a desktop its trash in .Trash-1000:
    # they were embedded, grouped and picked as photos of the library.
    lib = tmp_path / "lib"
    kept = [lib / "2024" / "IMG_1.JPG", lib / "b" / "IMG_2.jpg"]
    left_out = [
        lib / "2024" / "@eaDir" / "IMG_1.JPG" / "SYNOPHOTO_THUMB_XL.jpg",
        lib / ".Trash-1000" / "files" / "IMG_3.jpg",
        lib / "#recycle" / "IMG_4.jpg",
        lib / "$RECYCLE.BIN" / "S-1-5-21" / "IMG_5.jpg",
    ]
    for path in [*kept, *left_out]:
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(32, 24).save(path, "JPEG")
    uris, ignored = list_inputs(str(lib))
    assert uris == [str(p) for p in kept]
    assert ignored == len(left_out)
    # A library that itself lies in a hidden folder is listed whole.
    assert list_inputs(str(lib / ".Trash-1000"))[0] == [str(left_out[1])]


def test_list_inputs_s3_prefix(s3_bucket: str) -> None:
    s3 = boto3.client("s3")
    jpg = encode(photo(20, 20, 1), "JPEG")
    png = encode(photo(20, 20, 0), "PNG")
    objects = {
        "photos/a.jpg": jpg,
        "photos/sub/B.PNG": png,
        "photos/noext": png,
        "photos/blob": b"not an image",
        "photos/notes.txt": b"hi",
        "photos/.hidden.jpg": jpg,
        "photos2/other.jpg": jpg,  # another prefix that starts with the same string
    }
    for key, body in objects.items():
        s3.put_object(Bucket=s3_bucket, Key=key, Body=body)
    uris, ignored = list_inputs(f"s3://{s3_bucket}/photos")
    b = f"s3://{s3_bucket}/photos"
    assert uris == [f"{b}/a.jpg", f"{b}/noext", f"{b}/sub/B.PNG"]
    assert ignored == 3


def test_list_inputs_s3_manifest_resolves_relative_keys(s3_bucket: str) -> None:
    body = "image_uri\nimgs/a.jpg\ns3://other/x.jpg\nimgs/a.jpg\n"
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="sets/m.csv", Body=body.encode())
    uris, ignored = list_inputs(f"s3://{s3_bucket}/sets/m.csv")
    assert uris == [f"s3://{s3_bucket}/sets/imgs/a.jpg", "s3://other/x.jpg"]
    assert ignored == 0


def test_list_inputs_csv_manifest(tmp_path: Path) -> None:
    mdir = tmp_path / "m"
    mdir.mkdir()
    m = mdir / "manifest.csv"
    m.write_text(
        "image_uri,label\n"
        "imgs/a.jpg,x\n"
        "/abs/b.jpg,y\n"
        f"{mdir}/imgs/a.jpg,dup-after-resolving\n"
        "s3://bucket/c.jpg,z\n"
        "/abs/b.jpg,dup\n"
        "file:///abs/d.jpg,w\n"
    )
    uris, ignored = list_inputs(str(m))
    assert uris == [f"{mdir}/imgs/a.jpg", "/abs/b.jpg", "s3://bucket/c.jpg", "file:///abs/d.jpg"]
    assert ignored == 0


def test_list_inputs_parquet_manifest(tmp_path: Path) -> None:
    m = tmp_path / "manifest.parquet"
    pd.DataFrame(
        {"image_uri": ["x/2.jpg", "x/1.jpg", "x/2.jpg", "/a/3.png"], "k": [1, 2, 3, 4]}
    ).to_parquet(m)
    uris, _ = list_inputs(str(m))
    assert uris == [f"{tmp_path}/x/2.jpg", f"{tmp_path}/x/1.jpg", "/a/3.png"]


def test_manifest_without_image_uri_column(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("path,label\na.jpg,1\n")
    with pytest.raises(DataError, match=r"no image_uri column.*'path', 'label'") as e:
        list_inputs(str(m))
    assert e.value.source == str(m)


def test_manifest_with_empty_values_names_the_rows(tmp_path: Path) -> None:
    m = tmp_path / "m.csv"
    m.write_text("image_uri,label\na.jpg,x\n,y\nb.jpg,z\n   ,w\n")
    with pytest.raises(DataError, match=r"empty image_uri in rows \[1, 3\]") as e:
        list_inputs(str(m))
    assert e.value.rows == [1, 3]
    pq_m = tmp_path / "m.parquet"
    pd.DataFrame({"image_uri": ["a.jpg", "c.jpg", " ", ""]}).to_parquet(pq_m)
    with pytest.raises(DataError, match="empty image_uri") as e:
        list_inputs(str(pq_m))
    assert e.value.rows == [2, 3]


def test_parquet_manifest_with_null_image_uri_is_a_data_error(tmp_path: Path) -> None:
    pq_m = tmp_path / "m.parquet"
    pd.DataFrame({"image_uri": ["a.jpg", None, "c.jpg"]}).to_parquet(pq_m)
    with pytest.raises(DataError, match="empty image_uri") as e:
        list_inputs(str(pq_m))
    assert e.value.rows == [1]


def test_manifest_that_is_not_a_table(tmp_path: Path) -> None:
    m = tmp_path / "m.parquet"
    m.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="cannot read manifest"):
        list_inputs(str(m))


# ---------------------------------------------------------------- prepare_batch


def test_prepare_batch_good_and_bad_rows(corpus: dict[str, str], tmp_path: Path) -> None:
    errors = tmp_path / "errors"
    uris = [corpus[n] for n in MIXED]
    out = run_prepare(uris, errors, run_id="run-42")

    good = [corpus[n] for n in MIXED if n in GOOD]
    assert list(out["image_uri"]) == good
    n = len(good)
    assert out["pixel_values"].shape == (n, 3, SIZE, SIZE)
    assert out["pixel_values"].dtype == np.uint8
    data = {u: Path(u).read_bytes() for u in good}
    assert list(out["image_id"]) == [hashlib.sha256(data[u]).hexdigest() for u in good]
    # Original sizes, although big.jpg (1200x900) was decoded drafted.
    names = [Path(u).name for u in good]
    assert list(zip(out["width"], out["height"], strict=True)) == [SIZES[k] for k in names]
    assert out["width"].dtype == np.int32
    assert out["height"].dtype == np.int32
    assert out["t_decode"].shape == (n,)
    assert (out["t_decode"] > 0).all()
    # Quality features are those of the decoded (drafted) images, as float32.
    images = [decode_image(data[u], draft_size=DRAFT) for u in good]
    assert images[0].size[0] < 1200, "the 1200x900 JPEG must have been drafted"
    # A drafted JPEG's blockiness is measured on full-resolution pixels (the draft lost the grid).
    prep = ImagePreparation(SPEC)
    expected = quality_features(images, blockiness=[prep.decode(data[u]).blockiness for u in good])
    for j, name in enumerate(FEATURE_NAMES):
        if name in FLOAT_FEATURES:
            assert out[name].dtype == np.float32
            np.testing.assert_allclose(out[name], expected[:, j], rtol=1e-6, err_msg=name)
    assert len(set(out["sharpness"].tolist())) == n  # different images, different features

    err_parts = parts(errors)
    assert len(err_parts) == 1
    table = pq.read_table(err_parts[0])
    assert {"image_uri", "stage", "reason", "error", "run_id"} <= set(table.column_names)
    rows = {r["image_uri"]: r for r in table.to_pylist()}
    assert set(rows) == {corpus[k] for k in BAD}
    for name, (stage_name, reason) in BAD.items():
        row = rows[corpus[name]]
        assert (row["stage"], row["reason"]) == (stage_name, reason), name
        assert row["run_id"] == "run-42"
        assert row["error"]
    assert "missing.jpg" in rows[corpus["missing.jpg"]]["error"]
    # Counts add up: every input is a good row or an error row, never both, never neither.
    assert n + table.num_rows == len(uris)


def test_prepare_batch_large_jpeg_without_draft_has_the_same_sizes(
    corpus: dict[str, str], tmp_path: Path
) -> None:
    kw = {"spec": SPEC, "limits": LIMITS, "errors_dir": str(tmp_path), "run_id": "r"}
    batch = {"image_uri": np.array([corpus["big.jpg"]], dtype=object)}
    drafted = prepare_batch(batch, draft=True, **kw)
    full = prepare_batch(batch, draft=False, **kw)
    assert (int(drafted["width"][0]), int(drafted["height"][0])) == (1200, 900)
    assert (int(full["width"][0]), int(full["height"][0])) == (1200, 900)
    assert drafted["pixel_values"].shape == full["pixel_values"].shape == (1, 3, SIZE, SIZE)
    # Same picture either way (drafting only changes the decode resolution).
    diff = np.abs(drafted["pixel_values"].astype(int) - full["pixel_values"].astype(int))
    assert diff.mean() < 8
    assert parts(tmp_path) == []  # nothing failed: no error part


def test_prepare_batch_all_bad(corpus: dict[str, str], tmp_path: Path) -> None:
    uris = [corpus[n] for n in BAD]
    out = run_prepare(uris, tmp_path / "errors")
    assert out["pixel_values"].shape == (0, 3, SIZE, SIZE)
    assert out["pixel_values"].dtype == np.uint8
    for key in ("image_uri", "image_id", "width", "height", "t_decode", *FEATURE_NAMES):
        assert len(out[key]) == 0, key
    assert pq.read_table(parts(tmp_path / "errors")[0]).num_rows == len(uris)


def test_prepare_batch_applies_the_jobs_scan_limit(tmp_path: Path) -> None:
    """EmbedConfig.max_jpeg_scans reaches the decode tasks' limits: a 10-scan progressive JPEG
    is an error row at 9 (reason too_many_scans) and embedded at the default."""
    path = tmp_path / "progressive.jpg"
    path.write_bytes(encode(photo(96, 64, seed=4), "JPEG", progressive=True))
    for scans, embedded in ((9, 0), (EmbedConfig(input="i", output="o").max_jpeg_scans, 1)):
        errors = tmp_path / f"errors-{scans}"
        out = prepare_batch(
            {"image_uri": np.array([str(path)], dtype=object)},
            spec=SPEC,
            limits={**LIMITS, "max_jpeg_scans": scans},
            draft=True,
            errors_dir=str(errors),
            run_id="run-1",
        )
        assert len(out["image_uri"]) == embedded
        if not embedded:
            (row,) = pq.read_table(parts(errors)[0]).to_pylist()
            assert (row["stage"], row["reason"]) == ("decode", "too_many_scans")


def test_prepare_batch_error_part_is_deterministic(corpus: dict[str, str], tmp_path: Path) -> None:
    errors = tmp_path / "errors"
    uris = [corpus[n] for n in ["big.jpg", "text.jpg", "empty.jpg"]]
    run_prepare(uris, errors, run_id="first")
    first = parts(errors)
    run_prepare(uris, errors, run_id="second")  # a retried task
    assert parts(errors) == first
    assert len(first) == 1
    assert pq.read_table(first[0]).column("run_id").to_pylist() == ["second", "second"]
    run_prepare([corpus["tiny.png"]], errors)  # another batch: another part
    assert len(parts(errors)) == 2


# ---------------------------------------------------------------- EmbedStage + write_batch


def test_embed_and_write_match_clip_embedder(
    corpus: dict[str, str],
    tmp_path: Path,
    stage: EmbedStage,
    reference: ClipEmbedder,
) -> None:
    # 11 good images: more than the stage's batch_size of 8, so chunking is exercised.
    folder = tmp_path / "imgs"
    folder.mkdir()
    extra = []
    for i in range(7):
        p = folder / f"p{i}.jpg"
        p.write_bytes(encode(photo(90 + 10 * i, 60 + 5 * i, 100 + i), "JPEG", quality=90))
        extra.append(str(p))
    uris = [*(corpus[n] for n in GOOD), *extra, corpus["text.jpg"]]
    prepared = run_prepare(uris, tmp_path / "errors")
    n = len(uris) - 1
    embedded = stage(prepared)
    assert "pixel_values" not in embedded
    assert embedded["embedding"].shape == (n, 64)
    assert embedded["t_embed"].shape == (n,)

    tally = write_batch(embedded, spec=SPEC, embeddings_dir=str(tmp_path / "emb"))
    assert int(tally["rows"][0]) == n
    assert set(tally) == {"rows", "t_decode", "t_embed", "t_write", "nodes"}
    assert float(tally["t_decode"][0]) == pytest.approx(float(np.sum(prepared["t_decode"])))
    # Outside Ray every image is decoded and embedded "local"; the table has no node column.
    row = {k: v[0] for k, v in tally.items()}  # as the driver's iter_rows() gives it
    assert node_counts([row]) == {"decode": {"local": n}, "embed": {"local": n}}

    files = parts(tmp_path / "emb")
    assert len(files) == 1
    table = pq.read_table(files[0])
    schema = table.schema
    assert schema.field("embedding").type == pa.list_(pa.float32(), 64)
    for name in ("image_id", "image_uri", "model_spec"):
        assert schema.field(name).type == pa.string(), name
    for name in FLOAT_FEATURES:
        assert schema.field(name).type == pa.float32(), name
    assert schema.field("width").type == pa.int32()
    assert schema.field("height").type == pa.int32()
    assert table.num_rows == n

    assert table.column("image_uri").to_pylist() == uris[:n]
    assert table.column("model_spec").to_pylist() == [SPEC] * n
    assert table.column("image_id").to_pylist() == list(prepared["image_id"])
    assert table.column("width").to_pylist()[0] == 1200
    for name in FLOAT_FEATURES:
        np.testing.assert_array_equal(table.column(name).to_numpy(), prepared[name])

    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # Mirror the job: decode with the same draft size, then embed with the plain embedder.
    images = [decode_image(Path(u).read_bytes(), draft_size=DRAFT) for u in uris[:n]]
    expected = reference.embed_images(images)
    np.testing.assert_allclose(emb, expected, atol=1e-5)
    assert not np.allclose(emb[0], emb[1])


def test_decoding_in_the_actor_equals_decode_tasks(
    corpus: dict[str, str], tmp_path: Path, stage: EmbedStage
) -> None:
    """decode_placement=actor: the actor runs prepare_batch itself; same rows, same errors."""
    uris = [corpus[n] for n in MIXED]
    kwargs = {
        "spec": SPEC,
        "limits": LIMITS,
        "draft": True,
        "errors_dir": str(tmp_path / "actor-errors"),
        "run_id": "run-1",
    }
    in_actor = EmbedStage(SPEC, 8, prepare=kwargs)({"image_uri": np.array(uris, dtype=object)})
    in_tasks = stage(run_prepare(uris, tmp_path / "task-errors"))
    assert set(in_actor) == set(in_tasks)
    for name, column in in_tasks.items():
        if name not in ("t_decode", "t_embed"):
            np.testing.assert_array_equal(in_actor[name], column, err_msg=name)
    failed = [pq.read_table(f).to_pandas() for f in parts(tmp_path / "actor-errors")]
    expected = [pq.read_table(f).to_pandas() for f in parts(tmp_path / "task-errors")]
    assert sorted(failed[0]["image_uri"]) == sorted(expected[0]["image_uri"])
    assert sorted(failed[0]["reason"]) == sorted(expected[0]["reason"])


def test_empty_batch_writes_nothing(
    corpus: dict[str, str], tmp_path: Path, stage: EmbedStage
) -> None:
    prepared = run_prepare([corpus["empty.jpg"]], tmp_path / "errors")
    embedded = stage(prepared)
    assert len(embedded["embedding"]) == 0
    tally = write_batch(embedded, spec=SPEC, embeddings_dir=str(tmp_path / "emb"))
    assert int(tally["rows"][0]) == 0
    assert not (tmp_path / "emb").exists()


# ---------------------------------------------------------------- dedupe_parts


def write_part(folder: Path, name: str, uris: list[str]) -> None:
    table = pa.table({"image_uri": uris, "v": [f"{name}:{u}" for u in uris]})
    storage.write_parquet(table, str(folder / name))


def test_dedupe_parts(tmp_path: Path) -> None:
    # Sorted names decide who keeps a row: part-a first.
    write_part(tmp_path, "part-c.parquet", ["u1", "u4"])  # all duplicates of a and b
    write_part(tmp_path, "part-a.parquet", ["u1", "u2", "u3"])
    write_part(tmp_path, "part-b.parquet", ["u2", "u4", "u5"])
    assert EmbeddedParts.read(str(tmp_path)).dedupe() == 3  # u2 from b, u1 and u4 from c
    assert [p.name for p in parts(tmp_path)] == ["part-a.parquet", "part-b.parquet"]
    a = pq.read_table(tmp_path / "part-a.parquet").to_pydict()
    b = pq.read_table(tmp_path / "part-b.parquet").to_pydict()
    assert a == {
        "image_uri": ["u1", "u2", "u3"],
        "v": ["part-a.parquet:u1", "part-a.parquet:u2", "part-a.parquet:u3"],
    }
    assert b == {"image_uri": ["u4", "u5"], "v": ["part-b.parquet:u4", "part-b.parquet:u5"]}
    assert EmbeddedParts.read(str(tmp_path)).dedupe() == 0
    assert [p.name for p in parts(tmp_path)] == ["part-a.parquet", "part-b.parquet"]


def test_dedupe_parts_of_a_missing_folder_is_zero(tmp_path: Path) -> None:
    assert EmbeddedParts.read(str(tmp_path / "nothing-here")).dedupe() == 0


def test_dedupe_parts_within_one_part(tmp_path: Path) -> None:
    write_part(tmp_path, "part-a.parquet", ["u1", "u1", "u2"])
    assert EmbeddedParts.read(str(tmp_path)).dedupe() == 1
    assert pq.read_table(tmp_path / "part-a.parquet").column("image_uri").to_pylist() == [
        "u1",
        "u2",
    ]


# ---------------------------------------------------------------- table meta and summary


def test_check_table_meta(tmp_path: Path) -> None:
    dst = str(tmp_path / "dst")
    check_table_meta(dst, SPEC, embed_dim=64)
    meta = json.loads((tmp_path / "dst" / "_KEEPER_TABLE.json").read_text())
    assert meta["model_spec"] == SPEC
    assert meta["embed_dim"] == 64
    before = (tmp_path / "dst" / "_KEEPER_TABLE.json").read_bytes()
    check_table_meta(dst, SPEC, embed_dim=64)  # same spec: fine, file untouched
    assert (tmp_path / "dst" / "_KEEPER_TABLE.json").read_bytes() == before
    with pytest.raises(DataError, match=r"'keeper-tiny:random'.*'ViT-B-32:random'"):
        check_table_meta(dst, "ViT-B-32:random", embed_dim=512)


def test_check_table_meta_refuses_a_replaced_checkpoint(tmp_path: Path) -> None:
    dst = str(tmp_path / "dst")
    spec = f"keeper-tiny:{tmp_path / 'tiny.safetensors'}"
    check_table_meta(dst, spec, embed_dim=64, weights="sha256:aa")
    meta = json.loads((tmp_path / "dst" / "_KEEPER_TABLE.json").read_text())
    assert meta["weights_version"] == "sha256:aa"
    check_table_meta(dst, spec, embed_dim=64, weights="sha256:aa")  # the same checkpoint
    check_table_meta(dst, spec, embed_dim=64, weights=None)  # one the driver cannot see
    with pytest.raises(DataError, match=r"made with weights sha256:aa.*now holds sha256:bb"):
        check_table_meta(dst, spec, embed_dim=64, weights="sha256:bb", record=False)
    # A table recorded before weights were versioned is checked by its spec alone.
    old = tmp_path / "old"
    check_table_meta(str(old), spec, embed_dim=64)
    check_table_meta(str(old), spec, embed_dim=64, weights="sha256:bb")
    assert "weights_version" not in json.loads((old / "_KEEPER_TABLE.json").read_text())


def test_a_table_from_before_colour_management_is_named_when_added_to(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    new = tmp_path / "new"
    check_table_meta(str(new), SPEC, embed_dim=64)
    assert json.loads((new / "_KEEPER_TABLE.json").read_text())["color"] == "srgb/4"
    old = tmp_path / "old"
    old.mkdir()
    record = {"model_spec": SPEC, "embed_dim": 64, "format": 1, "created": "2026-11-01T00:00:00"}
    (old / "_KEEPER_TABLE.json").write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="keeper.embed"):
        check_table_meta(str(new), SPEC, embed_dim=64)
        check_table_meta(str(old), SPEC, embed_dim=64, record=False)  # plan: said once, later
        assert caplog.text == ""
        check_table_meta(str(old), SPEC, embed_dim=64)
    assert "prepared without that" in caplog.text
    assert "ICC profile or HEIF nclx box" in caplog.text
    assert str(old) in caplog.text
    mid = tmp_path / "mid"
    mid.mkdir()

    def warned(color: str) -> str:
        (mid / "_KEEPER_TABLE.json").write_text(json.dumps({**record, "color": color}))
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="keeper.embed"):
            check_table_meta(str(mid), SPEC, embed_dim=64)
        return caplog.text

    # A table of 2026-12-04's colour management: only the EXIF Adobe RGB JPEGs differ.
    text = warned("srgb")
    assert "EXIF says Adobe RGB" in text
    assert "CMYK" in text
    assert "ICC profile" not in text
    # One of the EXIF rule (2026-12-05): only CMYK photos with a profile and RAWs naming a space.
    text = warned("srgb/2")
    assert "CMYK photos with an embedded CMYK profile" in text
    assert "RAW files" in text
    assert "EXIF says Adobe RGB" not in text
    # One of 2026-12-05's colour management: its pixels are as now, but a cut-out's quality
    # features counted its transparent area (measured where it is opaque since "srgb/4").
    text = warned("srgb/3")
    assert "photos with transparency" in text
    assert "over their opaque pixels" in text
    assert "CMYK" not in text
    # The oldest record names every change since.
    assert "EXIF says Adobe RGB" in _unconverted(None)
    assert "CMYK" in _unconverted(None)
    assert "transparency" in _unconverted(None)
    assert _unconverted("srgb/4") == ""


def counts(**over: int) -> dict[str, int]:
    c = {
        "in": 10,
        "skipped": 2,
        "already_embedded": 1,
        "failed_before": 1,
        "retried": 0,
        "attempted": 8,
        "embedded": 7,
        "failed": 1,
        "retryable_failed": 0,
        "lost": 0,
        "duplicates_removed": 0,
        "errors_cleared": 0,
        "non_image_files_ignored": 0,
    }
    c.update(over)
    return c


def summary(**over: Any) -> EmbedSummary:
    s: dict[str, Any] = {
        "run_id": "20250101T000000Z-abcd1234",
        "status": "ok",
        "model_spec": SPEC,
        "image_size": 64,
        "input": "in/",
        "output": "out/",
        "counts": counts(),
        "table": {"embedded": 9, "failed": 1, "parts": 3},
        "failed_fraction": 0.1,
        "failed_fraction_this_run": 0.125,
        "max_failure_fraction": 0.05,
        "errors_by_reason": {"truncated": 1},
        "seconds": {"list": 0.1, "pipeline": 2.0, "total": 2.5},
        "images_per_s": 3.5,
        "seconds_to_first_part": 1.25,
        "worker_seconds": {"read_decode_features": 1.0, "embed": 0.5, "write": 0.1},
        "cluster": "",
        "versions": {},
        "finished": "2025-01-01T00:00:00+00:00",
    }
    s.update(over)
    return EmbedSummary.model_validate(s)


def test_format_summary() -> None:
    text = format_summary(summary())
    assert "keeper embed  OK  run 20250101T000000Z-abcd1234" in text
    assert "10 in = 1 already embedded + 1 failed before (not retried) + 8 attempted\n" in text
    assert "8 = 7 embedded + 1 failed\n" in text
    assert "LOST" not in text
    assert "10.0% of the table (limit 5.0%), 12.5% of this run" in text
    assert "{'truncated': 1}" in text
    assert "9 embeddings in 3 part(s), 1 errors" in text
    assert "3.5 img/s" in text
    assert "NOTE     random weights" in text


def test_format_summary_lost_retryable_and_real_weights() -> None:
    c = counts(skipped=0, already_embedded=0, failed_before=0, retried=2, attempted=5)
    c.update({"in": 5, "embedded": 2, "failed": 1, "retryable_failed": 1, "lost": 2})
    text = format_summary(
        summary(
            status="failed",
            counts=c,
            model_spec="ViT-B-32:laion2b_s34b_b79k",
            images_per_s=None,
            errors_by_reason={},
        )
    )
    assert "keeper embed  FAILED" in text
    assert "5 attempted, 2 of them retried" in text
    assert "5 = 2 embedded + 1 failed (1 retryable: the next run tries them again) + 2 LOST" in text
    assert "random weights" not in text
    assert "img/s" not in text
    assert "by reason" not in text


def test_summary_json_uses_the_key_in() -> None:
    stored = json.loads(summary().to_json())
    assert stored["counts"]["in"] == 10
    assert Counts.model_validate(stored["counts"]).in_ == 10


def test_embed_stage_sets_model_threads() -> None:
    import torch

    before = torch.get_num_threads()
    try:
        for n in (1, 2):  # as seen by the thread that runs the stage's forwards
            assert EmbedStage(SPEC, 8, threads=n).torch_thread.call(torch.get_num_threads) == n
    finally:
        torch.set_num_threads(before)


def test_embed_stage_cpu_only_threads_share_the_node() -> None:
    import torch

    from keeper_train.jobs.embed import node_cores

    before = torch.get_num_threads()
    try:
        stage = EmbedStage(SPEC, 8, node_actors=1)
        # Set on, and seen by, the thread that runs the stage's forwards.
        assert stage.threads == node_cores() == stage.torch_thread.call(torch.get_num_threads)
        stage = EmbedStage(SPEC, 8, node_actors=node_cores() + 1)
        assert stage.threads == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, StageCpus(decode=0.5, actor=0.5, model_threads=None, node_threads=True)),
        (
            {"num_gpus_per_worker": 1},
            StageCpus(decode=1.0, actor=1.0, model_threads=None, node_threads=False),
        ),
        (
            {"model_threads": 3, "num_cpus_per_worker": 2, "decode_num_cpus": 0.25},
            StageCpus(decode=0.25, actor=2.0, model_threads=3, node_threads=False),
        ),
    ],
)
def test_stage_cpus_defaults(overrides: dict[str, Any], expected: StageCpus) -> None:
    cfg = EmbedConfig(input="in", output="out", **overrides)
    assert cfg.stage_cpus() == expected


@pytest.mark.parametrize("name", ["auto", "cpu", "pil", "turbo"])
def test_decode_backends_prepare_the_same_rows(name: str, tmp_path: Path) -> None:
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (600, 800, 3), np.uint8))
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    path = tmp_path / "p.jpg"
    path.write_bytes(buf.getvalue())
    kw: dict[str, Any] = {
        "spec": SPEC,
        "limits": {"max_pixels": 10**8, "max_bytes": 10**8, "max_raw_bytes": 10**8, "min_side": 16},
        "draft": True,
        "errors_dir": str(tmp_path / "errors"),
        "run_id": "r",
    }
    batch = {"image_uri": np.array([str(path)], dtype=object)}
    ref = prepare_batch(batch, **kw, decode="pil")
    out = prepare_batch(batch, **kw, decode=name)
    assert out["image_id"][0] == ref["image_id"][0]
    diff = np.abs(out["pixel_values"].astype(int) - ref["pixel_values"].astype(int))
    assert diff.mean() < 1.0
    np.testing.assert_allclose(out["sharpness"], ref["sharpness"], rtol=0.02)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({}, "this run gives them none: set num_gpus_per_worker"),
        ({"num_gpus_per_worker": 1, "decode_placement": "tasks"}, "must be actor"),
        ({"num_gpus_per_worker": 1, "thumbnails": "thumbs/"}, "thumbnails are written from"),
    ],
)
@pytest.mark.parametrize("decode", ["gpu", "nvimgcodec"])
def test_decode_gpu_is_refused_where_it_cannot_run(
    decode: str, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        EmbedConfig(input="in", output="out", decode=decode, **overrides)


@pytest.mark.parametrize("decode", ["gpu", "nvimgcodec"])
def test_decode_gpu_decodes_in_the_actor(decode: str) -> None:
    cfg = EmbedConfig(input="in", output="out", decode=decode, num_gpus_per_worker=0.5)
    assert cfg.placement == "actor"
    assert EmbedConfig(input="in", output="out").placement == "tasks"


@pytest.mark.parametrize("decode", ["gpu", "nvimgcodec"])
def test_gpu_decode_actor_without_cuda_is_a_clear_error(decode: str) -> None:
    kwargs = {"spec": SPEC, "limits": LIMITS, "draft": True, "errors_dir": "e", "run_id": "r"}
    with pytest.raises(ConfigError, match=f"decode={decode}: this model actor sees no CUDA"):
        EmbedStage(SPEC, 8, prepare={**kwargs, "capture": False, "decode": decode})


@pytest.mark.parametrize("engine", ["torchvision", "nvimgcodec"])
def test_device_preparation_gives_the_decode_tasks_rows(
    corpus: dict[str, str], tmp_path: Path, engine: str
) -> None:
    """decode=gpu's (and nvimgcodec's) actor path, run with GpuDecoder's CPU mode (the control
    flow, on CPU)."""
    uris = [corpus[n] for n in MIXED]
    batch = {"image_uri": np.array(uris, dtype=object)}
    prep = DevicePreparation(
        SPEC, device="cpu", limits=DecodeLimits(**LIMITS), decoder=GpuDecoder("cpu", engine=engine)
    )
    got = prepare_on_device(
        batch,
        prep=prep,
        max_bytes=LIMITS["max_bytes"],
        errors_dir=str(tmp_path / "device-errors"),
        run_id="run-1",
        capture=True,
    )
    ref = prepare_batch(
        batch,
        spec=SPEC,
        limits=LIMITS,
        draft=True,
        errors_dir=str(tmp_path / "task-errors"),
        run_id="run-1",
        capture=True,
    )
    assert list(got["image_uri"]) == list(ref["image_uri"])
    assert list(got["image_id"]) == list(ref["image_id"])
    pixels = got["pixel_values"].numpy().astype(int)
    assert np.abs(pixels - ref["pixel_values"].astype(int)).mean() < 1.0
    for name in ("width", "height", "capture_time", "time_source", "camera"):
        np.testing.assert_array_equal(got[name], ref[name], err_msg=name)
    for name in FLOAT_FEATURES:
        np.testing.assert_allclose(got[name], ref[name], atol=0.05, err_msg=name)
    assert np.bitwise_count(got["dhash"] ^ ref["dhash"]).max() <= 2
    device_errors = pq.read_table(parts(tmp_path / "device-errors")[0]).to_pandas()
    task_errors = pq.read_table(parts(tmp_path / "task-errors")[0]).to_pandas()
    cols = ["image_uri", "stage", "reason"]
    pd.testing.assert_frame_equal(
        device_errors[cols].sort_values("image_uri").reset_index(drop=True),
        task_errors[cols].sort_values("image_uri").reset_index(drop=True),
    )


class HostlessTensor(torch.Tensor):
    """A tensor NumPy cannot read, as it cannot read a CUDA tensor (decode=gpu's pixel_values)."""

    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("can't convert cuda:0 device type tensor to numpy")


def test_device_prepared_pixels_reach_the_model_as_a_tensor(
    corpus: dict[str, str], tmp_path: Path, stage: EmbedStage
) -> None:
    """decode=gpu's actor call after its decode: the model stage takes pixel_values as the
    device tensor they are and embeds them as it does the decode tasks' pixels. On the H200
    (2026-12-04) every decode=gpu run failed here: the embedder made the CUDA tensor a NumPy
    array."""
    uris = [corpus[n] for n in MIXED]
    batch = {"image_uri": np.array(uris, dtype=object)}
    prep = DevicePreparation(
        SPEC, device="cpu", limits=DecodeLimits(**LIMITS), decoder=GpuDecoder("cpu")
    )
    got = prepare_on_device(
        batch, prep=prep, max_bytes=LIMITS["max_bytes"], errors_dir=str(tmp_path / "e"), run_id="r"
    )
    got["pixel_values"] = got["pixel_values"].as_subclass(HostlessTensor)
    with pytest.raises(TypeError, match="cuda"):  # the stand-in refuses NumPy as CUDA does
        np.asarray(got["pixel_values"])
    on_device = stage(got)
    in_tasks = stage(run_prepare(uris, tmp_path / "task-errors"))
    assert "pixel_values" not in on_device
    assert list(on_device["image_uri"]) == list(in_tasks["image_uri"])
    cosine = np.sum(on_device["embedding"] * in_tasks["embedding"], axis=1)
    assert cosine.min() > 0.99, cosine


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("actor_resources", {"GPU": 1}, "not a custom resource"),
        ("decode_resources", {"CPU": 2}, "not a custom resource"),
        ("actor_resources", {"keeper_gpu_node": 0}, "must be > 0"),
    ],
)
def test_custom_resources_refuse_builtins_and_zero(field: str, value: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        EmbedConfig(input="in", output="out", **{field: value})


def test_custom_resources_parse_from_overrides() -> None:
    from keeper_train.config import load_config

    cfg = load_config(
        EmbedConfig,
        None,
        [
            "input=in",
            "output=out",
            "actor_resources={keeper_gpu_node: 1}",
            "decode_resources.x=0.5",
        ],
    )
    assert cfg.actor_resources == {"keeper_gpu_node": 1.0}
    assert cfg.decode_resources == {"x": 0.5}


def test_a_model_actor_asks_for_its_model_and_ray_datas_headroom() -> None:
    """1.25 x (1 GiB + fp32 weights): above what Ray Data's memory check wants (1.25 x the most a
    ViT-B-32 actor was seen using, ~1.5 GiB), so it neither warns nor lets Ray overpack a node."""
    from keeper_core.models import ACTOR_BASELINE_BYTES, parameter_count
    from keeper_train.jobs.embed import actor_memory

    for spec in ("keeper-tiny:random", "ViT-B-32:random"):
        want = 1.25 * (ACTOR_BASELINE_BYTES + 4 * parameter_count(spec))
        assert actor_memory(spec) == pytest.approx(want, abs=1)
    assert actor_memory("ViT-B-32:random") >= 1.25 * 1.5 * 1024**3


def test_a_table_refuses_rows_prepared_otherwise(tmp_path: Path) -> None:
    """A table records how its images were prepared; rows prepared otherwise never join it,
    nor join a table from before the record whose spec keeper now prepares otherwise (a SigLIP
    checkpoint file, once prepared with CLIP's mean and std)."""
    siglip = "ViT-B-16-SigLIP:/models/siglip.safetensors"
    new = tmp_path / "new"
    check_table_meta(str(new), siglip, embed_dim=768)
    record = json.loads((new / "_KEEPER_TABLE.json").read_text())
    assert record["preprocess"] == {
        "image_size": 224,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "interpolation": "bicubic",
        "resize_mode": "squash",
    }
    check_table_meta(str(new), siglip, embed_dim=768)  # prepared alike: fine
    # A record that says otherwise (as a table of another keeper would hold).
    odd = tmp_path / "odd"
    odd.mkdir()
    other = {**record["preprocess"], "resize_mode": "shortest"}
    (odd / "_KEEPER_TABLE.json").write_text(json.dumps({**record, "preprocess": other}))
    with pytest.raises(DataError, match=r"prepared as .*'shortest'.*this run prepares them as"):
        check_table_meta(str(odd), siglip, embed_dim=768, record=False)
    # Tables from before the record: a SigLIP file's rows were prepared with CLIP's mean and std.
    old = tmp_path / "old"
    old.mkdir()
    before = {"model_spec": siglip, "embed_dim": 768, "format": 1, "color": "srgb/4"}
    (old / "_KEEPER_TABLE.json").write_text(json.dumps(before))
    with pytest.raises(DataError, match=r"0\.4814.*embedded before keeper prepared"):
        check_table_meta(str(old), siglip, embed_dim=768)
    # ... while a spec prepared as it was then is added to as before.
    (old / "_KEEPER_TABLE.json").write_text(json.dumps({**before, "model_spec": SPEC}))
    check_table_meta(str(old), SPEC, embed_dim=64)
