"""keeper feedback-export: one bad offer (an embedding of another width) is skipped with its
reason, the rest exported, the counts adding up; a re-run writes the same output."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from keeper_core.feedback import FeedbackEvent, FeedbackLog, OfferLog
from keeper_core.quality import FEATURE_NAMES
from keeper_train.jobs.feedback_export import SKIP_REASONS, FeedbackExportConfig, run

SPEC, DIM = "keeper-tiny:random", 64  # keeper-tiny's width


def _offer(request_id: str, group_id: str, image_id: str, dim: int = DIM) -> dict[str, Any]:
    rng = np.random.default_rng(zlib.crc32(image_id.encode()))
    e = rng.normal(size=dim)
    q = rng.uniform(0.1, 1.0, size=len(FEATURE_NAMES))
    q[-2:] = (640, 480)
    return {
        "request_id": request_id,
        "route": "pick",
        "client": "app",
        "model": "sharpness",
        "model_spec": SPEC,
        "group_id": group_id,
        "group_size": 3,
        "image_id": image_id,
        "image_uri": None,
        "position": 0,
        "rank": 0,
        "score": 0.0,
        "offered": "candidate",
        "embedding": (e / np.linalg.norm(e)).astype(np.float32).tolist(),
        "quality": q.astype(np.float32).tolist(),
    }


def _root(tmp_path: Path, offers: list[dict[str, Any]], *events: tuple[str, str, str]) -> Path:
    root = tmp_path / "feedback"
    OfferLog(str(root / "offers")).append_rows(offers, sync=True)
    FeedbackLog(str(root / "events")).append(
        [FeedbackEvent(request_id=r, image_id=i, action=a, client="alice") for r, i, a in events],
        sync=True,
    )
    return root


def test_one_offer_of_another_width_is_skipped_not_fatal(tmp_path: Path) -> None:
    offers = [
        *(_offer("r1", "g1", i) for i in "abc"),
        *(_offer("r2", "g2", i) for i in "de"),
        _offer("r2", "g2", "f", dim=DIM // 2),  # a corrupt row: half an embedding
        *(_offer("r3", "g3", i) for i in "gh"),
    ]
    root = _root(
        tmp_path,
        offers,
        ("r1", "a", "picked-as-keeper"),
        ("r2", "d", "picked-as-keeper"),
        ("r2", "f", "rejected"),
        ("r3", "g", "accepted"),
        ("r3", "h", "rejected"),
    )
    out = tmp_path / "out"
    # Before: DataError "embeddings of widths [4, 8] under one spec": nothing exported at all.
    s = run(FeedbackExportConfig(feedback=str(root), output=str(out)))
    assert s.used + sum(s.skipped.values()) == s.decisions == 5
    assert set(s.skipped) == set(SKIP_REASONS)
    assert s.skipped["no_embedding"] == 1  # f, with its reason
    assert (s.series, s.pairs, s.images) == (2, 1, 7)  # a+b+c, d+e, g-vs-h
    assert s.offers_left_out == 1
    manifest = pd.read_csv(out / "series.csv")
    assert len(manifest) == s.images
    assert not manifest["image_uri"].str.endswith("/f").any()
    table = pd.read_parquet(out / "embeddings")
    assert {len(e) for e in table["embedding"]} == {DIM}

    # The same command again: the same rows (a re-run after a kill ends the same).
    again = run(FeedbackExportConfig(feedback=str(root), output=str(out)))
    assert again.model_dump() == s.model_dump()
    assert pd.read_csv(out / "series.csv").equals(manifest)


def test_an_offer_of_the_wrong_width_is_skipped_by_the_specs_width(tmp_path: Path) -> None:
    # The width is the spec's own (keeper-tiny: 64), not a vote among the offers.
    offers = [_offer("r1", "g1", "a"), _offer("r1", "g1", "b"), _offer("r1", "g1", "c", dim=4)]
    root = _root(
        tmp_path,
        offers,
        ("r1", "a", "picked-as-keeper"),
        ("r1", "b", "rejected"),
        ("r1", "c", "rejected"),
    )
    s = run(FeedbackExportConfig(feedback=str(root), output=str(tmp_path / "out")))
    assert s.skipped["no_embedding"] == 1
    assert s.used + sum(s.skipped.values()) == s.decisions == 3
