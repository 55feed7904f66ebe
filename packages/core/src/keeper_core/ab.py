"""A/B of champion and challenger: sticky assignment, and the online figures people's decisions give.

Ray Serve has no traffic split built in (Seldon and KServe split traffic and record a reward per
model on a feedback route); keeper's ingress sends a configurable share of ``/v1/rank`` and
``/v1/pick`` to the challenger with :func:`assign` (``/v1/select`` ranks with the aesthetic
reranker, in no arm), and every answer's offers are logged with their ``arm`` (``keeper_core.feedback``). :func:`ab_report` joins the offers to
the standing decisions and measures each arm:

- **online top-1**: of the groups where a person picked a keeper, the share where it was the
  model's first choice (``rank`` 0). The live counterpart of the offline top-1 that ``keeper
  promote`` gates on, and the figure the challenger's gain is measured on. One trial per group
  and person: a person who moved the keeper without taking the first back counts with the
  latest; an image offered twice in one group (a byte copy: ids are content hashes) counts with
  its better rank;
- **acceptance rate**: of the images decided, the share accepted or picked as keeper;
- **click-through**: of the answers offered, the share with at least one decision;
- **mean keeper rank**: the model's rank (1 = first) of the image picked as keeper;
- **zero-result rate**: of the answers, the share that offered nothing to keep (no ``keeper``,
  ``keep`` or ``pick`` row).

The gain (challenger minus champion online top-1) comes with a Newcombe interval built from the two
arms' exact (Clopper-Pearson) intervals, so its lower bound is conservative like the offline
gain's; ``keeper promote`` can require it above zero.

:func:`figures_by_model` gives the same figures per (arm, model version): a version promoted
mid-test answered in both arms and has a row in each. Offers of the review page (``route``
``review``: a batch ``keeper pick`` run a person triages, no arm) are no answer of the live split:
:func:`ab_report` leaves them out, :func:`figures_by_model` counts them under the arm
``review``. :func:`window` keeps the answers of a time window and the events about them.
:func:`version_ab` measures one challenger version against the champion over the same time,
what ``keeper promote --online`` gates on (an arm pools every version that answered for it).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from keeper_core.errors import DataError
from keeper_core.feedback import decisions
from keeper_core.metrics import Interval, binomial_interval

Arm = Literal["champion", "challenger"]
ARMS: tuple[Arm, ...] = ("champion", "challenger")
#: What an offer row says the model put forward, per route (rank, pick, select).
OFFERED_FIRST = frozenset({"keeper", "keep", "pick"})
_CHOSEN = frozenset({"accepted", "picked-as-keeper"})
#: The offers' route of the review page's batch picks, and the arm figures_by_model files them
#: under: shown to a person, but no answer of the live split.
REVIEW = "review"
#: The offers' route of ``/v1/select``, and its arm likewise: ranked by the aesthetic reranker,
#: not a registered ranker, its answers belong to neither arm of a ranker's A/B.
SELECT = "select"
#: The offer columns the figures read (the rest, embeddings above all, need not be read).
FIGURE_COLUMNS = (
    "received_at",
    "request_id",
    "route",
    "arm",
    "model",
    "group_id",
    "image_id",
    "rank",
    "offered",
)
_K = TypeVar("_K", bound=Hashable)


def assign(key: str, share: float, salt: str = "keeper-ab") -> Arm:
    """The arm of a client ``key``: the challenger for a ``share`` of keys, the same every time.

    The key's SHA-256 (salted, so a new experiment reshuffles clients) read as a number in [0, 1)
    is compared with ``share``: sticky per key, independent of the server and its replicas, and
    a larger share keeps every client the smaller one had on the challenger.

    Raises:
        ValueError: ``share`` outside [0, 1].
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the challenger's share must be in [0, 1], got {share}")
    digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
    u = (int.from_bytes(digest[:8], "big") >> 11) / 2**53  # exact, and < 1: share 1 is everyone
    return "challenger" if u < share else "champion"


def difference_interval(
    k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95
) -> Interval | None:
    """``k2/n2 - k1/n1`` with Newcombe's interval over exact (Clopper-Pearson) arm intervals.

    None when either arm has no trials.
    """
    if n1 < 1 or n2 < 1:
        return None
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = binomial_interval(k1, n1, confidence)
    l2, u2 = binomial_interval(k2, n2, confidence)
    d = p2 - p1
    low = d - math.hypot(p2 - l2, u1 - p1)
    high = d + math.hypot(u2 - p2, p1 - l1)
    return Interval(d, low, high, confidence, n1 + n2)


@dataclass(frozen=True)
class Rate:
    """``k`` of ``n``, with its exact interval (``value`` None when ``n`` is 0)."""

    k: int
    n: int
    value: float | None
    low: float | None
    high: float | None

    @classmethod
    def of(cls, k: int, n: int, confidence: float) -> Rate:
        if n == 0:
            return cls(k, n, None, None, None)
        lo, hi = binomial_interval(k, n, confidence)
        return cls(k, n, k / n, lo, hi)


