"""The promotion rule (a pure function of two metric sets), URI resolution and the CLI wiring.

No MLflow server, no Ray: the registry side is exercised in tests/integration/test_registry.py.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from keeper_core.cli import build_parser
from keeper_core.errors import ConfigError, DataError
from keeper_core.metrics import SeriesMetrics, series_metrics
from keeper_train.jobs import evaluate, promote
from keeper_train.jobs.promote import Decision, decide
from keeper_train.tracking import ModelRef, resolve_model


def metrics(top1: float, mrr: float, *, random_top1: float = 0.25, n: int = 20) -> SeriesMetrics:
    """Metrics where only the fields the rule reads matter."""
    return SeriesMetrics(
        top1=top1,
        top2=min(1.0, top1 + 0.2),
        top3=min(1.0, top1 + 0.3),
        mean_rank=1.5,
        mrr=mrr,
        random_top1=random_top1,
        random_top2=0.5,
        random_top3=0.7,
        random_mean_rank=2.5,
        random_mrr=0.5,
        n_series=n,
    )


# (case, challenger, champion, min_gain, promote?, words the reason must contain)
CASES = [
    ("first beats random", metrics(0.30, 0.5), None, 0.01, True, ["no champion", "beats random"]),
    ("first ties random", metrics(0.25, 0.5), None, 0.01, False, ["does not beat random"]),
    ("first below random", metrics(0.10, 0.4), None, 0.01, False, ["does not beat random"]),
    # min_gain is not a hurdle for the first: beating random is.
    ("first, big min_gain", metrics(0.30, 0.5), None, 0.5, True, ["beats random"]),
    # 0.30 - 0.29 is 0.00999... in floating point: exactly one point must still count.
    ("gain exactly min", metrics(0.30, 0.6), metrics(0.29, 0.6), 0.01, True, ["+1.0 pts"]),
    ("gain below min", metrics(0.295, 0.7), metrics(0.29, 0.6), 0.01, False, ["below", "+1.0"]),
    ("gain, MRR regresses", metrics(0.50, 0.59), metrics(0.30, 0.60), 0.01, False, ["MRR"]),
    ("both fail", metrics(0.30, 0.5), metrics(0.30, 0.6), 0.01, False, ["below", "MRR"]),
    ("equal, min 0", metrics(0.40, 0.6), metrics(0.40, 0.6), 0.0, True, ["+0.0 pts"]),
    ("equal, min 1pt", metrics(0.40, 0.6), metrics(0.40, 0.6), 0.01, False, ["below"]),
    ("allowed top-1 drop", metrics(0.35, 0.7), metrics(0.40, 0.6), -0.1, True, ["-5.0 pts"]),
    ("min -1, MRR drop", metrics(0.90, 0.5), metrics(0.40, 0.6), -1.0, False, ["MRR"]),
    ("big gain", metrics(0.80, 0.9), metrics(0.40, 0.6), 0.01, True, ["+40.0 pts"]),
]


@pytest.mark.parametrize(
    ("challenger", "champion", "min_gain", "expected", "words"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_decide(
    challenger: SeriesMetrics,
    champion: SeriesMetrics | None,
    min_gain: float,
    expected: bool,
    words: list[str],
) -> None:
    d = decide(challenger, champion, min_gain)
    assert isinstance(d, Decision)
    assert d.promote is expected
    for w in words:
        assert w in d.reason


def test_decide_on_real_metrics() -> None:
    # 4 series of 2, 2, 4, 4 shots: random top-1 = mean(1/2, 1/2, 1/4, 1/4) = 0.375.
    best = [0, 1, 2, 3]
    good = series_metrics([[2, 1], [1, 2], [0, 1, 3, 2], [3, 1, 2, 0]], best)  # 3 of 4 right
    bad = series_metrics([[1, 2], [2, 1], [3, 2, 1, 0], [3, 2, 1, 0]], best)  # 0 of 4
    assert (good.top1, bad.top1, good.random_top1) == (0.75, 0.0, 0.375)
    assert decide(good, None, 0.01).promote
    assert not decide(bad, None, 0.01).promote
    assert decide(good, bad, 0.01).promote
    assert "regressed" in decide(bad, good, -1.0).reason


def test_decide_refuses_different_series_and_bad_min_gain() -> None:
    with pytest.raises(DataError, match="same series"):
        decide(metrics(0.5, 0.6, n=20), metrics(0.4, 0.5, n=19), 0.01)
    for bad in (1.5, -2.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="min_gain"):
            decide(metrics(0.5, 0.6), None, bad)


# ------------------------------------------------------------------ model URIs


class FakeRegistry:
    """Answers the two MlflowClient lookups resolve_model makes (only parsing is under test)."""

    tracking_uri = "http://registry"

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        assert (name, alias) == ("keeper-ranker", "champion")
        return SimpleNamespace(name=name, version=7, run_id="r7")

    def get_model_version(self, name: str, version: str) -> Any:
        assert (name, version) == ("keeper-ranker", "3")
        return SimpleNamespace(name=name, version=3, run_id="r3")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (
            "models:/keeper-ranker@champion",
            ModelRef("models:/keeper-ranker@champion", "models:/keeper-ranker/7",
                     "keeper-ranker", "7", "champion", "r7"),
        ),
        (
            "models:/keeper-ranker/3",
            ModelRef("models:/keeper-ranker/3", "models:/keeper-ranker/3",
                     "keeper-ranker", "3", None, "r3"),
        ),
        ("models:/m-0123abcd", ModelRef("models:/m-0123abcd", "models:/m-0123abcd")),
        ("runs:/abc/model", ModelRef("runs:/abc/model", "runs:/abc/model")),
    ],
)  # fmt: skip
def test_resolve_model(uri: str, expected: ModelRef) -> None:
    got = resolve_model(FakeRegistry(), uri)
    assert got == expected
    assert got.label() == ("keeper-ranker v" + got.version if got.version else uri)


# ------------------------------------------------------------------ CLI wiring


def test_cli_has_evaluate_and_promote() -> None:
    parser = build_parser()
    args = parser.parse_args(["promote", "keeper-ranker", "--rollback"])
    assert (args.name, args.rollback, args.min_gain) == ("keeper-ranker", True, 0.01)
    args = parser.parse_args(
        ["evaluate", "--model", "models:/k@champion", "--embeddings", "e", "--series", "s"]
    )
    assert (args.model, args.html, args.report_series) == ("models:/k@champion", None, 60)
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--embeddings", "e", "--series", "s"])  # no --model


def test_promote_refuses_bad_arguments_before_touching_mlflow(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert promote.main(["keeper-ranker"]) == 2
    assert "--embeddings and --series are required" in capsys.readouterr().err
    argv = ["keeper-ranker", "--embeddings", "e", "--series", "s", "--min-gain", "5"]
    assert promote.main(argv) == 2
    assert "min_gain must be in [-1, 1]" in capsys.readouterr().err


def test_evaluate_refuses_a_missing_table(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # The data is read before any model: a wrong path fails fast with exit 2 and names it.
    argv = ["--model", "models:/k@champion", "--embeddings", str(tmp_path / "none")]
    argv += ["--series", str(tmp_path / "none.csv"), "--tracking-uri", "http://127.0.0.1:9"]
    assert evaluate.main(argv) == 2
    assert "none.csv" in capsys.readouterr().err
