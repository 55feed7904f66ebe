"""keeper_core.ab over seeded random clients and logs, against plain references.

``assign`` (``KEEPER_HISTORIES=1000`` runs more seeds): keys are client ids of every kind (empty,
whitespace, NUL, accents, CJK, emoji, combining marks, near-identical ``client-17`` runs), with a
random salt and share. Its docstring's contract: the same arm every time, whatever else was
asked before; the challenger for a ``share`` of keys (within 6 binomial standard deviations, on
fixed seeds: never flaky); a larger share keeps every client the smaller one had on the
challenger, so changing the share moves only the clients between the two shares, about
``|s2 - s1|`` of them; a new salt reshuffles (two salts' assignments are independent); the
point a key switches arms is uniform on [0, 1) (a Kolmogorov-Smirnov bound); a share outside
[0, 1] (NaN included) is a ValueError.

``ab_report``, ``figures_by_model`` and ``window`` on random offers logs (answers of /v1/rank,
/v1/pick, /v1/select and the review page, each arm or none, several models, groups with byte
copies of an image, some answers offering nothing to keep) and random event logs (accepted,
rejected, picked-as-keeper, undone, by several clients, naming the group or not, some about no
offer) equal ``reference``: the module docstring and docs/feedback.md written out (one trial per
group and person with the keeper that stands, an image offered twice counting with its better
rank, review and select answers in no arm, decisions on no offer counted as unmatched). The
order of the offers log changes nothing. Binomial intervals are memoised in these tests (the
same values, computed once: a report asks for dozens).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import types
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from keeper_core import ab
from keeper_core.ab import (
    ARMS,
    OFFERED_FIRST,
    REVIEW,
    SELECT,
    ABReport,
    Rate,
    ab_report,
    assign,
    difference_interval,
    figures_by_model,
    window,
)
from keeper_core.feedback import OFFERS_SCHEMA, SCHEMA
from keeper_core.metrics import binomial_interval

SEEDS = int(os.environ.get("KEEPER_HISTORIES", "40"))
REPORT_SEEDS = max(SEEDS // 2, 1)
SIGMAS = 6.0  # a binomial count this far out: p < 2e-9 per check
PIECES = ["a", "Z", "0", "7", "-", "_", ".", "@", " ", "\t", "\0", "é", "José", "名前", "🙂",
          "e\u0301", "ß", "\u200b", "İ", "ø", "\U0010fffd"]  # fmt: skip
SHARES = [0.0, 1.0, 0.5, 0.3, 1e-3, 0.999, 0.05, 0.95]
MODELS = ["models:/r/1", "models:/r/2", "models:/r/3", "sharpness rule"]
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def pick(rng: np.random.Generator, options: list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def random_keys(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct client ids: random strings, and runs of near-identical ones."""
    keys: dict[str, None] = {"": None}
    start = int(rng.integers(0, 10**6))
    while len(keys) < n:
        kinds, lengths = rng.random(n), rng.integers(0, 16, size=n)
        pieces, hexes = rng.integers(len(PIECES), size=(n, 16)), rng.integers(0, 2**63, size=n)
        for i in range(n):
            if kinds[i] < 0.3:
                keys[f"client-{start + i}"] = None  # a hash must not see these as alike
            elif kinds[i] < 0.4:
                keys[f"{int(hexes[i]):x}"] = None
            else:
                keys["".join(PIECES[j] for j in pieces[i, : lengths[i]])] = None
        start += n
    return list(keys)[:n]


def random_share(rng: np.random.Generator) -> float:
    return float(pick(rng, [*SHARES, float(rng.random())]))


def within(count: int, n: int, p: float) -> bool:
    """``count`` of ``n`` is within SIGMAS binomial standard deviations of ``p * n``."""
    return abs(count - p * n) <= SIGMAS * math.sqrt(n * p * (1 - p)) + 1


# ---------------------------------------------------------------------------------------------
# assign


