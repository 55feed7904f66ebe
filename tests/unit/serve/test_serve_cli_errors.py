"""``keeper serve``'s answers to a user's mistakes: one line naming the key or file, exit 2,
before a token file is written or Serve started (no Ray here: ``local.start`` is replaced)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from keeper_core.errors import ConfigError
from keeper_serve import commands, local
from keeper_serve.config import KeeperAppArgs, describe

ROOT = Path(__file__).parents[3]
TOKEN_ENV = "KEEPER_API_TOKEN"


@pytest.fixture
def no_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Starting Serve fails the test; the token file is really written (where data_dir says)."""

    def start(*a: Any, **kw: Any) -> str:
        raise AssertionError("keeper serve started Serve")

    monkeypatch.setattr(local, "start", start)
    monkeypatch.delenv(TOKEN_ENV, raising=False)


def serve(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """``keeper serve ARGV``'s stderr, once it exited 2 with one line and no traceback."""
    from keeper_core.cli import main

    assert main(["serve", *argv]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "errors.pydantic.dev" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("keeper serve: ")
    return lines[0]


def write(tmp_path: Path, text: str | bytes, name: str = "serve.yaml") -> str:
    p = tmp_path / name
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return str(p)


def test_an_override_value_that_is_not_yaml(
    no_start: None, capsys: pytest.CaptureFixture[str]
) -> None:
    err = serve(["clip_model=@x"], capsys)
    assert "override 'clip_model': value '@x' is not valid YAML" in err
    assert "quote it: \"clip_model='@x'\"" in err
    assert local.parse_overrides(["clip_model='@x'"]) == {"clip_model": "@x"}  # what it says


def test_http_options_without_a_key(no_start: None, capsys: pytest.CaptureFixture[str]) -> None:
    err = serve(["http_options=5"], capsys)
    assert "http_options takes keys: http_options.KEY=VALUE" in err


@pytest.mark.parametrize("key", ["ranker..poll_s", ".x", "encoder."])
def test_an_override_key_with_an_empty_part(key: str) -> None:
    with pytest.raises(ConfigError, match="a name is missing between the dots"):
        local.apply_overrides(local.load_config(), {key: 1})


def test_an_override_into_a_null_section_makes_it() -> None:
    cfg = local.load_config()
    cfg["applications"][0]["args"]["feedback"] = None
    out = local.apply_overrides(cfg, {"feedback.root": "/fb"})
    assert out["applications"][0]["args"]["feedback"] == {"root": "/fb"}


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("applications: [5]\n", "applications[0] must be a mapping"),
        ("applications: [{name: a}, x]\n", "applications[1] must be a mapping"),
        ("applications: {a: 1}\n", "'applications' list"),
        ("applications:\n  - name: keeper\n    args: [1]\n", "applications[0].args must be a"),
        ("applications:\n  - name: keeper\n    deployments: 3\n", "deployments must be a list"),
        ("applications:\n  - deployments: [{num_replicas: 1}]\n", "deployments[0] must be a"),
        ("applications:\n  - deployments: [5]\n", "deployments[0] must be a mapping"),
        ("http_options: 5\napplications: [{name: a}]\n", "http_options must be a mapping"),
    ],
)
def test_a_config_of_the_wrong_shape(
    no_start: None, capsys: pytest.CaptureFixture[str], tmp_path: Path, text: str, where: str
) -> None:
    path = write(tmp_path, text)
    err = serve(["--config", path], capsys)
    assert path in err
    assert where in err
    with pytest.raises(ConfigError, match=r"must be a|'applications' list"):
        local.load_config(path)


def test_start_checks_the_shape_of_a_dict_config() -> None:
    with pytest.raises(ConfigError, match=r"applications\[0\] must be a mapping"):
        local.start({"applications": [5]})  # before any Ray or Serve call


@pytest.mark.parametrize(
    "spec",
    [
        "ViT-X-99:random",  # an unknown architecture
        "ViT-B-32:no_such_tag",  # an unknown pretrained tag
        ":random",  # not ARCH[:WEIGHTS]
    ],
)
def test_an_unknown_clip_model_exits_2_before_the_token_is_written(
    no_start: None, capsys: pytest.CaptureFixture[str], tmp_path: Path, spec: str
) -> None:
    data = tmp_path / "data"
    err = serve([f"data_dir={data}", f"clip_model={spec}"], capsys)
    assert "clip_model: cannot load model" in err
    assert not (data / "api-token").exists()
    assert not data.exists()


