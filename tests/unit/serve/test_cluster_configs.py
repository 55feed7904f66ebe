"""The shipped Serve configs (clusters/serve/*.yaml) and the KubeRay RayService that embeds one.

Parsed and validated the way ``serve deploy`` and Serve's controller do it (``ServeDeploySchema``;
the builder called through Serve's own ``call_user_app_builder_with_args_if_necessary``, which
turns ``args`` into ``KeeperAppArgs`` only when the annotation is a class), plus what Serve does
not check: Ray 2.60's schemas drop unknown keys silently (a misspelt ``max_ongoing_request``
becomes the default) and keep ``autoscaling_config`` as a raw dict. No Ray is started.
"""

from __future__ import annotations

import copy
import importlib
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, ValidationError
from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
from ray.serve._private.build_app import build_app as serve_build_app
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import (
    DeploymentSchema,
    HTTPOptionsSchema,
    RayActorOptionsSchema,
    ServeApplicationSchema,
    ServeDeploySchema,
    gRPCOptionsSchema,
)

from keeper_serve.config import (
    ENCODER,
    INGRESS,
    RANKER,
    VLM,
    EncoderArgs,
    KeeperAppArgs,
    RankerArgs,
    encoder_memory_shortfall,
)

ROOT = Path(__file__).parents[3]
SERVE_DIR = ROOT / "clusters" / "serve"
SERVE_CONFIGS = sorted(SERVE_DIR.glob("*.yaml"))
GPU_CONFIG = SERVE_DIR / "keeper-gpu.yaml"
RAYSERVICE = ROOT / "clusters" / "k8s" / "rayservice.yaml"
# What `keeper serve` runs when given no --config: the same content as clusters/serve/keeper.yaml.
PACKAGED = ROOT / "packages" / "serve" / "src" / "keeper_serve" / "serve_config.yaml"

IMPORT_PATH = "keeper_serve.app:build_app"
DEPLOYMENTS = {INGRESS, ENCODER, RANKER}  # always deployed; VLM only with args.vlm.source
ENCODER_USER_CONFIG = {"max_batch_size", "batch_wait_timeout_s"}
RANKER_USER_CONFIG = {"model_uri", "poll_s"}
SECRET_ENV = {"KEEPER_API_TOKEN", "RAY_AUTH_TOKEN", "AWS_SECRET_ACCESS_KEY"}


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path}: not a YAML mapping"
    return data


def unknown_keys(section: Any, model: type[BaseModel], where: str) -> list[str]:
    if not isinstance(section, dict):
        return []
    known = set(model.model_fields)
    known |= {f.alias for f in model.model_fields.values() if f.alias}
    return [
        f"{where}.{k}: not a field of {model.__name__} (Serve would ignore it)"
        for k in sorted(set(section) - known)
    ]


def deployments_by_name(app: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d.get("name"): d for d in app.get("deployments") or []}


def problems(config: dict[str, Any]) -> list[str]:
    """Everything wrong with a Serve config for keeper's app; empty when it is fit to deploy."""
    out = unknown_keys(config, ServeDeploySchema, "config")
    out += unknown_keys(config.get("http_options"), HTTPOptionsSchema, "http_options")
    out += unknown_keys(config.get("grpc_options"), gRPCOptionsSchema, "grpc_options")
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as e:
        out.append(f"ServeDeploySchema: {e}")
    for i, app in enumerate(config.get("applications") or []):
        where = f"applications[{i}]"
        out += unknown_keys(app, ServeApplicationSchema, where)
        out += app_problems(app, where)
    return out


