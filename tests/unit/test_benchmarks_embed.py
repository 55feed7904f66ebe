"""benchmarks/embed.py's DataLoader doing the job's work (method 3b): it runs the job's own decode
stage, forward and writer, so every image ends up in a Parquet part, as in the job."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from support import import_benchmark

from keeper_core.embedding import ClipEmbedder
from keeper_core.synthetic import generate_corpus


@pytest.fixture(scope="module")
def emb():
    return import_benchmark("embed")


@pytest.fixture(scope="module")
def uris(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    manifest = generate_corpus(root, n_series=3, seed=1, image_size=(200, 150))
    return [line.split(",")[1] for line in manifest.read_text().splitlines()[1:]]


def test_same_work_dataset_is_the_jobs_decode_stage(emb, uris, tmp_path):
    from keeper_train.jobs.embed import EmbedConfig, prepare_arguments

    cfg = EmbedConfig(input="-", output=str(tmp_path), model="keeper-tiny:random")
    ds = emb.KeeperWorkDataset(uris, 4, prepare_arguments(cfg, str(tmp_path), "t"))
    assert len(ds) == -(-len(uris) // 4)
    batch = ds[0]
    assert list(batch["image_uri"]) == uris[:4]
    assert batch["pixel_values"].shape == (4, 3, 64, 64)
    assert batch["pixel_values"].dtype == np.uint8
    for column in ("image_id", "dhash", "sharpness", "width", "capture_time"):
        assert column in batch, column


def test_run_same_work_embeds_every_image(emb, uris, tmp_path, monkeypatch):
    embedder = ClipEmbedder("keeper-tiny:random", batch_size=4, device="cpu")
    written = []
    real = emb.shutil.rmtree

    def keep(path, **kwargs):  # look at the parts before the loop removes its output
        written.extend(pq.read_table(p) for p in sorted(Path(path).rglob("*.parquet")))
        real(path, **kwargs)

    monkeypatch.setattr(emb.shutil, "rmtree", keep)
    ips = emb.run_same_work(embedder, "keeper-tiny:random", uris, 4, 1, 1, tmp_path)
    assert ips > 0
    rows = [r for t in written for r in t.to_pylist()]
    assert sorted(r["image_uri"] for r in rows) == sorted(uris)
    assert all(len(r["embedding"]) == embedder.clip.embed_dim for r in rows)


@pytest.mark.parametrize(
    ("argv0", "role"),
    [
        ("ray::MapWorker(MapBatches(EmbedStage)).submit", "ray::MapWorker(MapBatches(EmbedStage))"),
        ("ray::MapBatches(prepare_batch)", "ray::MapBatches(prepare_batch)"),
        ("ray::ActorLocationTracker.get_actor_locations", "ray::ActorLocationTracker"),
        ("ray::IDLE", "ray::IDLE"),
        ("/venv/lib/ray/core/src/ray/raylet/raylet", "raylet"),
    ],
)
def test_process_role_names_ray_workers_by_what_they_run(emb, argv0, role):
    import subprocess

    proc = subprocess.Popen(["bash", "-c", f'exec -a "{argv0}" sleep 30'])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # until exec has replaced bash's command line
            if Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(argv0.encode()):
                break
            time.sleep(0.02)
        assert emb.process_role(proc.pid) == role
    finally:
        proc.kill()
        proc.wait(timeout=10)
    assert emb.process_role(os.getpid()) == "benchmark"
