"""keeper_core.ab's online top-1: one trial per group a person decided, and the rank of
the image the person picked, whatever the order of the offers log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from support import offer_rows

from keeper_core.ab import ab_report, figures_by_model
from keeper_core.feedback import FeedbackEvent, FeedbackLog, OfferLog, read_feedback, read_offers


def _report(tmp_path: Path, offers: list[dict[str, Any]], events: list[FeedbackEvent]) -> Any:
    olog, elog = OfferLog(str(tmp_path / "offers")), FeedbackLog(str(tmp_path / "events"))
    olog.append_rows(offers, sync=True)
    for e in events:  # one append each: the log's order is the order they came in
        elog.append([e], sync=True)
    o, e = read_offers(str(tmp_path / "offers")), read_feedback(str(tmp_path / "events"))
    return ab_report(o, e), figures_by_model(o, e)


def _keeper(request: str, image: str, client: str | None = None) -> FeedbackEvent:
    return FeedbackEvent(
        request_id=request, image_id=image, action="picked-as-keeper", group_id="g", client=client
    )


def test_a_person_who_changes_keeper_is_one_group(tmp_path: Path) -> None:
    # One answer, one group of 4. The person first marks the model's first choice as the keeper,
    # then changes their mind and marks the third shot (an API client that sent no `undone`).
    # That is one group where a person picked a keeper, not two: the pick that stands is the
    # latest, as for every other decision, and it was not the model's first choice.
    report, by_model = _report(
        tmp_path,
        offer_rows("r1", "champion", "g", 4),
        [_keeper("r1", "r1-img0", "ann"), _keeper("r1", "r1-img2", "ann")],
    )
    top1 = report.arms["champion"].online_top1
    assert (top1.k, top1.n) == (0, 1)
    assert report.arms["champion"].mean_keeper_rank == pytest.approx(3.0)
    assert (by_model[0].online_top1.k, by_model[0].online_top1.n) == (0, 1)
    # Both images are still decided (acceptance counts images, not groups).
    assert report.arms["champion"].acceptance.n == 2


def test_two_people_on_one_group_are_two_trials(tmp_path: Path) -> None:
    report, _ = _report(
        tmp_path,
        offer_rows("r1", "champion", "g", 4),
        [_keeper("r1", "r1-img0", "ann"), _keeper("r1", "r1-img2", "bob")],
    )
    top1 = report.arms["champion"].online_top1
    assert (top1.k, top1.n) == (1, 2)


def test_an_image_offered_twice_in_an_answer_keeps_its_best_rank(tmp_path: Path) -> None:
    # /v1/pick names an image by the SHA-256 of its bytes, so a photo uploaded twice is offered
    # twice under one image_id: the original ranked first, its exact duplicate after every other
    # shot of the group. A person who picks that photo as the keeper picked the model's first
    # choice; the report used to take whichever row came last in the log (the duplicate, rank 3).
    rows = offer_rows("r1", "challenger", "g", 4, route="pick", first="keep")
    rows[3] = {**rows[3], "image_id": "r1-img0", "offered": "reject"}  # the byte copy, rank 3
    report, _ = _report(tmp_path, rows, [_keeper("r1", "r1-img0")])
    top1 = report.arms["challenger"].online_top1
    assert (top1.k, top1.n) == (1, 1)
    assert report.arms["challenger"].mean_keeper_rank == pytest.approx(1.0)
    # The copy listed first in the log: the same answer.
    rows = [rows[3], *rows[:3]]
    report, _ = _report(tmp_path / "again", rows, [_keeper("r1", "r1-img0")])
    assert report.arms["challenger"].online_top1.k == 1


def test_select_answers_count_in_no_arm(tmp_path: Path) -> None:
    # /v1/select's answers carry no arm (the aesthetic reranker ranked them, not a ranker):
    # during an A/B they must not enter the champion's online top-1 that promote gates on.
    rows = [
        *offer_rows("r1", "champion", "g", 3),
        *offer_rows("s1", None, "q", 3, route="select", first="pick"),
    ]
    report, by_model = _report(tmp_path, rows, [_keeper("r1", "r1-img0"), _keeper("s1", "s1-img2")])
    top1 = report.arms["champion"].online_top1
    assert (top1.k, top1.n) == (1, 1)  # the rank answer only
    assert {f.arm for f in by_model} == {"champion", "select"}
    (select,) = [f for f in by_model if f.arm == "select"]
    assert (select.online_top1.k, select.online_top1.n) == (0, 1)
