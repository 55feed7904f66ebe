"""A fine-tuned champion served beside head-over-embedding versions, over real HTTP.

The session's `mlflow server` holds three versions of one registered ranker, logged and
registered as `keeper train-head` / `keeper finetune` do (keeper_train.tracking):

- v1: a fine-tuned ranker (keeper-tiny:random tower, last-blocks+lora, its trainable tensors
  perturbed so the tuned tower is not the base), @champion when the app starts;
- v2: an MLP head over keeper-tiny:random embeddings;
- v3: a fine-tuned ranker whose base (ViT-S-32-alt, 224 px) prepares images differently from the
  served CLIP model (64 px): the replica must refuse it and keep serving v1.

The app is the packaged Serve config with small CPU shares and a 0.5 s registry poll; moving the
alias must switch the kind of ranker with no failed request.
"""

from __future__ import annotations

import base64
import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from keeper_core.embedding import ClipEmbedder
from keeper_core.finetune import TunedRanker
from keeper_core.heads import HeadConfig
from keeper_core.models import embed_dim
from keeper_core.preparation import ImagePreparation
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import QUALITY_INPUTS, RankerConfig, SeriesRanker, fit_standardizer
from keeper_core.synthetic import generate_corpus
from keeper_core.tower import TowerConfig

pytestmark = pytest.mark.integration

NAME = "keeper-ranker-serve-tuned"
SPEC = "keeper-tiny:random"
OTHER_BASE = "ViT-S-32-alt:random"  # an open_clip config every process knows: 224 px, not 64
TOKEN = "serve-tuned-token-" + "x" * 24
Q_COLS = [FEATURE_NAMES.index(n) for n in QUALITY_INPUTS]


# ----------------------------------------------------------------------------- fixtures


@dataclass
class Versions:
    uri: str
    series: list[list[bytes]]  # the request's series: encoded JPEGs
    tuned: TunedRanker  # v1, as trained (before the registry round trip)
    head: SeriesRanker  # v2
    pixels: np.ndarray  # the request's images as keeper embed prepares them, end to end
    quality: np.ndarray  # (N, FEATURE_NAMES) raw
    embeddings: np.ndarray  # keeper-tiny:random's, of ``pixels``


def ranker_config(base: str, quality: np.ndarray) -> RankerConfig:
    mean, std = fit_standardizer(quality[:, Q_COLS])
    dim = embed_dim(base)
    return RankerConfig(
        head=HeadConfig(kind="mlp", in_dim=dim + len(QUALITY_INPUTS), hidden=16, layers=1),
        features="embedding+quality",
        embedding_spec=base,  # the tuned tower's id once saved
        embed_dim=dim,
        quality_names=list(QUALITY_INPUTS),
        quality_mean=mean,
        quality_std=std,
        tower=TowerConfig(base_spec=base, method="last-blocks+lora", unfreeze_blocks=1, rank=4),
    )


