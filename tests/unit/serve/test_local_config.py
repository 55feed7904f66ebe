"""keeper_serve.local (config file, overrides, deployment options), ensure_token, app.bind and
``keeper serve``'s refusals. No Ray is started: every path here fails or returns before
``local.start`` would."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path
from typing import Any

import pytest
import yaml

from keeper_core.errors import ConfigError
from keeper_serve import commands, local
from keeper_serve.config import ENCODER, INGRESS, RANKER, VLM, KeeperAppArgs

TOKEN_ENV = "KEEPER_TEST_API_TOKEN"


def small_config() -> dict[str, Any]:
    return {
        "http_options": {"host": "127.0.0.1", "port": 8000},
        "applications": [
            {
                "name": "keeper",
                "import_path": "keeper_serve.app:build_app",
                "args": {"clip_model": "keeper-tiny:random", "ranker": {"poll_s": 5.0}},
                "deployments": [
                    {"name": ENCODER, "autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
                ],
            }
        ],
    }


# ---------------------------------------------------------------------------- load_config


def test_default_config_loads() -> None:
    cfg = local.load_config()
    assert cfg == local.load_config(local.DEFAULT_CONFIG)
    app = cfg["applications"][0]
    assert app["import_path"] == "keeper_serve.app:build_app"
    KeeperAppArgs.model_validate(app["args"])
    assert {d["name"] for d in app["deployments"]} == {INGRESS, ENCODER, RANKER}
    assert app["args"]["vlm"]["source"] is None  # so no VlmJudge block: Serve would refuse it


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the Serve config"):
        local.load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "text", ["", "applications: []\n", "http_options: {port: 1}\n", "- a\n- b\n", "just text\n"]
)
def test_config_without_applications(tmp_path: Path, text: str) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="'applications' list"):
        local.load_config(p)


def test_config_that_is_not_yaml(tmp_path: Path) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text("applications: [\n")
    with pytest.raises(ConfigError, match="cannot read the Serve config"):
        local.load_config(p)


def test_config_from_a_file(tmp_path: Path) -> None:
    p = tmp_path / "serve.yaml"
    p.write_text(yaml.safe_dump(small_config()))
    assert local.load_config(str(p)) == small_config()


# ---------------------------------------------------------------------------- apply_overrides


def test_overrides_of_args_deployments_and_http_options() -> None:
    cfg = small_config()
    before = copy.deepcopy(cfg)
    out = local.apply_overrides(
        cfg,
        {
            "clip_model": "ViT-B-32:random",
            "ranker.model_uri": None,
            "encoder.max_batch_size": 32,  # a new nested mapping under args
            f"deployments.{ENCODER}.autoscaling_config.max_replicas": 2,
            f"deployments.{RANKER}.ray_actor_options.num_cpus": 0.5,  # a new entry
            "http_options.port": 8001,
            "http_options.request_timeout_s": 30,
        },
    )
    assert cfg == before  # the input is not mutated
    app = out["applications"][0]
    assert app["args"] == {
        "clip_model": "ViT-B-32:random",
        "ranker": {"poll_s": 5.0, "model_uri": None},
        "encoder": {"max_batch_size": 32},
    }
    assert app["deployments"] == [
        {"name": ENCODER, "autoscaling_config": {"min_replicas": 1, "max_replicas": 2}},
        {"name": RANKER, "ray_actor_options": {"num_cpus": 0.5}},
    ]
    assert out["http_options"] == {"host": "127.0.0.1", "port": 8001, "request_timeout_s": 30}
    KeeperAppArgs.model_validate(app["args"])


def test_overrides_create_missing_sections() -> None:
    cfg = {"applications": [{"name": "keeper"}]}
    out = local.apply_overrides(
        cfg, {"data_dir": "/d", f"deployments.{INGRESS}.num_replicas": 2, "http_options.port": 9}
    )
    assert cfg == {"applications": [{"name": "keeper"}]}
    assert out["applications"][0] == {
        "name": "keeper",
        "args": {"data_dir": "/d"},
        "deployments": [{"name": INGRESS, "num_replicas": 2}],
    }
    assert out["http_options"] == {"port": 9}


def test_no_overrides_is_a_copy() -> None:
    cfg = small_config()
    out = local.apply_overrides(cfg, {})
    assert out == cfg
    assert out is not cfg
    assert out["applications"][0]["args"] is not cfg["applications"][0]["args"]


@pytest.mark.parametrize(
    "key",
    [
        "clip_model.arch",  # a string on the path
        "ranker.poll_s.x",  # a float on the path
        f"deployments.{ENCODER}.autoscaling_config.max_replicas.x",
        "http_options.port.x",
    ],
)
def test_override_through_a_non_mapping(key: str) -> None:
    with pytest.raises(ConfigError, match="is not a mapping"):
        local.apply_overrides(small_config(), {key: 1})


def test_override_of_a_deployment_needs_an_option() -> None:
    with pytest.raises(ConfigError, match=r"deployments\.NAME\.OPTION"):
        local.apply_overrides(small_config(), {f"deployments.{ENCODER}": 1})


# ---------------------------------------------------------------------------- parse_overrides


def test_parse_overrides_yaml_scalars() -> None:
    assert local.parse_overrides(
        [
            "ranker.model_uri=null",
            "encoder.max_batch_size=32",
            "ranker.poll_s=2.5",
            "draft=false",
            "auth.insecure_local=true",
            "clip_model=ViT-B-32:laion2b_s34b_b79k",
            "ranker.model_uri2=models:/keeper-ranker@champion",
            "data_dir=/data/keeper dir",
            "aesthetic_config=",
            "tracking_uri=http://h:5000/?a=b",
            " http_options.port =8001",
        ]
    ) == {
        "ranker.model_uri": None,
        "encoder.max_batch_size": 32,
        "ranker.poll_s": 2.5,
        "draft": False,
        "auth.insecure_local": True,
        "clip_model": "ViT-B-32:laion2b_s34b_b79k",
        "ranker.model_uri2": "models:/keeper-ranker@champion",
        "data_dir": "/data/keeper dir",
        "aesthetic_config": "",
        "tracking_uri": "http://h:5000/?a=b",
        "http_options.port": 8001,
    }
    assert local.parse_overrides([]) == {}


@pytest.mark.parametrize("item", ["clip_model", "=x", ""])
def test_parse_overrides_needs_key_and_equals(item: str) -> None:
    with pytest.raises(ConfigError, match="expected key=value"):
        local.parse_overrides([item])


# ---------------------------------------------------------------------------- _options


def test_options_from_deployments() -> None:
    app = small_config()["applications"][0]
    assert local._options(app) == {
        ENCODER: {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}
    }
    assert local._options({"name": "keeper"}) == {}


def test_options_merge_the_app_env_vars() -> None:
    app = {
        "runtime_env": {"env_vars": {"A": "1", "B": "2"}},
        "deployments": [
            {
                "name": ENCODER,
                "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"B": "3"}}},
            },
            {"name": RANKER, "max_ongoing_requests": 4},
        ],
    }
    assert local._options(app) == {
        # a deployment's own env_vars win over the application's
        ENCODER: {
            "ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": {"A": "1", "B": "3"}}}
        },
        RANKER: {
            "max_ongoing_requests": 4,
            "ray_actor_options": {"runtime_env": {"env_vars": {"A": "1", "B": "2"}}},
        },
    }


def test_options_of_the_packaged_config() -> None:
    opts = local._options(local.load_config()["applications"][0])
    assert set(opts) == {INGRESS, ENCODER, RANKER}
    assert all("name" not in o for o in opts.values())
    assert opts[ENCODER]["max_ongoing_requests"] >= 16


def test_options_do_not_mutate_the_app() -> None:
    app = {
        "runtime_env": {"env_vars": {"A": "1"}},
        "deployments": [{"name": ENCODER, "ray_actor_options": {"num_cpus": 1}}],
    }
    before = copy.deepcopy(app)
    local._options(app)
    assert app == before


# ---------------------------------------------------------------------------- ensure_token


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_ensure_token_generates_then_reuses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    data = tmp_path / "keeper-data"
    token, where = commands.ensure_token(TOKEN_ENV, str(data))
    path = data / "api-token"
    assert where == str(path)
    assert len(token) >= 32
    assert path.read_text().strip() == token
    assert mode(path) == 0o600
    assert os.environ[TOKEN_ENV] == token  # what a local Ray's replicas inherit

    monkeypatch.delenv(TOKEN_ENV)
    again, where = commands.ensure_token(TOKEN_ENV, str(data))
    assert (again, where) == (token, str(path))


def test_ensure_token_env_var_wins(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(TOKEN_ENV, "  " + "e" * 20 + " ")
    assert commands.ensure_token(TOKEN_ENV, str(tmp_path)) == ("e" * 20, f"${TOKEN_ENV}")
    assert not (tmp_path / "api-token").exists()


def test_ensure_token_replaces_a_short_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = tmp_path / "api-token"
    path.write_text("short\n")
    path.chmod(0o600)
    token, _ = commands.ensure_token(TOKEN_ENV, str(tmp_path))
    assert len(token) >= 32
    assert path.read_text().strip() == token


def test_ensure_token_file_is_0600_even_when_it_existed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = tmp_path / "api-token"
    path.write_text("")
    path.chmod(0o644)
    commands.ensure_token(TOKEN_ENV, str(tmp_path))
    assert mode(path) == 0o600


# ---------------------------------------------------------------------------- app.bind


def test_bind_refuses_unknown_deployments() -> None:
    import ray

    from keeper_serve import app

    was_up = ray.is_initialized()  # the integration tests' session Ray may be up already
    with pytest.raises(ValueError, match="Nope"):
        app.bind(KeeperAppArgs(), options={"Nope": {}})
    assert app.DEPLOYMENTS == (INGRESS, ENCODER, RANKER)
    assert VLM in app.OPTIONAL_DEPLOYMENTS
    with pytest.raises(ValueError, match=r"args\.vlm\.source is null"):
        app.bind(KeeperAppArgs(), options={VLM: {"num_replicas": 1}})
    assert ray.is_initialized() == was_up, "bind must not start Ray"


# ---------------------------------------------------------------------------- keeper serve


@pytest.fixture
def no_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to start Serve fail the test."""

    def start(*a: Any, **kw: Any) -> str:
        raise AssertionError("keeper serve started Serve")

    monkeypatch.setattr(local, "start", start)
    monkeypatch.setattr(commands, "ensure_token", lambda *a: pytest.fail("token generated"))


