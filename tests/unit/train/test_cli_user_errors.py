"""A user mistake at the ``keeper`` CLI: one line naming the problem, exit 2, no traceback, and
nothing left behind that blocks the corrected re-run (no Ray, no MLflow server: every case fails
at validation or while planning)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from support import fails_cleanly, photo, write_embed_table

from keeper_core import registry
from keeper_core.errors import ConfigError, DataError
from keeper_train.config import parse_overrides
from keeper_train.data import read_embeddings
from keeper_train.jobs import demo, embed, pick

SPEC = "keeper-tiny:random"


@pytest.fixture(autouse=True)
def no_env_store(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No tracking URI from the environment; relative paths land in the test's folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a job gets as far as the embed pipeline."""

    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the job reached the embed pipeline before refusing")

    monkeypatch.setattr(embed, "execute", refuse)


def _series(path: Path, uris: list[str]) -> Path:
    sids = [f"s{i // 2}" for i in range(len(uris))]
    pd.DataFrame(
        {"series_id": sids, "image_uri": uris, "is_best": [1, 0] * (len(uris) // 2)}
    ).to_csv(path, index=False)
    return path


# --------------------------------------------------------------------------------------------
# 1, 2: the config file and the overrides


def test_a_binary_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "embed.yaml"
    cfg.write_bytes(b"\x8e\xff\xfe\x00" + bytes(range(256)))
    fails_cleanly(capsys, ["embed", "--config", str(cfg)], f"cannot read config {cfg}")


def test_a_config_file_that_is_not_yaml_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "embed.yaml"
    cfg.write_text("input: x\noutput: [y,\n")
    fails_cleanly(capsys, ["embed", "--config", str(cfg)], "cannot read config", "line ")


@pytest.mark.parametrize(
    ("override", "key"),
    [("exclude=[a,", "exclude"), ("model=@foo", "model"), ("model=a: b: c", "model")],
)
def test_an_override_that_is_not_yaml_names_its_key(
    capsys: pytest.CaptureFixture[str], override: str, key: str
) -> None:
    line = fails_cleanly(
        capsys, ["embed", "--input", "x", "--output", "y", override], f"override {key!r}", "quote"
    )
    assert not Path("y").exists()
    # The quoting the message suggests parses as the string that was meant.
    suggested = line.rsplit('"', 2)[-2]
    assert parse_overrides([suggested]) == {key: override.partition("=")[2]}


def test_parse_overrides_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"override 'model': value '@foo' is not valid YAML"):
        parse_overrides(["model=@foo"])


# --------------------------------------------------------------------------------------------
# 3, 4: an unknown ModelSpec, refused by the config (embed's own check) before any work


def test_pick_refuses_an_unknown_clip_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    (tmp_path / "photos").mkdir()
    fails_cleanly(
        capsys,
        [
            *("pick", "--input", "photos", "--output", "out", "--zero-shot"),
            *("--clip-model", "ViT-X-99:random"),
        ],
        "clip_model",
        "ViT-X-99",
    )
    assert not (tmp_path / "out").exists()
    assert pick.PickJobConfig(input="a", output="b").clip_model is None  # no model: fine


@pytest.mark.parametrize("manifest", [False, True])
def test_demo_refuses_an_unknown_model_before_the_corpus(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    manifest: bool,
) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("the demo did work before refusing its model")

    monkeypatch.setattr(demo, "generate_corpus", refuse)
    monkeypatch.setattr(demo, "read_series_manifest", refuse)
    extra = ["--manifest", str(_series(tmp_path / "s.csv", ["a.jpg", "b.jpg"]))] if manifest else []
    fails_cleanly(
        capsys, ["demo", "--out", "d", "--model", "ViT-X-99:random", *extra], "model", "ViT-X-99"
    )
    assert not (tmp_path / "d").exists()


def test_one_validator_for_every_model_spec_field() -> None:
    """pick's clip_model, demo's model and embed's model take the same specs, normalised alike."""
    assert embed.EmbedConfig(input="a", output="b", model="keeper-tiny").model == SPEC
    assert pick.PickJobConfig(input="a", output="b", clip_model="keeper-tiny").clip_model == SPEC
    assert demo.DemoConfig(model="keeper-tiny").model == SPEC


# --------------------------------------------------------------------------------------------
# 5: a tracking URI MLflow has no store for


def test_evaluate_refuses_an_unsupported_tracking_uri(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uris = [str(tmp_path / f"{i}.jpg") for i in range(4)]
    table = write_embed_table(tmp_path / "emb", uris)
    series = _series(tmp_path / "series.csv", uris)
    fails_cleanly(
        capsys,
        [
            *("evaluate", "--model", "models:/r@champion", "--embeddings", str(table)),
            *("--series", str(series), "--tracking-uri", "bogus://x"),
        ],
        "tracking_uri 'bogus://x'",
        "'bogus'",
        "sqlite",
    )


@pytest.mark.parametrize("model", [[], ["--model", "models:/r@champion"]])
def test_pick_refuses_an_unsupported_tracking_uri(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None, model: list[str]
) -> None:
    (tmp_path / "photos").mkdir()
    fails_cleanly(
        capsys,
        ["pick", "--input", "photos", "--output", "out", "--tracking-uri", "bogus://x", *model],
        "tracking_uri 'bogus://x'",
    )
    assert not (tmp_path / "out").exists()


def test_export_refuses_an_unsupported_tracking_uri(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fails_cleanly(
        capsys,
        ["export", "models:/r@champion", "--output", "exp", "--tracking-uri", "bogus://x"],
        "tracking_uri 'bogus://x'",
    )
    assert not (tmp_path / "exp").exists()


def test_has_champion_turns_a_registry_uri_error_into_a_config_error() -> None:
    with pytest.raises(ConfigError, match="tracking_uri 'bogus://x'"):
        pick._has_champion("bogus://x", "keeper-ranker")


def test_tracking_uri_checks_the_environment_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI 'bogus://x'"):
        registry.tracking_uri(None, tmp_path)


@pytest.mark.parametrize(
    "uri",
    [
        "http://127.0.0.1:5000",
        "https://mlflow.example.com",
        "databricks",
        "postgresql+psycopg2://u@db/mlflow",
        "mysql://u@db/mlflow",
        "mssql://u@db/mlflow",
        "file:///nowhere/mlruns",
        "/nowhere/mlruns",
        "sqlite:///nowhere/mlflow.db",
    ],
)
def test_tracking_uri_takes_every_scheme_mlflow_supports(tmp_path: Path, uri: str) -> None:
    assert registry.tracking_uri(uri, tmp_path / "data") == uri
    assert not (tmp_path / "data").exists()  # asked of MLflow's list: nothing created
    assert not Path("/nowhere").exists()


# --------------------------------------------------------------------------------------------
# 6: a table keeper embed did not write


def test_evaluate_refuses_a_table_without_model_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uris = [str(tmp_path / f"{i}.jpg") for i in range(4)]
    table = write_embed_table(tmp_path / "emb", uris, drop=("model_spec",))
    series = _series(tmp_path / "series.csv", uris)
    fails_cleanly(
        capsys,
        [
            *("evaluate", "--model", "models:/r@champion", "--embeddings", str(table)),
            *("--series", str(series)),
        ],
        "not a keeper embed table: missing columns ['model_spec']",
    )


def test_export_embeddings_refuses_a_table_without_model_spec(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    table = write_embed_table(
        tmp_path / "emb", ["/a.jpg", "/b.jpg"], drop=("model_spec", "image_id")
    )
    fails_cleanly(
        capsys,
        ["export-embeddings", "--table", str(table), "--output", "cr"],
        "not a keeper embed table: missing columns ['image_id', 'model_spec']",
    )
    assert not (tmp_path / "cr").exists()


def test_read_embeddings_names_the_missing_columns(tmp_path: Path) -> None:
    table = write_embed_table(tmp_path / "emb", ["/a.jpg"], drop=("embedding",))
    with pytest.raises(DataError, match=r"missing columns \['embedding'\]"):
        read_embeddings(str(table))
    assert len(read_embeddings(str(write_embed_table(tmp_path / "ok", ["/a.jpg"])))) == 1


# --------------------------------------------------------------------------------------------
# 7, 8, 9: keeper embed's output record and its input


@pytest.mark.parametrize(("body", "why"), [(b"{bad", "not valid JSON"), (b"[1]", "not a mapping")])
def test_embed_refuses_a_corrupt_table_record_by_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None, body: bytes, why: str
) -> None:
    (tmp_path / "photos").mkdir()
    photo(64, 48).save(tmp_path / "photos" / "a.jpg")
    meta = tmp_path / "out" / embed.TABLE_META
    meta.parent.mkdir()
    meta.write_bytes(body)
    fails_cleanly(
        capsys,
        ["embed", "--input", "photos", "--output", "out"],
        str(Path("out", embed.TABLE_META)),
        why,
    )
    assert meta.read_bytes() == body  # left as it was, for the user to look at


def test_embed_of_an_empty_folder_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    (tmp_path / "photos").mkdir()
    fails_cleanly(
        capsys, ["embed", "--input", "photos", "--output", "out"], "no images found under photos"
    )
    assert not (tmp_path / "out").exists()


def test_embed_of_a_folder_without_images_says_what_it_saw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "notes.txt").write_text("not a photo")
    fails_cleanly(
        capsys,
        ["embed", "--input", "photos", "--output", "out"],
        "no images found under photos (1 file(s), none an image",
    )


def test_pick_of_an_empty_folder_fails_the_same_way(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    (tmp_path / "photos").mkdir()
    fails_cleanly(
        capsys,
        ["pick", "--input", "photos", "--output", "out", "--zero-shot"],
        "no images found under photos",
    )
    assert not (tmp_path / "out" / embed.SUMMARY).exists()
    assert not (tmp_path / "out" / "table" / embed.TABLE_META).exists()


def test_everything_already_embedded_is_not_an_empty_input(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    photo(64, 48).save(tmp_path / "photos" / "a.jpg")
    uris, _ = embed.list_inputs(str(tmp_path / "photos"))
    write_embed_table(tmp_path / "out", uris)
    p = embed.plan(embed.EmbedConfig(input=str(tmp_path / "photos"), output=str(tmp_path / "out")))
    assert (len(p.inputs), p.todo) == (1, [])


def test_a_failed_embed_leaves_no_table_record_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    fails_cleanly(capsys, ["embed", "--input", "nope", "--output", "e1"], "nope")
    assert not (tmp_path / "e1" / embed.TABLE_META).exists()
    # The corrected run, with another model, is not told e1 holds the first run's spec.
    (tmp_path / "photos").mkdir()
    photo(64, 48).save(tmp_path / "photos" / "a.jpg")
    other = "ViT-B-32:random"
    p = embed.plan(embed.EmbedConfig(input="photos", output="e1", model=other))
    assert len(p.todo) == 1
    meta = json.loads((tmp_path / "e1" / embed.TABLE_META).read_text())
    assert meta["model_spec"] == other  # recorded once there is something to embed
    with pytest.raises(DataError, match=f"holds embeddings of '{other}'"):
        embed.plan(embed.EmbedConfig(input="photos", output="e1", model=SPEC))