def tuned_ranker(base: str, quality: np.ndarray, seed: int) -> TunedRanker:
    """A fine-tuned ranker whose adapter and unfrozen block moved away from the base."""
    ranker = TunedRanker.build(ranker_config(base, quality), device="cpu", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA's B starts at zero: without this the adapter does nothing
        for p in [*ranker.parts.lora.values(), *ranker.parts.backbone.values()]:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return ranker


def log_and_register(uri: str, folder: Path, example: pd.DataFrame, experiment: str) -> str:
    """Log a saved ranker folder as train-head does and register it: the new version."""
    from keeper_train import tracking

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = tracking.experiment_id(client, experiment, folder.parent)
    with mlflow.start_run(experiment_id=exp) as run:
        info = tracking.log_ranker(folder, example)
        return str(tracking.register(client, info.model_uri, NAME, run.info.run_id))


@pytest.fixture(scope="module")
def versions(
    ray_cluster: str, mlflow_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Versions:
    d = tmp_path_factory.mktemp("serve-tuned")
    manifest = pd.read_csv(generate_corpus(d / "corpus", n_series=2, seed=11, max_shots=3))
    # Each series' shots together: the order /v1/rank lays them end to end.
    manifest = manifest.sort_values("series_id", kind="stable").reset_index(drop=True)
    blobs = [Path(u).read_bytes() for u in manifest["image_uri"]]
    prep = ImagePreparation(SPEC)
    decoded = [prep.decode(b) for b in blobs]
    pixels, quality = prep.pixels(decoded), prep.quality(decoded)
    embeddings = ClipEmbedder(SPEC, device="cpu").embed_pixels(pixels)
    series = [
        [blobs[i] for i in idx] for idx in manifest.groupby("series_id", sort=True).indices.values()
    ]

    rows = manifest[["series_id", "image_uri"]].copy()
    for j, name in enumerate(FEATURE_NAMES):
        rows[name] = quality[:, j]
    uri = mlflow_server.uri
    tuned = tuned_ranker(SPEC, quality, seed=1)
    example = rows[["series_id", "image_uri", *QUALITY_INPUTS]]
    v1 = log_and_register(uri, tuned.save(d / "tuned"), example, "serve-tuned-test")
    mlflow.MlflowClient(uri).set_registered_model_alias(NAME, "champion", v1)

    torch.manual_seed(2)  # the head's random init
    head = SeriesRanker(ranker_config(SPEC, quality).model_copy(update={"tower": None}))
    head_rows = rows.assign(embedding=list(embeddings))
    v2 = log_and_register(
        uri, head.save(d / "head"), head_rows[["series_id", "image_uri", "embedding",
                                               *QUALITY_INPUTS]], "serve-tuned-test",
    )  # fmt: skip

    other = tuned_ranker(OTHER_BASE, quality, seed=3)
    v3 = log_and_register(uri, other.save(d / "other"), example, "serve-tuned-test")
    assert (v1, v2, v3) == ("1", "2", "3")
    return Versions(uri, series, tuned, head, pixels, quality, embeddings)


@pytest.fixture(scope="module")
def app(
    shared_serve: int, versions: Versions, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    from keeper_serve import local

    token_file = tmp_path_factory.mktemp("serve-tuned-token") / "token"
    token_file.write_text(TOKEN)
    overrides = {
        "clip_model": SPEC,
        "tracking_uri": versions.uri,
        "ranker.model_uri": f"models:/{NAME}@champion",
        "ranker.poll_s": 0.5,
        "auth.token_file": str(token_file),
        "deployments.KeeperIngress.ray_actor_options.num_cpus": 0.25,
        "deployments.KeeperIngress.autoscaling_config.max_replicas": 1,
        "deployments.SeriesRanker.ray_actor_options.num_cpus": 0.5,
        "deployments.SeriesRanker.autoscaling_config.max_replicas": 1,
        "deployments.ClipEncoder.ray_actor_options.num_cpus": 0.5,
        "deployments.ClipEncoder.autoscaling_config.max_replicas": 1,
    }
    url = local.start(overrides=overrides, port=shared_serve, wait_s=240)
    try:
        yield url
    finally:
        local.shutdown()


# ----------------------------------------------------------------------------- client


@dataclass
class Reply:
    status: int
    body: dict[str, Any]


def call(url: str, method: str, path: str, body: Any = None) -> Reply:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port.split("/")[0]), timeout=60)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers=headers)  # fmt: skip
        r = conn.getresponse()
        return Reply(r.status, json.loads(r.read() or b"{}"))
    finally:
        conn.close()


def rank_body(v: Versions) -> dict[str, Any]:
    return {
        "series": [
            {"id": f"s{i}", "images": [{"b64": base64.b64encode(b).decode()} for b in s]}
            for i, s in enumerate(v.series)
        ]
    }


def lengths(v: Versions) -> list[int]:
    return [len(s) for s in v.series]


def expected_tuned(v: Versions) -> list[np.ndarray]:
    """v1's scores, in this process, on pixels prepared as keeper embed prepares them."""
    return v.tuned.score(v.pixels, v.quality[:, Q_COLS], lengths(v))


def expected_head(v: Versions) -> list[np.ndarray]:
    ids = np.repeat(np.arange(len(v.series)), lengths(v)).astype(str)
    table = pd.DataFrame({"series_id": ids, "embedding": list(v.embeddings)})
    for j, name in enumerate(FEATURE_NAMES):
        table[name] = v.quality[:, j]
    score = v.head.rank(table)["score"].to_numpy()
    return np.split(score, np.cumsum(lengths(v))[:-1])


