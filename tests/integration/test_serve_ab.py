"""The A/B split over real HTTP on the session's local Ray: champion and challenger registered in a
sqlite MLflow store (two tiny heads, the challenger the champion reversed), ``ab.share`` 0.5,
feedback and offers logged under a local root.

40 clients each get the arm ``keeper_core.ab.assign`` gives their ``X-Keeper-Client``, answered
by that arm's version; one client asking 5 times always gets the same arm; the offers log names
the arm and the registered version of every answer; and ``ab_report`` over the offers and the
people's picks counts every answer on its arm.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import negated, register_ranker
from PIL import Image
from support import small_app_overrides
from test_serve import call

from keeper_core import storage
from keeper_core.ab import ab_report, assign
from keeper_core.errors import StorageError
from keeper_core.feedback import read_feedback, read_offers
from keeper_core.heads import HeadConfig
from keeper_core.ranker import RankerConfig, SeriesRanker
from keeper_core.synthetic import PHOTOS, load_photos

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]

SPEC = "keeper-tiny:random"
NAME = "keeper-ranker-ab"
TOKEN = "ab-test-token-" + "x" * 24
SALT = "ab-test-salt"
SHARE = 0.5


@dataclass
class Setup:
    url: str
    root: str  # the feedback root
    champion: str  # version
    challenger: str
    series: list[dict[str, str]]  # one series of base64 JPEGs, sent in every /v1/rank


def _jpeg(im: Image.Image) -> dict[str, str]:
    buf = io.BytesIO()
    im.resize((96, 72)).save(buf, "JPEG", quality=90)
    return {"b64": base64.b64encode(buf.getvalue()).decode()}


@pytest.fixture(scope="module")
def ab_app(
    shared_serve: int, ray_cluster: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Setup]:
    from keeper_serve import local

    d = tmp_path_factory.mktemp("serve-ab")
    uri = f"sqlite:///{d / 'mlflow.db'}"
    # A linear head over keeper-tiny's 64-d embeddings (random weights), and the same reversed:
    # the two arms rank every series in opposite orders.
    torch.manual_seed(0)
    champion = SeriesRanker(
        RankerConfig(
            head=HeadConfig(kind="linear", in_dim=64), features="embedding",
            embedding_spec=SPEC, embed_dim=64,
        )
    )  # fmt: skip
    rng = np.random.default_rng(0)
    rows = pd.DataFrame(
        {
            "series_id": ["s0"] * 4 + ["s1"] * 4,
            "image_uri": [f"img-{i}.jpg" for i in range(8)],
            "embedding": list(rng.normal(size=(8, 64)).astype(np.float32)),
        }
    )
    v1 = register_ranker(uri, NAME, champion, rows, d / "champion", "serve-ab")
    v2 = register_ranker(uri, NAME, negated(champion), rows, d / "challenger", "serve-ab")
    import mlflow

    mlflow.MlflowClient(uri).set_registered_model_alias(NAME, "champion", v1)  # v2: @challenger
    (d / "token").write_text(TOKEN)
    root = str(d / "feedback")
    overrides = small_app_overrides(
        d,
        SPEC,
        **{
            "tracking_uri": uri,
            "ranker.model_uri": f"models:/{NAME}@champion",
            "ab": {"share": SHARE, "salt": SALT, "model_uri": f"models:/{NAME}@challenger"},
            "feedback": {"root": root, "max_age_s": 1.0, "online_poll_s": 1.0},
            "deployments.ChallengerRanker.ray_actor_options.num_cpus": 0.1,
            "deployments.ChallengerRanker.num_replicas": 1,
        },
    )
    warned = _Caught()
    logging.getLogger("keeper.serve").addHandler(warned)
    try:
        url = local.start(overrides=overrides, port=shared_serve, wait_s=240)
    finally:
        logging.getLogger("keeper.serve").removeHandler(warned)
    try:  # from here on Serve runs: whatever fails, the next module must not find it up
        # the challenger's block sets no memory (nor can OnlineFigures have one in the packaged
        # config): keeper serve names both (Ray packs them by CPU alone)
        assert any(
            "deployments ChallengerRanker, OnlineFigures reserve no memory" in m
            for m in warned.messages
        ), warned.messages
        series = [_jpeg(im) for im in load_photos(PHOTOS[:3]).values()]
        yield Setup(url, root, v1, v2, series)
    finally:
        local.shutdown()


class _Caught(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def post(url: str, path: str, body: Any, headers: dict[str, str] | None = None) -> Any:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    h = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}", **(headers or {})}
    try:
        conn.request("POST", path, body=json.dumps(body), headers=h)
        r = conn.getresponse()
        text = r.read()
        assert r.status == 200, (path, r.status, text[:500])
        return json.loads(text)
    finally:
        conn.close()


def wait_until(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def offers(root: str) -> list[dict[str, Any]]:
    try:
        return list(read_offers(storage.join(root, "offers")).to_pylist())
    except StorageError:  # nothing written yet
        return []


def test_the_split_follows_the_client_and_is_logged(ab_app: Setup) -> None:
    body = {"series": [{"id": "s0", "images": ab_app.series}]}
    version = {"champion": ab_app.champion, "challenger": ab_app.challenger}
    answers: dict[str, dict[str, Any]] = {}  # request_id -> answer
    arms = {}
    for i in range(40):
        key = f"ab-client-{i}"
        a = post(ab_app.url, "/v1/rank", body, {"X-Keeper-Client": key})
        assert a["arm"] == assign(key, SHARE, SALT), (key, a["arm"])
        assert (a["model"]["name"], a["model"]["version"]) == (NAME, version[a["arm"]])
        assert a["model"]["alias"] == a["arm"]
        answers[a["request_id"]], arms[key] = a, a["arm"]
    k = sum(arm == "challenger" for arm in arms.values())
    assert abs(k - 20) <= 10, k
    # The challenger is the champion reversed: the arms' keepers differ.
    keeper = {a["arm"]: a["series"][0]["keeper_index"] for a in answers.values()}
    assert keeper["champion"] != keeper["challenger"], keeper

    repeat = "ab-client-repeat"
    for _ in range(5):
        a = post(ab_app.url, "/v1/rank", body, {"X-Keeper-Client": repeat})
        assert a["arm"] == assign(repeat, SHARE, SALT)
        answers[a["request_id"]] = a
    assert len(answers) == 45
    models = call(ab_app.url, "GET", "/v1/models", token=TOKEN).body
    assert models["ab"] == {"share": SHARE, "salt": SALT}
    assert (models["ranker"]["version"], models["challenger"]["version"]) == (
        version["champion"], version["challenger"],
    )  # fmt: skip

    # The offers log: every image of every answer, with its arm and the version that ranked.
    wait_until(lambda: {r["request_id"] for r in offers(ab_app.root)} >= set(answers), 30, "offers")
    rows = [r for r in offers(ab_app.root) if r["request_id"] in answers]
    assert len(rows) == 45 * len(ab_app.series)
    for r in rows:
        arm = answers[r["request_id"]]["arm"]
        assert (r["arm"], r["model"], r["route"]) == (
            arm, f"models:/{NAME}/{version[arm]}", "rank",
        )  # fmt: skip

    # People pick each answer's keeper: every arm's online top-1 is then 1.
    picks = [
        {"request_id": r["request_id"], "image_id": r["image_id"], "action": "picked-as-keeper"}
        for r in rows
        if r["offered"] == "keeper"
    ]
    assert len(picks) == 45
    fb = post(ab_app.url, "/v1/feedback", {"events": picks, "sync": True})
    assert (fb["accepted"], fb["durable"]) == (45, True), fb
    report = ab_report(
        read_offers(storage.join(ab_app.root, "offers")),
        read_feedback(storage.join(ab_app.root, "events")),
    )
    per_arm = {arm: f.answers for arm, f in report.arms.items()}
    assert sum(per_arm.values()) == 45, per_arm
    assert per_arm["challenger"] == k + 5 * (assign(repeat, SHARE, SALT) == "challenger")
    assert min(per_arm.values()) > 0, per_arm
    assert (report.decisions, report.unmatched) == (45, 0)
    for arm, f in report.arms.items():
        assert f.models == [f"models:/{NAME}/{version[arm]}"]
        assert (f.online_top1.k, f.online_top1.n) == (f.answers, f.answers)

    # OnlineFigures reads the same logs: /v1/models (and its gauges) show the same figures.
    def online() -> dict[tuple[str, str], dict[str, Any]]:
        info = call(ab_app.url, "GET", "/v1/models", token=TOKEN).body["online"]
        return {(f["arm"], f["model"]): f for f in info["figures"]}

    def caught_up() -> bool:
        got = online()
        return all(
            (arm, "*") in got and got[(arm, "*")]["online_top1"]["n"] == n
            for arm, n in per_arm.items()
        )

    wait_until(caught_up, 30, "OnlineFigures to count every decision")
    got = online()
    for arm in per_arm:
        model = f"models:/{NAME}/{version[arm]}"
        for key in ((arm, "*"), (arm, model)):
            assert got[key]["answers"] == per_arm[arm], (key, got[key])
            assert got[key]["online_top1"]["value"] == 1.0, (key, got[key])