@pytest.mark.parametrize("seed", range(SEEDS))
def test_assign_is_sticky_whatever_the_order_and_near_the_share(seed: int) -> None:
    rng = np.random.default_rng(seed)
    keys = random_keys(rng, 1000)
    share = random_share(rng)
    salt = "".join(pick(rng, PIECES) for _ in range(int(rng.integers(0, 6))))
    why = f"seed {seed}: share={share} salt={salt!r}"
    arms = {k: assign(k, share, salt) for k in keys}
    assert set(arms.values()) <= set(ARMS), why
    # Asked again in another order, between questions about other salts and shares.
    others = rng.random(len(keys))
    for i in rng.permutation(len(keys)).tolist():
        assign(keys[i], float(others[i]), salt + "x")
        assert assign(keys[i], share, salt) == arms[keys[i]], f"{why} key {keys[i]!r}"
    on = sum(a == "challenger" for a in arms.values())
    if share in (0.0, 1.0):
        assert on == share * len(keys), why
    assert within(on, len(keys), share), f"{why}: {on} of {len(keys)} on the challenger"


@pytest.mark.parametrize("seed", range(SEEDS))
def test_changing_the_share_moves_only_the_clients_between_the_shares(seed: int) -> None:
    rng = np.random.default_rng(1000 + seed)
    keys = random_keys(rng, 800)
    salt = f"exp-{seed}"
    shares = sorted({0.0, 1.0, *(random_share(rng) for _ in range(6))})
    on = {s: {k for k in keys if assign(k, s, salt) == "challenger"} for s in shares}
    for small, large in itertools.pairwise(shares):
        why = f"seed {seed}: share {small} -> {large}"
        # Growing the share keeps everyone the challenger had; shrinking it back moves back
        # exactly those clients, and no one else changes arms.
        assert on[small] <= on[large], why
        moved = len(on[large] - on[small])
        assert within(moved, len(keys), large - small), f"{why}: {moved} of {len(keys)} moved"
    # Two salts (two experiments) assign independently.
    s1, s2 = random_share(rng), random_share(rng)
    both = sum(
        assign(k, s1, salt) == "challenger" and assign(k, s2, salt + "'") == "challenger"
        for k in keys
    )
    assert within(both, len(keys), s1 * s2), f"seed {seed}: {both} on both challengers"


