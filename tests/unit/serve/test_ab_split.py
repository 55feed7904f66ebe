"""The serving side of the A/B split (args.ab): its config, the key an arm is assigned by, the
bound app's ChallengerRanker, and the ingress routes with fake handles (no Ray started).

``keeper_core.ab.assign`` itself is tested in tests/unit/core; here: what the ingress feeds it
(``X-Keeper-Client``, else the request id), and what it does with the arm (which handle ranks,
the challenger's fallback to the champion, the answer's ``arm``, the metrics).
"""

from __future__ import annotations

import base64
import io
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError
from serve_fakes import Recorder, Remote, ingress_class

from keeper_core.ab import assign
from keeper_serve import api
from keeper_serve.config import CHALLENGER, ABArgs, KeeperAppArgs, LimitArgs, RankerArgs

SPEC = "keeper-tiny:random"
TOKEN = "ab-split-token-" + "x" * 20
AUTH = {"Authorization": f"Bearer {TOKEN}"}
LIMITS = LimitArgs(max_request_bytes=2_000_000, max_image_bytes=1_000_000, max_images=8)


# ---------------------------------------------------------------------------- ABArgs


@pytest.mark.parametrize("share", [-0.01, 1.01, float("nan")])
def test_share_outside_zero_one_is_refused(share: float) -> None:
    with pytest.raises(ValidationError, match="share"):
        ABArgs(share=share)


@pytest.mark.parametrize("share", [0.0, 0.5, 1.0])
def test_share_at_and_inside_the_bounds_is_taken(share: float) -> None:
    ab = ABArgs(share=share)
    assert (ab.share, ab.salt, ab.model_uri) == (
        share,
        "keeper-ab",
        "models:/keeper-ranker@challenger",
    )


def test_ab_needs_a_share_and_knows_its_keys() -> None:
    with pytest.raises(ValidationError, match="share"):
        ABArgs.model_validate({})
    with pytest.raises(ValidationError, match="shares"):
        ABArgs.model_validate({"share": 0.1, "shares": 0.2})
    with pytest.raises(ValidationError, match="salt"):
        ABArgs(share=0.1, salt="")


def test_ab_without_a_champion_is_a_config_error() -> None:
    with pytest.raises(ValidationError, match=r"ranker\.model_uri is null"):
        KeeperAppArgs.model_validate({"ranker": {"model_uri": None}, "ab": {"share": 0.5}})
    args = KeeperAppArgs.model_validate({"ab": {"share": 0.5}})  # the default champion
    assert args.ab == ABArgs(share=0.5)
    assert KeeperAppArgs().ab is None


def test_the_challengers_ranker_args_follow_ab_model_uri() -> None:
    champion = RankerArgs(model_uri="models:/r@champion", poll_s=2.0)
    ab = ABArgs(share=0.2, model_uri="models:/r@candidate", poll_s=7.0)
    assert ab.ranker_args(champion) == RankerArgs(model_uri="models:/r@candidate", poll_s=7.0)
    assert champion.model_uri == "models:/r@champion"  # a copy, not the champion's edited


# ---------------------------------------------------------------------------- the arm's key


def test_the_key_is_the_client_when_named_else_the_request_id() -> None:
    assert api.ab_key("app-user-7", "req-1") == "app-user-7"
    assert api.ab_key(None, "req-1") == "req-1"
    assert api.ab_arm(None, "app-user-7", "req-1") is None  # no A/B: no arm


def test_assignment_over_2000_clients_matches_the_share_and_sticks() -> None:
    ab = ABArgs(share=0.3, salt="exp-1")
    clients = [f"client-{i}" for i in range(2000)]
    arms = [api.ab_arm(ab, c, f"req-{i}") for i, c in enumerate(clients)]
    k = arms.count("challenger")
    # Binomial(2000, 0.3): sd 20.5; 4.4 sd either side.
    assert abs(k - 600) <= 90, k
    assert set(arms) == {"champion", "challenger"}
    # Sticky: the same client on any later request id gets the same arm ...
    assert arms == [api.ab_arm(ab, c, f"other-{i}") for i, c in enumerate(clients)]
    assert arms == [assign(c, 0.3, "exp-1") for c in clients]
    # ... and a new salt is a new experiment: clients reshuffled.
    reshuffled = [api.ab_arm(ABArgs(share=0.3, salt="exp-2"), c, "r") for c in clients]
    assert reshuffled != arms


def test_without_a_client_each_request_draws_anew() -> None:
    ab = ABArgs(share=0.5)
    arms = {api.ab_arm(ab, None, f"req-{i}") for i in range(64)}
    assert arms == {"champion", "challenger"}
    assert {api.ab_arm(ab, "one-client", f"req-{i}") for i in range(64)} == {
        assign("one-client", 0.5)
    }


def test_share_zero_and_one_send_everyone_one_way() -> None:
    keys = [f"c{i}" for i in range(200)]
    assert {api.ab_arm(ABArgs(share=0.0), k, "r") for k in keys} == {"champion"}
    assert {api.ab_arm(ABArgs(share=1.0), k, "r") for k in keys} == {"challenger"}


