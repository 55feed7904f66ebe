"""The Ray Data embed job end to end on a local Ray: S3 in and out (a real moto_server), bad
input, kill and resume. Results are checked against ClipEmbedder run directly."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from support import jpeg_with_scans, png_declaring

from keeper_core import storage
from keeper_core.embedding import ClipEmbedder
from keeper_core.images import decode_image
from keeper_core.synthetic import generate_corpus
from keeper_train.jobs import embed
from keeper_train.jobs.embed import EmbedConfig

pytestmark = pytest.mark.integration
TINY = "keeper-tiny:random"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """~25 real-photo JPEGs from the benchmark corpus generator."""
    manifest = generate_corpus(tmp_path_factory.mktemp("corpus"), n_series=7, seed=3)
    return [Path(u) for u in pd.read_csv(manifest)["image_uri"]]


@pytest.fixture(scope="module")
def reference() -> ClipEmbedder:
    return ClipEmbedder(TINY)


def read_table(dst: str) -> pd.DataFrame:
    return storage.read_parquet(storage.join(dst, embed.EMBEDDINGS)).to_pandas()


def read_errors(dst: str) -> pd.DataFrame:
    return storage.read_parquet(storage.join(dst, embed.ERRORS)).to_pandas()


def assert_counts_add_up(summary: embed.EmbedSummary) -> None:
    c = summary.counts
    assert c.in_ == c.skipped + c.attempted
    assert c.skipped == c.already_embedded + c.failed_before
    assert c.attempted == c.embedded + c.failed
    assert c.lost == 0


def test_s3_corpus_to_s3_table(
    ray_cluster: str, s3_bucket: str, corpus: list[Path], reference: ClipEmbedder
) -> None:
    s3 = boto3.client("s3")
    keys = []
    for i, path in enumerate(corpus):
        key = f"photos/{path.parent.name}/{path.name}"
        if i == 0:
            key = f"photos/{path.parent.name}/no-extension"  # found by sniffing its bytes
        s3.put_object(Bucket=s3_bucket, Key=key, Body=path.read_bytes())
        keys.append(key)
    s3.put_object(Bucket=s3_bucket, Key="photos/README.txt", Body=b"not a photo")
    dst = f"s3://{s3_bucket}/embeddings/tiny"
    cfg = EmbedConfig(
        input=f"s3://{s3_bucket}/photos",
        output=dst,
        model=TINY,
        batch_size=8,
        rows_per_file=8,
        ray_address=ray_cluster,
    )
    summary = embed.run(cfg)

    assert summary.status == "ok"
    assert_counts_add_up(summary)
    assert summary.counts.embedded == len(corpus)
    assert summary.counts.non_image_files_ignored == 1
    table = read_table(dst)
    uris = [f"s3://{s3_bucket}/{k}" for k in keys]
    assert sorted(table["image_uri"]) == sorted(uris)  # every good image exactly once
    assert set(table["model_spec"]) == {TINY}
    emb = np.stack(table["embedding"].to_numpy()).astype(np.float32)
    assert emb.shape == (len(corpus), 64)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)

    by_uri = dict(zip(table["image_uri"], emb, strict=True))
    images = [decode_image(p.read_bytes()) for p in corpus]
    direct = reference.embed_images(images)
    np.testing.assert_allclose(np.stack([by_uri[u] for u in uris]), direct, atol=1e-4)
    for u, p in zip(uris, corpus, strict=True):
        row = table[table["image_uri"] == u].iloc[0]
        with Image.open(p) as im:
            assert (row["width"], row["height"]) == im.size
    stored = json.loads(storage.read_bytes(f"{dst}/_SUMMARY.json"))
    assert stored["run_id"] == summary.run_id
    assert stored["versions"]["ray"].startswith("2.")

    # One photo saved over with an edit, one with a copy of another photo, one uploaded again as
    # it was: the first is embedded again, the second takes a copy of the other photo's row, and
    # the table holds one row of each, the new content's.
    time.sleep(1.1)  # S3 times are whole seconds
    buf = io.BytesIO()
    edit = decode_image(corpus[1].read_bytes()).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    edit.save(buf, "JPEG", quality=90)
    s3.put_object(Bucket=s3_bucket, Key=keys[1], Body=buf.getvalue())
    s3.put_object(Bucket=s3_bucket, Key=keys[5], Body=corpus[2].read_bytes())
    s3.put_object(Bucket=s3_bucket, Key=keys[3], Body=corpus[3].read_bytes())
    again = embed.run(cfg)
    assert_counts_add_up(again)
    c = again.counts
    assert (c.changed, c.restamped, c.copied, c.attempted, c.embedded) == (2, 1, 1, 1, 1)
    table = read_table(dst).set_index("image_uri")
    assert len(table) == len(corpus)
    edited = reference.embed_images([decode_image(buf.getvalue())])[0]
    np.testing.assert_allclose(table.loc[uris[1], "embedding"], edited, atol=1e-4)
    np.testing.assert_allclose(table.loc[uris[5], "embedding"], direct[2], atol=1e-4)
    assert table.loc[uris[5], "image_id"] == table.loc[uris[2], "image_id"]

    # A photo renamed (S3: copied to the new key, the old one deleted): its row is copied under
    # the new name, nothing is decoded or embedded.
    renamed = keys[4].replace(corpus[4].name, f"renamed-{corpus[4].name}")
    s3.copy_object(Bucket=s3_bucket, Key=renamed, CopySource={"Bucket": s3_bucket, "Key": keys[4]})
    s3.delete_object(Bucket=s3_bucket, Key=keys[4])
    moved = embed.run(cfg)
    assert_counts_add_up(moved)
    assert (moved.counts.moved, moved.counts.attempted) == (1, 0)
    table = read_table(dst).set_index("image_uri")
    np.testing.assert_allclose(
        table.loc[f"s3://{s3_bucket}/{renamed}", "embedding"], direct[4], atol=1e-4
    )
    assert uris[4] not in table.index  # the old name's row went with it

    # A photo deleted: counted, its row kept (a prefix not synced lists alike) until prune.
    s3.delete_object(Bucket=s3_bucket, Key=keys[0])
    kept = embed.run(cfg)
    assert (kept.counts.gone, kept.counts.pruned, kept.table["embedded"]) == (1, 0, len(corpus))
    pruned = embed.run(cfg.model_copy(update={"prune": True}))
    assert_counts_add_up(pruned)
    assert (pruned.counts.gone, pruned.counts.pruned, pruned.counts.attempted) == (1, 1, 0)
    table = read_table(dst).set_index("image_uri")
    assert uris[0] not in table.index
    assert len(table) == len(corpus) - 1 == pruned.table["embedded"]

    # A new photo uploaded under two keys at once (a card synced to two prefixes): decoded and
    # embedded once, each key given its row.
    buf = io.BytesIO()
    edit.rotate(90, expand=True).save(buf, "JPEG", quality=85)
    twins = [f"s3://{s3_bucket}/photos/{d}/new-shot.jpg" for d in ("card", "card-backup")]
    for u in twins:
        s3.put_object(Bucket=s3_bucket, Key=u.split("/", 3)[3], Body=buf.getvalue())
    both = embed.run(cfg)
    assert_counts_add_up(both)
    c = both.counts
    assert (c.attempted, c.embedded, c.twins) == (2, 2, 1)
    assert sum(both.nodes["embed"].values()) == 1  # the model saw it once
    table = read_table(dst).set_index("image_uri")
    shot = reference.embed_images([decode_image(buf.getvalue())])[0]
    for u in twins:
        np.testing.assert_allclose(table.loc[u, "embedding"], shot, atol=1e-4)


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def operations_example() -> str:
    """The python example in docs/operations.md (section "Reading the output")."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)
    assert len(blocks) == 1, "docs/operations.md should hold one python example"
    return str(blocks[0])


