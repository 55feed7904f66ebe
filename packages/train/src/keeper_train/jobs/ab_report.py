"""Measure champion and challenger on people's decisions: the online A/B report.

    keeper ab-report --feedback s3://bucket/feedback [--since 2026-11-01T00:00:00Z] [--json-out F]
    python -m keeper_train.jobs.ab_report --config FILE feedback=... [key=value ...]   # the same

Reads the server's feedback root (``ROOT/offers``: what each answer offered, and to which arm;
``ROOT/events``: what people decided) and prints, per arm, the online top-1 (the model's first
choice was the keeper the person picked), acceptance rate, click-through, zero-result rate and
mean keeper rank, each with its exact interval, then the challenger's online top-1 gain with a
Newcombe interval (``keeper_core.ab``). ``keeper promote --online ROOT`` gates on the same gain.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import ConfigDict, Field

from keeper_core import storage
from keeper_core.ab import ABReport, ab_report, format_report, window
from keeper_core.errors import DataError
from keeper_core.feedback import read_feedback_so_far, read_offers
from keeper_train.config import TimeWindow, job_main

OFFERS, EVENTS = "offers", "events"


class ABReportConfig(TimeWindow):
    """Everything keeper ab-report takes. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    feedback: str = Field(description="the server's feedback root (ROOT/offers, ROOT/events)")
    since: datetime | None = Field(None, description="only answers offered at or after this")
    until: datetime | None = Field(None, description="only answers offered before this")
    confidence: float = Field(0.95, gt=0, lt=1, description="coverage of every interval")
    json_out: str | None = Field(None, description="also write the report here (path or s3://)")


def load(
    feedback: str, since: datetime | None = None, until: datetime | None = None
) -> tuple[pa.Table, pa.Table]:
    """The offers in the window, every event about them, and the events about answers that no
    offer in the whole log has (a client's mistyped ``request_id``, a root mixed up): the report
    counts those as without an offer, where a window would leave them out unseen.

    Raises:
        DataError: no offers logged under ``feedback`` (``feedback.offers`` off, or another root).
        StorageError: the logs cannot be read.
    """
    offers_uri = storage.join(feedback, OFFERS)
    if not storage.exists(offers_uri):
        raise DataError(
            "no offers logged here: the server writes them with feedback.offers on",
            source=offers_uri,
        )
    # Offers and no decision yet: every figure but the answers' count is empty.
    events = read_feedback_so_far(storage.join(feedback, EVENTS))
    offers = read_offers(offers_uri)
    known = pc.is_in(events.column("request_id"), value_set=pc.unique(offers.column("request_id")))
    chosen, about = window(offers, events, since, until)
    return chosen, pa.concat_tables([about, events.filter(pc.invert(known))])


def run(cfg: ABReportConfig) -> ABReport:
    offers, events = load(cfg.feedback, cfg.since, cfg.until)
    report = ab_report(offers, events, cfg.confidence)
    if cfg.json_out:
        storage.write_bytes(cfg.json_out, json.dumps(report.as_dict(), indent=2).encode())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv,
        job="ab_report",
        description="Per-arm online figures and the challenger's gain from the feedback logs",
        model=ABReportConfig,
        run=run,
        describe=format_report,
        exit_code=lambda _: 0,
        example="feedback=s3://bucket/feedback since=2026-11-01T00:00:00Z",
    )


if __name__ == "__main__":
    sys.exit(main())
