"""The promotion rule (a pure function of two metric sets and the gain's interval), the overlap
and rollback refusals, URI resolution and the CLI wiring.

No MLflow server, no Ray: the gate's registry side (aliases, tags, refusals) runs on a local
sqlite store with loading and scoring stubbed; tests/integration/test_registry.py runs it end to
end.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest

from keeper_core.cli import build_parser
from keeper_core.cli import main as keeper
from keeper_core.errors import ConfigError, DataError, KeeperError, ModelLoadError
from keeper_core.metrics import SeriesMetrics, best_ranks, series_metrics
from keeper_train import tracking
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


def test_split_overlap_sees_the_same_photos_under_another_path() -> None:
    # Trained from s3://, promoted from a local copy of the bucket: the same bytes, other paths.
    rows = pd.DataFrame(
        {
            "series_id": ["a", "a", "b"],
            "image_uri": ["/c/1", "/c/2", "/c/3"],
            "image_id": list("pqr"),
        }
    )
    split = pd.DataFrame(
        {"series_id": ["s1", "s2"], "image_uri": ["s3://b/1", "s3://b/7"], "image_id": ["p", "z"],
         "split": ["train", "val"]}
    )  # fmt: skip
    assert evaluate.split_overlap(rows, split).by_split == {"train": 1, "val": 0}
    # A split recorded before image_id was: paths alone, as they were.
    assert evaluate.split_overlap(rows, split.drop(columns="image_id")).series == 0


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


# ------------------------------------------------------------------ the gate on a real registry
# A local sqlite registry (no server); versions are registry entries whose runs carry the split
# and manifest hash training records. Loading and scoring are stubbed: a "good" version ranks
# every keeper first, a "bad" one last, so the gate's numbers are known.

NAME = "keeper-ranker"
N_SERIES = 12


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow sqlite store, created once (migrations take seconds)."""
    import mlflow

    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@dataclass
class Registry:
    client: Any
    dir: Path
    experiment: str
    quality: dict[str, str]  # version -> "good" / "bad" (how the stubbed model scores)
    on_load: dict[str, Callable[[], None]]  # version -> called when promote loads it

    def version(
        self, quality: str = "good", split: pd.DataFrame | None = None, manifest: str = ""
    ) -> str:
        """A new registered version of NAME whose run logged ``split`` (if given) as split.csv."""
        run_id = self.client.create_run(self.experiment).info.run_id
        if split is not None:
            folder = self.dir / run_id
            folder.mkdir()
            split.to_csv(folder / "split.csv", index=False)
            self.client.log_artifact(run_id, str(folder / "split.csv"))
        if manifest:
            self.client.set_tag(run_id, "keeper.manifest_sha256", manifest)
        source = (self.dir / "models" / run_id).as_uri()
        v = str(self.client.create_model_version(NAME, source=source, run_id=run_id).version)
        self.quality[v] = quality
        return v

    def alias(self, **aliases: str) -> None:
        for alias, v in aliases.items():
            self.client.set_registered_model_alias(NAME, alias.replace("_", "-"), v)

    def aliases(self) -> dict[str, str]:
        return tracking.aliases(self.client, NAME)

    def tags(self, v: str, prefix: str = "keeper.") -> dict[str, str]:
        tags = self.client.get_model_version(NAME, v).tags
        return {k: t for k, t in tags.items() if k.startswith(prefix)}


def holdout() -> evaluate.EvalData:
    """N_SERIES promotion series of 2 images, the keeper first."""
    n = 2 * N_SERIES
    rows = pd.DataFrame(
        {
            "series_id": [f"h{i // 2:02d}" for i in range(n)],
            "image_uri": [f"/holdout/h{i // 2:02d}/{i % 2}.jpg" for i in range(n)],
            "is_best": [int(i % 2 == 0) for i in range(n)],
            "sharpness": [float(i % 3) for i in range(n)],
        }
    )
    return evaluate.EvalData(
        rows=rows,
        spec="keeper-tiny:random",
        dropped=0,
        embeddings="emb",
        series="holdout.csv",
        manifest_sha256="holdout-sha",
    )


