"""``/v1/select`` when the VLM gives no finite score for one image (NaN: non-finite logits).

That image leaves the cascade as ``vlm_failed`` with its reason, the rest are ranked, and the
response is valid JSON (no NaN). In the VlmJudge replica, where one forward batches the images of
concurrent requests, the NaN is that image's alone: the other request gets its scores. No Ray:
the route runs as tests/unit/serve/test_select_api.py drives it, the replica's class directly.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from test_select_api import AUTH, FakeVlm, body, check_accounting, client_with, photo  # noqa: F401

from keeper_core.cascade import STAGES, VlmScores
from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_serve.config import VlmArgs
from keeper_serve.ingress import VLM_NONFINITE, vlm_answer
from keeper_serve.vlm import VlmJudge

ODD = (80, 60)  # the size of the image the fake VLM gives no finite score for


class NanVlm(FakeVlm):
    """FakeVlm, but NaN for an image of size ``ODD`` (as keeper_core's judge answers one)."""

    def _relevance(self, images: list[np.ndarray], query: str) -> np.ndarray:
        out = super()._relevance(images, query)
        odd = [im.shape[:2] == ODD[::-1] for im in images]
        return np.where(odd, np.float32(np.nan), out)


def _no_nan(text: str) -> Any:
    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in the response")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("dropped", [True, False])
def test_a_nan_score_is_that_candidates_vlm_failed_and_the_rest_are_ranked(
    client_with: Callable[[FakeVlm], Any],  # noqa: F811
    dropped: bool,
) -> None:
    vlm = NanVlm()
    client = client_with(vlm)
    odd = 2
    blobs = [photo(i, ODD if i == odd else (96, 72)) for i in range(6)]
    knobs = {"top_n": 6, "top_k": 3, "alpha": 0.0, "beta": 1.0, "gamma": 0.1}
    knobs |= {"dedup_threshold": None, "candidates": "all" if dropped else "picks"}
    r = client.post("/v1/select", json=body(blobs, **knobs), headers=AUTH)
    assert r.status_code == 200, r.text
    out = _no_nan(r.text)
    check_accounting(out, 6)
    assert vlm.calls == [(6, "a red scene")]  # all six reach the VLM, the odd one included
    stage = out["stages"][STAGES.index("vlm")]
    assert (stage["n_in"], stage["n_kept"], stage["n_dropped"]) == (6, 5, 1)
    assert odd not in out["picks"]
    assert len(out["picks"]) == 3
    assert out["cost"]["vlm_calls"] == 5  # 6 sent, 1 not judged
    if dropped:
        records = {c["index"]: c for c in out["candidates"]}
        assert records[odd]["dropped_at"] == "vlm"
        assert records[odd]["reason"] == f"vlm_failed: {VLM_NONFINITE}"
        assert records[odd]["vlm"] is None
        assert records[odd]["final"] is None
        judged = {i: c["vlm"] for i, c in records.items() if c["vlm"] is not None}
        assert len(judged) == 5
        assert out["picks"] == sorted(judged, key=lambda i: -judged[i])[:3]  # beta dominates


def test_vlm_answer_turns_nan_into_failures_and_keeps_the_reasons_it_had() -> None:
    idx = np.array([7, 3, 9, 1])
    clean = np.array([0.2, 0.9, 0.4, 0.1])
    assert vlm_answer(idx, clean, {}) is clean  # all judged: the plain scores
    scores = np.array([0.2, np.nan, np.nan, 0.1])  # 3 came back NaN; 9 was never sent
    got = vlm_answer(idx, scores, {9: "corpus image x is unreadable"})
    assert isinstance(got, VlmScores)
    assert dict(got.failed) == {3: VLM_NONFINITE, 9: "corpus image x is unreadable"}
    np.testing.assert_array_equal(got.scores, scores)


# ------------------------------------------------------------------- the replica, batched


@pytest.fixture(scope="module")
def replica(tmp_path_factory: pytest.TempPathFactory) -> Any:
    tiny = build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny")
    before = torch.get_num_threads()
    args = VlmArgs(source=str(tiny), device="cpu", torch_threads=1, batch_wait_timeout_s=0.0)
    yield VlmJudge.func_or_class(args)
    torch.set_num_threads(before)


def _views(seed: int, n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40 + 4 * i, 56, 3), dtype=np.uint8) for i in range(n)]


def test_a_nan_image_does_not_fail_the_other_requests_of_its_batch(
    replica: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine, theirs = _views(0, 1), _views(1, 3)
    generate = replica.judge.model.generate

    def first_row_nan(**kwargs: Any) -> Any:  # the first row of the batch is `mine`
        out = generate(**kwargs)
        logits = out.logits[0].clone()
        logits[0] = torch.nan
        out.logits = (logits, *out.logits[1:])
        return out

    async def calls() -> tuple[np.ndarray, list[np.ndarray], int]:
        alone: np.ndarray = await replica.relevance(theirs, "a tree")
        monkeypatch.setattr(replica.judge.model, "generate", first_row_nan)
        forwards = replica.batcher.stats.forwards
        both: list[np.ndarray] = await asyncio.gather(
            replica.relevance(mine, "a dog"), replica.relevance(theirs, "a tree")
        )
        return alone, both, replica.batcher.stats.forwards - forwards

    want, (got_mine, got_theirs), forwards = asyncio.run(calls())  # one loop: the batcher's
    assert forwards == 1  # one forward held both requests
    assert got_mine.shape == (1,)
    assert np.isnan(got_mine[0])
    assert np.isfinite(got_theirs).all()
    np.testing.assert_allclose(got_theirs, want, atol=1e-5, rtol=0)