def assert_scores(reply: Reply, want: list[np.ndarray]) -> None:
    assert reply.status == 200, reply
    for got, w in zip(reply.body["series"], want, strict=True):
        np.testing.assert_allclose(got["scores"], w, atol=1e-4)
        assert got["keeper_index"] == int(np.argmax(w))


def rank_until(app: str, v: Versions, version: str, tries: int = 120) -> list[Reply]:
    """POST /v1/rank until ``version`` answers (at most ``tries`` requests); every reply."""
    replies = []
    for _ in range(tries):
        replies.append(call(app, "POST", "/v1/rank", rank_body(v)))
        r = replies[-1]
        if r.status == 200 and r.body["model"]["version"] == version:
            break
        time.sleep(0.25)
    return replies


def set_champion(v: Versions, version: str) -> None:
    mlflow.MlflowClient(v.uri).set_registered_model_alias(NAME, "champion", version)


# ----------------------------------------------------------------------------- tests


def test_fine_tuned_champion_ranks_from_pixels_over_http(app: str, versions: Versions) -> None:
    v = versions
    base = ClipEmbedder(SPEC, device="cpu").embed_pixels(v.pixels)
    assert not np.allclose(v.tuned.embed_pixels(v.pixels), base, atol=1e-3), "a trivial tuning"

    models = call(app, "GET", "/v1/models").body["ranker"]
    assert models["status"] == "ready", models
    assert (models["version"], models["kind"], models["method"], models["base_spec"]) == (
        "1", "fine-tuned", "last-blocks+lora", SPEC,
    )  # fmt: skip
    r = call(app, "POST", "/v1/rank", rank_body(v))
    model = r.body["model"]
    assert (model["version"], model["kind"], model["method"], model["base_spec"]) == (
        "1", "fine-tuned", "last-blocks+lora", SPEC,
    )  # fmt: skip
    assert model["clip_model"] == SPEC
    assert_scores(r, expected_tuned(v))

    images = [{"b64": base64.b64encode(b).decode()} for s in v.series for b in s]
    pick = call(app, "POST", "/v1/pick", {"images": images})
    assert pick.status == 200, pick
    ranker = pick.body["ranker"]
    assert (ranker["kind"], ranker["version"], ranker["model_kind"], ranker["base_spec"]) == (
        "model", "1", "fine-tuned", SPEC,
    )  # fmt: skip


def test_promotion_switches_between_kinds_with_no_failed_request(
    app: str, versions: Versions
) -> None:
    v = versions
    set_champion(v, "2")
    replies = rank_until(app, v, "2")
    assert [r.status for r in replies] == [200] * len(replies), replies[-1]
    last = replies[-1].body["model"]
    assert (last["version"], last["kind"], last["method"], last["base_spec"]) == (
        "2", "head", None, None,
    )  # fmt: skip
    assert_scores(replies[-1], expected_head(v))
    assert call(app, "GET", "/v1/models").body["ranker"]["kind"] == "head"

    set_champion(v, "1")
    replies = rank_until(app, v, "1")
    assert [r.status for r in replies] == [200] * len(replies), replies[-1]
    assert replies[-1].body["model"]["kind"] == "fine-tuned"
    assert_scores(replies[-1], expected_tuned(v))


def test_fine_tuned_base_with_other_preprocessing_is_refused(app: str, versions: Versions) -> None:
    v = versions
    before = call(app, "GET", "/v1/models").body["ranker"]
    assert (before["version"], before["error"]) == ("1", None), before
    set_champion(v, "3")
    try:
        info: dict[str, Any] = {}
        for _ in range(120):  # bounded: the replica polls every 0.5 s
            r = call(app, "POST", "/v1/rank", rank_body(v))
            assert r.status == 200, r
            assert (r.body["model"]["version"], r.body["model"]["kind"]) == ("1", "fine-tuned")
            info = call(app, "GET", "/v1/models").body["ranker"]
            if "prepares images" in (info["error"] or ""):
                break
            time.sleep(0.25)
        assert "prepares images" in (info["error"] or ""), info
        assert (info["status"], info["version"]) == ("ready", "1")
        assert OTHER_BASE in info["error"]
        assert_scores(call(app, "POST", "/v1/rank", rank_body(v)), expected_tuned(v))
    finally:
        set_champion(v, "1")
