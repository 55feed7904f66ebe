"""Ray Train + MLflow: two data-parallel workers, one MLflow run; a worker lost mid-training
resumes from the last checkpoint and the run's epochs stay continuous."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import MlflowServer

from keeper_core import storage
from keeper_core.ranker import SeriesRanker
from keeper_core.synthetic import generate_corpus
from keeper_train.jobs import embed, train_head
from keeper_train.jobs.train_head import TrainHeadConfig

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def data(ray_cluster: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("train-data")
    manifest = generate_corpus(d / "corpus", n_series=30, seed=21)
    out = str(d / "emb")
    embed.run(embed.EmbedConfig(input=str(manifest), output=out, ray_address=ray_cluster))
    return out, str(manifest)


def _config(
    data: tuple[str, str], tmp_path: Path, server: MlflowServer, **over: object
) -> TrainHeadConfig:
    base = {
        "embeddings": data[0],
        "series": data[1],
        "head": "mlp",
        "epochs": 6,
        "patience": 6,
        "storage": str(tmp_path / "ckpt"),
        "tracking_uri": server.uri,
        "baselines": False,
    }
    return TrainHeadConfig.model_validate({**base, **over})


def _runs(server: MlflowServer, experiment: str) -> list[mlflow.entities.Run]:
    client = mlflow.MlflowClient(server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None
    return list(client.search_runs([exp.experiment_id]))


def test_two_workers_one_mlflow_run(
    ray_cluster: str, data: tuple[str, str], tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    cfg = _config(
        data,
        tmp_path,
        mlflow_server,
        num_workers=2,
        experiment="two-workers",
        ray_address=ray_cluster,
    )
    summary = train_head.run(cfg)

    runs = _runs(mlflow_server, "two-workers")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id == summary["run_id"]
    history = mlflow.MlflowClient(mlflow_server.uri).get_metric_history(run.info.run_id, "val_top1")
    assert sorted(m.step for m in history) == list(range(summary["epochs_run"]))
    assert run.data.params["num_workers"] == "2"
    assert run.data.tags["keeper.embedding_spec"] == "keeper-tiny:random"
    assert "test_trained_head_top1" in run.data.metrics
    assert summary["test"]["trained head"]["n_series"] == summary["series"]["test"]


def test_worker_failure_resumes_with_continuous_epochs(
    ray_cluster: str, data: tuple[str, str], tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    cfg = _config(
        data, tmp_path, mlflow_server, epochs=5, fail_at_epoch=2, max_failures=1,
        experiment="fault-drill", ray_address=ray_cluster,
    )  # fmt: skip
    summary = train_head.run(cfg)

    assert (tmp_path / "ckpt" / summary["run_name"] / "_injected_failure").exists()
    runs = _runs(mlflow_server, "fault-drill")
    assert len(runs) == 1
    history = mlflow.MlflowClient(mlflow_server.uri).get_metric_history(
        runs[0].info.run_id, "val_top1"
    )
    steps = sorted(m.step for m in history)
    assert steps == [0, 1, 2, 3, 4], "epochs must continue from the checkpoint, not restart"
    assert summary["epochs_run"] == 5


def test_s3_checkpoints_and_resume_from_s3(
    ray_cluster: str,
    data: tuple[str, str],
    tmp_path: Path,
    mlflow_server: MlflowServer,
    s3_bucket: str,
) -> None:
    """storage=s3://: Ray Train persists every epoch's checkpoint to the bucket (pyarrow's S3
    filesystem on AWS_ENDPOINT_URL), and a lost worker resumes from the checkpoint in S3."""
    cfg = _config(
        data, tmp_path, mlflow_server, epochs=4, fail_at_epoch=2, max_failures=1,
        storage=f"s3://{s3_bucket}/checkpoints", experiment="s3-storage",
        ray_address=ray_cluster,
    )  # fmt: skip
    summary = train_head.run(cfg)

    prefix = f"s3://{s3_bucket}/checkpoints/{summary['run_name']}"
    files = storage.list_files(prefix)
    assert f"{prefix}/_injected_failure" in files, "the drill's marker lives beside the checkpoints"
    # Checkpoints are checkpoint_*/ folders right under the run (Ray's checkpoint_manager_snapshot
    # .json beside them is not one), each holding the job's state.pt.
    rel = [f.removeprefix(f"{prefix}/").split("/") for f in files]
    ckpts = {p[0] for p in rel if len(p) > 1 and p[0].startswith("checkpoint_")}
    assert len(ckpts) == 2, f"num_to_keep=2 checkpoints in S3, got {sorted(ckpts)}"
    assert all([c, "state.pt"] in rel for c in ckpts), f"a checkpoint without state.pt: {files}"
    runs = _runs(mlflow_server, "s3-storage")
    assert len(runs) == 1
    history = mlflow.MlflowClient(mlflow_server.uri).get_metric_history(
        runs[0].info.run_id, "val_top1"
    )
    assert sorted(m.step for m in history) == [0, 1, 2, 3], "resumed from S3, not restarted"


def test_failure_without_retries_fails_the_job(
    ray_cluster: str, data: tuple[str, str], tmp_path: Path, mlflow_server: MlflowServer
) -> None:
    cfg = _config(
        data, tmp_path, mlflow_server, epochs=3, fail_at_epoch=1, max_failures=0,
        experiment="fault-no-retry", ray_address=ray_cluster,
    )  # fmt: skip
    with pytest.raises(Exception, match="injected failure"):
        train_head.run(cfg)


def test_best_epoch_weights_are_the_model(tmp_path: Path, data: tuple[str, str]) -> None:
    """The saved ranker scores the same as its head on the prepared test series."""
    cfg = TrainHeadConfig(embeddings=data[0], series=data[1], epochs=3, baselines=False)
    prepared = train_head.prepare(cfg)
    model, metrics = train_head.train_single_process(prepared, cfg, "series-softmax")
    ranker = SeriesRanker(prepared.ranker_config, model)
    loaded = SeriesRanker.load(ranker.save(tmp_path / "r"))
    test = prepared.table[prepared.table["split"] == "test"]
    a, b = ranker.rank(test), loaded.rank(test)
    np.testing.assert_allclose(a["score"], b["score"], atol=1e-6)
    picks = a[a["rank"] == 1]
    assert len(picks) == metrics.n_series