@pytest.mark.parametrize("placement", ["tasks", "actor"])
def test_bad_inputs_are_recorded_and_the_rest_finishes(
    ray_cluster: str, tmp_path: Path, corpus: list[Path], placement: str, reference: ClipEmbedder
) -> None:
    """Decoded in CPU tasks or inside the model actor: the same errors, the same table."""
    good = corpus[:6]
    folder = tmp_path / "in"
    folder.mkdir()
    jpeg = good[0].read_bytes()
    bad = {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "notimage.jpg": (b"this is a text file, not a photo\n" * 20, "not_image"),
        "bomb.png": (png_declaring(30_000, 30_000), "too_many_pixels"),
        "scanbomb.jpg": (jpeg_with_scans(300), "too_many_scans"),
        "tiny.png": (_png((8, 8)), "too_small"),
    }
    for name, (data, _) in bad.items():
        (folder / name).write_bytes(data)
    missing = str(folder / "gone.jpg")
    rows = [str(p) for p in good] + [str(folder / n) for n in bad] + [missing]
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame({"image_uri": rows}).to_csv(manifest, index=False)

    dst = str(tmp_path / "out")
    summary = embed.run(
        EmbedConfig(
            input=str(manifest),
            output=dst,
            model=TINY,
            max_failure_fraction=1.0,
            decode_placement=placement,
            ray_address=ray_cluster,
        )
    )
    assert_counts_add_up(summary)
    assert summary.counts.embedded == len(good)
    assert summary.counts.failed == len(bad) + 1
    assert summary.status == "ok"
    errors = read_errors(dst).set_index("image_uri")
    assert len(errors) == len(bad) + 1
    for name, (_, reason) in bad.items():
        assert errors.loc[str(folder / name), "reason"] == reason, name
        assert errors.loc[str(folder / name), "stage"] == "decode"
    assert errors.loc[missing, "stage"] == "read"
    assert errors.loc[missing, "reason"] == "unreadable"
    # Nothing here passes on a second try: a re-run leaves them alone unless retry_errors.
    assert not errors["retryable"].any()
    table = read_table(dst).set_index("image_uri")
    assert sorted(table.index) == sorted(str(p) for p in good)
    expected = reference.embed_images([decode_image(p.read_bytes()) for p in good])
    got = np.stack(table.loc[[str(p) for p in good], "embedding"].to_numpy())
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert (table["sharpness"] > 0).all()
    assert (table["width"] > 0).all()
    if placement == "actor":
        return  # the rest is about the table and the exit code, not where decode ran

    # docs/operations.md's "Reading the output" example, as a user copies it, on this table.
    code = operations_example()
    assert 'dst = "s3://bucket/emb/vit-b-32"' in code
    out: dict[str, Any] = {}
    exec(code.replace('"s3://bucket/emb/vit-b-32"', repr(dst)), out)
    assert out["X"].shape == (len(good), out["emb"].column("embedding").type.list_size)
    assert len(out["errors"]) == len(bad) + 1
    assert out["summary"]["run_id"] == summary.run_id
    assert len(out["nearest"]) == min(10, len(good))

    # The same input against the default limit (5 %): the job finishes, says why, exits 3.
    argv = [f"input={manifest}", f"output={tmp_path / 'out2'}", f"ray_address={ray_cluster}"]
    assert embed.main(argv) == embed.EXIT_TOO_MANY_FAILURES
    again = json.loads((tmp_path / "out2" / "_SUMMARY.json").read_text())
    assert again["status"] == "failed"
    assert again["counts"]["embedded"] == len(good)