# ---------------------------------------------------------------------------- app.bind


def test_bind_with_ab_adds_the_challenger_ranker() -> None:
    import ray

    from keeper_serve import app

    was_up = ray.is_initialized()
    args = KeeperAppArgs.model_validate(
        {"ab": {"share": 0.25, "model_uri": "models:/r@challenger", "poll_s": 3.0}}
    )
    bound = app.bind(args, options={CHALLENGER: {"ray_actor_options": {"num_cpus": 0.1}}})
    ingress = bound._bound_deployment
    challenger = ingress.init_kwargs["challenger"]._bound_deployment
    champion = ingress.init_args[1]._bound_deployment
    assert (challenger.name, champion.name) == (CHALLENGER, "SeriesRanker")
    assert challenger.func_or_class is champion.func_or_class  # the same deployment class
    assert challenger.init_args[0] == RankerArgs(model_uri="models:/r@challenger", poll_s=3.0)
    assert champion.init_args[0] == args.ranker
    assert challenger.init_args[1:] == champion.init_args[1:]  # clip model, tracking, data dir
    assert challenger.ray_actor_options["num_cpus"] == 0.1
    assert CHALLENGER in app.OPTIONAL_DEPLOYMENTS
    assert ray.is_initialized() == was_up, "bind must not start Ray"


def test_bind_without_ab_has_no_challenger_and_refuses_its_options() -> None:
    from keeper_serve import app

    bound = app.bind(KeeperAppArgs())
    assert bound._bound_deployment.init_kwargs["challenger"] is None
    with pytest.raises(ValueError, match=r"args\.ab is null"):
        app.bind(KeeperAppArgs(), options={CHALLENGER: {"num_replicas": 1}})


def test_the_ingress_is_bound_with_the_models_preprocess_config() -> None:
    """Read once where the app is built, so the ingress replicas need no open_clip (torch)."""
    from keeper_core.models import preprocess_config
    from keeper_serve import app

    args = KeeperAppArgs()
    bound = app.bind(args)._bound_deployment
    assert bound.init_kwargs["preprocess"] == preprocess_config(args.clip_model)


def test_the_vlm_judge_is_bound_only_with_a_source() -> None:
    """vlm.source null: no VlmJudge at all (the ingress answers "disabled" itself)."""
    from keeper_serve import app

    assert app.bind(KeeperAppArgs())._bound_deployment.init_args[2] is None
    args = KeeperAppArgs.model_validate({"vlm": {"source": "/models/tiny-vlm"}})
    bound = app.bind(args, options={"VlmJudge": {"ray_actor_options": {"num_cpus": 0.3}}})
    judge = bound._bound_deployment.init_args[2]._bound_deployment
    assert (judge.name, judge.init_args[0]) == ("VlmJudge", args.vlm)
    assert judge.ray_actor_options["num_cpus"] == 0.3
    # With no VlmJudge block (the shipped CPU config has none): a share that fits a 2-core box
    # beside the shipped minimum of the others (1.75 CPUs), not Serve's default of one CPU.
    default = app.bind(args)._bound_deployment.init_args[2]._bound_deployment
    assert default.ray_actor_options["num_cpus"] <= 0.25


# ---------------------------------------------------------------------------- the routes


def _jpeg(seed: int) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90)
    return {"b64": base64.b64encode(buf.getvalue()).decode()}


RANK_BODY = {"series": [{"id": "s0", "images": [_jpeg(0), _jpeg(1), _jpeg(2)]}]}


class FakeEncoder:
    embed_pixels = Remote(lambda px: np.full((len(px), 8), 8**-0.5, np.float32))
    embed_texts = Remote(lambda texts: np.full((len(texts), 8), 8**-0.5, np.float32))
    info = Remote(
        lambda: {"spec": SPEC, "embed_dim": 8, "image_size": 64, "random_weights": True,
                 "logit_scale": 100.0}
    )  # fmt: skip


class FakeVlm:
    info = Remote(lambda: {"status": "disabled", "source": None})


class FakeRanker:
    """``SeriesRanker.rank`` answering as version ``version`` (None: "unavailable")."""

    def __init__(self, version: str | None, alias: str) -> None:
        self.calls = 0

        def rank(emb: np.ndarray, quality: np.ndarray, lengths: list[int]) -> dict[str, Any]:
            self.calls += 1
            if version is None:
                return {"unavailable": f"no version has the alias @{alias}"}
            model = {"uri": f"models:/r@{alias}", "name": "r", "version": version,
                     "alias": alias, "kind": "head", "method": None, "base_spec": None}  # fmt: skip
            parts = np.split(np.arange(sum(lengths), dtype=np.float64), np.cumsum(lengths)[:-1])
            return {"model": model, "series": [(p, np.exp(p) / np.exp(p).sum()) for p in parts]}

        self.rank = Remote(rank)
        self.info = Remote(lambda: {"uri": f"models:/r@{alias}", "status": "ready"})