def test_serve_insecure_local_refuses_a_public_host(
    no_start: None, capsys: pytest.CaptureFixture[str]
) -> None:
    import ray

    from keeper_core.cli import main

    was_up = ray.is_initialized()  # the integration tests' session Ray may be up already
    assert main(["serve", "--insecure-local", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "keeper serve:" in err
    assert "--insecure-local" in err
    assert "--host 0.0.0.0 is not loopback" in err
    assert ray.is_initialized() == was_up


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["clip_model"], "expected key=value"),
        (["limits.max_imagez=3"], "max_imagez"),
        (["encoder.max_batch_size=0"], "max_batch_size"),
        (["--config", "/nonexistent/serve.yaml"], "cannot read the Serve config"),
    ],
)
def test_serve_bad_arguments_exit_2(
    no_start: None, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    from keeper_core.cli import main

    assert main(["serve", *argv]) == 2
    assert message in capsys.readouterr().err


def _serve_parser() -> Any:
    import argparse

    from keeper_core.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["serve"]


def test_every_serve_flag_has_help_and_defaults_to_not_given() -> None:
    parser = _serve_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert (action.help or "").strip(), action.dest
        assert action.default in (None, []), (action.dest, action.default)


def _write(tmp_path: Path, cfg: dict[str, Any]) -> str:
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_serve_config_values_survive_when_flags_are_not_given(tmp_path: Path) -> None:
    cfg = small_config()
    cfg["http_options"] = {"host": "127.0.0.2", "port": 9001}
    path = _write(tmp_path, cfg)
    parser = _serve_parser()
    plan = commands._plan(parser.parse_args(["--config", path]))
    assert (plan.host, plan.port) == ("127.0.0.2", 9001)
    assert plan.config["http_options"]["port"] == 9001
    assert plan.args.auth.insecure_local is False
    plan = commands._plan(parser.parse_args(["--config", path, "--port", "9002"]))
    assert (plan.host, plan.port) == ("127.0.0.2", 9002)
    assert plan.config["http_options"] == {"host": "127.0.0.2", "port": 9002}
    plan = commands._plan(parser.parse_args(["--config", path, "--insecure-local"]))
    assert plan.args.auth.insecure_local is True


def test_serve_insecure_config_refuses_a_public_host(
    no_start: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """auth.insecure_local from the config is held to the same loopback rule as the flag."""
    from keeper_core.cli import main

    cfg = small_config()
    cfg["http_options"]["host"] = "0.0.0.0"
    cfg["applications"][0]["args"]["auth"] = {"insecure_local": True}
    assert main(["serve", "--config", _write(tmp_path, cfg)]) == 2
    assert "auth.insecure_local" in capsys.readouterr().err


def test_start_warns_when_the_encoders_memory_is_short_for_its_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The warning comes before anything starts (here the port refusal stops it, no Ray)."""
    import socket

    cfg = small_config()
    app = cfg["applications"][0]
    app["args"]["clip_model"] = "ViT-B-32:random"  # needs 1.95 GiB
    app["deployments"][0]["ray_actor_options"] = {"num_cpus": 1, "memory": 2**30}
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with caplog.at_level("WARNING", logger="keeper.serve"):
            with pytest.raises(local.StartError, match="port is in use"):
                local.start(cfg, port=port, ray_address="local")
            assert "ClipEncoder: ray_actor_options.memory 1.00 GiB < 1.95 GiB" in caplog.text
            caplog.clear()
            app["deployments"][0]["ray_actor_options"]["memory"] = 2 * 2**30  # enough: silent
            with pytest.raises(local.StartError, match="port is in use"):
                local.start(cfg, port=port, ray_address="local")
            assert "ray_actor_options.memory" not in caplog.text


def test_memory_floor_counts_each_deployments_minimum_replicas() -> None:
    cfg = local.load_config(None)  # the packaged dev-box config
    floor = local.memory_floor(local._options(cfg["applications"][0]))
    # every deployment reserves memory; each has min_replicas 1 in this config
    assert floor == {INGRESS: 2**29, ENCODER: 2 * 2**30, RANKER: 2**30}
    opts = {
        "A": {"ray_actor_options": {"memory": 100}, "autoscaling_config": {"min_replicas": 3}},
        "B": {"ray_actor_options": {"memory": 10}, "num_replicas": 2},
        "C": {"ray_actor_options": {"num_cpus": 1}},  # reserves none
        "D": {"ray_actor_options": {"memory": 5}, "autoscaling_config": {"min_replicas": 0}},
    }
    assert local.memory_floor(opts) == {"A": 300.0, "B": 20.0}


def test_memory_refusal_names_the_reservations_and_the_knob() -> None:
    opts = {ENCODER: {"ray_actor_options": {"memory": 3 * 2**30}}}
    assert local.memory_refusal(opts, 3 * 2**30) is None
    why = local.memory_refusal(opts, 2.5 * 2**30)
    assert why is not None
    assert "reserve 3.00 GiB" in why
    assert f"{ENCODER} 3.00" in why
    assert "offers 2.50 GiB" in why
    assert "ray_actor_options.memory" in why


def test_unreserved_deployments_are_the_running_ones_the_config_gives_no_memory() -> None:
    cfg = local.load_config(None)  # the packaged dev-box config: everything it runs reserves
    opts = local._options(cfg["applications"][0])
    assert local.unreserved_deployments([INGRESS, ENCODER, RANKER], opts) == []
    # an A/B challenger the config does not list (or lists without memory) reserves none
    assert local.unreserved_deployments([INGRESS, "ChallengerRanker"], opts) == ["ChallengerRanker"]
    opts["ChallengerRanker"] = {"ray_actor_options": {"num_cpus": 1}}
    assert local.unreserved_deployments(["ChallengerRanker", RANKER], opts) == ["ChallengerRanker"]
    opts["ChallengerRanker"]["ray_actor_options"]["memory"] = 2**30
    assert local.unreserved_deployments(["ChallengerRanker", RANKER], opts) == []


def test_haproxy_env_gives_each_instance_its_own_files_and_ports(tmp_path: Path) -> None:
    """Ray's defaults (/tmp/haproxy-serve, ports 9101 and 8404) would collide between two
    Serve instances on one machine: each keeper instance gets its own."""
    a, b = local.haproxy_env(tmp_path / "a"), local.haproxy_env(tmp_path / "b")
    assert a[local.HAPROXY_FLAG] == b[local.HAPROXY_FLAG] == "1"
    for env, root in ((a, tmp_path / "a"), (b, tmp_path / "b")):
        assert root.is_dir()
        paths = [v for k, v in env.items() if k.endswith(("_LOC", "_PATH", "_BASE", "_FILE"))]
        assert len(paths) == 4
        assert all(Path(v) == root or Path(v).parent == root for v in paths), env
        ports = {env["RAY_SERVE_HAPROXY_METRICS_PORT"], env["RAY_SERVE_HAPROXY_STATS_PORT"]}
        assert len(ports) == 2
        assert not ports & {"9101", "8404"}
    assert a["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"] != b["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]


@pytest.mark.parametrize("address", ["127.0.0.1:6379", "auto"])
def test_start_with_haproxy_refuses_to_join_a_cluster_started_without_it(
    monkeypatch: pytest.MonkeyPatch, address: str
) -> None:
    """HAProxy is chosen where Ray starts; joining a Ray, keeper cannot turn it on there."""
    monkeypatch.delenv(local.HAPROXY_FLAG, raising=False)
    with pytest.raises(ConfigError, match="start the cluster with RAY_SERVE_ENABLE_HA_PROXY=1"):
        local.start(small_config(), ray_address=address, haproxy=True)
    assert local.HAPROXY_FLAG not in os.environ  # nothing was set on the way


@pytest.mark.parametrize(("address", "env"), [("127.0.0.1:6379", None), (None, "auto")])
def test_an_open_api_is_served_only_by_a_ray_started_here(
    monkeypatch: pytest.MonkeyPatch, address: str | None, env: str | None
) -> None:
    """Joining a running Ray, its Serve keeps its own host (maybe 0.0.0.0): open is refused."""
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    cfg = local.apply_overrides(small_config(), {"auth.insecure_local": True})
    with pytest.raises(ConfigError, match="served only by a Ray that keeper serve starts"):
        local.start(cfg, ray_address=address)
