"""``/v1/select`` and the VlmJudge replica with a VLM question the judge refuses.

- The replica's ``info()`` carries the judge's own rules (``max_query_chars``,
  ``reserved_tokens``); the route refuses a ``vlm_query`` (or the first positive prompt without
  one) they refuse with 422 naming the field and why, before any image is read or the VLM asked,
  instead of a 503 "vlm_unavailable ... retry" after all the work.
- In the replica, a call with such a query fails alone: the other requests' calls batched with it
  get their scores.
- A 503 naming a special token keeps it (``</s>``, not ``<<path>``).
- Over HTTP, dedup compares each candidate with at most ``top_n`` kept ones, head scores given.

No Ray: the route runs as tests/unit/serve/test_select_api.py drives it, the replica's class
directly, on the tiny random Llava.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_select_api import AUTH, FakeVlm, body, check_accounting, client_with, photo  # noqa: F401

from keeper_core import cascade
from keeper_core.errors import DataError, client_text
from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_serve.config import VlmArgs
from keeper_serve.vlm import VlmJudge


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny")


@pytest.fixture
def replica(tiny: Path) -> Iterator[Any]:
    before = torch.get_num_threads()
    args = VlmArgs(source=str(tiny), device="cpu", torch_threads=1, batch_wait_timeout_s=0.0)
    yield VlmJudge.func_or_class(args)
    torch.set_num_threads(before)


class RulesVlm(FakeVlm):
    """FakeVlm answering ``info`` as the real replica does (its judge's query rules included)."""

    def __init__(self, info: dict[str, Any]) -> None:
        super().__init__()
        self.info.fn = lambda: info


def _views(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8) for i in range(n)]


# ------------------------------------------------------------------------------------ the route


@pytest.mark.parametrize(
    ("knobs", "field", "why"),
    [
        ({"vlm_query": "a red <image> scene"}, "vlm_query", "['<image>']"),
        ({"vlm_query": "a red scene </s>"}, "vlm_query", "['</s>']"),
        ({"vlm_query": "r" * 600}, "vlm_query", "600 characters, more than the limit of 512"),
        ({"positive": ["a red <s> scene"]}, "positive.0", "['<s>']"),
        ({"positive": ["r" * 513], "rationale": True, "beta": 0.0}, "positive.0", "513 characters"),
    ],
)
def test_a_vlm_question_the_judge_refuses_is_a_422_before_any_work(
    client_with: Callable[..., Any],  # noqa: F811
    replica: Any,
    knobs: dict[str, Any],
    field: str,
    why: str,
) -> None:
    info = replica.info()
    assert info["max_query_chars"] == 512
    assert "</s>" in info["reserved_tokens"]
    vlm = RulesVlm(info)
    client = client_with(vlm)
    r = client.post(
        "/v1/select", json={**body([photo(i) for i in range(4)]), **knobs}, headers=AUTH
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert err["message"].startswith(f"{field}: "), err
    assert why in err["message"], err
    assert vlm.calls == []
    assert client.get("/v1/models", headers=AUTH).json()["vlm"]["reserved_tokens"] == list(
        info["reserved_tokens"]
    )


def test_a_question_the_vlm_is_not_asked_is_not_checked(
    client_with: Callable[..., Any],  # noqa: F811
    replica: Any,
) -> None:
    vlm = RulesVlm(replica.info())
    client = client_with(vlm)
    blobs = [photo(i) for i in range(4)]
    r = client.post("/v1/select", json=body(blobs, vlm_query="x</s>", beta=0.0), headers=AUTH)
    assert r.status_code == 200, r.text
    check_accounting(r.json(), 4)
    r = client.post("/v1/select", json=body(blobs, vlm_query="a red scene"), headers=AUTH)
    assert r.status_code == 200, r.text
    assert vlm.calls == [(4, "a red scene")]


def test_a_503_keeps_a_special_token_and_still_hides_paths(
    client_with: Callable[..., Any],  # noqa: F811
) -> None:
    vlm = FakeVlm(fail=DataError("query 0: contains the special token(s) ['</s>'] in /srv/x.py"))
    r = client_with(vlm).post("/v1/select", json=body([photo(i) for i in range(3)]), headers=AUTH)
    assert r.status_code == 503, r.text
    message = r.json()["error"]["message"]
    assert "['</s>']" in message, message
    assert "<<path>" not in message
    assert "/srv/x.py" not in message
    assert client_text("a </s> b </img> at /opt/k.py") == "a </s> b </img> at <path>"


def test_dedup_over_http_compares_with_at_most_top_n_kept(
    client_with: Callable[..., Any],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[int] = []
    real = cascade.dedup_in_order

    def spy(order: np.ndarray, emb: np.ndarray, threshold: float, limit: Any) -> Any:
        kept, dup_of, done = real(order, emb, threshold, limit)
        seen.append(len(kept))
        return kept, dup_of, done

    monkeypatch.setattr(cascade, "dedup_in_order", spy)
    blobs = [photo(i) for i in range(12)]  # 12 distinct images: none a near duplicate
    r = client_with(FakeVlm()).post(
        "/v1/select", json=body(blobs, top_n=2, top_k=2, dedup_threshold=0.9999), headers=AUTH
    )
    assert r.status_code == 200, r.text
    check_accounting(r.json(), 12)
    assert seen == [2]  # compared with the 2 kept, not with all 12


# ---------------------------------------------------------------------------------- the replica


@pytest.mark.parametrize("bad", ["a dog <image>", "a dog </s>", "x" * 600, "  "])
def test_a_refused_query_fails_its_own_call_not_the_batch(replica: Any, bad: str) -> None:
    async def calls() -> tuple[np.ndarray, list[Any], int]:
        alone: np.ndarray = await replica.relevance(_views(1, 2), "a tree")
        forwards = replica.batcher.stats.forwards
        both: list[Any] = await asyncio.gather(
            replica.relevance(_views(0, 2), "a tree"),
            replica.relevance(_views(1, 2), "a tree"),
            replica.relevance(_views(2, 1), bad),  # would have shared their batch
            return_exceptions=True,
        )
        return alone, both, replica.batcher.stats.forwards - forwards

    want, (first, second, refused), forwards = asyncio.run(calls())
    assert isinstance(refused, DataError), refused
    assert str(refused).startswith("vlm query: ")
    for got in (first, second):
        assert isinstance(got, np.ndarray), got
        assert np.isfinite(got).all()
    np.testing.assert_allclose(second, want, atol=1e-5, rtol=0)
    assert forwards >= 1  # the innocent calls ran; the refused one joined no batch
