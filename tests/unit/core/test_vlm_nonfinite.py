"""One image with non-finite logits scores NaN, and only it: the rest of its batch scores as it
would without it (in Serve that batch holds other requests' images). The tiny random Llava, with
``model.generate`` wrapped to poison chosen rows of the logits the judge reads."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_core.vlm import VlmConfig, VlmJudge, load_vlm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 5  # max_batch 3: chunks of 3 and 2, so a poisoned row in the second chunk checks offsets
QUERIES = ["a dog on a beach", "red car", "a tree", "a cat", "a mountain at night"]


@pytest.fixture(scope="module")
def judge(tmp_path_factory: pytest.TempPathFactory) -> VlmJudge:
    tiny = build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny")
    return load_vlm(VlmConfig(source=str(tiny), max_batch=3))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(7)
    return [
        Image.fromarray(rng.integers(0, 256, (30 + 5 * i, 40 + 3 * i, 3), dtype=np.uint8))
        for i in range(N)
    ]


Poison = Callable[[set[int], str], None]


@pytest.fixture
def poison(judge: VlmJudge, monkeypatch: pytest.MonkeyPatch) -> Poison:
    """poison(rows, how): later calls of N images see non-finite logits for those rows (indices
    in the call, counted across the judge's chunks). ``how``: "nan" (the whole row NaN) or "inf"
    (one +inf at a token that answers nothing: the row's softmax overflowed all the same)."""

    def apply(rows: set[int], how: str) -> None:
        generate = judge.model.generate
        seen = 0

        def spy(**kwargs: Any) -> Any:
            nonlocal seen
            out = generate(**kwargs)
            logits = out.logits[0].clone()
            local = [k for k in range(len(logits)) if (seen + k) % N in rows]
            if how == "nan":
                logits[local] = torch.nan
            else:
                logits[local, 0] = torch.inf  # id 0 is <unk>: no answer word's token
            seen += len(logits)
            out.logits = (logits, *out.logits[1:])
            return out

        monkeypatch.setattr(judge.model, "generate", spy)

    return apply


def _scores(judge: VlmJudge, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    return judge.relevance(images, QUERIES), judge.quality(images)


@pytest.mark.parametrize("how", ["nan", "inf"])
@pytest.mark.parametrize("row", [1, 4])
def test_one_non_finite_row_is_nan_and_the_others_unchanged(
    judge: VlmJudge,
    images: list[Image.Image],
    poison: Poison,
    caplog: pytest.LogCaptureFixture,
    how: str,
    row: int,
) -> None:
    assert judge.config.max_batch < N
    clean_rel, clean_q = _scores(judge, images)
    assert np.isfinite(clean_rel).all()
    assert np.isfinite(clean_q).all()
    poison({row}, how)
    with caplog.at_level(logging.WARNING, logger="keeper_core.vlm"):
        rel, q = _scores(judge, images)
    others = np.arange(N) != row
    for got, clean in ((rel, clean_rel), (q, clean_q)):
        assert got.dtype == np.float32
        assert got.shape == (N,)
        assert np.isnan(got[row])
        np.testing.assert_array_equal(got[others], clean[others])
        assert np.all((got[others] >= 0) & (got[others] <= 1))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per call: relevance, then quality
    for w in warnings:
        text = w.getMessage()
        assert f"rows [{row}]" in text
        assert "dtype float32" in text
        assert "1 of 5" in text


def test_every_row_non_finite_is_all_nan_not_an_error(
    judge: VlmJudge, images: list[Image.Image], poison: Poison
) -> None:
    poison(set(range(N)), "nan")
    rel, q = _scores(judge, images)
    assert np.isnan(rel).all()
    assert np.isnan(q).all()


def test_an_error_that_is_not_one_images_still_raises(
    judge: VlmJudge, images: list[Image.Image], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(**kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(judge.model, "generate", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        judge.relevance(images, QUERIES)
