"""The feedback loop's training half, end to end on S3 (moto_server), local Ray and a real
``mlflow server``: decisions written with the core logs -> keeper feedback-export -> keeper
train-head (registered @challenger) -> keeper promote on later, held-out decisions.

The decisions carry a planted signal: in every group the person keeps (or accepts) the image whose
embedding leans towards one fixed direction; the quality features are noise. A head trained on the
export must find it (beat chance on its test split) and pass promote's gate against random.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from conftest import MlflowServer

from keeper_core import storage
from keeper_core.feedback import FeedbackEvent, FeedbackLog, OfferLog
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs import feedback_export, promote, train_head

pytestmark = pytest.mark.integration

NAME = "keeper-feedback-test"
SPEC, DIM, GROUP = "keeper-tiny:random", 64, 4
TRAIN_GROUPS, PAIR_GROUPS, HOLDOUT_GROUPS = 60, 10, 24


def _answers(
    rng: np.random.Generator, direction: np.ndarray, prefix: str, n: int, bucket: str
) -> tuple[list[dict[str, Any]], list[int]]:
    """n pick answers of GROUP images each; the index of the image a person prefers in each."""
    offers, preferred = [], []
    for k in range(n):
        g = rng.normal(size=(GROUP, DIM))
        best = int(rng.integers(GROUP))
        g[best] += 1.5 * np.sqrt(DIM) * direction  # leans towards the direction people like
        emb = g / np.linalg.norm(g, axis=1, keepdims=True)
        q = rng.uniform(0.1, 1.0, size=(GROUP, len(FEATURE_NAMES)))
        q[:, -2:] = (640, 480)  # width, height
        for p in range(GROUP):
            image_id = f"{prefix}{k}-{p}"
            offers.append(
                {
                    "request_id": f"{prefix}{k}",
                    "route": "pick",
                    "client": "app",
                    "model": "sharpness",
                    "model_spec": SPEC,
                    "group_id": "g",
                    "group_size": GROUP,
                    "image_id": image_id,
                    # some came as s3:// URIs, the rest as bytes
                    "image_uri": f"s3://{bucket}/photos/{image_id}.jpg" if k % 3 == 0 else None,
                    "position": p,
                    "rank": p,
                    "score": 0.0,
                    "offered": "candidate",
                    "embedding": emb[p].astype(np.float32).tolist(),
                    "quality": q[p].astype(np.float32).tolist(),
                }
            )
        preferred.append(best)
    return offers, preferred


def _event(request_id: str, image: int, action: str, client: str) -> FeedbackEvent:
    return FeedbackEvent(
        request_id=request_id,
        image_id=f"{request_id}-{image}",
        action=action,
        client=client,
    )


def _keeper_events(
    prefix: str, preferred: list[int], rng: np.random.Generator
) -> list[FeedbackEvent]:
    events = []
    for k, best in enumerate(preferred):
        other = (best + 1 + int(rng.integers(GROUP - 1))) % GROUP
        events += [
            _event(f"{prefix}{k}", other, "rejected", "ann"),
            _event(f"{prefix}{k}", best, "picked-as-keeper", "ann"),
        ]
    return events


def _pair_events(prefix: str, preferred: list[int]) -> list[FeedbackEvent]:
    events = []
    for k, best in enumerate(preferred):
        other = (best + 2) % GROUP
        events += [
            _event(f"{prefix}{k}", best, "accepted", "bob"),
            _event(f"{prefix}{k}", other, "rejected", "bob"),
        ]
    return events


def test_feedback_export_train_head_promote(
    ray_cluster: str,
    mlflow_server: MlflowServer,
    s3_bucket: str,
    tmp_path: Path,
    one_torch_thread: None,
) -> None:
    t0 = time.perf_counter()
    root = f"s3://{s3_bucket}/feedback"
    rng = np.random.default_rng(5)
    direction = rng.normal(size=DIM)
    direction /= np.linalg.norm(direction)

    # Decisions on 60 + 10 answers, then (after `cut`) on 24 more: what promote judges on.
    train_offers, train_best = _answers(rng, direction, "t", TRAIN_GROUPS, s3_bucket)
    pair_offers, pair_best = _answers(rng, direction, "p", PAIR_GROUPS, s3_bucket)
    hold_offers, hold_best = _answers(rng, direction, "h", HOLDOUT_GROUPS, s3_bucket)
    offers = OfferLog(storage.join(root, "offers"), writer="ingress-a")
    offers.append_rows([*train_offers, *pair_offers, *hold_offers], sync=True)
    log = FeedbackLog(storage.join(root, "events"), writer="ingress-a")
    log.append([*_keeper_events("t", train_best, rng), *_pair_events("p", pair_best)], sync=True)
    time.sleep(0.01)
    cut = datetime.now(UTC)
    time.sleep(0.01)
    assert log.append(_keeper_events("h", hold_best, rng), sync=True).durable

    train_out, hold_out = f"s3://{s3_bucket}/fb-train", f"s3://{s3_bucket}/fb-holdout"
    argv = [f"feedback={root}", f"output={train_out}", f"until={cut.isoformat()}"]
    assert feedback_export.main(argv) == 0
    s = feedback_export.FeedbackExportSummary.model_validate_json(
        storage.read_bytes(storage.join(train_out, "_SUMMARY.json"))
    )
    assert (s.series, s.pairs, s.images) == (TRAIN_GROUPS, PAIR_GROUPS, 4 * 60 + 2 * 10)
    assert s.decisions == 2 * (TRAIN_GROUPS + PAIR_GROUPS + HOLDOUT_GROUPS)
    assert s.used == 2 * (TRAIN_GROUPS + PAIR_GROUPS)
    assert s.skipped["outside_window"] == 2 * HOLDOUT_GROUPS
    assert s.used + sum(s.skipped.values()) == s.decisions
    assert not s.finetune_ready  # two thirds of the images came as bytes
    hold = feedback_export.run(
        feedback_export.FeedbackExportConfig(feedback=root, output=hold_out, since=cut)
    )
    assert (hold.series, hold.pairs) == (HOLDOUT_GROUPS, 0)

    trained = train_head.run(
        train_head.TrainHeadConfig(
            embeddings=train_out,
            series=storage.join(train_out, "series.csv"),
            head="mlp",
            hidden=32,
            epochs=10,
            patience=10,
            register=NAME,
            tracking_uri=mlflow_server.uri,
            experiment="keeper-feedback-test",
            storage=str(tmp_path / "ckpt"),
            ray_address=ray_cluster,
            baselines=False,
        )
    )
    assert trained["series_dropped"] == 0
    assert sum(trained["series"].values()) == TRAIN_GROUPS + PAIR_GROUPS
    test = trained["test"]["trained head"]
    assert test["top1"] > test["random_top1"] + 0.2, test
    client = mlflow.MlflowClient(mlflow_server.uri)
    logged = client.get_run(trained["run_id"]).data.metrics
    assert logged["test_trained_head_top1"] == pytest.approx(test["top1"])
    version = trained["registered"]["version"]

    outcome = promote.run(
        promote.PromoteConfig(
            name=NAME,
            embeddings=hold_out,
            series=storage.join(hold_out, "series.csv"),
            tracking_uri=mlflow_server.uri,
        )
    )
    assert (outcome["decision"], outcome["champion"], outcome["gain_vs"]) == (
        "promoted",
        None,
        "random",
    )
    assert outcome["metrics"][f"challenger v{version}"]["n_series"] == HOLDOUT_GROUPS
    tags = client.get_model_version(NAME, version).tags
    assert tags["keeper.promotion.decision"] == "promoted"
    assert "beats random" in tags["keeper.promotion.reason"]
    assert client.get_model_version_by_alias(NAME, "champion").version == version
    judged = outcome["metrics"][f"challenger v{version}"]
    print(
        f"feedback-export -> train-head -> promote: {time.perf_counter() - t0:.1f} s; test top-1 "
        f"{test['top1']:.3f} (random {test['random_top1']:.3f}, {test['n_series']} series), "
        f"holdout top-1 {judged['top1']:.3f} on {judged['n_series']}, gain CI low "
        f"{outcome['gain']['low']:.3f}"
    )
