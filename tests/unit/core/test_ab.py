"""keeper_core.ab: sticky assignment, the Newcombe gain interval, and the online figures."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from support import offer_rows

from keeper_core.ab import (
    ab_report,
    arm_of,
    assign,
    difference_interval,
    figures_by_model,
    format_report,
    window,
)
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
    offers.append_rows(offer_rows("empty", "challenger", "q", 3, "rank", first="candidate"))
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


def answer(
    req: str, arm: str | None, model: str, route: str = "rank", first: str = "keeper"
) -> list[dict[str, object]]:
    """Three offer rows of one answer by ``model`` (offer_rows names the model by arm)."""
    return [{**r, "model": model} for r in offer_rows(req, arm, "g", 3, route, first)]


V1, V2 = "models:/r/1", "models:/r/2"


def promoted_mid_test(root: Path) -> tuple[str, str]:
    """v1 the champion, v2 the challenger, then v2 promoted (answering for the champion too),
    and a review page run ranked by v2; returns the offers and events folders."""
    offers = OfferLog(str(root / "offers"))
    events = FeedbackLog(str(root / "events"))
    for req in ("c1", "c2", "c3"):
        offers.append_rows(answer(req, "champion", V1))
    offers.append_rows(answer("p1", "champion", V2))
    offers.append_rows(answer("p2", "champion", V2, "select", first="candidate"))
    for req in ("h1", "h2"):
        offers.append_rows(answer(req, "challenger", V2))
    for req in ("r1", "r2"):
        offers.append_rows(answer(req, None, V2, "review"))
    for req, img, action in [
        ("c1", 0, "picked-as-keeper"),  # the first choice
        ("c2", 2, "picked-as-keeper"),  # the third
        ("p1", 1, "picked-as-keeper"),
        ("p1", 0, "rejected"),
        ("h1", 0, "picked-as-keeper"),
        ("h2", 1, "accepted"),
        ("r1", 0, "picked-as-keeper"),
        ("r1", 1, "rejected"),
    ]:
        events.append([ev(req, f"{req}-img{img}", action)])
    offers.flush()
    events.flush()
    return str(root / "offers"), str(root / "events")


def test_figures_by_model_splits_a_promotion_and_counts_the_review_page(tmp_path: Path) -> None:
    offers_uri, events_uri = promoted_mid_test(tmp_path)
    rows = figures_by_model(read_offers(offers_uri), read_feedback(events_uri))
    got = {
        (f.arm, f.model): (
            f.answers,
            f.decided,
            (f.online_top1.k, f.online_top1.n),
            (f.acceptance.k, f.acceptance.n),
            (f.click_through.k, f.click_through.n),
            (f.zero_result.k, f.zero_result.n),
            f.mean_keeper_rank,
        )
        for f in rows
    }
    assert got == {
        ("champion", V1): (3, 2, (1, 2), (2, 2), (2, 3), (0, 3), 2.0),
        ("champion", V2): (1, 2, (0, 1), (1, 2), (1, 1), (0, 1), 2.0),
        ("challenger", V2): (2, 2, (1, 1), (2, 2), (2, 2), (0, 2), 1.0),
        ("review", V2): (2, 2, (1, 1), (1, 2), (1, 2), (0, 2), 1.0),
        # p2, a /v1/select answer (the aesthetic reranker): its own row, in no arm.
        ("select", V2): (1, 0, (0, 0), (0, 0), (0, 1), (1, 1), None),
    }
    assert [(f.arm, f.model) for f in rows] == list(got)  # champion, challenger, review, select
    assert rows[0].online_top1.low is not None
    assert rows[0].online_top1.low < 0.5 < rows[0].online_top1.high  # type: ignore[operator]


def test_ab_report_leaves_the_review_page_out_of_the_arms(tmp_path: Path) -> None:
    offers_uri, events_uri = promoted_mid_test(tmp_path)
    r = ab_report(read_offers(offers_uri), read_feedback(events_uri))
    champ = r.arms["champion"]
    assert champ.models == [V1, V2]
    # review's r1, r2 and select's p2 are in no arm
    assert (champ.answers, champ.decided) == (4, 4)
    assert (champ.online_top1.k, champ.online_top1.n) == (1, 3)
    assert (champ.acceptance.k, champ.acceptance.n) == (3, 4)
    assert (champ.click_through.k, champ.click_through.n) == (3, 4)
    assert (champ.zero_result.k, champ.zero_result.n) == (0, 4)
    assert champ.mean_keeper_rank == pytest.approx(2.0)
    assert (r.decisions, r.unmatched) == (8, 0)  # review's decisions matched, not counted
    assert [(f.arm, f.model) for f in r.by_model][-2:] == [("review", V2), ("select", V2)]
    text = format_report(r)
    assert "per model version:" in text
    assert "review      models:/r/2  2        100.0% (1/1)" in text
    assert r.as_dict()["by_model"][0]["model"] == V1


def test_window_keeps_the_answers_offered_in_it_and_every_decision_on_them(
    tmp_path: Path,
) -> None:
    offers = OfferLog(str(tmp_path / "offers"))
    events = FeedbackLog(str(tmp_path / "events"))
    offers.append_rows(answer("old", "champion", V1), sync=True)
    time.sleep(0.01)
    since = datetime.now(UTC)
    offers.append_rows(answer("new", "champion", V1), sync=True)
    until = datetime.now(UTC)
    for req in ("old", "new"):
        events.append([ev(req, f"{req}-img0", "picked-as-keeper")], sync=True)
    o, e = window(
        read_offers(str(tmp_path / "offers")), read_feedback(str(tmp_path / "events")), since
    )
    assert set(o.column("request_id").to_pylist()) == {"new"}
    assert e.column("request_id").to_pylist() == ["new"]  # decided after `since`: counted
    o, e = window(o, e, None, until=since)
    assert (o.num_rows, e.num_rows) == (0, 0)
    o, _ = window(read_offers(str(tmp_path / "offers")), e, None, until=until)
    assert o.num_rows == 6


def test_arm_of_a_row() -> None:
    assert arm_of("review", None) == "review"
    assert arm_of("rank", None) == "champion"
    assert arm_of("pick", "challenger") == "challenger"
    with pytest.raises(DataError, match="canary"):
        arm_of("rank", "canary")
