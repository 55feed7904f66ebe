"""keeper_train.jobs.ab_report: the online A/B report from a feedback root, as the CLI runs it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from support import offer_rows

from keeper_core.feedback import FeedbackEvent, FeedbackLog, OfferLog
from keeper_train.jobs import ab_report


def write_root(root: Path) -> None:
    offers = OfferLog(str(root / "offers"))
    events = FeedbackLog(str(root / "events"))
    for arm, first_hits in (("champion", 2), ("challenger", 5)):
        for i in range(6):
            req = f"{arm}-{i}"
            offers.append_rows(offer_rows(req, arm, "s", 3))
            chosen = 0 if i < first_hits else 2
            events.append(
                [
                    FeedbackEvent(
                        request_id=req, image_id=f"{req}-img{chosen}", action="picked-as-keeper"
                    )
                ]
            )
    events.append([FeedbackEvent(request_id="other", image_id="x", action="accepted")])
    offers.flush()
    events.flush()


def test_report_prints_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_root(tmp_path / "fb")
    out = tmp_path / "ab.json"
    assert ab_report.main([f"feedback={tmp_path / 'fb'}", f"json_out={out}"]) == 0
    text = capsys.readouterr().out
    assert "online top-1" in text
    assert "33.3% (2/6" in text  # champion
    assert "83.3% (5/6" in text  # challenger
    assert "+50.0 pts" in text
    report = json.loads(out.read_text())
    assert report["arms"]["challenger"]["online_top1"]["k"] == 5
    assert report["unmatched"] == 1  # the decision about a request no answer has


def test_window_and_missing_offers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_root(tmp_path / "fb")
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert ab_report.main([f"feedback={tmp_path / 'fb'}", f"since={later}"]) == 0
    assert "answers" in capsys.readouterr().out
    r = ab_report.run(ab_report.ABReportConfig(feedback=str(tmp_path / "fb"), since=later))
    assert r.arms["champion"].answers == 0
    earlier = datetime.now(UTC) - timedelta(hours=1)
    cfg = ab_report.ABReportConfig(feedback=str(tmp_path / "fb"), since=earlier, until=later)
    assert ab_report.run(cfg).arms["champion"].answers == 6
    (tmp_path / "empty").mkdir()
    assert ab_report.main([f"feedback={tmp_path / 'empty'}"]) == 2
    assert "no offers logged here" in capsys.readouterr().err


def test_an_events_folder_without_a_part_is_no_decision_yet(tmp_path: Path) -> None:
    # Made ahead, or left by a first flush killed mid-write: it failed the report.
    root = tmp_path / "fb"
    OfferLog(str(root / "offers")).append_rows(offer_rows("q", "champion", "s", 2), sync=True)
    (root / "events").mkdir()
    (root / "events" / ".part-x.parquet.abcd1234.tmp").write_bytes(b"half")
    r = ab_report.run(ab_report.ABReportConfig(feedback=str(root)))
    assert (r.arms["champion"].answers, r.decisions) == (1, 0)


def test_the_keeper_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from keeper_core.cli import main as keeper

    write_root(tmp_path / "fb")
    argv = ["ab-report", "--feedback", str(tmp_path / "fb"), "--confidence", "0.9"]
    assert keeper(argv) == 0
    assert "online top-1" in capsys.readouterr().out