@dataclass(frozen=True)
class ArmFigures:
    """One arm's online figures."""

    arm: str
    models: list[str]  # every model that answered for the arm (a promotion mid-test shows two)
    answers: int
    online_top1: Rate  # groups with a keeper picked: the model's first choice was it
    acceptance: Rate  # images decided: accepted or picked as keeper
    click_through: Rate  # answers with at least one decision
    zero_result: Rate  # answers that offered nothing to keep
    mean_keeper_rank: float | None  # 1 = the model's first choice
    decided: int = 0  # standing decisions on the arm's offers


@dataclass(frozen=True)
class ModelFigures:
    """The online figures of one model version in one arm (``review``: the review page's;
    ``select``: ``/v1/select``'s)."""

    arm: str
    model: str  # a registered version's URI (models:/NAME/VERSION), or the rule's name
    answers: int
    decided: int  # standing decisions on its offers
    online_top1: Rate
    acceptance: Rate
    click_through: Rate
    zero_result: Rate
    mean_keeper_rank: float | None


@dataclass(frozen=True)
class ABReport:
    arms: dict[str, ArmFigures]
    gain: Interval | None  # challenger minus champion online top-1
    decisions: int
    unmatched: int  # standing decisions whose (request_id, image_id) no offer row given has
    confidence: float
    by_model: list[ModelFigures] = field(default_factory=list)  # figures_by_model's rows

    def as_dict(self) -> dict[str, Any]:
        return {
            "arms": {a: asdict(f) for a, f in self.arms.items()},
            "by_model": [asdict(f) for f in self.by_model],
            "gain": asdict(self.gain) if self.gain is not None else None,
            "decisions": self.decisions,
            "unmatched": self.unmatched,
            "confidence": self.confidence,
        }


def window(
    offers: pa.Table, events: pa.Table, since: datetime | None, until: datetime | None = None
) -> tuple[pa.Table, pa.Table]:
    """The offers received in [since, until) (None: unbounded), and the events about them.

    An answer is in or out as a whole by when it was offered; every decision about it counts,
    however late it came.
    """
    ts = offers.column("received_at")
    if since is not None:
        offers = offers.filter(pc.greater_equal(ts, pa.scalar(since, ts.type)))
    if until is not None:
        ts = offers.column("received_at")
        offers = offers.filter(pc.less(ts, pa.scalar(until, ts.type)))
    asked = pc.unique(offers.column("request_id"))
    return offers, events.filter(pc.is_in(events.column("request_id"), value_set=asked))


def arm_of(route: str | None, arm: str | None) -> str:
    """The arm an offer row counts under: ``review`` for the review page's, ``select`` for
    ``/v1/select``'s, else its A/B arm, the champion when there is no A/B.

    Raises:
        DataError: an arm other than champion or challenger.
    """
    if route in (REVIEW, SELECT):
        return route
    a = arm or "champion"
    if a not in ARMS:
        raise DataError(f"offers with arm {a!r}: expected one of {ARMS}")
    return a


@dataclass
class _Tally:
    """What the figures of one key (an arm, or an arm and model) are counted from."""

    models: set[str] = field(default_factory=set)
    requests: set[str] = field(default_factory=set)
    keep_offered: set[str] = field(default_factory=set)  # requests that offered something to keep
    decided_requests: set[str] = field(default_factory=set)
    decided: int = 0
    accepted: int = 0
    keepers: int = 0  # keeper picks on ranked offers: online top-1's trials
    hits: int = 0  # of them, the model's first choice
    rank_sum: float = 0.0

    def rates(self, confidence: float) -> dict[str, Any]:
        n = len(self.requests)
        return {
            "answers": n,
            "decided": self.decided,
            "online_top1": Rate.of(self.hits, self.keepers, confidence),
            "acceptance": Rate.of(self.accepted, self.decided, confidence),
            "click_through": Rate.of(len(self.decided_requests & self.requests), n, confidence),
            "zero_result": Rate.of(len(self.requests - self.keep_offered), n, confidence),
            "mean_keeper_rank": self.rank_sum / self.keepers if self.keepers else None,
        }


