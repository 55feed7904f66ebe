"""The A/B split when the challenger fails (not merely "unavailable"), and the ranker URIs the
app's args refuse before anything is deployed. No Ray: fake handles, as test_ab_split.py."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from serve_fakes import Remote
from test_ab_split import AUTH, RANK_BODY, FakeRanker, _jpeg, make  # noqa: F401

from keeper_serve.config import ABArgs, KeeperAppArgs, RankerArgs


class FailingRanker:
    """A challenger whose ``rank`` raises (a lost replica, a full queue, a bug)."""

    def __init__(self, exc: Exception) -> None:
        self.calls = 0

        def rank(*args: Any) -> Any:
            self.calls += 1
            raise exc

        self.rank = Remote(rank)
        self.info = Remote(lambda: {"uri": "models:/r@challenger", "status": "ready"})


def _failures() -> list[Exception]:
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    return [
        RuntimeError("boom"),
        RayActorError(),
        BackPressureError(num_queued_requests=1, max_queued_requests=1),
    ]


@pytest.mark.parametrize("n", range(3))
def test_serving_a_failing_challenger_hands_rank_and_pick_to_the_champion(
    make: Any,  # noqa: F811 (test_ab_split's fixture)
    n: int,
) -> None:
    exc = _failures()[n]
    champion, challenger = FakeRanker("1", "champion"), FailingRanker(exc)
    client, inst = make(champion, challenger, 1.0)  # everyone on the challenger
    r = client.post("/v1/rank", json=RANK_BODY, headers=AUTH)
    assert r.status_code == 200, r.text
    assert (r.json()["arm"], r.json()["model"]["version"]) == ("champion", "1")
    r = client.post("/v1/pick", json={"images": [_jpeg(5), _jpeg(6)]}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert (r.json()["arm"], r.json()["ranker"]["version"]) == ("champion", "1")
    assert challenger.calls == 2
    assert inst.ab_fallbacks.tags == [{"route": "/v1/rank"}, {"route": "/v1/pick"}]
    assert [t["arm"] for t in inst.ab_answers.tags] == ["champion", "champion"]


def test_serving_a_failing_champion_still_fails_the_request(make: Any) -> None:  # noqa: F811
    """The fallback is the challenger's only: with no one to hand it to, the error stands."""
    client, _ = make(FailingRanker(RuntimeError("boom")), FakeRanker("2", "challenger"), 0.0)
    r = client.post("/v1/rank", json=RANK_BODY, headers=AUTH)
    assert r.status_code == 500, r.text


@pytest.mark.parametrize(
    ("uri", "words"),
    [
        ("", "is empty"),
        ("   ", "is empty"),
        ("models:/keeper-ranker", "names no model"),
        ("models:/keeper-ranker@", "names no model"),
        ("models:/@champion", "names no model"),
        ("models:/", "names no model"),
    ],
)
def test_serving_config_refuses_a_model_uri_that_names_no_model(uri: str, words: str) -> None:
    with pytest.raises(ValidationError, match=rf"ranker\.model_uri.*{words}"):
        KeeperAppArgs.model_validate({"ranker": {"model_uri": uri}})
    with pytest.raises(ValidationError, match=rf"ab\.model_uri.*{words}"):
        KeeperAppArgs.model_validate({"ab": {"share": 0.1, "model_uri": uri}})


@pytest.mark.parametrize(
    "uri",
    [
        "models:/keeper-ranker@champion",
        "models:/keeper-ranker/3",
        "models:/m-0123456789abcdef",
        "runs:/0123/model",
        "/srv/models/ranker",
        None,
    ],
)
def test_serving_config_takes_the_model_uris_the_registry_resolves(uri: str | None) -> None:
    assert RankerArgs(model_uri=uri).model_uri == uri
    if uri is not None:  # blanks around a URI are dropped, not refused
        assert RankerArgs(model_uri=f"  {uri} ").model_uri == uri


def test_serving_config_refuses_an_ab_of_the_champion_against_itself_and_endless_polls() -> None:
    with pytest.raises(ValidationError, match="both arms would serve the same version"):
        KeeperAppArgs.model_validate(
            {"ranker": {"model_uri": "models:/r@champion"},
             "ab": {"share": 0.1, "model_uri": "models:/r@champion"}}
        )  # fmt: skip
    for bad in (float("inf"), float("nan"), 0.0):
        with pytest.raises(ValidationError, match="poll_s"):
            RankerArgs(poll_s=bad)
        with pytest.raises(ValidationError, match="poll_s"):
            ABArgs(share=0.1, poll_s=bad)


def test_a_utf8_client_id_is_read_as_the_client_sent_it() -> None:
    from keeper_serve import api
    from keeper_serve.api import ApiError

    # Starlette decodes header bytes as latin-1: "José" sent as UTF-8 arrives as "JosÃ©".
    assert api.client_key("José".encode().decode("latin-1")) == "José"
    cjk = "写真家" * 70  # 210 characters, 630 UTF-8 bytes: within the 256-character limit
    assert api.client_key(cjk.encode().decode("latin-1")) == cjk
    assert api.client_key("plain-ascii-17") == "plain-ascii-17"
    assert api.client_key("caf\xe9") == "caf\xe9"  # latin-1 bytes that are not UTF-8: as they came
    with pytest.raises(ApiError, match="257 characters"):
        api.client_key(("é" * 257).encode().decode("latin-1"))