def app_problems(app: dict[str, Any], where: str) -> list[str]:
    out: list[str] = []
    if app.get("import_path") != IMPORT_PATH:
        out.append(f"{where}.import_path: {app.get('import_path')!r}, expected {IMPORT_PATH!r}")
    try:
        args = KeeperAppArgs.model_validate(app.get("args") or {})
    except ValidationError as e:
        out.append(f"{where}.args: {e}")
        args = KeeperAppArgs()
    for env in [app.get("runtime_env") or {}] + [
        (d.get("ray_actor_options") or {}).get("runtime_env") or {}
        for d in app.get("deployments") or []
    ]:
        leaked = SECRET_ENV & set(env.get("env_vars") or {})
        if leaked:
            out.append(
                f"{where}: secret(s) {sorted(leaked)} in a runtime_env (shown by the dashboard)"
            )

    names = [d.get("name") for d in app.get("deployments") or []]
    if len(names) != len(set(names)):
        out.append(f"{where}.deployments: duplicate names {names}")
    # Serve refuses a block for a deployment the app does not build ("does not exist").
    built = DEPLOYMENTS | ({VLM} if args.vlm.source is not None else set())
    for name in sorted(set(names) - built, key=str):
        out.append(
            f"{where}.deployments: {name!r} is not deployed by these args, not one of "
            f"{sorted(built)}"
        )
    for name in sorted(built - set(names)):
        out.append(f"{where}.deployments: {name} not configured (code defaults would apply)")

    deps = deployments_by_name(app)
    for name, d in deps.items():
        out += deployment_problems(d, f"{where}.deployments[{name}]")

    if ENCODER in deps:
        enc = deps[ENCODER]
        short = encoder_memory_shortfall(args.clip_model, enc.get("ray_actor_options") or {})
        if short:
            out.append(short)
        user_config = enc.get("user_config") or {}
        extra = set(user_config) - ENCODER_USER_CONFIG
        if extra:
            out.append(f"{ENCODER}.user_config: unknown keys {sorted(extra)}")
        out += set_twice(app, "encoder", user_config, ENCODER)
        try:
            encoder = EncoderArgs.model_validate({**args.encoder.model_dump(), **user_config})
        except ValidationError as e:
            out.append(f"{ENCODER}.user_config: {e}")
        else:
            ongoing = enc.get("max_ongoing_requests")
            if isinstance(ongoing, int) and ongoing < encoder.max_batch_size:
                out.append(
                    f"{ENCODER}: max_ongoing_requests {ongoing} < max_batch_size "
                    f"{encoder.max_batch_size}: a batch can never fill"
                )
    if RANKER in deps:
        user_config = deps[RANKER].get("user_config") or {}
        extra = set(user_config) - RANKER_USER_CONFIG
        if extra:
            out.append(f"{RANKER}.user_config: unknown keys {sorted(extra)}")
        out += set_twice(app, "ranker", user_config, RANKER)
        try:
            RankerArgs.model_validate({**args.ranker.model_dump(), **user_config})
        except ValidationError as e:
            out.append(f"{RANKER}.user_config: {e}")
    return out


def set_twice(
    app: dict[str, Any], section: str, user_config: dict[str, Any], name: str
) -> list[str]:
    """A key in both args.SECTION and the deployment's user_config: the args value is dead."""
    in_args = (app.get("args") or {}).get(section) or {}
    both = sorted(set(in_args) & set(user_config)) if isinstance(in_args, dict) else []
    return [
        f"args.{section}.{k} and {name}.user_config.{k} both set: user_config wins, so "
        f"`keeper serve {section}.{k}=...` would change nothing"
        for k in both
    ]


def deployment_problems(d: dict[str, Any], where: str) -> list[str]:
    out = unknown_keys(d, DeploymentSchema, where)
    out += unknown_keys(
        d.get("ray_actor_options"), RayActorOptionsSchema, f"{where}.ray_actor_options"
    )
    for knob in ("max_ongoing_requests", "max_queued_requests", "ray_actor_options"):
        if knob not in d:
            out.append(f"{where}: {knob} not set (code default or unbounded queue)")
    if "memory" not in (d.get("ray_actor_options") or {}):
        # Serve replaces the code's ray_actor_options with the config's: what is not here is not
        # reserved, and Ray packs replicas onto a node by CPU alone
        out.append(f"{where}.ray_actor_options: memory not set (nothing reserved)")
    if d.get("max_queued_requests") == -1:
        out.append(f"{where}: max_queued_requests -1 is an unbounded queue (no 503 back-pressure)")
    if "num_replicas" in d:
        out.append(f"{where}: num_replicas set; keeper's configs autoscale")
    scaling = d.get("autoscaling_config")
    if not isinstance(scaling, dict):
        out.append(f"{where}: no autoscaling_config")
        return out
    out += unknown_keys(scaling, AutoscalingConfig, f"{where}.autoscaling_config")
    for knob in ("min_replicas", "max_replicas", "target_ongoing_requests"):
        if knob not in scaling:
            out.append(f"{where}.autoscaling_config: {knob} not set")
    try:
        auto = AutoscalingConfig.model_validate(scaling)
    except ValidationError as e:
        out.append(f"{where}.autoscaling_config: {e}")
        return out
    if auto.min_replicas > auto.max_replicas:
        out.append(f"{where}: min_replicas {auto.min_replicas} > max_replicas {auto.max_replicas}")
    ongoing = d.get("max_ongoing_requests")
    target = auto.target_ongoing_requests
    if isinstance(ongoing, int) and target is not None and target > ongoing:
        out.append(f"{where}: target_ongoing_requests {target} > max_ongoing_requests {ongoing}")
    return out