def _tally(
    offers: pa.Table, events: pa.Table, key: Callable[[str, str], _K | None]
) -> tuple[dict[_K, _Tally], int, int]:
    """Count each ``key(arm, model)``'s figures (None: the row counts nowhere).

    Returns:
        the tallies, the standing decisions, and those that no offer row has.
    """
    rows = offers.select(list(FIGURE_COLUMNS[1:])).to_pylist()
    # (request, image) -> its key and, per group it was offered in, its best rank there. An
    # image is named by its bytes' hash, so a photo sent twice in one answer (a byte copy) is
    # offered twice: the person who picks it picked what the model put at the better rank, not
    # whichever row the log happens to hold last.
    offer: dict[tuple[str, str], tuple[_K | None, dict[str | None, int | None]]] = {}
    tallies: dict[_K, _Tally] = {}
    for r in rows:
        model = str(r["model"])
        k = key(arm_of(r["route"], r["arm"]), model)
        req = str(r["request_id"])
        if r["image_id"] is not None:
            _, ranks = offer.setdefault((req, str(r["image_id"])), (k, {}))
            g = None if r["group_id"] is None else str(r["group_id"])
            ranks[g] = _better_rank(ranks.get(g, r["rank"]), r["rank"])
        if k is None:
            continue
        t = tallies.setdefault(k, _Tally())
        t.models.add(model)
        t.requests.add(req)
        if r["offered"] in OFFERED_FIRST:
            t.keep_offered.add(req)

    standing = decisions(events).to_pylist()
    unmatched = 0
    # Online top-1 has one trial per group a person decided: (key, request, group, client) ->
    # the rank of the keeper that stands, the latest (``standing`` is in the order of each
    # decision's latest event), so a person who moved the keeper without an ``undone`` is one
    # group, not two.
    keeper_of: dict[tuple[_K, str, str | None, str | None], int] = {}
    for d in standing:
        where = (str(d["request_id"]), str(d["image_id"]))
        if where not in offer:
            unmatched += 1
            continue
        k, ranks = offer[where]
        if k is None:  # an offer counted nowhere (the review page's, in the A/B report)
            continue
        t = tallies[k]
        t.decided_requests.add(where[0])
        t.decided += 1
        t.accepted += d["action"] in _CHOSEN
        group = d["group_id"] if d["group_id"] in ranks else None
        if group is None and None not in ranks:  # the event names no group the offer has
            group = min(ranks, key=lambda g: _rank_order(ranks[g]))
        rank = ranks[group]
        if d["action"] == "picked-as-keeper" and rank is not None:
            keeper_of[(k, where[0], group, d["client"])] = int(rank)  # a later one replaces it
    for (k, *_), rank in keeper_of.items():
        t = tallies[k]
        t.keepers += 1
        t.hits += rank == 0
        t.rank_sum += rank + 1
    return tallies, len(standing), unmatched


def _rank_order(rank: int | None) -> float:
    return math.inf if rank is None else float(rank)


def _better_rank(a: int | None, b: int | None) -> int | None:
    """The better (lower) of two ranks of one image; None (unranked) only when both are."""
    return a if _rank_order(a) <= _rank_order(b) else b


def figures_by_model(
    offers: pa.Table, events: pa.Table, confidence: float = 0.95
) -> list[ModelFigures]:
    """The online figures per (arm, model) that answered, sorted by arm then model.

    A version that answered in both arms (promoted mid-test) has a row in each; the review
    page's offers (route ``review``) have theirs under the arm ``review``. A decision is matched
    to the offer of its ``(request_id, image_id)``, as in :func:`ab_report`.

    Raises:
        DataError: offers with an arm other than champion or challenger.
    """
    tallies, _, _ = _tally(offers, events, lambda arm, model: (arm, model))
    order = {a: i for i, a in enumerate((*ARMS, REVIEW, SELECT))}
    return [
        ModelFigures(arm=arm, model=model, **tallies[(arm, model)].rates(confidence))
        for arm, model in sorted(tallies, key=lambda k: (order[k[0]], k[1]))
    ]


def ab_report(offers: pa.Table, events: pa.Table, confidence: float = 0.95) -> ABReport:
    """Each arm's online figures from the offers log and the feedback events.

    Offers of ``/v1/rank`` and ``/v1/pick`` without an ``arm`` (no A/B running) count as the
    champion's; the review page's (route ``review``) and ``/v1/select``'s (route ``select``: the
    aesthetic reranker, not a ranker) count in no arm, only in ``by_model``
    (:func:`figures_by_model`). A
    decision is matched to the offer of its ``(request_id, image_id)``; one no offer has is
    counted as ``unmatched``.

    Raises:
        DataError: offers with an arm other than champion or challenger.
    """
    tallies, standing, unmatched = _tally(
        offers, events, lambda arm, _model: arm if arm in ARMS else None
    )
    arms: dict[str, ArmFigures] = {}
    for a in ARMS:
        t = tallies.get(a, _Tally())
        arms[a] = ArmFigures(arm=a, models=sorted(t.models), **t.rates(confidence))
    champ, chall = tallies.get("champion", _Tally()), tallies.get("challenger", _Tally())
    gain = difference_interval(champ.hits, champ.keepers, chall.hits, chall.keepers, confidence)
    by_model = figures_by_model(offers, events, confidence)
    return ABReport(arms, gain, standing, unmatched, confidence, by_model)


