"""keeper finetune on Ray Train: two DDP workers fed by Ray Data from decoded-once pixels, one MLflow
run, the loss falls, an injected worker failure resumes from the last checkpoint, a bad image is
recorded and its series left out (counts add up), the registered version loads without pickle and
ranks images; a target the tower lacks fails before any work."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import MlflowServer

from keeper_core import storage
from keeper_core.finetune import TunedRanker
from keeper_core.synthetic import PHOTOS, generate_corpus
from keeper_train.jobs import finetune
from keeper_train.jobs.finetune import FinetuneConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """28 series of 96x72 shots, one image of one series replaced by bytes that are no image."""
    d = tmp_path_factory.mktemp("finetune-data")
    path = generate_corpus(d / "corpus", n_series=28, seed=5, image_size=(96, 72), photos=PHOTOS)
    rows = pd.read_csv(path)
    Path(rows["image_uri"].iloc[0]).write_bytes(b"not an image at all")
    return path


def _config(manifest: Path, tmp_path: Path, server: MlflowServer, **over: object) -> FinetuneConfig:
    base = {
        "series": str(manifest),
        "model": "keeper-tiny:random",
        "method": "lora",
        "rank": 4,
        "epochs": 4,
        "patience": 4,
        "batch_size": 4,
        "lr_lora": 3e-3,
        "lr_head": 3e-3,
        "warmup_epochs": 0.5,
        "storage": str(tmp_path / "ckpt"),
        "tracking_uri": server.uri,
        "data_dir": str(tmp_path / "kd"),
    }
    return FinetuneConfig.model_validate({**base, **over})


def test_two_workers_fault_drill_one_run_registered(
    ray_cluster: str, manifest: Path, tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    cfg = _config(
        manifest,
        tmp_path,
        mlflow_server,
        num_workers=2,
        fail_at_epoch=2,
        experiment="finetune-two-workers",
        register="keeper-finetune-test",
        ray_address=ray_cluster,
    )
    summary = finetune.run(cfg)

    # Counts add up: the bad image is recorded, its series left out, the rest trained.
    assert summary.images["failed"] == 1
    assert summary.images["in"] == summary.images["prepared"] + summary.images["failed"]
    assert summary.series["dropped"] == 1
    assert sum(summary.series[k] for k in ("train", "val", "test", "dropped")) == 28

    client = mlflow.MlflowClient(mlflow_server.uri)
    exp = client.get_experiment_by_name("finetune-two-workers")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in runs] == [summary.run_id]  # one run, rank 0 logging
    errors = client.list_artifacts(summary.run_id)
    assert "errors.csv" in {a.path for a in errors}

    # The drill failed once at epoch 2 and the run resumed: every epoch logged, none lost.
    marker = storage.join(cfg.storage, summary.run_name, "_injected_failure")
    assert storage.exists(marker)
    assert summary.epochs_run == 4
    assert [e.epoch for e in summary.epochs] == [0, 1, 2, 3]
    losses = [e.train_loss for e in summary.epochs]
    assert losses[-1] < losses[0], losses

    # What trained is LoRA + head only, as the formula says for keeper-tiny (2 blocks, d=128).
    lora = 2 * 16 * cfg.rank * 128
    assert summary.trainable_params > lora
    assert summary.trainable_share < 0.2

    # The registered challenger loads without keeper_train and ranks image files.
    version = summary.registered
    assert version is not None
    assert version["alias"] == "challenger"
    model = mlflow.pyfunc.load_model(f"models:/keeper-finetune-test/{version['version']}")
    ranker = model.unwrap_python_model().ranker
    assert isinstance(ranker, TunedRanker)
    assert ranker.config.embedding_spec == summary.tower_id
    rows = pd.read_csv(manifest)
    one = rows[rows["series_id"] == rows["series_id"].iloc[-1]][["series_id", "image_uri"]]
    ranked = model.predict(one)
    assert sorted(ranked["rank"]) == list(range(1, len(one) + 1))
    assert np.isclose(ranked["prob"].sum(), 1.0)


def test_unknown_target_fails_before_any_work(
    manifest: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = finetune.main(
        [
            f"series={manifest}",
            "targets=[transformer.resblocks.9.attn]",
            f"storage={tmp_path / 'ckpt'}",
            f"data_dir={tmp_path / 'kd'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "transformer.resblocks.9.attn" in err
    assert "not a module" in err
    # Refused at plan time: no checkpoint folder, no MLflow store, nothing decoded.
    assert not (tmp_path / "ckpt").exists()
    assert not (tmp_path / "kd").exists()


def test_last_blocks_with_targets_is_a_config_error(manifest: Path) -> None:
    with pytest.raises(ValueError, match="last-blocks has no LoRA"):
        FinetuneConfig.model_validate(
            {"series": str(manifest), "method": "last-blocks", "targets": ["x"]}
        )
