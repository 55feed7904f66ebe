"""A/B of champion and challenger: sticky assignment, and the online figures people's decisions give.

Ray Serve has no traffic split built in (Seldon and KServe split traffic and record a reward per
model on a feedback route); keeper's ingress sends a configurable share of ``/v1/rank``,
``/v1/pick`` and ``/v1/select`` to the challenger with :func:`assign`, and every answer's offers
are logged with their ``arm`` (``keeper_core.feedback``). :func:`ab_report` joins the offers to
the standing decisions and measures each arm:

- **online top-1**: of the groups where a person picked a keeper, the share where it was the
  model's first choice (``rank`` 0). The live counterpart of the offline top-1 that ``keeper
  promote`` gates on, and the figure the challenger's gain is measured on;
- **acceptance rate**: of the images decided, the share accepted or picked as keeper;
- **click-through**: of the answers offered, the share with at least one decision;
- **mean keeper rank**: the model's rank (1 = first) of the image picked as keeper;
- **zero-result rate**: of the answers, the share that offered nothing to keep (no ``keeper``,
  ``keep`` or ``pick`` row).

The gain (challenger minus champion online top-1) comes with a Newcombe interval built from the two
arms' exact (Clopper-Pearson) intervals, so its lower bound is conservative like the offline
gain's; ``keeper promote`` can require it above zero.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pyarrow as pa

from keeper_core.errors import DataError
from keeper_core.feedback import decisions
from keeper_core.metrics import Interval, binomial_interval

Arm = Literal["champion", "challenger"]
ARMS: tuple[Arm, ...] = ("champion", "challenger")
#: What an offer row says the model put forward, per route (rank, pick, select).
OFFERED_FIRST = frozenset({"keeper", "keep", "pick"})
_CHOSEN = frozenset({"accepted", "picked-as-keeper"})


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
    u = int.from_bytes(digest[:8], "big") / 2**64
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


@dataclass(frozen=True)
class ABReport:
    arms: dict[str, ArmFigures]
    gain: Interval | None  # challenger minus champion online top-1
    decisions: int
    unmatched: int  # standing decisions whose (request_id, image_id) no offer row has
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "arms": {a: asdict(f) for a, f in self.arms.items()},
            "gain": asdict(self.gain) if self.gain is not None else None,
            "decisions": self.decisions,
            "unmatched": self.unmatched,
            "confidence": self.confidence,
        }


def ab_report(offers: pa.Table, events: pa.Table, confidence: float = 0.95) -> ABReport:
    """Each arm's online figures from the offers log and the feedback events.

    Offers without an ``arm`` (no A/B running) count as the champion's. A decision is matched to
    the offer of its ``(request_id, image_id)``; one no offer has is counted as ``unmatched``.

    Raises:
        DataError: offers with an arm other than champion or challenger.
    """
    rows = offers.select(
        ["request_id", "arm", "model", "group_id", "image_id", "rank", "offered"]
    ).to_pylist()
    arm_of: dict[str, str] = {}
    offer: dict[tuple[str, str], dict[str, Any]] = {}
    offered_any: dict[str, bool] = {}
    models: dict[str, set[str]] = {a: set() for a in ARMS}
    for r in rows:
        arm = r["arm"] or "champion"
        if arm not in ARMS:
            raise DataError(f"offers with arm {arm!r}: expected one of {ARMS}")
        req = str(r["request_id"])
        arm_of[req] = arm
        models[arm].add(str(r["model"]))
        offered_any[req] = offered_any.get(req, False) or r["offered"] in OFFERED_FIRST
        if r["image_id"] is not None:
            offer[(req, str(r["image_id"]))] = r

    standing = decisions(events).to_pylist()
    decided_requests: set[str] = set()
    accepted: dict[str, int] = dict.fromkeys(ARMS, 0)
    decided: dict[str, int] = dict.fromkeys(ARMS, 0)
    hits: dict[str, int] = dict.fromkeys(ARMS, 0)
    keepers: dict[str, int] = dict.fromkeys(ARMS, 0)
    rank_sum: dict[str, float] = dict.fromkeys(ARMS, 0.0)
    unmatched = 0
    for d in standing:
        o = offer.get((str(d["request_id"]), str(d["image_id"])))
        if o is None:
            unmatched += 1
            continue
        arm = o["arm"] or "champion"
        decided_requests.add(str(d["request_id"]))
        decided[arm] += 1
        accepted[arm] += d["action"] in _CHOSEN
        if d["action"] == "picked-as-keeper" and o["rank"] is not None:
            keepers[arm] += 1
            hits[arm] += int(o["rank"]) == 0
            rank_sum[arm] += int(o["rank"]) + 1

    arms: dict[str, ArmFigures] = {}
    for a in ARMS:
        reqs = [r for r, x in arm_of.items() if x == a]
        arms[a] = ArmFigures(
            arm=a,
            models=sorted(models[a]),
            answers=len(reqs),
            online_top1=Rate.of(hits[a], keepers[a], confidence),
            acceptance=Rate.of(accepted[a], decided[a], confidence),
            click_through=Rate.of(sum(r in decided_requests for r in reqs), len(reqs), confidence),
            zero_result=Rate.of(sum(not offered_any[r] for r in reqs), len(reqs), confidence),
            mean_keeper_rank=rank_sum[a] / keepers[a] if keepers[a] else None,
        )
    gain = difference_interval(
        hits["champion"], keepers["champion"], hits["challenger"], keepers["challenger"], confidence
    )
    return ABReport(arms, gain, len(standing), unmatched, confidence)


def format_report(report: ABReport) -> str:
    """The report as a table, a row per figure and a column per arm, then the gain."""

    def cell(r: Rate) -> str:
        if r.value is None:
            return "-"
        assert r.low is not None
        assert r.high is not None
        return f"{100 * r.value:.1f}% ({r.k}/{r.n}, {100 * r.low:.0f}-{100 * r.high:.0f})"

    figures: Mapping[str, Any] = {
        "answers": lambda f: str(f.answers),
        "online top-1": lambda f: cell(f.online_top1),
        "acceptance": lambda f: cell(f.acceptance),
        "click-through": lambda f: cell(f.click_through),
        "zero-result": lambda f: cell(f.zero_result),
        "mean keeper rank": lambda f: (
            "-" if f.mean_keeper_rank is None else f"{f.mean_keeper_rank:.2f}"
        ),
        "models": lambda f: ", ".join(f.models) or "-",
    }
    rows = [("", *ARMS)] + [
        (name, *(fn(report.arms[a]) for a in ARMS)) for name, fn in figures.items()
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    gain = "gain (challenger - champion online top-1): "
    gain += report.gain.pts() if report.gain is not None else "no keeper picks on one arm yet"
    tail = f"{report.decisions} standing decisions, {report.unmatched} without an offer"
    return "\n".join([*lines, gain, tail])
