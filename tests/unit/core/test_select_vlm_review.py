"""The VLM judge's query rules and its aspect-ratio bound, on the tiny random Llava.

- What the judge refuses as a query is one ``QueryRules``: the judge's own checks use it, its
  ``describe()`` carries it, and ``query_rules(config)`` reads the same from the checkpoint's
  processor files without its weights (an ``s3://`` checkpoint's weights are never read).
- An image far from square is centre-cropped to ``MAX_ASPECT`` before the image processor sees
  it: a 16 x 100,000 PNG of a few kB cost gigabytes in the processor's shortest-edge resize.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from keeper_core import storage
from keeper_core.cascade import QueryRules
from keeper_core.errors import DataError, ModelLoadError
from keeper_core.tiny_vlm import build_tiny_vlm
from keeper_core.vlm import MAX_ASPECT, VlmConfig, VlmJudge, bound_aspect, load_vlm, query_rules

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "tiny")


@pytest.fixture(scope="module")
def judge(tiny_dir: Path) -> VlmJudge:
    return load_vlm(VlmConfig(source=str(tiny_dir), max_batch=4))


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------- query rules


def test_the_judges_rules_are_what_it_refuses_and_what_it_describes(judge: VlmJudge) -> None:
    rules = judge.query_rules
    assert rules.max_chars == 512
    assert {"<image>", "</s>", "<s>", "<unk>", "<pad>"} <= set(rules.reserved)
    described = judge.describe()
    assert QueryRules.from_info(described) == rules
    assert described["max_query_chars"] == 512
    images = [_image(40, 30)]
    for query in ("a dog <image>", "a dog </s>", "x" * 513, "   "):
        why = rules.problem(query)
        assert why is not None
        with pytest.raises(DataError, match=re.escape(f"query 0: {why}")):
            judge.relevance(images, query)
    assert rules.problem("a dog on a beach") is None
    assert rules.problem("x" * 512) is None
    assert QueryRules.from_info({"source": "x"}) is None  # an info that does not say


def test_query_rules_come_from_the_processor_alone(tiny_dir: Path, tmp_path: Path) -> None:
    judge_rules = load_vlm(VlmConfig(source=str(tiny_dir))).query_rules
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            (no_weights / f.name).write_bytes(f.read_bytes())
    assert query_rules(VlmConfig(source=str(tiny_dir))) == judge_rules
    assert query_rules(VlmConfig(source=str(no_weights))) == judge_rules
    limited = query_rules(VlmConfig(source=str(no_weights), max_query_chars=40))
    assert limited.max_chars == 40
    with pytest.raises(ModelLoadError, match="cannot read its processor"):
        query_rules(VlmConfig(source=str(tmp_path / "nowhere")))


def test_query_rules_of_an_s3_checkpoint_read_no_weights(
    tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = "s3://models/tiny"
    files = {f"{prefix}/{f.name}": f for f in sorted(tiny_dir.iterdir())}
    assert any(u.endswith(".safetensors") for u in files)
    read: list[str] = []

    def list_files(uri: str, **_: Any) -> list[str]:
        assert uri == prefix
        return list(files)

    def read_bytes(uri: str, **_: Any) -> bytes:
        read.append(uri)
        return files[uri].read_bytes()

    monkeypatch.setattr(storage, "list_files", list_files)
    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    rules = query_rules(VlmConfig(source=prefix + "/"))
    assert rules == load_vlm(VlmConfig(source=str(tiny_dir))).query_rules
    assert read
    assert not [u for u in read if u.endswith(".safetensors")]


# ------------------------------------------------------------------------------- aspect bound


@pytest.mark.parametrize(
    ("size", "want"),
    [
        ((16, 100_000), (16, 64)),
        ((100_000, 16), (64, 16)),
        ((1, 672), (1, 4)),
        ((400, 100), (400, 100)),  # exactly 4:1: whole
        ((401, 100), (400, 100)),
        ((50, 60), (50, 60)),
    ],
)
def test_bound_aspect_centre_crops_to_4_to_1(size: tuple[int, int], want: tuple[int, int]) -> None:
    assert MAX_ASPECT == 4.0
    w, h = size
    stripes = np.zeros((h, w, 3), np.uint8)
    long = max(w, h)
    ramp = (np.arange(long) * 255 // max(long - 1, 1)).astype(np.uint8)
    if w >= h:
        stripes[:, :, 0] = ramp[None, :]
    else:
        stripes[:, :, 0] = ramp[:, None]
    im = Image.fromarray(stripes)
    out = bound_aspect(im)
    assert out.size == want
    if out.size != im.size:  # the centre: as much cut from each end (one more from the end)
        got = np.asarray(out)[..., 0]
        keep = max(want)
        start = (long - keep) // 2
        line = got[0, :] if w >= h else got[:, 0]
        np.testing.assert_array_equal(line, ramp[start : start + keep])
    else:
        assert out is im


def test_the_image_processor_never_sees_more_than_4_to_1(
    judge: VlmJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, int]] = []
    processor = judge.processor

    class Spy:
        def __getattr__(self, name: str) -> Any:
            return getattr(processor, name)

        def __call__(self, *, images: list[Image.Image], **kw: Any) -> Any:
            seen.extend(im.size for im in images)
            return processor(images=images, **kw)

    monkeypatch.setattr(judge, "processor", Spy())
    thin = [_image(16, 100_000, 1), _image(100_000, 16, 2), _image(1, 672, 3), _image(40, 30, 4)]
    rel = judge.relevance(thin, "a red scene")
    qual = judge.quality(thin)
    judge.rationale(thin[0], "a red scene", max_new_tokens=2)
    assert len(seen) == 2 * len(thin) + 1
    assert all(max(w, h) <= MAX_ASPECT * min(w, h) for w, h in seen), seen
    assert np.isfinite(rel).all()
    assert np.isfinite(qual).all()
    # the square one is shown as it is: the same score alone as beside the thin ones
    np.testing.assert_allclose(judge.relevance([thin[3]], "a red scene"), rel[3:], atol=1e-5)