def switch_point(key: str, salt: str) -> float:
    """The share at which ``key`` moves to the challenger (to 2^-40), by bisection."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if assign(key, mid, salt) == "challenger":
            hi = mid
        else:
            lo = mid
    return hi


def test_switch_points_are_uniform() -> None:
    rng = np.random.default_rng(7)
    keys = random_keys(rng, 1500)
    u = np.sort([switch_point(k, "keeper-ab") for k in keys])
    n = len(u)
    ks = max(np.max(np.arange(1, n + 1) / n - u), np.max(u - np.arange(n) / n))
    assert ks * math.sqrt(n) < 2.8  # P(KS > 2.8 / sqrt(n)) < 1e-6 for a uniform sample
    for k, t in zip(keys[:100], [switch_point(k, "keeper-ab") for k in keys[:100]], strict=True):
        assert assign(k, min(1.0, t + 1e-9), "keeper-ab") == "challenger"
        assert assign(k, max(0.0, t - 1e-9), "keeper-ab") == "champion"


@pytest.mark.parametrize(
    "share", [-0.5, -1e-300, 1.0000000000000002, 2.0, math.nan, math.inf, -math.inf]
)
def test_a_share_outside_0_1_is_refused(share: float) -> None:
    with pytest.raises(ValueError, match="share"):
        assign("client", share)


def test_every_key_takes_the_edges_of_the_share() -> None:
    keys = random_keys(np.random.default_rng(3), 300)
    assert {assign(k, 0.0) for k in keys} == {assign(k, -0.0) for k in keys} == {"champion"}
    assert {assign(k, 1.0) for k in keys} == {assign(k, 1) for k in keys} == {"challenger"}


# Found by the histories, fixed since: assign read the digest's top 64 bits / 2**64 as a float,
# which rounds to 1.0 for the top 2**10 values (p = 2**-54 per key): such a key was on the
# champion at share 1.0.
def test_a_digest_at_the_top_is_on_the_challenger_at_share_1(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No real key with such a digest can be found by search; a stand-in sha256 shows the path.
    top = (2**64 - 1).to_bytes(8, "big") + bytes(24)
    fake = types.SimpleNamespace(sha256=lambda data: types.SimpleNamespace(digest=lambda: top))
    monkeypatch.setattr(ab, "hashlib", fake)
    assert assign("anyone", 1.0) == "challenger"


# ---------------------------------------------------------------------------------------------
# the Newcombe gain interval


@pytest.mark.parametrize("seed", range(SEEDS))
def test_the_gain_interval_is_antisymmetric_and_contains_the_gain(seed: int) -> None:
    rng = np.random.default_rng(2000 + seed)
    n1, n2 = (int(pick(rng, [1, 2, 10, int(rng.integers(1, 300))])) for _ in range(2))
    k1, k2 = int(rng.integers(0, n1 + 1)), int(rng.integers(0, n2 + 1))
    conf = float(pick(rng, [0.8, 0.9, 0.95, 0.99]))
    why = f"seed {seed}: {k1}/{n1} -> {k2}/{n2} at {conf}"
    g = difference_interval(k1, n1, k2, n2, conf)
    r = difference_interval(k2, n2, k1, n1, conf)
    assert g is not None, why
    assert r is not None, why
    assert g.estimate == k2 / n2 - k1 / n1, why
    assert (g.n, g.confidence) == (n1 + n2, conf), why
    assert -1.0 - 1e-12 <= g.low <= g.estimate <= g.high <= 1.0 + 1e-12, why
    assert (r.estimate, r.low, r.high) == (-g.estimate, -g.high, -g.low), why
    # Newcombe's hybrid score interval over the two arms' exact intervals.
    l1, u1 = binomial_interval(k1, n1, conf)
    l2, u2 = binomial_interval(k2, n2, conf)
    d = k2 / n2 - k1 / n1
    assert g.low == pytest.approx(d - math.sqrt((k2 / n2 - l2) ** 2 + (u1 - k1 / n1) ** 2))
    assert g.high == pytest.approx(d + math.sqrt((u2 - k2 / n2) ** 2 + (k1 / n1 - l1) ** 2))
    assert difference_interval(k1, n1, 0, 0, conf) is None
    assert difference_interval(0, 0, k2, n2, conf) is None


# ---------------------------------------------------------------------------------------------
# the online figures


@pytest.fixture(autouse=True)
def memoised_intervals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ab, "binomial_interval", _cached_interval)


_cached_interval = functools.lru_cache(maxsize=None)(binomial_interval)


@dataclass
class Log:
    seed: int
    offers: list[dict[str, Any]]
    events: list[dict[str, Any]]

    def tables(self, order: np.ndarray | None = None) -> tuple[pa.Table, pa.Table]:
        rows = self.offers if order is None else [self.offers[int(i)] for i in order]
        return (
            pa.Table.from_pylist(rows, schema=OFFERS_SCHEMA),
            pa.Table.from_pylist(self.events, schema=SCHEMA),
        )


def random_log(seed: int) -> Log:
    rng = np.random.default_rng(3000 + seed)
    offers: list[dict[str, Any]] = []
    offered: list[tuple[str, str, str | None]] = []  # (request, image, group)
    for a in range(int(rng.integers(1, 10))):
        req = f"req-{a}" if rng.random() < 0.8 else f"réq {a} 名"
        route = pick(rng, ["rank", "rank", "pick", "pick", "select", "review"])
        arm = pick(rng, [None, "champion", "challenger", "challenger"])
        arm = arm if route in ("rank", "pick") else None
        model, client = pick(rng, MODELS), pick(rng, [None, "ann", "bob"])
        at = T0 + timedelta(seconds=int(rng.integers(0, 100)))
        nothing_to_keep = rng.random() < 0.15
        for g in range(int(rng.integers(1, 4))):
            group = None if g == 0 and rng.random() < 0.15 else f"g{g}"
            size = int(rng.integers(1, 5))
            images = [f"{req}-{group}-{j}" for j in range(size)]
            if size >= 2 and rng.random() < 0.3:  # a byte copy: one image id offered twice
                images[int(rng.integers(size))] = images[int(rng.integers(size))]
            for position, rank in enumerate(rng.permutation(size).tolist()):
                first = rank == 0 or (route == "pick" and rng.random() < 0.2)
                label = {"rank": "keeper", "pick": "keep", "select": "pick", "review": "keep"}
                offers.append(
                    {
                        "event_id": f"o{len(offers)}",
                        "received_at": at,
                        "seq": len(offers),
                        "writer": "w",
                        "request_id": req,
                        "route": route,
                        "client": client,
                        "arm": arm,
                        "model": model,
                        "model_spec": "keeper-tiny:random",
                        "group_id": group,
                        "group_size": size,
                        "image_id": images[position],
                        "position": position,
                        "rank": rank,
                        "score": float(size - rank),
                        "offered": label[route]
                        if first and not nothing_to_keep
                        else pick(rng, ["candidate", "alternate", "reject"]),
                    }
                )
                offered.append((req, images[position], group))
    events: list[dict[str, Any]] = []
    for i in range(int(rng.integers(0, 30))):
        req, img, group = offered[int(rng.integers(len(offered)))]
        if rng.random() < 0.1:  # about nothing offered
            req, img = pick(rng, [(req, "nope"), ("ghost", img)])
        events.append(
            {
                "event_id": f"e{i}",
                "received_at": T0 + timedelta(seconds=200 + i),
                "seq": i,
                "writer": "w",
                "request_id": req,
                "image_id": img,
                "action": pick(
                    rng, ["accepted", "rejected", "picked-as-keeper", "picked-as-keeper", "undone"]
                ),
                "group_id": pick(rng, [group, group, group, None, "elsewhere"]),
                "client": pick(rng, [None, "ann", "bob"]),
            }
        )
    return Log(seed, offers, events)


@dataclass
class Tally:
    models: set[str] = field(default_factory=set)
    answers: set[str] = field(default_factory=set)
    keep_offered: set[str] = field(default_factory=set)
    decided_requests: set[str] = field(default_factory=set)
    decided: int = 0
    accepted: int = 0
    trials: dict[tuple[str, str | None, str | None], tuple[int, int]] = field(
        default_factory=dict
    )  # (request, group, person) -> (latest event, rank of the keeper that stands)

    def figures(self) -> dict[str, Any]:
        ranks = [r for _, r in self.trials.values()]
        return {
            "answers": len(self.answers),
            "decided": self.decided,
            "online_top1": (sum(r == 0 for r in ranks), len(ranks)),
            "acceptance": (self.accepted, self.decided),
            "click_through": (len(self.decided_requests), len(self.answers)),
            "zero_result": (len(self.answers - self.keep_offered), len(self.answers)),
            "mean_keeper_rank": sum(r + 1 for r in ranks) / len(ranks) if ranks else None,
        }


def reference(log: Log, per_model: bool) -> tuple[dict[Any, Tally], int, int]:
    """Each arm's (or (arm, model)'s) tally, the standing decisions and the unmatched ones."""

    def key(row: dict[str, Any]) -> Any:
        arm = row["route"] if row["route"] in (REVIEW, SELECT) else row["arm"] or "champion"
        if per_model:
            return (arm, row["model"])
        return arm if arm in ARMS else None  # the review page and /v1/select: in no arm

    tallies: dict[Any, Tally] = defaultdict(Tally)
    image: dict[tuple[str, str], tuple[Any, str | None, int]] = {}  # -> key, group, best rank
    for r in log.offers:
        k, where = key(r), (r["request_id"], r["image_id"])
        best = min(r["rank"], image[where][2]) if where in image else r["rank"]
        image[where] = (k, r["group_id"], best)  # an image offered twice: its better rank
        if k is None:
            continue
        t = tallies[k]
        t.models.add(r["model"])
        t.answers.add(r["request_id"])
        if r["offered"] in OFFERED_FIRST:
            t.keep_offered.add(r["request_id"])
    # The standing decision per (request, image, person): the latest, an undone taking back the
    # one before it; ordered by each one's latest event.
    stacks: dict[tuple[str, str, str | None], list[str]] = defaultdict(list)
    latest: dict[tuple[str, str, str | None], int] = {}
    for i, e in enumerate(log.events):
        who = (e["request_id"], e["image_id"], e["client"])
        if e["action"] == "undone":
            if stacks[who]:
                stacks[who].pop()
        else:
            stacks[who].append(e["action"])
        latest[who] = i
    standing = sorted((latest[w], w, s[-1]) for w, s in stacks.items() if s)
    unmatched = 0
    for i, (req, img, person), action in standing:
        if (req, img) not in image:
            unmatched += 1
            continue
        k, group, rank = image[(req, img)]
        if k is None:
            continue
        t = tallies[k]
        t.decided += 1
        t.accepted += action in ("accepted", "picked-as-keeper")
        t.decided_requests.add(req)
        if action == "picked-as-keeper":
            t.trials[(req, group, person)] = max(
                t.trials.get((req, group, person), (-1, 0)), (i, rank)
            )
    return tallies, len(standing), unmatched


def figures_of(f: Any) -> dict[str, Any]:
    def rate(r: Rate) -> tuple[int, int]:
        assert r.value == (None if r.n == 0 else r.k / r.n)
        assert (r.low, r.high) == ((None, None) if r.n == 0 else binomial_interval(r.k, r.n))
        return (r.k, r.n)

    return {
        "answers": f.answers,
        "decided": f.decided,
        **{
            name: rate(getattr(f, name))
            for name in ("online_top1", "acceptance", "click_through", "zero_result")
        },
        "mean_keeper_rank": f.mean_keeper_rank,
    }


def check_report(report: ABReport, log: Log, why: str) -> None:
    arms, standing, unmatched = reference(log, per_model=False)
    assert (report.decisions, report.unmatched, report.confidence) == (standing, unmatched, 0.95)
    assert set(report.arms) == set(ARMS), why
    for a in ARMS:
        got, want = report.arms[a], arms.get(a, Tally())
        assert got.arm == a, why
        assert got.models == sorted(want.models), f"{why} {a}"
        assert figures_of(got) == want.figures(), f"{why} {a}"
    c, h = arms.get("champion", Tally()).figures(), arms.get("challenger", Tally()).figures()
    assert report.gain == difference_interval(*c["online_top1"], *h["online_top1"]), why
    by_model, _, _ = reference(log, per_model=True)
    order = {a: i for i, a in enumerate((*ARMS, REVIEW, SELECT))}
    keys = sorted(by_model, key=lambda k: (order[k[0]], k[1]))
    assert [(f.arm, f.model) for f in report.by_model] == keys, why
    for f, k in zip(report.by_model, keys, strict=True):
        assert figures_of(f) == by_model[k].figures(), f"{why} {k}"


@pytest.mark.parametrize("seed", range(REPORT_SEEDS))
def test_the_report_is_the_reference_on_random_logs(seed: int) -> None:
    log = random_log(seed)
    why = f"seed {seed}: offers {log.offers} events {log.events}"
    offers, events = log.tables()
    report = ab_report(offers, events)
    check_report(report, log, why)
    assert figures_by_model(offers, events) == report.by_model, why
    # The order of the offers log changes nothing.
    order = np.random.default_rng(seed).permutation(len(log.offers))
    assert ab_report(*log.tables(order)).as_dict() == report.as_dict(), why


@pytest.mark.parametrize("seed", range(REPORT_SEEDS))
def test_a_window_keeps_whole_answers_and_every_decision_on_them(seed: int) -> None:
    log = random_log(seed)
    rng = np.random.default_rng(4000 + seed)
    since, until = (
        pick(rng, [None, T0 + timedelta(seconds=int(rng.integers(-5, 105)))]) for _ in range(2)
    )
    why = f"seed {seed}: since {since} until {until}"
    east = timezone(timedelta(hours=2))  # the same instants, written in another zone
    as_given = [
        t if t is None or rng.random() < 0.5 else t.astimezone(east) for t in (since, until)
    ]
    inside = [
        r
        for r in log.offers
        if (since is None or r["received_at"] >= since)
        and (until is None or r["received_at"] < until)
    ]
    asked = {r["request_id"] for r in inside}
    kept = Log(seed, inside, [e for e in log.events if e["request_id"] in asked])
    o, e = window(*log.tables(), *as_given)
    assert o.column("event_id").to_pylist() == [r["event_id"] for r in kept.offers], why
    assert e.column("event_id").to_pylist() == [x["event_id"] for x in kept.events], why
    check_report(ab_report(o, e), kept, why)
