"""keeper_serve.online: the online figures per (arm, model) from a feedback root, as gauges.

The deployment's class runs in this process (no Ray, no Serve) with recording gauges, over logs
written by keeper_core.feedback's own writers.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from support import offer_rows

from keeper_core.feedback import FeedbackEvent, FeedbackLog, OfferLog
from keeper_serve.config import FeedbackArgs
from keeper_serve.online import COMPUTED_AT, GAUGES, OnlineFigures

V1, V2 = "models:/r/1", "models:/r/2"


class Gauges(dict[str, "Recorder"]):
    def __init__(self) -> None:
        super().__init__({n: Recorder() for n in [*GAUGES, COMPUTED_AT]})

    def now(self, name: str, arm: str, model: str) -> float:
        return self[name].last[(arm, model)]


class Recorder:
    """Stands in for a Ray gauge: the last value per (arm, model)."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, str], float] = {}

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        t = tags or {}
        self.last[(t.get("arm", ""), t.get("model", ""))] = value


def online(root: Path, window_s: float = 3600) -> tuple[OnlineFigures, Gauges]:
    gauges = Gauges()
    args = FeedbackArgs(root=str(root), online_poll_s=0, online_window_s=window_s)
    return OnlineFigures.func_or_class(args, gauges), gauges  # type: ignore[attr-defined]


def answer(req: str, arm: str | None, model: str, route: str = "rank") -> list[dict[str, object]]:
    first = "candidate" if route == "select" else "keeper"  # select: nothing offered to keep
    return [{**r, "model": model} for r in offer_rows(req, arm, "g", 3, route, first)]


def decide(log: FeedbackLog, req: str, img: int, action: str) -> None:
    log.append([FeedbackEvent(request_id=req, image_id=f"{req}-img{img}", action=action)])  # type: ignore[arg-type]


def write(root: Path) -> None:
    """v1 the champion, v2 the challenger and then promoted, v2 on the review page, and a
    /v1/select answer (counted in no arm)."""
    offers = OfferLog(str(root / "offers"))
    events = FeedbackLog(str(root / "events"))
    for req, arm, model, route in [
        ("c1", "champion", V1, "rank"),
        ("c2", "champion", V1, "rank"),
        ("c3", "champion", V1, "rank"),
        ("p1", "champion", V2, "rank"),
        ("p2", "champion", V2, "select"),
        ("h1", "challenger", V2, "rank"),
        ("h2", "challenger", V2, "pick"),
        ("r1", None, V2, "review"),
    ]:
        offers.append_rows(answer(req, arm, model, route))
    decide(events, "c1", 0, "picked-as-keeper")
    decide(events, "c2", 2, "picked-as-keeper")
    decide(events, "p1", 1, "picked-as-keeper")
    decide(events, "p1", 0, "rejected")
    decide(events, "h1", 0, "picked-as-keeper")
    decide(events, "h2", 1, "accepted")
    decide(events, "r1", 0, "picked-as-keeper")
    decide(events, "p2", 1, "picked-as-keeper")  # a select answer: in no arm
    decide(events, "nobody", 0, "accepted")  # about no answer in the window: not read
    offers.flush()
    events.flush()


def test_figures_per_arm_and_model(tmp_path: Path) -> None:
    write(tmp_path)
    o, g = online(tmp_path)
    assert o.refresh()
    # hand-counted: (arm, model) -> answers, decisions, top-1, acceptance, click-through,
    # zero-result, mean keeper rank
    want = {
        ("champion", V1): (3, 2, 1 / 2, 1.0, 2 / 3, 0.0, 2.0),
        ("champion", V2): (1, 2, 0.0, 1 / 2, 1.0, 0.0, 2.0),
        ("challenger", V2): (2, 2, 1.0, 1.0, 1.0, 0.0, 1.0),
        ("review", V2): (1, 1, 1.0, 1.0, 1.0, 0.0, 1.0),
        ("select", V2): (1, 1, 0.0, 1.0, 1.0, 1.0, 2.0),
        ("champion", "*"): (4, 4, 1 / 3, 3 / 4, 3 / 4, 0.0, 2.0),
        ("challenger", "*"): (2, 2, 1.0, 1.0, 1.0, 0.0, 1.0),
    }
    names = [
        "keeper_online_answers",
        "keeper_online_decisions",
        "keeper_online_top1",
        "keeper_online_acceptance",
        "keeper_online_click_through",
        "keeper_online_zero_result",
        "keeper_online_mean_keeper_rank",
    ]
    for key, values in want.items():
        got = tuple(g.now(n, *key) for n in names)
        assert got == pytest.approx(values), key
    assert set(g["keeper_online_top1"].last) == set(want)  # no review total, nothing else
    info = o.info()
    assert (info["answers"], info["decisions"], info["error"]) == (8, 8, None)
    assert info["window_s"] == 3600
    assert info["computed_at"] == g.now(COMPUTED_AT, "", "")
    assert [(f["arm"], f["model"]) for f in info["figures"]][:2] == [
        ("champion", "*"),
        ("challenger", "*"),
    ]
    assert info["figures"][2]["online_top1"] == {
        "k": 1,
        "n": 2,
        "value": 0.5,
        "low": pytest.approx(0.0126, abs=1e-4),
        "high": pytest.approx(0.9874, abs=1e-4),
    }


