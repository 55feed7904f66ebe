"""Ray Train + MLflow: two data-parallel workers, one MLflow run; a worker lost mid-training
resumes from the last checkpoint and the run's epochs stay continuous."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
from conftest import MlflowServer

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