def split_of(series: int, *, start: int = 0, name: str = "train") -> pd.DataFrame:
    """A recorded split holding the images of holdout series ``start .. start+series-1``, plus
    images of its own."""
    uris = [f"/holdout/h{i:02d}/{j}.jpg" for i in range(start, start + series) for j in (0, 1)]
    own = [f"/train/t{i}.jpg" for i in range(4)]
    return pd.DataFrame(
        {
            "series_id": ["x"] * len(uris) + ["t"] * len(own),
            "image_uri": uris + own,
            "split": [name] * len(uris) + ["train"] * len(own),
        }
    )


@pytest.fixture
def reg(empty_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    db = tmp_path / "mlflow.db"
    shutil.copy(empty_db, db)
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{db}")
    experiment = client.create_experiment("promote", artifact_location=(tmp_path / "art").as_uri())
    client.create_registered_model(NAME)
    r = Registry(client, tmp_path, experiment, {}, {})

    def load_model(client: Any, uri: str) -> Any:
        # As MLflow resolves models:/NAME/03: to version 3.
        v = str(client.get_model_version(NAME, uri.removeprefix(f"models:/{NAME}/")).version)
        if v in r.on_load:
            r.on_load.pop(v)()
        return SimpleNamespace(version=v)

    def predict(model: Any, data: evaluate.EvalData) -> pd.DataFrame:
        best = data.rows["is_best"].to_numpy(dtype=float)
        score = best if r.quality[model.version] == "good" else 1.0 - best
        return data.rows[["series_id", "image_uri"]].assign(score=score)

    monkeypatch.setattr(evaluate, "load_model", load_model)
    monkeypatch.setattr(evaluate, "predict", predict)
    return r


def gate(reg: Registry, **cfg: Any) -> dict[str, Any]:
    config = promote.PromoteConfig(name=NAME, embeddings="emb", series="holdout.csv", **cfg)
    return promote.promote(reg.client, config, holdout())


def test_the_gate_on_a_sqlite_registry(reg: Registry) -> None:
    # The fixture itself: a good challenger over a bad champion is promoted, and recorded.
    v1 = reg.version("bad", split_of(0))
    v2 = reg.version("good", split_of(0))
    reg.alias(champion=v1, challenger=v2)
    out = gate(reg)
    assert (out["decision"], out["challenger"], out["champion"]) == ("promoted", v2, v1)
    assert out["warnings"] == []
    assert reg.aliases() == {"champion": v2, "challenger": v2, "previous-champion": v1}
    tags = reg.tags(v2, promote.TAG)
    assert tags[promote.TAG + "previous_champion"] == v1
    checked = "none with the recorded split (12 series checked)"
    assert tags[promote.TAG + "champion_overlap"] == out["champion_overlap"] == checked
    assert promote.TAG + "warnings" not in tags


def test_promotion_series_left_out_are_warned_about_and_recorded(reg: Registry) -> None:
    v1, v2 = reg.version("bad", split_of(0)), reg.version("good", split_of(0))
    reg.alias(champion=v1, challenger=v2)
    data = dataclasses.replace(holdout(), dropped=20)
    out = promote.promote(
        reg.client, promote.PromoteConfig(name=NAME, embeddings="emb", series="h.csv"), data
    )
    left_out = (
        f"20 of {20 + N_SERIES} promotion series left out: an image of each has no embedding in emb"
    )
    assert out["warnings"] == [left_out]
    assert out["series_dropped"] == 20
    tags = reg.tags(v2, promote.TAG)
    assert tags[promote.TAG + "series_dropped"] == "20"
    assert tags[promote.TAG + "warnings"] == left_out
    assert f"WARNING: {left_out}" in promote.format_outcome(out)


def test_a_champion_of_another_spec_is_scored_on_its_own_table(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A move to another CLIP: the challenger's table holds every series, the champion's lacks
    # two; each is scored on its own, over the series complete in both.
    v1, v2 = reg.version("bad", split_of(0)), reg.version("good", split_of(0))
    reg.alias(champion=v1, challenger=v2)
    ours = holdout()
    keep = ~ours.rows["series_id"].isin(["h00", "h01"])
    theirs = dataclasses.replace(
        ours, rows=ours.rows[keep].reset_index(drop=True), spec="ViT-B-32:openai",
        embeddings="emb-b32",
    )  # fmt: skip
    scored_on: dict[str, tuple[str, int]] = {}
    predict = evaluate.predict

    def spy(model: Any, data: evaluate.EvalData) -> pd.DataFrame:
        scored_on[model.version] = (data.embeddings, len(data.rows))
        return predict(model, data)

    monkeypatch.setattr(evaluate, "predict", spy)
    cfg = promote.PromoteConfig(name=NAME, embeddings="emb", series="h.csv")
    out = promote.promote(reg.client, cfg, ours, theirs)
    n = 2 * (N_SERIES - 2)
    assert scored_on == {v2: ("emb", n), v1: ("emb-b32", n)}
    assert (out["decision"], out["series_scored"], out["series_dropped"]) == (
        "promoted",
        N_SERIES - 2,
        2,
    )
    assert out["warnings"] == [
        f"2 of {N_SERIES} promotion series left out: an image of each has no embedding in emb "
        "or emb-b32"
    ]
    assert reg.tags(v2, promote.TAG)[promote.TAG + "champion_embeddings"] == "emb-b32"
    # Another manifest is not the same series.
    with pytest.raises(DataError, match="not one manifest"):
        evaluate.common_series(ours, dataclasses.replace(theirs, manifest_sha256="other"))


# 1. a version spelled otherwise than the registry spells it


@pytest.mark.parametrize("ci_gate", [False, True])
def test_a_version_spelled_with_a_leading_zero_is_not_judged_against_itself(
    reg: Registry, ci_gate: bool
) -> None:
    for _ in range(3):
        reg.version()
    reg.alias(champion="3")
    out = gate(reg, version="03", ci_gate=ci_gate, min_gain=0.0)
    assert (out["decision"], out["challenger"], out["champion"]) == ("unchanged", "3", "3")
    assert out["reason"] == "v3 already is the champion"
    assert reg.aliases() == {"champion": "3"}
    assert reg.tags("3") == {}  # no promotion tags on the serving champion
    # A rollback has nothing to walk back to.
    with pytest.raises(ConfigError, match="no previous champion"):
        promote.rollback(reg.client, NAME)


def test_a_version_is_recorded_as_the_registry_spells_it(reg: Registry) -> None:
    v1, v2 = reg.version("bad", split_of(0)), reg.version("good", split_of(0))
    reg.alias(champion=v1)
    out = gate(reg, version=f"0{v2}")
    assert (out["decision"], out["challenger"]) == ("promoted", v2)
    assert f"challenger v{v2}" in out["metrics"]
    assert reg.aliases() == {"champion": v2, "previous-champion": v1}
    assert reg.tags(v2, promote.TAG)[promote.TAG + "decision"] == "promoted"


def test_rollback_refuses_a_previous_champion_that_is_the_champion(reg: Registry) -> None:
    v1, v2 = reg.version(), reg.version()
    reg.alias(champion=v2, previous_champion=v2, challenger=v2)
    with pytest.raises(ConfigError, match="previous-champion is v2, which already is @champion"):
        promote.rollback(reg.client, NAME)
    assert reg.aliases() == {"champion": v2, "previous-champion": v2, "challenger": v2}
    assert reg.tags(v1) == reg.tags(v2) == {}


def test_rollbacks_never_restore_a_version_an_earlier_rollback_retired(reg: Registry) -> None:
    # v1, v2, v3 promoted in turn, then v1 again (--version 1): its previous_champion tag now
    # names v3, v3's v2, v2's v1, a loop. The rollbacks walked it: v1 -> v3 -> v2 -> v1 (the
    # version retired two rollbacks before) -> v3 ...
    v1, v2, v3 = (reg.version("good", split_of(0)) for _ in range(3))
    for v in (v1, v2, v3, v1):
        assert gate(reg, version=v, min_gain=-1.0, ci_gate=False)["decision"] == "promoted"
    first = promote.rollback(reg.client, NAME)
    assert (first["replaced"], first["champion"], first["previous_champion"]) == (v1, v3, v2)
    second = promote.rollback(reg.client, NAME)
    assert (second["replaced"], second["champion"], second["previous_champion"]) == (v3, v2, None)
    assert reg.aliases() == {"champion": v2}
    with pytest.raises(ConfigError, match="no previous champion"):
        promote.rollback(reg.client, NAME)
    # Promoted again on purpose after its rollback, a version is a champion to go back to.
    gate(reg, version=v1, force=True, min_gain=-1.0, ci_gate=False)  # v1 over v2
    v4, v5 = reg.version("good", split_of(0)), reg.version("good", split_of(0))
    for v in (v4, v5):
        assert gate(reg, version=v, min_gain=-1.0, ci_gate=False)["decision"] == "promoted"
    back = promote.rollback(reg.client, NAME)
    assert (back["replaced"], back["champion"], back["previous_champion"]) == (v5, v4, v1)


# 2. a split that cannot be read is not "no split recorded"


def test_training_split_is_none_only_when_none_was_recorded(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    with_split = reg.client.create_run(reg.experiment).info.run_id
    (reg.dir / "s").mkdir()
    split_of(2).to_csv(reg.dir / "s" / "split.csv", index=False)
    reg.client.log_artifact(with_split, str(reg.dir / "s" / "split.csv"))
    without = reg.client.create_run(reg.experiment).info.run_id
    got = tracking.training_split(reg.client, with_split)
    assert got is not None
    assert list(got.columns) == ["series_id", "image_uri", "split"]
    assert tracking.training_split(reg.client, without) is None  # logged without a split
    assert tracking.training_split(reg.client, "0" * 32) is None  # a run deleted for good
    assert tracking.training_split(reg.client, None) is None

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise MlflowException("503 Service Unavailable: the artifact store is down")

    with monkeypatch.context() as m:
        m.setattr(mlflow.artifacts, "download_artifacts", unavailable)
        with pytest.raises(ModelLoadError, match="503 Service Unavailable") as e:
            tracking.training_split(reg.client, with_split)
        assert e.value.spec == f"runs:/{with_split}/split.csv"
    for error in (MlflowException("INTERNAL_ERROR"), OSError("connection reset")):

        def listing_fails(*args: Any, error: Exception = error, **kwargs: Any) -> Any:
            raise error

        with monkeypatch.context() as m:
            m.setattr(reg.client, "list_artifacts", listing_fails)
            with pytest.raises(ModelLoadError, match="cannot list the run's artifacts"):
                tracking.training_split(reg.client, with_split)

    bad = reg.client.create_run(reg.experiment).info.run_id
    (reg.dir / "b").mkdir()
    (reg.dir / "b" / "split.csv").write_text("uri,kind\n/x,train\n")
    reg.client.log_artifact(bad, str(reg.dir / "b" / "split.csv"))
    with pytest.raises(DataError, match="lacks columns"):
        tracking.training_split(reg.client, bad)


def test_the_gate_fails_closed_when_the_challengers_split_cannot_be_fetched(
    reg: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException

    v1 = reg.version("good", split_of(3))  # trained on 3 of the promotion series
    reg.alias(challenger=v1)
    with pytest.raises(DataError, match="3 of 12 series"):
        gate(reg)

    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise MlflowException("503 Service Unavailable")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", unavailable)
    with pytest.raises(ModelLoadError, match="503"):
        gate(reg)  # was: a warning ("recorded no split.csv"), then promoted
    assert reg.aliases() == {"challenger": v1}
    assert reg.tags(v1, promote.TAG) == {}


# 3. the champion's own split


def test_a_champion_trained_on_the_promotion_series_is_warned_about(reg: Registry) -> None:
    v1 = reg.version("bad", split_of(5, start=2, name="val"))  # 5 of the 12 in its val split
    v2 = reg.version("good", split_of(0))
    reg.alias(champion=v1, challenger=v2)
    out = gate(reg)
    assert out["decision"] == "promoted"  # the incumbent is warned about, not refused
    assert out["warnings"] == [
        f"5 of 12 series (5 with val images) share images with the series champion {NAME} "
        f"v{v1} was trained or validated on: its numbers on these series are inflated, the "
        "comparison skewed against the challenger"
    ]
    assert out["champion_overlap"] == "5 of 12 series (5 with val images) in its recorded split"
    tags = reg.tags(v2, promote.TAG)
    assert tags[promote.TAG + "champion_overlap"] == out["champion_overlap"]
    assert tags[promote.TAG + "warnings"] == out["warnings"][0]
    assert "WARNING: 5 of 12 series" in promote.format_outcome(out)


def test_a_champion_trained_on_this_manifest_is_warned_about(reg: Registry) -> None:
    v1 = reg.version("bad", manifest="holdout-sha")  # no split recorded, this very manifest
    v2 = reg.version("good", split_of(0))
    v3 = reg.version("bad")  # no split, another manifest: nothing known, nothing warned
    reg.alias(champion=v1, challenger=v2)
    out = gate(reg)
    assert out["warnings"] == [
        f"champion {NAME} v{v1} was trained on this very manifest: its numbers on these series are "
        "inflated, the comparison skewed against the challenger"
    ]
    assert out["champion_overlap"] == "all 12 series: trained on this manifest"
    reg.alias(champion=v3, challenger=v2)
    reg.client.delete_registered_model_alias(NAME, "previous-champion")
    out = gate(reg, version=v2)
    assert (out["warnings"], out["champion_overlap"]) == ([], "not checked: no split recorded")


# 4. @champion moved by someone else meanwhile


def test_a_champion_moved_during_the_promotion_is_not_overwritten(reg: Registry) -> None:
    v1, v2, v3 = reg.version("bad", split_of(0)), reg.version("good", split_of(0)), reg.version()
    reg.alias(champion=v1, challenger=v2)
    # Another promote moves @champion to v3 while this one evaluates v1.
    reg.on_load[v1] = lambda: reg.alias(champion=v3, previous_champion=v1)
    with pytest.raises(KeeperError, match=f"@champion moved from v{v1} to v{v3} during this"):
        gate(reg)
    assert reg.aliases() == {"champion": v3, "previous-champion": v1, "challenger": v2}
    assert reg.tags(v2, promote.TAG) == {}


def test_a_first_champion_set_during_the_promotion_is_not_overwritten(reg: Registry) -> None:
    v1, v2 = reg.version("good", split_of(0)), reg.version()
    reg.alias(challenger=v1)
    reg.on_load[v1] = lambda: reg.alias(champion=v2)
    with pytest.raises(KeeperError, match=f"moved from none to v{v2} during this promotion; run"):
        gate(reg)
    assert reg.aliases() == {"champion": v2, "challenger": v1}
    assert reg.tags(v1, promote.TAG) == {}


# ------------------------------------------------------------------ --exit-code, through the CLI


@pytest.mark.parametrize(
    ("challenger", "flag", "status", "verdict"),
    [
        ("bad", "--exit-code", promote.EXIT_REJECTED, "REJECTED"),
        ("bad", "--no-exit-code", 0, "REJECTED"),
        ("good", "--exit-code", 0, "PROMOTED"),
    ],
)
def test_exit_code_says_whether_the_gate_rejected(
    reg: Registry,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    challenger: str,
    flag: str,
    status: int,
    verdict: str,
) -> None:
    import mlflow

    monkeypatch.setattr(evaluate, "load_data", lambda *_: holdout())
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda _: None)  # no global left behind
    v1 = reg.version("good" if challenger == "bad" else "bad", split_of(0))
    v2 = reg.version(challenger, split_of(0))
    reg.alias(champion=v1, challenger=v2)
    argv = ["promote", NAME, "--embeddings", "e", "--series", "s", flag]
    assert keeper([*argv, "--tracking-uri", f"sqlite:///{reg.dir / 'mlflow.db'}"]) == status
    assert f"{verdict} {NAME} v{v2}" in capsys.readouterr().out
    assert reg.aliases()["champion"] == (v2 if verdict == "PROMOTED" else v1)
