"""The promotion rule (a pure function of two metric sets and the gain's interval), the overlap
and rollback refusals, URI resolution and the CLI wiring.

No MLflow server, no Ray: the registry side is exercised in tests/integration/test_registry.py.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from keeper_core.cli import build_parser
from keeper_core.cli import main as keeper
from keeper_core.errors import ConfigError, DataError
from keeper_core.metrics import SeriesMetrics, best_ranks, series_metrics
from keeper_train.jobs import evaluate, promote
from keeper_train.jobs.promote import Decision, decide, top1_gain
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


# ------------------------------------------------------------------ the gain's interval


def per_series(wins: int, losses: int, ties: int, *, size: int = 4) -> tuple[list[Any], list[int]]:
    """Hand-built per-series scores for (challenger, champion) over wins + losses + ties series.

    The keeper is image 0. A win: the challenger ranks it first, the champion second; a loss: the
    reverse; a tie: both rank it first.
    """
    first, second = [4.0, 3.0, 2.0, 1.0][:size], [3.0, 4.0, 2.0, 1.0][:size]
    chal = [first] * wins + [second] * losses + [first] * ties
    champ = [second] * wins + [first] * losses + [first] * ties
    return [chal, champ], [0] * (wins + losses + ties)


def judged(wins: int, losses: int, ties: int, min_gain: float = 0.01) -> Decision:
    (chal, champ), best = per_series(wins, losses, ties)
    sizes = [len(s) for s in chal]
    gain = top1_gain(best_ranks(chal, best), best_ranks(champ, best), sizes)
    return decide(series_metrics(chal, best), series_metrics(champ, best), min_gain, gain)


def test_one_series_of_24_is_four_points_and_not_enough() -> None:
    # One more keeper found on 24 series is +4.2 points: the old rule (gain >= 1 point) promoted it.
    (chal, champ), best = per_series(1, 0, 23)
    m_chal, m_champ = series_metrics(chal, best), series_metrics(champ, best)
    assert m_chal.top1 - m_champ.top1 == pytest.approx(1 / 24)
    assert decide(m_chal, m_champ, 0.01).promote  # without the interval
    gain = top1_gain(best_ranks(chal, best), best_ranks(champ, best), [4] * 24)
    assert (gain.estimate, gain.high, gain.n) == (pytest.approx(1 / 24), pytest.approx(1 / 24), 24)
    assert gain.low == pytest.approx((2 * 0.025 - 1) / 24)  # Clopper-Pearson of 1 win in 1
    d = decide(m_chal, m_champ, 0.01, gain)
    assert not d.promote
    assert "not surely better: +4.2 pts (95% CI -4.0 to +4.2)" in d.reason
    assert "one series is 4.2 pts" in d.reason


@pytest.mark.parametrize(
    ("wins", "losses", "ties", "min_gain", "expected"),
    [
        (1, 0, 23, 0.01, False),  # +4.2 pts: one series
        (4, 0, 20, 0.01, False),  # +16.7 pts, but 4 wins of 4 happen by chance 1 time in 16
        (6, 0, 18, 0.01, True),  # 6 of 6: 1 in 64, below the 2.5 % one-sided level
        (12, 0, 12, 0.01, True),
        (8, 4, 12, 0.01, False),  # +16.7 pts net, but losses too: the CI spans 0
        (0, 0, 24, 0.0, False),  # identical: nothing to gain, not promoted even at min_gain 0
        (0, 0, 24, -0.05, True),  # a drop the user allows: the bound is -5 pts, not 0
        (0, 3, 21, -0.05, False),  # -12.5 pts: below the allowed drop
        (1, 0, 23, -0.05, True),  # the interval's -4.0 stays above the allowed -5
    ],
)
def test_gate_on_the_gains_interval(
    wins: int, losses: int, ties: int, min_gain: float, expected: bool
) -> None:
    assert judged(wins, losses, ties, min_gain).promote is expected


def test_first_challenger_must_surely_beat_random() -> None:
    # 2 series of 2 shots, keeper found in both: top-1 100 % vs random 50 %, but 2 series cannot
    # exclude luck; 12 such series can.
    for n, expected in ((2, False), (12, True)):
        scores, best = [[2.0, 1.0]] * n, [0] * n
        m = series_metrics(scores, best)
        gain = top1_gain(best_ranks(scores, best), None, [2] * n)
        assert gain.estimate == pytest.approx(0.5)
        d = decide(m, None, 0.01, gain)
        assert d.promote is expected, d.reason
        assert ("beats random" if expected else "not surely better than random") in d.reason


# ------------------------------------------------------------------ refusals


def test_split_overlap_counts_series_sharing_images() -> None:
    rows = pd.DataFrame(
        {
            "series_id": ["a", "a", "b", "b", "c", "c"],
            "image_uri": ["/x/1", "/x/2", "/x/3", "/x/4", "/y/5", "/y/6"],
        }
    )
    split = pd.DataFrame(
        {
            "series_id": ["s1", "s1", "s2", "s3"],
            "image_uri": ["/x/1", "/q/9", "/x/4", "/y/5"],
            "split": ["train", "train", "val", "test"],
        }
    )
    got = evaluate.split_overlap(rows, split)
    assert (got.series, got.of, got.by_split) == (2, 3, {"train": 1, "val": 1})
    assert got.describe() == "2 of 3 series (1 with train images, 1 with val images)"
    # Same series ids, other images (another corpus generated alike): no overlap.
    other = split.assign(image_uri=["/z/1", "/z/2", "/z/3", "/z/4"])
    assert evaluate.split_overlap(rows, other).series == 0


def test_split_overlap_sees_one_file_spelled_two_ways(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Trained from ./corpus/manifest.csv, promoted with the absolute path: the same images.
    monkeypatch.chdir(tmp_path)
    rows = pd.DataFrame({"series_id": ["a", "a"], "image_uri": [f"{tmp_path}/corpus/1.jpg", "x"]})
    split = pd.DataFrame({"series_id": ["s"], "image_uri": ["corpus/./1.jpg"], "split": ["train"]})
    assert evaluate.split_overlap(rows, split).by_split == {"train": 1, "val": 0}


def test_rolled_back_tags() -> None:
    assert promote.rolled_back({"keeper.run_id": "r", "keeper.rollback.restored_at": "t"}) == {}
    tags = {"keeper.rollback.rolled_back_at": "t", "keeper.rollback.rolled_back_to": "1"}
    assert promote.rolled_back({**tags, "other": "x"}) == tags


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
    assert (args.name, args.rollback, args.min_gain) == ("keeper-ranker", True, None)
    args = parser.parse_args(["promote", "k", "--version", "3", "--force", "--no-ci-gate"])
    assert (args.version, args.force, args.ci_gate) == ("3", True, False)
    args = parser.parse_args(
        ["evaluate", "--model", "models:/k@champion", "--embeddings", "e", "--series", "s"]
    )
    assert (args.model, args.html, args.report_series) == (["models:/k@champion"], None, None)
    with pytest.raises(SystemExit):
        parser.parse_args(["evaluate", "--embeddings", "e", "--series", "s"])  # no --model


def test_promote_refuses_bad_arguments_before_touching_mlflow(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert promote.main(["keeper-ranker"]) == 2
    assert "embeddings and series are required" in capsys.readouterr().err
    argv = ["keeper-ranker", "--embeddings", "e", "--series", "s", "--min-gain", "5"]
    assert promote.main(argv) == 2
    assert "min_gain must be in [-1, 1]" in capsys.readouterr().err
    assert keeper(["promote", "k", "--embeddings", "e", "--series", "s", "--force"]) == 2
    assert "force needs version" in capsys.readouterr().err
    assert keeper(["promote", "k", "--rollback", "--version", "2"]) == 2
    assert "rollback takes no version" in capsys.readouterr().err


def test_evaluate_refuses_a_missing_table(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    # The data is read before any model: a wrong path fails fast with exit 2 and names it.
    argv = ["--model", "models:/k@champion", "--embeddings", str(tmp_path / "none")]
    argv += ["--series", str(tmp_path / "none.csv"), "--tracking-uri", "http://127.0.0.1:9"]
    assert evaluate.main(argv) == 2
    assert "none.csv" in capsys.readouterr().err