# ---------------------------------------------------------------- the shipped configs


def test_both_configs_ship() -> None:
    assert {p.name for p in SERVE_CONFIGS} >= {"keeper.yaml", "keeper-gpu.yaml"}


@pytest.fixture(params=SERVE_CONFIGS, ids=lambda p: p.name)
def config(request: pytest.FixtureRequest) -> dict[str, Any]:
    return load(request.param)


def test_config_is_a_serve_deploy_schema(config: dict[str, Any]) -> None:
    parsed = ServeDeploySchema.model_validate(config)
    assert [a.name for a in parsed.applications] == ["keeper"]
    app = parsed.applications[0]
    assert app.import_path == IMPORT_PATH
    assert app.route_prefix == "/"
    vlm = {VLM} if KeeperAppArgs.model_validate(app.args).vlm.source is not None else set()
    assert set(app.deployment_names) == DEPLOYMENTS | vlm


def test_config_args_are_keeper_app_args(config: dict[str, Any]) -> None:
    for app in config["applications"]:
        args = KeeperAppArgs.model_validate(app["args"])
        assert args.auth.insecure_local is False  # a shipped config never serves open
        assert args.auth.token_env == "KEEPER_API_TOKEN"


def test_config_has_no_problems(config: dict[str, Any]) -> None:
    assert problems(config) == []


def test_builder_takes_args_as_serve_passes_them(config: dict[str, Any]) -> None:
    """What the Serve controller does with import_path and args (minus starting replicas).

    Serve converts the args dict to the builder's annotated model only when the annotation is
    a class at runtime: a builder module with ``from __future__ import annotations`` gets the
    raw dict.
    """
    app = config["applications"][0]
    module, _, attr = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), attr)
    built = call_user_app_builder_with_args_if_necessary(builder, app["args"])
    deployments = serve_build_app(built, name=app["name"]).deployments
    assert {d.name for d in deployments} == {d["name"] for d in app["deployments"]}


def test_packaged_config_is_keeper_yaml() -> None:
    """keeper serve's default and the file operators `serve deploy` are one file."""
    assert (SERVE_DIR / "keeper.yaml").resolve() == PACKAGED.resolve()
    assert load(PACKAGED) == load(SERVE_DIR / "keeper.yaml")


def test_encoder_batches_can_fill(config: dict[str, Any]) -> None:
    app = config["applications"][0]
    enc = deployments_by_name(app)[ENCODER]
    args = KeeperAppArgs.model_validate(app["args"])
    batch = (enc.get("user_config") or {}).get("max_batch_size", args.encoder.max_batch_size)
    assert enc["max_ongoing_requests"] >= batch


def test_gpu_config_puts_the_encoder_on_a_gpu() -> None:
    enc = deployments_by_name(load(GPU_CONFIG)["applications"][0])[ENCODER]
    assert enc["ray_actor_options"]["num_gpus"] == 1
    assert enc["user_config"]["max_batch_size"] > EncoderArgs().max_batch_size


def test_cpu_config_minimum_fits_two_cores() -> None:
    deps = deployments_by_name(load(SERVE_DIR / "keeper.yaml")["applications"][0])
    floor = sum(
        d["autoscaling_config"]["min_replicas"] * d["ray_actor_options"].get("num_cpus", 1)
        for d in deps.values()
    )
    assert floor <= 2
    assert all(not d["ray_actor_options"].get("num_gpus") for d in deps.values())