def test_other_model_spec_is_refused(ray_cluster: str, tmp_path: Path, corpus: list[Path]) -> None:
    manifest = tmp_path / "m.csv"
    pd.DataFrame({"image_uri": [str(p) for p in corpus[:3]]}).to_csv(manifest, index=False)
    dst = str(tmp_path / "out")
    embed.run(EmbedConfig(input=str(manifest), output=dst, model=TINY, ray_address=ray_cluster))
    argv = [f"input={manifest}", f"output={dst}", "model=ViT-B-32:random"]
    assert embed.main(argv) == 2  # refused before any work, naming both specs


def test_a_failed_pipeline_releases_its_actors(
    ray_cluster: str, tmp_path: Path, corpus: list[Path]
) -> None:
    """A stage that raises stops the job with PipelineError, and the model actors go with it:
    the driver goes on (as a notebook or a benchmark does) and its next job gets their CPUs (or
    GPUs). Ray Data leaves a failed execution's actors to reference counting, and references
    outlived the error: the next decode=gpu job in the H200 benchmark waited for the GPU until it
    was killed, and, in this test session, the next Ray Train test for the CPUs."""
    import ray

    before = ray.available_resources().get("CPU", 0.0)
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    manifest = tmp_path / "manifest.csv"
    uris = [str(p) for p in corpus[:4]] + [str(tmp_path / "bad.jpg")]
    pd.DataFrame({"image_uri": uris}).to_csv(manifest, index=False)
    dst = tmp_path / "out"
    dst.mkdir()
    # The model actor decodes (decode_placement=actor) and so writes the bad image's error row:
    # where the errors folder is a file, that write raises inside the actor.
    (dst / embed.ERRORS).write_text("a file where the errors folder goes")
    cfg = EmbedConfig(
        input=str(manifest),
        output=str(dst),
        model=TINY,
        decode_placement="actor",
        max_failure_fraction=1.0,
        ray_address=ray_cluster,
    )
    with pytest.raises(embed.PipelineError, match=r"EmbedStage[\s\S]*errors"):
        embed.run(cfg)

    def cpus_back() -> bool:  # bounded: Ray reports freed resources within a second or two
        deadline = time.monotonic() + 15
        while ray.available_resources().get("CPU", 0.0) < before and time.monotonic() < deadline:
            time.sleep(0.2)
        return ray.available_resources().get("CPU", 0.0) == before

    assert cpus_back()
    (dst / embed.ERRORS).unlink()
    summary = embed.run(cfg)  # the same driver: the next job runs, and finishes the table
    assert_counts_add_up(summary)
    assert summary.table == {
        "embedded": 4,
        "failed": 1,
        "parts": summary.table["parts"],
        "error_parts": 1,
        "error_parts_compacted": 0,
    }
    assert cpus_back()  # and leaves the shared Ray as it found it


