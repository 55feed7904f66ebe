"""keeper promote's online half: a challenger version's A/B gain from people's decisions
(version_ab, decide_online)."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa
import pytest
from support import offer_rows

from keeper_core.ab import VersionAB, ab_report, version_ab
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

Answer = tuple[str, int, bool]  # (arm, version that answered, the person's keeper was its first)


def logs(tmp_path: Path, *phases: list[Answer]) -> tuple[pa.Table, pa.Table]:
    """The offers and events of answers given in ``phases``, each phase after the one before;
    every answer offers one group of 4 images, and its person picks the first or the last."""
    offers = OfferLog(str(tmp_path / "offers"))
    events = FeedbackLog(str(tmp_path / "events"))
    n = 0
    for phase in phases:
        for arm, version, hit in phase:
            req = f"{arm}-v{version}-{n}"
            n += 1
            rows = offer_rows(req, arm, "s", 4)
            for r in rows:
                r["model"] = f"models:/r/{version}"
            offers.append_rows(rows)
            chosen = f"{req}-img{0 if hit else 3}"
            events.append(
                [FeedbackEvent(request_id=req, image_id=chosen, action="picked-as-keeper")]
            )
        offers.flush()
        events.flush()
        time.sleep(0.01)  # the next phase's answers are received strictly later
    return read_offers(str(tmp_path / "offers")), read_feedback(str(tmp_path / "events"))


def answers(arm: str, version: int, hits: int, groups: int) -> list[Answer]:
    return [(arm, version, i < hits) for i in range(groups)]


def together(a: list[Answer], b: list[Answer]) -> list[Answer]:
    """Two arms' answers as a server gives them: alternating."""
    return [x for pair in zip(a, b, strict=True) for x in pair]


def ab_test(tmp_path: Path, champion_hits: int, challenger_hits: int, groups: int) -> VersionAB:
    """v2 on the challenger arm against v1 on the champion arm, ``groups`` answers each."""
    both = together(
        answers("challenger", 2, challenger_hits, groups),
        answers("champion", 1, champion_hits, groups),
    )
    return version_ab(*logs(tmp_path, both), "models:/r/2", "models:/r/1")


def test_a_clear_online_win_passes(tmp_path: Path) -> None:
    d = decide_online(ab_test(tmp_path, 30, 80, 100), 0.0)
    assert d.promote, d.reason
    ab = ab_test(tmp_path / "again", 30, 80, 100)
    assert ab.report.gain is not None
    # From the champion's first answer on: the challenger's first (a hit) came before it.
    assert ab.report.gain.estimate == pytest.approx(79 / 99 - 30 / 100)
    assert "models:/r/2 against models:/r/1" in d.reason


def test_a_small_or_missing_online_win_fails(tmp_path: Path) -> None:
    small = ab_test(tmp_path / "a", 4, 7, 10)  # +30 points on 10 groups an arm: within chance
    d = decide_online(small, 0.0)
    assert not d.promote
    assert "not surely better" in d.reason
    assert not decide_online(ab_test(tmp_path / "b", 30, 80, 100), 0.6).promote  # below the gain
    with pytest.raises(ConfigError):
        decide_online(small, 5.0)


def test_a_version_the_arm_never_served_fails(tmp_path: Path) -> None:
    offers, events = logs(
        tmp_path, together(answers("champion", 1, 30, 100), answers("challenger", 2, 80, 100))
    )
    other = decide_online(version_ab(offers, events, "models:/r/3", "models:/r/1"), 0.0)
    assert not other.promote
    assert "served models:/r/2, not models:/r/3" in other.reason


def test_a_version_is_judged_on_its_own_answers_against_the_champion_of_its_time(
    tmp_path: Path,
) -> None:
    # v2 won its A/B against v1 and was promoted; v3 is the challenger now, and people pick its
    # first choice in 10 of 50 groups where they pick the champion v2's in 35 of 50. The
    # challenger arm's history pools v2's wins with v3's answers (90 of 150 against the champion
    # arm's 65 of 160): judged on the arms, v3 passed.
    offers, events = logs(
        tmp_path,
        together(answers("champion", 1, 30, 100), answers("challenger", 2, 80, 100)),
        answers("champion", 2, 0, 10),  # v2 champion before v3 answered: not v3's time
        together(answers("challenger", 3, 10, 50), answers("champion", 2, 35, 50)),
    )
    pooled = ab_report(offers, events).gain
    assert pooled is not None
    assert pooled.low > 0  # what the gate read before
    ab = version_ab(offers, events, "models:/r/3", "models:/r/2")
    assert ab.served == ["models:/r/2", "models:/r/3"]
    assert ab.report.arms["challenger"].models == ["models:/r/3"]
    assert ab.report.arms["champion"].models == ["models:/r/2"]
    assert (ab.report.arms["champion"].answers, ab.report.arms["challenger"].answers) == (50, 50)
    assert ab.report.gain is not None
    assert ab.report.gain.estimate == pytest.approx(10 / 50 - 35 / 50)
    d = decide_online(ab, 0.0)
    assert not d.promote
    assert "-50.0 pts" in d.reason


def test_no_keeper_picks_is_no_evidence(tmp_path: Path) -> None:
    offers = OfferLog(str(tmp_path / "offers"))
    offers.append_rows(offer_rows("q", "challenger", "s", 2), sync=True)
    empty = version_ab(read_offers(str(tmp_path / "offers")), SCHEMA.empty_table(), "models:/r/2")
    d = decide_online(empty, 0.0)
    assert not d.promote
    assert "no evidence" in d.reason
    assert empty.since is None  # no champion answer at all


def test_config_takes_the_online_root() -> None:
    cfg = PromoteConfig(
        name="r", embeddings="e", series="s", online="s3://b/fb", min_online_gain=0.02
    )
    assert (cfg.online, cfg.min_online_gain) == ("s3://b/fb", 0.02)
    with pytest.raises(ValueError, match="min_gain"):
        PromoteConfig(name="r", embeddings="e", series="s", min_online_gain=3)