# ---------------------------------------------------------------- what the checks catch


@pytest.fixture
def cpu_config() -> dict[str, Any]:
    return copy.deepcopy(load(SERVE_DIR / "keeper.yaml"))


def test_unknown_args_key_is_rejected(cpu_config: dict[str, Any]) -> None:
    cpu_config["applications"][0]["args"]["clip_modle"] = "ViT-B-32:laion2b_s34b_b79k"
    with pytest.raises(ValidationError, match="clip_modle"):
        KeeperAppArgs.model_validate(cpu_config["applications"][0]["args"])
    # Serve's own schema takes args as a plain dict: only KeeperAppArgs catches it.
    ServeDeploySchema.model_validate(cpu_config)
    assert any("clip_modle" in p for p in problems(cpu_config))


def test_unknown_nested_args_key_is_rejected(cpu_config: dict[str, Any]) -> None:
    cpu_config["applications"][0]["args"]["encoder"]["batch_size"] = 8
    with pytest.raises(ValidationError, match="batch_size"):
        KeeperAppArgs.model_validate(cpu_config["applications"][0]["args"])


def test_misspelt_serve_knob_is_caught(cpu_config: dict[str, Any]) -> None:
    dep = cpu_config["applications"][0]["deployments"][0]
    dep["max_ongoing_request"] = dep.pop("max_ongoing_requests")
    dep["autoscaling_config"]["min_replica"] = 1
    ServeDeploySchema.model_validate(cpu_config)  # Serve accepts both typos silently
    found = problems(cpu_config)
    assert any("max_ongoing_request:" in p for p in found)
    assert any("min_replica:" in p for p in found)


def test_unknown_deployment_name_is_caught(cpu_config: dict[str, Any]) -> None:
    cpu_config["applications"][0]["deployments"][1]["name"] = "ClipEncoderV2"
    found = problems(cpu_config)
    assert any("'ClipEncoderV2' is not deployed by these args" in p for p in found)
    assert any(f"{ENCODER} not configured" in p for p in found)


def test_a_vlm_block_without_a_vlm_source_is_caught(cpu_config: dict[str, Any]) -> None:
    """Serve refuses the whole config ("Deployment 'VlmJudge' does not exist")."""
    app = cpu_config["applications"][0]
    assert app["args"]["vlm"]["source"] is None
    app["deployments"].append({"name": VLM, "ray_actor_options": {"num_cpus": 0.2}})
    assert any("'VlmJudge' is not deployed by these args" in p for p in problems(cpu_config))
    app["args"]["vlm"]["source"] = "/models/tiny-vlm"
    assert not any("is not deployed" in p for p in problems(cpu_config))


def test_encoder_too_few_ongoing_requests_is_caught(cpu_config: dict[str, Any]) -> None:
    app = cpu_config["applications"][0]
    app["args"]["encoder"]["max_batch_size"] = (
        deployments_by_name(app)[ENCODER]["max_ongoing_requests"] + 1
    )
    assert any("a batch can never fill" in p for p in problems(cpu_config))


def test_encoder_user_config_batch_wins_over_args(cpu_config: dict[str, Any]) -> None:
    app = cpu_config["applications"][0]
    enc = deployments_by_name(app)[ENCODER]
    del app["args"]["encoder"]["max_batch_size"]
    enc["user_config"] = {"max_batch_size": enc["max_ongoing_requests"] + 1}
    assert any("a batch can never fill" in p for p in problems(cpu_config))


def test_key_in_args_and_user_config_is_caught(cpu_config: dict[str, Any]) -> None:
    app = cpu_config["applications"][0]
    deployments_by_name(app)[RANKER]["user_config"] = {"model_uri": "models:/keeper-ranker/3"}
    assert any("args.ranker.model_uri and SeriesRanker" in p for p in problems(cpu_config))


def test_min_above_max_replicas_is_caught(cpu_config: dict[str, Any]) -> None:
    scaling = cpu_config["applications"][0]["deployments"][0]["autoscaling_config"]
    scaling["min_replicas"] = scaling["max_replicas"] + 1
    assert any("min_replicas" in p for p in problems(cpu_config))