def pack_shards(
    paths: list[Path], per_shard: int, *, orphan: bool = False
) -> list[tuple[str, bytes]]:
    """WebDataset shards (name, tar bytes) of these photos as img2dataset lays them out: a
    ``.jpg``, a ``.txt`` caption and a ``.json`` of metadata per sample. ``orphan``: the last
    shard also holds a caption whose sample has no image."""
    shards = []
    for s in range(0, len(paths), per_shard):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i, path in enumerate(paths[s : s + per_shard], start=s):
                key = f"{i:09d}"
                meta = json.dumps({"key": key, "url": f"https://example.org/{path.name}"})
                for name, data in (
                    (f"{key}.jpg", path.read_bytes()),
                    (f"{key}.txt", f"caption of {path.parent.name}/{path.name}".encode()),
                    (f"{key}.json", meta.encode()),
                ):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            if orphan and s + per_shard >= len(paths):
                info = tarfile.TarInfo("999999999.txt")
                info.size = 4
                tar.addfile(info, io.BytesIO(b"lost"))
        shards.append((f"{s // per_shard:05d}.tar", buf.getvalue()))
    return shards


def test_webdataset_shards_on_s3(
    ray_cluster: str, s3_bucket: str, corpus: list[Path], reference: ClipEmbedder
) -> None:
    s3 = boto3.client("s3")
    shards = pack_shards(corpus, per_shard=8, orphan=True)  # + a sample with no image
    _, first = shards[0]
    cut = first[: len(first) // 2]
    for name, data in [*shards, ("99999.tar", cut)]:
        s3.put_object(Bucket=s3_bucket, Key=f"wds/{name}", Body=data)
    dst = f"s3://{s3_bucket}/emb/wds"
    cfg = EmbedConfig(
        input=f"s3://{s3_bucket}/wds/",
        output=dst,
        model=TINY,
        batch_size=8,
        rows_per_file=8,
        max_failure_fraction=1.0,
        ray_address=ray_cluster,
    )
    summary = embed.run(cfg)

    assert_counts_add_up(summary)
    assert summary.counts.non_image_files_ignored == 1  # the sample with no image
    table = read_table(dst)
    cut_images = table["image_uri"].str.startswith(f"s3://{s3_bucket}/wds/99999.tar#")
    whole = table[~cut_images]
    assert len(whole) == len(corpus)  # every photo of the whole shards, exactly once
    assert whole["image_uri"].is_unique
    by_path = {f"caption of {p.parent.name}/{p.name}": p for p in corpus}
    assert set(whole["caption"]) == set(by_path)
    for _, row in whole.iterrows():
        assert json.loads(row["metadata"])["url"].endswith(by_path[row["caption"]].name)
    # the cut shard: the photos before the cut embedded, the rest one failed input
    assert 0 < cut_images.sum() < 8
    errors = read_errors(dst).set_index("image_uri")
    assert errors.loc[f"s3://{s3_bucket}/wds/99999.tar", "reason"] == "corrupt_shard"
    assert summary.counts.embedded == len(table)
    assert summary.counts.failed == 1
    emb = np.stack(whole["embedding"].to_numpy()).astype(np.float32)
    direct = reference.embed_images(
        [decode_image(by_path[c].read_bytes()) for c in whole["caption"]]
    )
    np.testing.assert_allclose(emb, direct, atol=1e-4)
    assert storage.list_files(f"{dst}/{embed.SHARDS}")  # the indexes are cached

    again = embed.run(cfg)
    assert again.counts.attempted == 0
    assert again.counts.skipped == summary.counts.in_


@pytest.mark.parametrize("kind", ["manifest", "webdataset"])
def test_killed_job_resumes_with_every_image_once(
    ray_cluster: str, tmp_path: Path, kind: str
) -> None:
    manifest = generate_corpus(tmp_path / "corpus", n_series=40, seed=11, min_shots=3)
    total = len(pd.read_csv(manifest))
    src = str(manifest)
    if kind == "webdataset":
        (tmp_path / "wds").mkdir()
        photos = [Path(u) for u in pd.read_csv(manifest)["image_uri"]]
        for name, data in pack_shards(photos, per_shard=16):
            (tmp_path / "wds" / name).write_bytes(data)
        src = f"{tmp_path / 'wds'}/{{00000..{(total - 1) // 16:05d}}}.tar"
    dst = tmp_path / "out"
    emb_dir = dst / embed.EMBEDDINGS
    cmd = [
        sys.executable, "-m", "keeper_train.jobs.embed",
        f"input={src}", f"output={dst}", f"model={TINY}",
        "batch_size=4", "decode_batch_size=4", "rows_per_file=4", f"ray_address={ray_cluster}",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if emb_dir.is_dir() and any(emb_dir.glob("*.parquet")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the job ended before any output was seen"
        os.kill(proc.pid, signal.SIGKILL)  # the driver dies mid-job
    finally:
        proc.kill()
        proc.wait(timeout=30)
    done_before = len(read_table(str(dst)))
    assert 0 < done_before < total, "kill did not land mid-job"
    # the killed driver's lock is left behind; its process is gone, so this run takes it over
    assert json.loads((dst / "_LOCK.json").read_text())["pid"] == proc.pid

    summary = embed.run(
        EmbedConfig(input=src, output=str(dst), model=TINY, ray_address=ray_cluster)
    )
    assert_counts_add_up(summary)
    assert not (dst / "_LOCK.json").exists()
    assert summary.counts.skipped >= done_before
    table = read_table(str(dst))
    assert len(table) == total
    assert table["image_uri"].is_unique
    assert table["image_id"].notna().all()

    again = embed.run(EmbedConfig(input=src, output=str(dst), model=TINY, ray_address=ray_cluster))
    assert again.counts.attempted == 0
    assert again.counts.skipped == total
    assert len(read_table(str(dst))) == total
