"""User mistakes at the ``keeper`` CLI, each one line naming the problem and what to do, exit 2,
before any work: ab-report's window, a bare model name, finetune's cheap checks first, its
lora_blocks range, and every error of a query in select's queries file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from support import fails_cleanly

import keeper_core.models
from keeper_core.errors import ConfigError, ModelLoadError, StorageError
from keeper_core.registry import ModelRef, resolve_model
from keeper_train import cluster
from keeper_train.jobs import ab_report, embed, finetune, select


def refuse(what: str) -> Any:
    def refused(*_: object, **__: object) -> None:
        raise AssertionError(f"the job reached {what} before refusing")

    return refused


@pytest.fixture(autouse=True)
def no_env_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No tracking URI from the environment; relative paths land in the test's folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------------------------
# 1: ab-report refuses an empty window, as feedback-export does


@pytest.mark.parametrize(
    ("since", "until"),
    [
        ("2026-12-01T00:00:00Z", "2026-11-01T00:00:00Z"),
        ("2026-11-01T00:00:00Z", "2026-11-01T00:00:00Z"),  # [since, until) is empty
        ("2026-12-01T00:00:00", "2026-11-01T00:00:00Z"),  # no zone: UTC, as the logs
    ],
)
def test_ab_report_refuses_since_after_until(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, since: str, until: str
) -> None:
    monkeypatch.setattr(ab_report, "load", refuse("the feedback logs"))
    line = fails_cleanly(
        capsys,
        ["ab-report", "--feedback", "fb", "--since", since, "--until", until],
        "since must be before until",
    )
    # The same words as feedback-export's.
    window = [f"since={since}", f"until={until}"]
    fails_cleanly(
        capsys,
        ["feedback-export", "--feedback", "fb", "--output", "o", *window],
        line.partition("ABReportConfig")[2],
    )


def test_ab_report_keeps_a_window_in_order() -> None:
    cfg = ab_report.ABReportConfig.model_validate(
        {"feedback": "fb", "since": "2026-11-01T00:00:00", "until": "2026-12-01T00:00:00Z"}
    )
    assert cfg.since is not None
    assert cfg.until is not None
    assert cfg.since < cfg.until
    assert cfg.since.utcoffset() is not None  # a bound without a zone is UTC


# --------------------------------------------------------------------------------------------
# 2: a bare model name is not a model URI


class NoRegistry:
    """A client no lookup may reach: only parsing is under test."""

    tracking_uri = "sqlite:///nowhere/mlflow.db"

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the registry was asked ({name})")


@pytest.mark.parametrize("uri", ["m1", "keeper-ranker", "models/keeper-ranker"])
def test_a_bare_model_name_says_which_uris_work(uri: str) -> None:
    with pytest.raises(ModelLoadError) as e:
        resolve_model(NoRegistry(), uri)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"cannot load model {uri!r}: not a model URI, and no such local path" in msg
    for form in ("models:/NAME@ALIAS", "models:/NAME/VERSION", "runs:/"):
        assert form in msg, msg


def test_a_local_model_folder_and_other_schemes_pass_as_they_are(tmp_path: Path) -> None:
    (tmp_path / "m1").mkdir()
    for uri in ("m1", str(tmp_path / "m1"), "runs:/abc/model", "s3://b/model", "models:/m-0a"):
        assert resolve_model(NoRegistry(), uri) == ModelRef(uri=uri, load_uri=uri)
    with pytest.raises(ConfigError, match="must not be empty"):
        resolve_model(NoRegistry(), " ")


def test_pick_with_a_bare_model_name_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embed, "execute", refuse("the embed pipeline"))
    (tmp_path / "photos").mkdir()
    # A registry no request may reach (nothing listens on the discard port): refused first.
    store = ["--tracking-uri", "http://127.0.0.1:9"]
    fails_cleanly(
        capsys,
        ["pick", "--input", "photos", "--output", "out", "--model", "m1", *store],
        "'m1'",
        "models:/NAME@ALIAS",
    )
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# 3, 4: finetune checks the tracking URI, then the manifest, then the tower, before Ray


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cluster, "init_ray", refuse("Ray"))


@pytest.fixture
def no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keeper_core.models, "load_clip", refuse("building the model"))


def _series(path: Path) -> Path:
    pd.DataFrame(
        {
            "series_id": ["s0", "s0", "s1", "s1"],
            "image_uri": [f"{i}.jpg" for i in range(4)],
            "is_best": [1, 0, 0, 1],
        }
    ).to_csv(path, index=False)
    return path


def test_finetune_refuses_a_tracking_uri_before_any_work(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_ray: None,
    no_model: None,
) -> None:  # fmt: skip
    monkeypatch.setattr(finetune, "plan", refuse("the plan"))
    fails_cleanly(
        capsys,
        ["finetune", "--series", "missing.csv", "--tracking-uri", "bogus://x"],
        "tracking_uri 'bogus://x'",
    )


def test_finetune_refuses_the_environments_tracking_uri_too(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, no_ray: None,
    no_model: None,
) -> None:  # fmt: skip
    monkeypatch.setattr(finetune, "plan", refuse("the plan"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    fails_cleanly(capsys, ["finetune", "--series", "s.csv"], "MLFLOW_TRACKING_URI 'bogus://x'")


def test_finetune_refuses_a_missing_series_before_building_the_model(
    capsys: pytest.CaptureFixture[str], no_ray: None, no_model: None
) -> None:
    fails_cleanly(capsys, ["finetune", "--series", "missing.csv"], "missing.csv")
    assert "No pretrained weights loaded" not in capsys.readouterr().out


def test_finetune_plan_reads_the_manifest_before_the_tower(tmp_path: Path, no_model: None) -> None:
    cfg = finetune.FinetuneConfig(series=str(tmp_path / "nope.csv"))
    with pytest.raises(StorageError, match=r"nope\.csv"):
        finetune.plan(cfg)


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (
            ["--lora-blocks", "99"],
            "lora_blocks=99, but the tower has 2 blocks: use lora_blocks from 1 to 2, or leave "
            "it unset for all of them",
        ),
        (
            ["--method", "last-blocks+lora", "--lora-blocks", "2"],
            "lora_blocks=2, but only 1 of the tower's 2 blocks is left for LoRA "
            "(unfreeze_blocks=1 trains the last 1 in full): use lora_blocks from 1 to 1",
        ),
        (
            ["--method", "last-blocks+lora", "--unfreeze-blocks", "2"],
            "unfreeze_blocks=2 trains all 2 blocks of the tower in full, which leaves no block "
            "for LoRA (lora_blocks needs at least 1): use unfreeze_blocks from 1 to 1, or "
            "method last-blocks",
        ),
    ],
)
def test_finetune_says_the_valid_lora_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None, flags: list[str], says: str
) -> None:
    series = _series(tmp_path / "s.csv")
    line = fails_cleanly(capsys, ["finetune", "--series", str(series), *flags], says)
    assert "not unfrozen" not in line


# --------------------------------------------------------------------------------------------
# 5: every error of a query in the queries file, in one line


def test_select_names_every_error_of_a_query(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "q.yaml").write_text("- name: dogs\n  positiv: [a dog]\n")
    fails_cleanly(
        capsys,
        ["select", "--table", "t", "--queries", "q.yaml", "--output", "o"],
        "queries q.yaml: queries[0]: positiv: unknown field; positive: Field required",
    )
    assert not (tmp_path / "o").exists()


def test_select_names_the_first_bad_query_and_counts_the_others(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text(
        "queries:\n"
        "  - {name: ok, positive: [a cat]}\n"
        "  - {name: 'a b', positive: [' '], negativ: [x]}\n"
        "  - {name: c}\n"
        "  - just a string\n"
    )
    with pytest.raises(ConfigError) as e:
        select.load_queries("q.yaml")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("queries q.yaml: queries[1]: negativ: unknown field; name: "), msg
    assert "positive: Value error, empty prompt(s) at position(s) [0]" in msg
    assert msg.endswith(" (and 2 more invalid queries)"), msg


def test_select_queries_that_are_fine_load_as_before(tmp_path: Path) -> None:
    (tmp_path / "q.yaml").write_text("- {name: a, positive: [x]}\n- {name: A, positive: [y]}\n")
    with pytest.raises(ConfigError, match="names 'a' and 'A' collide"):
        select.load_queries("q.yaml")
    (tmp_path / "q.yaml").write_text("- {name: a, positive: [x]}\n")
    assert select.load_queries("q.yaml") == [select.Query(name="a", positive=["x"])]