def test_unknown_user_config_key_is_caught(cpu_config: dict[str, Any]) -> None:
    deployments_by_name(cpu_config["applications"][0])[RANKER]["user_config"] = {"poll": 1}
    assert any("unknown keys ['poll']" in p for p in problems(cpu_config))


def test_deployment_without_memory_is_caught(cpu_config: dict[str, Any]) -> None:
    del deployments_by_name(cpu_config["applications"][0])[INGRESS]["ray_actor_options"]["memory"]
    assert any(f"[{INGRESS}].ray_actor_options: memory not set" in p for p in problems(cpu_config))


def test_encoder_memory_below_its_model_is_caught(cpu_config: dict[str, Any]) -> None:
    app = cpu_config["applications"][0]
    assert problems(cpu_config) == []
    app["args"]["clip_model"] = "ViT-L-14:laion2b_s32b_b82k"  # 3.24 GiB > the shipped 2 GiB
    assert any("that ViT-L-14:laion2b_s32b_b82k needs" in p for p in problems(cpu_config))
    deployments_by_name(app)[ENCODER]["ray_actor_options"]["memory"] = int(3.5 * 2**30)
    assert problems(cpu_config) == []


def test_token_in_runtime_env_is_caught(cpu_config: dict[str, Any]) -> None:
    cpu_config["applications"][0]["runtime_env"] = {"env_vars": {"KEEPER_API_TOKEN": "x" * 32}}
    assert any("KEEPER_API_TOKEN" in p for p in problems(cpu_config))


# ---------------------------------------------------------------- KubeRay RayService


@pytest.fixture
def rayservice() -> dict[str, Any]:
    return load(RAYSERVICE)


def test_rayservice_serve_config_is_keeper_gpu_yaml(rayservice: dict[str, Any]) -> None:
    assert rayservice["apiVersion"] == "ray.io/v1"
    assert rayservice["kind"] == "RayService"
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    gpu = load(GPU_CONFIG)
    assert embedded["applications"] == gpu["applications"]
    assert embedded == gpu  # http_options and proxy_location too
    assert problems(embedded) == []


def test_rayservice_cluster(rayservice: dict[str, Any]) -> None:
    cluster = rayservice["spec"]["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["enableInTreeAutoscaling"] is True
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env", [])}
            token = env["KEEPER_API_TOKEN"]
            assert "value" not in token, "the API token comes from a Secret, never inline"
            assert token["valueFrom"]["secretKeyRef"]["name"]
            assert "MLFLOW_TRACKING_URI" in env


def test_rayservice_gpu_group_can_hold_every_encoder(rayservice: dict[str, Any]) -> None:
    app = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    enc = deployments_by_name(app)[ENCODER]
    most = enc["autoscaling_config"]["max_replicas"]
    surge = math.ceil(enc.get("max_surge_percent", 0) * most / 100)  # a rolling update's extra
    gpus_needed = (most + surge) * enc["ray_actor_options"]["num_gpus"]
    gpus_offered = 0
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        per_pod = sum(
            float(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))
            for c in group["template"]["spec"]["containers"]
        )
        gpus_offered += per_pod * group["maxReplicas"]
    assert gpus_offered >= gpus_needed


def test_rayservice_pods_can_hold_every_replica(rayservice: dict[str, Any]) -> None:
    """Each deployment's reservation fits a pod that offers its resources: Ray's memory resource
    is what the pod has minus the object store (30 % by default), and a replica asking for more
    than any node offers stays pending forever."""
    app = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    pods = []
    for group in rayservice["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        memory = int(limits["memory"].removesuffix("Gi")) * 2**30
        pods.append((float(limits.get("nvidia.com/gpu", 0)), 0.7 * memory))
    for d in app["deployments"]:
        opts = d["ray_actor_options"]
        gpus = float(opts.get("num_gpus", 0))
        fits = [mem for pod_gpus, mem in pods if pod_gpus >= gpus]
        assert fits, f"{d['name']}: no pod group has {gpus} GPU(s)"
        # replicas that share a GPU (num_gpus 0.5: two a pod) must fit beside each other
        share = math.floor(1 / gpus) if gpus else 1
        assert opts["memory"] * share <= max(fits), (
            f"{d['name']}: {share} x {opts['memory'] / 2**30:.1f} GiB fits no pod group"
        )
