"""keeper promote's online half: the A/B gain from people's decisions (decide_online)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import offer_rows

from keeper_core.ab import ABReport, ab_report
from keeper_core.errors import ConfigError
from keeper_core.feedback import (
    SCHEMA,
    FeedbackEvent,
    FeedbackLog,
    OfferLog,
    read_feedback,
    read_offers,
)
from keeper_train.jobs.promote import PromoteConfig, decide_online


def report(tmp_path: Path, champion_hits: int, challenger_hits: int, groups: int) -> ABReport:
    """An A/B where people picked the model's first choice in ``*_hits`` of ``groups`` groups;
    the challenger arm served models:/r/2, the champion models:/r/1 (support.offer_rows)."""
    offers = OfferLog(str(tmp_path / "offers"))
    events = FeedbackLog(str(tmp_path / "events"))
    for arm, hits in (("champion", champion_hits), ("challenger", challenger_hits)):
        for i in range(groups):
            req = f"{arm}-{i}"
            offers.append_rows(offer_rows(req, arm, "s", 4))
            chosen = 0 if i < hits else 3
            events.append(
                [
                    FeedbackEvent(
                        request_id=req, image_id=f"{req}-img{chosen}", action="picked-as-keeper"
                    )
                ]
            )
    offers.flush()
    events.flush()
    return ab_report(read_offers(str(tmp_path / "offers")), read_feedback(str(tmp_path / "events")))


def test_a_clear_online_win_passes(tmp_path: Path) -> None:
    d = decide_online(report(tmp_path, 30, 80, 100), "r", "2", 0.0)
    assert d.promote, d.reason
    assert "+50.0 pts" in d.reason


def test_a_small_or_missing_online_win_fails(tmp_path: Path) -> None:
    small = report(tmp_path / "a", 4, 7, 10)  # +30 points on 10 groups an arm: within chance
    d = decide_online(small, "r", "2", 0.0)
    assert not d.promote
    assert "not surely better" in d.reason
    big = report(tmp_path / "b", 30, 80, 100)
    assert not decide_online(big, "r", "2", 0.6).promote  # below the gain required
    other = decide_online(big, "r", "3", 0.0)  # the arm served v2, v3 is judged
    assert not other.promote
    assert "served models:/r/2, not v3" in other.reason
    with pytest.raises(ConfigError):
        decide_online(big, "r", "2", 5.0)


def test_no_keeper_picks_is_no_evidence(tmp_path: Path) -> None:
    offers = OfferLog(str(tmp_path / "offers"))
    offers.append_rows(offer_rows("q", "challenger", "s", 2), sync=True)
    empty = ab_report(read_offers(str(tmp_path / "offers")), SCHEMA.empty_table())
    d = decide_online(empty, "r", "2", 0.0)
    assert not d.promote
    assert "no evidence" in d.reason


def test_config_takes_the_online_root() -> None:
    cfg = PromoteConfig(
        name="r", embeddings="e", series="s", online="s3://b/fb", min_online_gain=0.02
    )
    assert (cfg.online, cfg.min_online_gain) == ("s3://b/fb", 0.02)
    with pytest.raises(ValueError, match="min_gain"):
        PromoteConfig(name="r", embeddings="e", series="s", min_online_gain=3)