def test_no_denominator_is_nan_and_missing_logs_are_empty(tmp_path: Path) -> None:
    o, g = online(tmp_path / "nothing-yet")
    assert o.refresh()
    assert o.info()["answers"] == 0
    assert o.info()["error"] is None
    assert g.now("keeper_online_answers", "challenger", "*") == 0
    assert math.isnan(g.now("keeper_online_top1", "challenger", "*"))
    assert math.isnan(g.now("keeper_online_click_through", "champion", "*"))
    # Offers and no events log yet: answers counted, every rate of decisions NaN, not 0.
    OfferLog(str(tmp_path / "fb" / "offers")).append_rows(answer("a", None, V1), sync=True)
    o, g = online(tmp_path / "fb")
    assert o.refresh()
    assert g.now("keeper_online_answers", "champion", V1) == 1
    assert g.now("keeper_online_click_through", "champion", V1) == 0  # 0 of 1 answer
    assert g.now("keeper_online_zero_result", "champion", V1) == 0
    for name in (
        "keeper_online_top1",
        "keeper_online_acceptance",
        "keeper_online_mean_keeper_rank",
    ):
        assert math.isnan(g.now(name, "champion", V1)), name


def test_a_model_out_of_the_window_stops_reporting(tmp_path: Path) -> None:
    write(tmp_path)
    o, g = online(tmp_path, window_s=1.0)
    assert o.refresh()
    assert g.now("keeper_online_answers", "review", V2) == 1
    # A second later only a new answer of v3 is in the window.
    import time

    time.sleep(1.1)
    OfferLog(str(tmp_path / "offers")).append_rows(
        answer("n", "champion", "models:/r/3"), sync=True
    )
    assert o.refresh()
    assert g.now("keeper_online_answers", "champion", "models:/r/3") == 1
    for key in [("review", V2), ("champion", V1), ("challenger", V2)]:
        assert g.now("keeper_online_answers", *key) == 0
        assert g.now("keeper_online_decisions", *key) == 0
        assert math.isnan(g.now("keeper_online_top1", *key))
        assert math.isnan(g.now("keeper_online_mean_keeper_rank", *key))
    assert g.now("keeper_online_answers", "champion", "*") == 1
    assert o.info()["answers"] == 1
    assert len(o._offers._tables) == 1  # the old part is dropped, not read again


def test_a_failed_read_keeps_the_last_figures(tmp_path: Path) -> None:
    write(tmp_path)
    o, g = online(tmp_path)
    assert o.refresh()
    before = o.info()
    computed_at = g.now(COMPUTED_AT, "", "")
    (tmp_path / "offers" / "part-zzz-corrupt.parquet").write_bytes(b"not parquet")
    assert not o.refresh()
    info = o.info()
    assert info["error"] is not None
    assert "DataError" in info["error"]
    assert info["figures"] == before["figures"]
    assert g.now(COMPUTED_AT, "", "") == computed_at  # the staleness alert's signal
    assert g.now("keeper_online_answers", "champion", V1) == 3
    (tmp_path / "offers" / "part-zzz-corrupt.parquet").unlink()
    assert o.refresh()
    assert o.info()["error"] is None


def test_the_thread_computes_at_start(tmp_path: Path) -> None:
    import time

    write(tmp_path)
    gauges = Gauges()
    args = FeedbackArgs(root=str(tmp_path), online_poll_s=30, online_window_s=3600)
    o = OnlineFigures.func_or_class(args, gauges)  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while o.info()["computed_at"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert o.info()["answers"] == 8
    o._stop.set()