@pytest.fixture
def make(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Any]]:
    """``make(champion, challenger, share) -> (TestClient, ingress)``; no Ray."""
    import ray.serve
    from fastapi.testclient import TestClient

    from keeper_serve import ingress

    monkeypatch.setenv("KEEPER_API_TOKEN", TOKEN)
    cls = ingress_class()
    clients: list[Any] = []

    def build(champion: Any, challenger: Any, share: float | None) -> tuple[Any, Any]:
        ab = None if share is None else ABArgs(share=share)
        args = KeeperAppArgs(clip_model=SPEC, limits=LIMITS, ab=ab)
        inst = cls(FakeEncoder(), champion, FakeVlm(), args, challenger=challenger)
        inst.requests, inst.latency = Recorder(), Recorder()
        inst.ab_answers, inst.ab_fallbacks = Recorder(), Recorder()
        monkeypatch.setattr(
            ray.serve, "get_replica_context", lambda: types.SimpleNamespace(servable_object=inst)
        )
        client = TestClient(ingress.app, raise_server_exceptions=False).__enter__()
        clients.append(client)
        return client, inst

    yield build
    for c in clients:
        c.__exit__(None, None, None)


def test_the_ingress_refuses_a_challenger_handle_without_ab(make: Any) -> None:
    from keeper_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"exactly when args\.ab"):
        make(FakeRanker("1", "champion"), FakeRanker("2", "challenger"), None)
    with pytest.raises(ConfigError, match=r"exactly when args\.ab"):
        make(FakeRanker("1", "champion"), None, 0.5)


def test_rank_answers_by_the_clients_arm(make: Any) -> None:
    champion, challenger = FakeRanker("1", "champion"), FakeRanker("2", "challenger")
    client, inst = make(champion, challenger, 0.5)
    keys = [f"user-{i}" for i in range(12)]
    want = {k: assign(k, 0.5) for k in keys}
    assert set(want.values()) == {"champion", "challenger"}
    for k in keys:
        r = client.post("/v1/rank", json=RANK_BODY, headers={**AUTH, api.CLIENT_HEADER: k})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["arm"] == want[k]
        assert body["model"]["version"] == ("2" if want[k] == "challenger" else "1")
    n_challenger = sum(a == "challenger" for a in want.values())
    assert (challenger.calls, champion.calls) == (n_challenger, len(keys) - n_challenger)
    assert inst.ab_answers.tags == [
        {"route": "/v1/rank", "arm": want[k],
         "model": "models:/r/2" if want[k] == "challenger" else "models:/r/1"}
        for k in keys
    ]  # fmt: skip
    assert inst.ab_fallbacks.tags == []


def test_an_unavailable_challenger_hands_the_request_to_the_champion(make: Any) -> None:
    champion, challenger = FakeRanker("1", "champion"), FakeRanker(None, "challenger")
    client, inst = make(champion, challenger, 1.0)  # everyone on the challenger
    r = client.post("/v1/rank", json=RANK_BODY, headers=AUTH)
    assert r.status_code == 200, r.text
    assert (r.json()["arm"], r.json()["model"]["version"]) == ("champion", "1")
    assert (challenger.calls, champion.calls) == (1, 1)
    assert inst.ab_fallbacks.tags == [{"route": "/v1/rank"}]
    assert inst.ab_answers.tags == [
        {"route": "/v1/rank", "arm": "champion", "model": "models:/r/1"}
    ]


def test_without_ab_the_arm_is_null(make: Any) -> None:
    client, inst = make(FakeRanker("1", "champion"), None, None)
    r = client.post("/v1/rank", json=RANK_BODY, headers={**AUTH, api.CLIENT_HEADER: "u"})
    assert r.status_code == 200, r.text
    assert r.json()["arm"] is None
    assert inst.ab_answers.tags == []
    r = client.post("/v1/pick", json={"images": [_jpeg(3), _jpeg(4)]}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["arm"] is None


def test_pick_answers_by_the_arm_and_falls_back_once_per_request(make: Any) -> None:
    body = {"images": [_jpeg(5), _jpeg(6), _jpeg(7)]}
    champion, challenger = FakeRanker("1", "champion"), FakeRanker("2", "challenger")
    client, inst = make(champion, challenger, 1.0)
    r = client.post("/v1/pick", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert (r.json()["arm"], r.json()["ranker"]["version"]) == ("challenger", "2")
    assert champion.calls == 0

    champion, challenger = FakeRanker("1", "champion"), FakeRanker(None, "challenger")
    client, inst = make(champion, challenger, 1.0)
    r = client.post("/v1/pick", json=body, headers=AUTH)
    assert r.status_code == 200, r.text
    assert (r.json()["arm"], r.json()["ranker"]["version"]) == ("champion", "1")
    assert inst.ab_fallbacks.tags == [{"route": "/v1/pick"}]
    assert inst.ab_answers.tags == [
        {"route": "/v1/pick", "arm": "champion", "model": "models:/r/1"}
    ]
