"""keeper_core.ab: sticky assignment, the Newcombe gain interval, and the online figures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import offer_rows

from keeper_core.ab import ab_report, assign, difference_interval, format_report
from keeper_core.errors import DataError
from keeper_core.feedback import FeedbackEvent, FeedbackLog, OfferLog, read_feedback, read_offers


def test_assign_is_sticky_and_near_the_share() -> None:
    keys = [f"client-{i}" for i in range(20_000)]
    arms = [assign(k, 0.3) for k in keys]
    assert arms == [assign(k, 0.3) for k in keys]  # the same every time
    share = sum(a == "challenger" for a in arms) / len(keys)
    assert abs(share - 0.3) < 0.015  # binomial sd at n=20k is 0.0032
    assert {assign(k, 0.0) for k in keys[:500]} == {"champion"}
    assert {assign(k, 1.0) for k in keys[:500]} == {"challenger"}
    # Growing the share keeps every client the smaller share had on the challenger.
    small = {k for k in keys if assign(k, 0.2) == "challenger"}
    large = {k for k in keys if assign(k, 0.4) == "challenger"}
    assert small < large
    # A new salt (a new experiment) reshuffles clients.
    other = [assign(k, 0.3, salt="exp-2") for k in keys[:2000]]
    assert other != arms[:2000]
    with pytest.raises(ValueError, match="share"):
        assign("x", 1.5)


def test_difference_interval() -> None:
    same = difference_interval(40, 100, 40, 100)
    assert same is not None
    assert same.estimate == 0
    assert same.low < 0 < same.high
    better = difference_interval(40, 200, 150, 200)
    assert better is not None
    assert better.estimate == pytest.approx(0.55)
    assert 0.4 < better.low < 0.55 < better.high < 0.7
    # Small samples: 4/10 vs 9/10 is +50 points, and still its interval is wide.
    small = difference_interval(4, 10, 9, 10)
    assert small is not None
    assert small.low < 0.25
    assert difference_interval(0, 0, 3, 5) is None


def ev(request: str, image: str, action: str) -> FeedbackEvent:
    return FeedbackEvent(request_id=request, image_id=image, action=action)  # type: ignore[arg-type]


def test_ab_report_measures_each_arm(tmp_path: Path) -> None:
    offers = OfferLog(str(tmp_path / "offers"))
    events = FeedbackLog(str(tmp_path / "events"))
    rng = np.random.default_rng(0)
    for arm, hits in (("champion", 4), (None, 0), ("challenger", 9)):
        n_req = 10 if arm is not None else 2
        for i in range(n_req):
            req = f"{arm}-{i}"
            offers.append_rows(offer_rows(req, arm, "s0", 4))
            if arm is None:  # no A/B: counted as the champion's, never decided
                continue
            # The person picks the model's first choice in `hits` of 10 groups.
            chosen = 0 if i < hits else int(rng.integers(1, 4))
            events.append([ev(req, f"{req}-img{chosen}", "picked-as-keeper")])
            events.append([ev(req, f"{req}-img{(chosen + 1) % 4}", "rejected")])
    # A zero-result answer (nothing offered to keep) on the challenger, never decided.
    offers.append_rows(offer_rows("empty", "challenger", "q", 3, "select", first="candidate"))
    # Taken back: not a decision. Unknown request: unmatched.
    events.append([ev("champion-0", "champion-0-img3", "accepted")])
    events.append([ev("champion-0", "champion-0-img3", "undone")])
    events.append([ev("nobody", "x", "accepted")])
    offers.flush()
    events.flush()

    r = ab_report(read_offers(str(tmp_path / "offers")), read_feedback(str(tmp_path / "events")))
    champ, chall = r.arms["champion"], r.arms["challenger"]
    assert (champ.answers, chall.answers) == (12, 11)
    assert (champ.online_top1.k, champ.online_top1.n) == (4, 10)
    assert (chall.online_top1.k, chall.online_top1.n) == (9, 10)
    assert champ.acceptance.value == pytest.approx(0.5)  # a keeper and a reject per group
    assert (champ.click_through.k, champ.click_through.n) == (10, 12)
    assert (chall.zero_result.k, chall.zero_result.n) == (1, 11)
    assert champ.zero_result.k == 0
    assert chall.mean_keeper_rank is not None
    assert champ.mean_keeper_rank is not None
    assert chall.mean_keeper_rank < champ.mean_keeper_rank
    assert champ.models == ["models:/r/1"]
    assert r.gain is not None
    assert r.gain.estimate == pytest.approx(0.5)
    assert r.decisions == 41  # 20 + 20 standing, the undone one gone, + the unmatched one
    assert r.unmatched == 1
    text = format_report(r)
    assert "online top-1" in text
    assert "+50.0 pts" in text
    assert r.as_dict()["arms"]["challenger"]["online_top1"]["k"] == 9


def test_unknown_arm_is_refused(tmp_path: Path) -> None:
    offers = OfferLog(str(tmp_path / "offers"))
    offers.append_rows(offer_rows("r", "canary", "s", 2), sync=True)
    events = FeedbackLog(str(tmp_path / "events"))
    events.append([ev("r", "r-img0", "accepted")], sync=True)
    with pytest.raises(DataError, match="canary"):
        ab_report(read_offers(str(tmp_path / "offers")), read_feedback(str(tmp_path / "events")))
