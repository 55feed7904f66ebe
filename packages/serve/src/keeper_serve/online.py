"""``OnlineFigures``: each model version's online figures, from the feedback logs, as gauges.

A decision may reach an ingress replica that never served its answer, so no replica can count
these figures itself; the durable logs under ``feedback.root`` (``ROOT/offers``, ``ROOT/events``;
keeper_core.feedback) hold both sides. Every ``feedback.online_poll_s`` seconds a thread reads the
answers offered in the last ``feedback.online_window_s`` seconds and every decision about them,
measures them with keeper_core.ab (the figures of ``keeper ab-report``), and sets one gauge per
figure, tagged ``arm`` and ``model``:

- per (arm, model version) that answered in the window (:func:`keeper_core.ab.figures_by_model`;
  the review page's answers under the arm ``review``), and
- per A/B arm with ``model="*"`` (:func:`keeper_core.ab.ab_report`'s arms: champion, challenger).

A rate with no denominator (no keeper picked yet, no decision) is NaN, never 0. A series whose
(arm, model) left the window reads 0 for the counts (``keeper_online_answers``,
``keeper_online_decisions``, ``keeper_online_keeper_picks``: true, none in the window) and NaN for
the rates and the mean rank. Ray's exporter drops a NaN gauge, so such a series is absent from
``/metrics`` (not its old value). Logs that do not exist yet measure as empty; a read that fails (a
corrupt part, storage down) keeps the last figures and gauges, logs the error, shows it in
:meth:`OnlineFigures.info`, and ``keeper_online_computed_at`` stops advancing.

Offer parts are read once each (a part is written whole and never changed) and only the columns
the figures use (not the embeddings); parts wholly older than the window are dropped. Run one
replica: several would each export the same figures.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, cast

import pyarrow as pa
import pyarrow.compute as pc
from ray import serve
from ray.serve.metrics import Gauge

from keeper_core import storage
from keeper_core.ab import (
    FIGURE_COLUMNS,
    ArmFigures,
    ModelFigures,
    Rate,
    ab_report,
    window,
)
from keeper_core.errors import DataError, StorageError
from keeper_core.feedback import OFFERS_SCHEMA, read_feedback_so_far
from keeper_serve.config import FeedbackArgs

log = logging.getLogger("keeper.serve")

#: The ``model`` tag of an arm's totals.
ALL_MODELS = "*"
TAGS = cast("tuple[str]", ("arm", "model"))  # Ray annotates Tuple[str], takes any number
#: gauge -> description; every one tagged arm and model (see the module docstring).
GAUGES: dict[str, str] = {
    "keeper_online_answers": "answers offered in the window",
    "keeper_online_decisions": "standing decisions on those answers' offers",
    "keeper_online_keeper_picks": "keepers picked among ranked offers (online top-1's groups)",
    "keeper_online_top1": "share of keeper picks that were the model's first choice",
    "keeper_online_acceptance": "share of decided images accepted or picked as keeper",
    "keeper_online_click_through": "share of answers with at least one decision",
    "keeper_online_zero_result": "share of answers that offered nothing to keep",
    "keeper_online_mean_keeper_rank": "mean rank (1 = first) of the image picked as keeper",
}
COUNTS = ("keeper_online_answers", "keeper_online_decisions", "keeper_online_keeper_picks")
COMPUTED_AT = "keeper_online_computed_at"
_PROJECTED = pa.schema([OFFERS_SCHEMA.field(c) for c in FIGURE_COLUMNS])


class GaugeLike(Protocol):
    """What OnlineFigures needs of a gauge (Ray's, or a test's recorder)."""

    def set(self, value: float, tags: dict[str, str]) -> object: ...


def _rate(r: Rate) -> float:
    return math.nan if r.value is None else r.value


def gauge_values(f: ModelFigures) -> dict[str, float]:
    """The value of every gauge in :data:`GAUGES` for one row of figures."""
    return {
        "keeper_online_answers": float(f.answers),
        "keeper_online_decisions": float(f.decided),
        "keeper_online_keeper_picks": float(f.online_top1.n),
        "keeper_online_top1": _rate(f.online_top1),
        "keeper_online_acceptance": _rate(f.acceptance),
        "keeper_online_click_through": _rate(f.click_through),
        "keeper_online_zero_result": _rate(f.zero_result),
        "keeper_online_mean_keeper_rank": (
            math.nan if f.mean_keeper_rank is None else f.mean_keeper_rank
        ),
    }


def _arm_total(a: ArmFigures) -> ModelFigures:
    return ModelFigures(
        arm=a.arm,
        model=ALL_MODELS,
        answers=a.answers,
        decided=a.decided,
        online_top1=a.online_top1,
        acceptance=a.acceptance,
        click_through=a.click_through,
        zero_result=a.zero_result,
        mean_keeper_rank=a.mean_keeper_rank,
    )


@dataclass(frozen=True)
class OnlineReport:
    """One computation: the arms' totals (model ``*``) first, then each (arm, model)."""

    computed_at: float  # unix seconds
    since: datetime  # answers offered at or after this count
    answers: int  # in every arm, the review page's included
    decisions: int  # standing decisions on them
    figures: list[ModelFigures] = field(default_factory=list)