@dataclass(frozen=True)
class VersionAB:
    """One challenger version's A/B against the champion over the same time (:func:`version_ab`).

    ``report`` is :func:`ab_report` over the challenger arm's answers by ``challenger`` and the
    champion arm's (by ``champion`` when named) from ``since``, the first time both were
    answering; ``served`` is every model the challenger arm answered with in the whole log.
    """

    report: ABReport
    challenger: str
    champion: str | None
    since: datetime | None  # None: one of the two never answered, and the report is empty
    served: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.report.as_dict(),
            "challenger": self.challenger,
            "champion": self.champion,
            "since": self.since.isoformat() if self.since is not None else None,
            "challenger_arm_served": self.served,
        }


def version_ab(
    offers: pa.Table,
    events: pa.Table,
    challenger: str,
    champion: str | None = None,
    confidence: float = 0.95,
) -> VersionAB:
    """The A/B of the version ``challenger`` (a model URI as offers name it) against the champion.

    An arm's figures pool every version that answered for it, and the challenger arm answers
    with each challenger in turn: a version that won an earlier test (and was promoted since)
    would lend its wins to the next one. Judging one version takes the challenger arm's answers
    by that version alone, and the champion arm's (by ``champion``, the version now champion,
    when named) over the same time: from the first moment both were answering, so neither is
    judged on a period the other did not see. Events about other answers are left out.

    Raises:
        DataError: offers with an arm other than champion or challenger.
    """
    # Each row's arm as every figure counts it (review and select answers are in no arm).
    arms = [
        arm_of(r, a)
        for r, a in zip(
            offers.column("route").to_pylist(), offers.column("arm").to_pylist(), strict=True
        )
    ]
    models = offers.column("model").to_pylist()
    times = offers.column("received_at").to_pylist()
    rows = list(zip(arms, models, times, strict=True))
    served = sorted({str(m) for a, m, _ in rows if a == "challenger"})
    mine = [a == "challenger" and m == challenger for a, m, _ in rows]
    theirs = [a == "champion" and (champion is None or m == champion) for a, m, _ in rows]
    starts = [min((t for t, k in zip(times, side, strict=True) if k), default=None)
              for side in (mine, theirs)]  # fmt: skip
    since = None if starts[0] is None or starts[1] is None else max(starts[0], starts[1])
    keep = [
        (x or y) and (since is None or t >= since)
        for x, y, t in zip(mine, theirs, times, strict=True)
    ]
    chosen, about = window(offers.filter(pa.array(keep, pa.bool_())), events, None)
    return VersionAB(ab_report(chosen, about, confidence), challenger, champion, since, served)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def format_report(report: ABReport) -> str:
    """The report as a table, a row per figure and a column per arm, then the gain, then a row
    per (arm, model) (figures without their intervals)."""

    def cell(r: Rate) -> str:
        if r.value is None:
            return "-"
        assert r.low is not None
        assert r.high is not None
        return f"{100 * r.value:.1f}% ({r.k}/{r.n}, {100 * r.low:.0f}-{100 * r.high:.0f})"

    def short(r: Rate) -> str:
        return "-" if r.value is None else f"{100 * r.value:.1f}% ({r.k}/{r.n})"

    def rank(f: ArmFigures | ModelFigures) -> str:
        return "-" if f.mean_keeper_rank is None else f"{f.mean_keeper_rank:.2f}"

    figures: Mapping[str, Any] = {
        "answers": lambda f: str(f.answers),
        "online top-1": lambda f: cell(f.online_top1),
        "acceptance": lambda f: cell(f.acceptance),
        "click-through": lambda f: cell(f.click_through),
        "zero-result": lambda f: cell(f.zero_result),
        "mean keeper rank": rank,
        "models": lambda f: ", ".join(f.models) or "-",
    }
    lines = _table(
        [("", *ARMS)]
        + [(name, *(fn(report.arms[a]) for a in ARMS)) for name, fn in figures.items()]
    )
    gain = "gain (challenger - champion online top-1): "
    gain += report.gain.pts() if report.gain is not None else "no keeper picks on one arm yet"
    tail = f"{report.decisions} standing decisions, {report.unmatched} without an offer"
    head = ("arm", "model", "answers", "online top-1", "acceptance", "click-through")
    per_model = _table(
        [(*head, "zero-result", "mean keeper rank")]
        + [
            (
                *(f.arm, f.model, str(f.answers), short(f.online_top1), short(f.acceptance)),
                *(short(f.click_through), short(f.zero_result), rank(f)),
            )
            for f in report.by_model
        ]
    )
    by_model = ["", "per model version:", *per_model] if report.by_model else []
    return "\n".join([*lines, gain, tail, *by_model])
