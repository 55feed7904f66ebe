"""``keeper evaluate`` with several models on a real ``mlflow server`` (S3 artifacts on moto_server):
one table with a row per model (two heads and a fine-tuned ranker), the sharpness rule and random,
a version named twice evaluated once, the training-split warning per model, and a head over
embeddings of another spec refused.

Every expected number comes from the model's own ranker here (``SeriesRanker.rank`` /
``TunedRanker.rank``) and ``series_metrics``, never from evaluate's predictions."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import negated, register_ranker

from keeper_core.finetune import TunedRanker
from keeper_core.heads import HeadConfig
from keeper_core.metrics import SeriesMetrics, format_table, series_metrics
from keeper_core.ranker import QUALITY_INPUTS, RankerConfig, SeriesRanker, fit_standardizer
from keeper_core.synthetic import PHOTOS, generate_corpus
from keeper_core.tower import TowerConfig
from keeper_train import tracking
from keeper_train.data import join_series
from keeper_train.jobs import embed, evaluate

pytestmark = pytest.mark.integration

TINY = "keeper-tiny:random"
NAME = "keeper-evaluate-many"
EXPERIMENT = "keeper-evaluate-many-test"
QUALITY = list(QUALITY_INPUTS)
N_SERIES = 16


@dataclass
class Model:
    version: str
    expected: SeriesMetrics  # series metrics of the ranker's own scores here

    @property
    def uri(self) -> str:
        return f"models:/{NAME}/{self.version}"

    @property
    def label(self) -> str:
        return f"{NAME} v{self.version}"


@dataclass
class Setup:
    uri: str  # tracking URI
    manifest: str
    embeddings: str
    rows: pd.DataFrame
    head: Model  # MLP over embedding + quality, random weights
    reversed: Model  # the same head negated: every series' order reversed
    tuned: Model  # LoRA on keeper-tiny + a linear head over its own embedding
    other_spec: Model  # a head over embeddings of another ModelSpec
    sharpness: SeriesMetrics
    split: tuple[int, int, int]  # series of the reversed head's recorded split: all, train, val

    def data_args(self) -> list[str]:
        return ["--embeddings", self.embeddings, "--series", self.manifest]


def _metrics(rows: pd.DataFrame, scores: np.ndarray) -> SeriesMetrics:
    groups = [g.index.to_numpy() for _, g in rows.groupby("series_id", sort=True)]
    best = [int(np.argmax(rows["is_best"].to_numpy()[g])) for g in groups]
    return series_metrics([np.asarray(scores, np.float64)[g] for g in groups], best)


@pytest.fixture(scope="module")
def setup(ray_cluster: str, mlflow_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Setup:
    d = tmp_path_factory.mktemp("evaluate-many")
    manifest = str(
        generate_corpus(
            d / "corpus", n_series=N_SERIES, seed=31, image_size=(96, 72), photos=PHOTOS
        )
    )
    emb = str(d / "emb")
    embed.run(embed.EmbedConfig(input=manifest, output=emb, batch_size=16, ray_address=ray_cluster))
    rows = join_series(emb, manifest)[0]
    uri = mlflow_server.uri

    # Two heads with random weights, one the other reversed.
    mean, std = fit_standardizer(rows[QUALITY].to_numpy())
    torch.manual_seed(0)
    head = SeriesRanker(
        RankerConfig(
            head=HeadConfig(kind="mlp", in_dim=64 + len(QUALITY), hidden=32, layers=1),
            features="embedding+quality", embedding_spec=TINY, embed_dim=64,
            quality_names=QUALITY, quality_mean=mean, quality_std=std,
        )
    )  # fmt: skip
    backwards = negated(head)
    models = {}
    for key, ranker in (("head", head), ("reversed", backwards)):
        version = register_ranker(uri, NAME, ranker, rows, d / key, EXPERIMENT)
        models[key] = Model(version, _metrics(rows, ranker.rank(rows)["score"].to_numpy()))

    # A fine-tuned ranker: its LoRA moved off zero so its tower is not the base's.
    tuned = TunedRanker.build(
        RankerConfig(
            head=HeadConfig(kind="linear", in_dim=64), features="embedding",
            embedding_spec="unsaved", embed_dim=64,
            tower=TowerConfig(base_spec=TINY, method="lora", rank=4),
        ),
        device="cpu", seed=3,
    )  # fmt: skip
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in tuned.parts.lora.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = tuned.save(d / "tuned")
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    with mlflow.start_run(experiment_id=tracking.experiment_id(client, EXPERIMENT, d)) as run:
        info = tracking.log_ranker(folder, rows[["series_id", "image_uri"]].head(4))
        version = tracking.register(client, info.model_uri, NAME, run.info.run_id)
    scores = tuned.rank(rows[["series_id", "image_uri"]])["score"].to_numpy()
    models["tuned"] = Model(version, _metrics(rows, scores))

    bad = SeriesRanker(
        RankerConfig(
            head=HeadConfig(kind="linear", in_dim=64), features="embedding",
            embedding_spec="keeper-other:random", embed_dim=64,
        )
    )  # fmt: skip
    version = register_ranker(uri, NAME, bad, rows, d / "bad", EXPERIMENT)
    models["other_spec"] = Model(version, models["head"].expected)  # never scored

    # The reversed head's run records a split: 3 of these series as train, 2 as val.
    ids = sorted(rows["series_id"].unique())
    split = rows[rows["series_id"].isin(ids[:5])][["series_id", "image_uri"]].copy()
    split["split"] = np.where(split["series_id"].isin(ids[:3]), "train", "val")
    split.to_csv(d / tracking.SPLIT_ARTIFACT, index=False)
    run_id = client.get_model_version(NAME, models["reversed"].version).run_id
    client.log_artifact(run_id, str(d / tracking.SPLIT_ARTIFACT))
    client.set_registered_model_alias(NAME, "many", models["head"].version)

    sharp = _metrics(rows, rows["sharpness"].to_numpy(dtype=np.float64))
    return Setup(uri, manifest, emb, rows, **models, sharpness=sharp, split=(5, 3, 2))


def _title(m: Model, what: str) -> str:
    return f"{m.label} ({what})"


def test_one_table_for_three_models(setup: Setup) -> None:
    s = setup
    head, back, tuned = s.head, s.reversed, s.tuned
    # The metrics differ, so a row given another model's numbers would be caught.
    assert len({json.dumps(m.expected.as_dict()) for m in (head, back, tuned)}) == 3

    alias = f"models:/{NAME}@many"
    summary = evaluate.run(
        evaluate.EvaluateConfig(
            model=[alias, back.uri, tuned.uri, head.uri], embeddings=s.embeddings,
            series=s.manifest, tracking_uri=s.uri,
        )
    )  # fmt: skip

    models = summary["models"]
    assert [m["label"] for m in models] == [head.label, back.label, tuned.label]
    assert [m["uris"] for m in models] == [[alias, head.uri], [back.uri], [tuned.uri]]
    assert [m["kind"] for m in models] == ["head", "head", "fine-tuned"]
    assert (models[2]["method"], models[2]["base_spec"]) == ("lora", TINY)
    assert summary["model"]["loaded"] == head.uri  # the first model, alias resolved
    assert summary["series_scored"] == N_SERIES
    for m, want in zip(models, (head, back, tuned), strict=True):
        assert m["metrics"] == pytest.approx(want.expected.as_dict())
        assert summary["metrics"][want.label] == pytest.approx(want.expected.as_dict())
    assert summary["metrics"][evaluate.SHARPNESS] == pytest.approx(s.sharpness.as_dict())

    expected_table = format_table(
        {
            _title(head, "mlp, embedding+quality"): head.expected,
            _title(back, "mlp, embedding+quality"): back.expected,
            _title(tuned, "fine-tuned lora, embedding"): tuned.expected,
            "sharpness rule": s.sharpness,
        }
    )
    assert summary["table"] == expected_table
    lines = summary["table"].splitlines()
    assert len(lines) == 2 + 3 + 2  # header, rule, three models, sharpness, one shared random
    assert [line.split("  ")[0] for line in lines[-2:]] == ["sharpness rule", "random"]

    # Only the reversed head's run recorded a split that overlaps these series.
    everything, train, val = s.split
    warning = (
        f"{everything} of {N_SERIES} series ({train} with train images, {val} with val images) "
        f"share images with {back.label}'s training split: these numbers are not held-out figures"
    )
    assert [m["warnings"] for m in models] == [[], [warning], []]
    assert [m["series_seen_in_training"] for m in models] == [None, everything, None]
    assert summary["warnings"] == [warning]
    assert summary["series_seen_in_training"] is None  # the first model's


def test_main_prints_the_table_writes_json_and_report_and_refuses_another_spec(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup
    head, tuned = s.head, s.tuned
    out, html = tmp_path / "e.json", tmp_path / "e.html"
    argv = ["--model", head.uri, "--model", tuned.uri, *s.data_args(), "--tracking-uri", s.uri]
    capsys.readouterr()
    assert evaluate.main([*argv, "--json", str(out), "--html", str(html)]) == 0
    printed = capsys.readouterr().out
    table = format_table(
        {
            _title(head, "mlp, embedding+quality"): head.expected,
            _title(tuned, "fine-tuned lora, embedding"): tuned.expected,
            "sharpness rule": s.sharpness,
        }
    )
    assert table in printed
    assert f"{head.uri} -> {NAME} version {head.version}" in printed
    assert f"{tuned.label}: fine-tuned ranker (lora on {TINY}): embeds the images" in printed

    result = json.loads(out.read_text())
    assert [m["label"] for m in result["models"]] == [head.label, tuned.label]
    assert [m["title"] for m in result["models"]] == [
        _title(head, "mlp, embedding+quality"),
        _title(tuned, "fine-tuned lora, embedding"),
    ]
    assert result["models"][1]["metrics"] == pytest.approx(tuned.expected.as_dict())

    # The report shows every model's pick: a blue tag per series where it picked the keeper.
    page = html.read_text()
    assert page.count("class='series'") == N_SERIES
    for label, m in ((head.label, head.expected), (tuned.label, tuned.expected)):
        assert page.count(f"<span class='tag pick'>{label}</span>") == round(m.top1 * N_SERIES)
    assert page.count(f"<span class='tag pick'>{evaluate.SHARPNESS}</span>") == round(
        s.sharpness.top1 * N_SERIES
    )

    # A head over embeddings of another spec is refused, whichever models come with it.
    bad = [
        "--model",
        head.uri,
        "--model",
        s.other_spec.uri,
        *s.data_args(),
        "--tracking-uri",
        s.uri,
    ]
    assert evaluate.main(bad) == 2
    err = capsys.readouterr().err
    assert f"{s.other_spec.label} was trained on 'keeper-other:random'" in err
    assert "specs never mix" in err