class OfferParts:
    """The offers log's parts under ``uri``, each read once, with only the figures' columns.

    A part is written whole and never changed (keeper_core.feedback.PartLog), so a part read
    once is kept; one whose rows are all older than the window is dropped and not read again.
    """

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._tables: dict[str, pa.Table] = {}
        self._expired: set[str] = set()

    def read(self, since: datetime) -> pa.Table:
        """Every offer row received at or after ``since`` (a missing log: none).

        Raises:
            StorageError: the log cannot be listed or a part read.
            DataError: a part that is not an offers part.
        """
        if not storage.exists(self.uri):
            return _PROJECTED.empty_table()
        names = set(storage.list_files(self.uri, suffixes=[".parquet"]))
        for name in sorted(names - self._tables.keys() - self._expired):
            t = storage.read_parquet(name, columns=list(FIGURE_COLUMNS))
            try:
                self._tables[name] = t.select(list(FIGURE_COLUMNS)).cast(_PROJECTED)
            except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as e:
                raise DataError(f"not an offers part: {e}", source=name) from e
        self._expired &= names
        cut = pa.scalar(since, _PROJECTED.field("received_at").type)
        for name in list(self._tables):
            t = self._tables[name]
            if name not in names:  # removed from the log
                del self._tables[name]
            elif t.num_rows == 0 or pc.less(pc.max(t.column("received_at")), cut).as_py():
                del self._tables[name]
                self._expired.add(name)
        if not self._tables:
            return _PROJECTED.empty_table()
        return pa.concat_tables(self._tables.values())


def measure(
    root: str, offers: OfferParts, window_s: float, confidence: float = 0.95
) -> OnlineReport:
    """The online figures of the answers offered in the last ``window_s`` seconds.

    Raises:
        StorageError, DataError: a log cannot be read.
    """
    now = time.time()
    since = datetime.fromtimestamp(now, UTC) - timedelta(seconds=window_s)
    events = read_feedback_so_far(storage.join(root, "events"))
    o, e = window(offers.read(since), events, since)
    report = ab_report(o, e, confidence)
    totals = [_arm_total(report.arms[a]) for a in report.arms]
    answers = len(pc.unique(o.column("request_id")))
    return OnlineReport(now, since, answers, report.decisions, [*totals, *report.by_model])


# One replica, a poller's share of a CPU: a Serve config may change the CPU share, not the count
# (keeper_serve.app.bind refuses more than one replica: each would export the same figures).
@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0.05})
class OnlineFigures:
    """Recomputes the online figures from ``args.root``'s logs every ``args.online_poll_s``.

    Args:
        args: the app's feedback args (``root``, ``online_poll_s``, ``online_window_s``).
        gauges: name -> gauge for every name in :data:`GAUGES` and ``keeper_online_computed_at``
            (tests pass recorders); Ray Serve gauges when None.
    """

    def __init__(self, args: FeedbackArgs, gauges: Mapping[str, GaugeLike] | None = None) -> None:
        self.args = args
        self.gauges: Mapping[str, GaugeLike] = gauges or {
            **{n: Gauge(n, description=d, tag_keys=TAGS) for n, d in GAUGES.items()},
            COMPUTED_AT: Gauge(COMPUTED_AT, description="unix time of the last good computation"),
        }
        self._offers = OfferParts(storage.join(args.root, "offers"))
        self._lock = threading.Lock()  # one computation at a time (the thread, refresh())
        self._report: OnlineReport | None = None
        self._reported: set[tuple[str, str]] = set()  # every (arm, model) ever set
        self._error: str | None = None
        self._stop = threading.Event()
        if args.online_poll_s > 0:
            threading.Thread(target=self._follow, name="keeper-online-poll", daemon=True).start()

    def _follow(self) -> None:
        wait = 0.0  # the first computation at once: gauges from the replica's start
        while not self._stop.wait(wait):
            wait = self.args.online_poll_s
            try:
                self.refresh()
            except Exception as e:  # an unforeseen error must not end the polling for good
                self._error = f"{type(e).__name__}: {e}"
                log.exception("online figures of %s: poll failed", self.args.root)

    def refresh(self) -> bool:
        """Compute the figures once and set the gauges; False (figures kept) when a log
        cannot be read."""
        with self._lock:
            try:
                report = measure(self.args.root, self._offers, self.args.online_window_s)
            except (StorageError, DataError) as e:
                self._error = f"{type(e).__name__}: {e}"
                log.error("online figures of %s: keeping the last ones: %s", self.args.root, e)
                return False
            self._set(report)
            self._report, self._error = report, None
            return True

    def _set(self, report: OnlineReport) -> None:
        now = set()
        for f in report.figures:
            tags = {"arm": f.arm, "model": f.model}
            now.add((f.arm, f.model))
            for name, value in gauge_values(f).items():
                self.gauges[name].set(value, tags=tags)
        for arm, model in sorted(self._reported - now):  # out of the window: no stale value
            for name in GAUGES:
                self.gauges[name].set(
                    0.0 if name in COUNTS else math.nan, tags={"arm": arm, "model": model}
                )
        self._reported |= now
        self.gauges[COMPUTED_AT].set(report.computed_at, tags={})

    def info(self) -> dict[str, Any]:
        r = self._report
        return {
            "computed_at": r.computed_at if r else None,
            "window_s": self.args.online_window_s,
            "answers": r.answers if r else None,
            "decisions": r.decisions if r else None,
            "figures": [asdict(f) for f in r.figures] if r else [],
            "error": self._error,
        }

    def __del__(self) -> None:
        self._stop.set()