def test_clip_model_is_checked_under_the_context_only() -> None:
    # Plain construction (an ingress replica, the tests) parses the spec but imports no open_clip.
    assert KeeperAppArgs(clip_model="ViT-B-32").clip_model == "ViT-B-32:random"
    assert KeeperAppArgs(clip_model="ViT-X-99").clip_model == "ViT-X-99:random"
    with pytest.raises(ValidationError, match="clip_model"):
        KeeperAppArgs(clip_model="ViT-B-32:")
    with pytest.raises(ValidationError, match="unknown architecture 'ViT-X-99'"):
        KeeperAppArgs.checked({"clip_model": "ViT-X-99"})
    assert KeeperAppArgs.checked({"clip_model": " keeper-tiny "}).clip_model == (
        "keeper-tiny:random"
    )


@pytest.mark.parametrize(
    "path",
    [
        ROOT / "packages" / "serve" / "src" / "keeper_serve" / "serve_config.yaml",
        *sorted((ROOT / "clusters" / "serve").glob("*.yaml")),
    ],
    ids=lambda p: p.name,
)
def test_the_shipped_configs_validate_with_their_clip_model(path: Path) -> None:
    cfg = local.load_config(path)
    args = local.validate(cfg)
    assert args.clip_model == cfg["applications"][0]["args"]["clip_model"]  # canonical already


def test_a_port_that_is_not_a_number(no_start: None, capsys: pytest.CaptureFixture[str]) -> None:
    err = serve(["http_options.port=abc"], capsys)
    assert "http_options.port" in err
    assert "invalid literal" not in err


def test_a_deployment_option_of_the_wrong_type(
    no_start: None, capsys: pytest.CaptureFixture[str]
) -> None:
    err = serve(["deployments.ClipEncoder.num_replicas=abc"], capsys)
    assert "invalid Serve config" in err
    assert "num_replicas" in err


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["clip_modle=x"], ["clip_modle: Extra inputs are not permitted"]),
        (["args=[1]"], ["args: Extra inputs are not permitted"]),
        (
            ["clip_modle=x", "encoder.max_batch_size=0"],
            ["clip_modle: Extra inputs", "encoder.max_batch_size: Input should be greater"],
        ),
        (["select.top_n=99"], ["select: select.top_n/top_k must not exceed"]),
        (["limits.max_image_bytes=999999999999"], ["(root): limits.max_image_bytes exceeds"]),
    ],
)
def test_invalid_args_are_one_line_per_field(
    no_start: None, capsys: pytest.CaptureFixture[str], argv: list[str], names: list[str]
) -> None:
    err = serve(argv, capsys)
    assert err.startswith("keeper serve: invalid application args: ")
    for name in names:
        assert name in err
    assert "validation error for" not in err


def test_describe_drops_pydantic_s_prefix_and_newlines() -> None:
    with pytest.raises(ValidationError) as info:
        KeeperAppArgs.model_validate({"s3_allow_buckets": ["s3://b"], "draft": "maybe"})
    text = describe(info.value)
    assert "\n" not in text
    assert "s3_allow_buckets: s3_allow_buckets takes bare bucket names" in text
    assert "draft: Input should be a valid boolean" in text
    assert "Value error," not in text


def test_a_binary_config_file_is_named(
    no_start: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, b"\x89PNG\r\n\x1a\n\x00\xff\xfe binary", "serve.png")
    err = serve(["--config", path], capsys)
    assert f"cannot read the Serve config {path}: not UTF-8 text" in err


def test_a_config_that_is_not_yaml_is_one_line(
    no_start: None, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write(tmp_path, "applications: [\n  - a: b\n  - : :\n")
    err = serve(["--config", path], capsys)
    assert f"cannot read the Serve config {path}: invalid YAML" in err
    assert "line " in err


def test_a_good_config_still_plans(tmp_path: Path) -> None:
    import argparse

    cfg = local.load_config()
    path = write(tmp_path, yaml.safe_dump(cfg))
    ns = argparse.Namespace(
        config=path,
        overrides=["http_options.port=8123", "clip_model=keeper-tiny"],
        insecure_local=None,
        host=None,
        port=None,
    )
    plan = commands._plan(ns)
    assert plan.port == 8123
    assert plan.args.clip_model == "keeper-tiny:random"
