"""clusters/: the KubeRay manifests and the Ray cluster launcher YAML are fit to apply.

What `kubectl apply --validate=strict` and `ray up` would refuse, found without a cluster:

- every YAML under clusters/ parses (a duplicated key is an error, as in strict kubectl);
- each KubeRay manifest validates against the ``openAPIV3Schema`` of the shipped KubeRay CRDs
  (clusters/k8s/crds/, pinned by sha256), made strict: an unknown field is an error;
- clusters/aws/cluster.yaml passes Ray's own launcher schema and checks (``ray up`` runs them);
- every keeper job named (RayJob entrypoints, the commands in the files' headers and in
  clusters/README.md) exists, its ``--help`` runs, its ``--config`` file is in the repo and its
  ``key=value`` overrides make a valid config;
- no secret is written in a manifest; the cluster specs have token auth, CPU and GPU groups as
  their jobs need, and the installed Ray's version.

No Ray is started. (serveConfigV2 == clusters/serve/keeper-gpu.yaml: tests/unit/serve/
test_cluster_configs.py.)
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib
import json
import lzma
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import BaseModel

from keeper_train.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTERS = ROOT / "clusters"
K8S = CLUSTERS / "k8s"
CRDS = K8S / "crds"
AWS = CLUSTERS / "aws" / "cluster.yaml"
README = CLUSTERS / "README.md"

KUBERAY_VERSION = "1.7.0"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}  # stored xz-compressed (FILE.xz): 3.4 MB of YAML as 38 KB
MANIFESTS = sorted(K8S.glob("*.yaml"))
YAMLS = sorted(p for p in CLUSTERS.rglob("*.y*ml") if CRDS not in p.parents)
RAY_VERSION = version("ray")
GPU = "nvidia.com/gpu"
# Where the image (docker/) and the AWS file_mounts put the repo.
REPO_IN = ("/home/ray/keeper/", "/home/ubuntu/keeper/")
# Env names that hold credentials: their value comes from a Secret, never from the manifest.
SECRET_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|KEY|CREDENTIAL", re.IGNORECASE)
JOB_PREFIX = "keeper_train.jobs."


# ------------------------------------------------------------------------------------ loading


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_docs(text: str) -> list[Any]:
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d is not None]


@functools.cache
def manifest(name: str) -> dict[str, Any]:
    docs = load_docs((K8S / name).read_text())
    assert len(docs) == 1, f"{name}: one manifest per file"
    assert isinstance(docs[0], dict), f"{name}: not a mapping"
    return docs[0]


def cluster_specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, RayClusterSpec) for each cluster a manifest creates."""
    spec = doc["spec"]
    return {
        "RayCluster": [("spec", spec)],
        "RayJob": [("spec.rayClusterSpec", spec.get("rayClusterSpec"))],
        "RayService": [("spec.rayClusterConfig", spec.get("rayClusterConfig"))],
    }[doc["kind"]]


def containers(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    groups = [("head", cluster["headGroupSpec"])]
    groups += [(g["groupName"], g) for g in cluster.get("workerGroupSpecs") or []]
    for name, group in groups:
        for c in group["template"]["spec"]["containers"]:
            yield f"{name}/{c['name']}", c


def gpus_per_pod(group: dict[str, Any]) -> int:
    limits = [
        c.get("resources", {}).get("limits", {}) for c in group["template"]["spec"]["containers"]
    ]
    return sum(int(lim.get(GPU, 0)) for lim in limits)


def walk(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    yield path, node
    if isinstance(node, dict):
        for k, v in node.items():
            yield from walk(v, f"{path}.{k}" if path else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, f"{path}[{i}]")


# --------------------------------------------------------------------------------- CRD schema


def crd_bytes(name: str) -> bytes:
    """A CRD file as KubeRay released it: ``crds/NAME.xz`` decompressed."""
    return lzma.decompress((CRDS / f"{name}.xz").read_bytes())


def strict(schema: Any) -> Any:
    """``schema`` with unknown fields refused wherever Kubernetes refuses them.

    A structural schema's object with ``properties`` prunes (and under ``--validate=strict``
    refuses) any other field, unless it says ``x-kubernetes-preserve-unknown-fields`` or gives
    ``additionalProperties`` itself (a map). JSON Schema allows them unless told otherwise.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    crd = yaml.load(
        crd_bytes(CRD_FILES[kind]), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    )
    group, _, ver = api_version.partition("/")
    assert crd["spec"]["group"] == group, f"{kind}: CRD group {crd['spec']['group']}, not {group}"
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert ver in versions, (
        f"{kind}: KubeRay {KUBERAY_VERSION} serves {sorted(versions)}, not {ver}"
    )
    assert versions[ver]["served"], f"{kind} {api_version} is not served"
    schema = strict(versions[ver]["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


# ObjectMeta is not in the CRD schema (the API server checks it); the fields a manifest sets.
METADATA = {"name", "namespace", "labels", "annotations"}


def schema_errors(doc: dict[str, Any]) -> list[str]:
    """What a strict `kubectl apply` would refuse in ``doc``: empty when it applies."""
    kind, api = doc.get("kind"), doc.get("apiVersion", "")
    if kind not in CRD_FILES:
        return [f"kind {kind!r}: not one of {sorted(CRD_FILES)}"]
    out = [
        f"metadata.{k}: unknown field" for k in sorted(set(doc.get("metadata") or {}) - METADATA)
    ]
    if not (doc.get("metadata") or {}).get("name"):
        out.append("metadata.name: required")
    for e in crd_validator(kind, api).iter_errors(doc):
        where = ".".join(str(p) for p in e.absolute_path) or "(root)"
        out.append(f"{where}: {e.message}")
    return sorted(out)


def test_crds_are_the_pinned_kuberay_release() -> None:
    notes = (CRDS / "README.md").read_text()
    assert f"KubeRay v{KUBERAY_VERSION}" in notes
    assert f"`v{KUBERAY_VERSION}`" in notes
    for name in CRD_FILES.values():
        digest = hashlib.sha256(crd_bytes(name)).hexdigest()
        assert f"| `{name}` | `{digest}` |" in notes, (
            f"crds/{name}: sha256 {digest} is not the one in crds/README.md: the file was edited "
            "or replaced; copy it unmodified from the KubeRay tag and update the table"
        )
    assert sorted(p.name for p in CRDS.glob("*.yaml*")) == sorted(
        f"{name}.xz" for name in CRD_FILES.values()
    )
    # The operator the README installs is the release the manifests were checked against.
    assert f"--version {KUBERAY_VERSION}" in README.read_text()


# ------------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(CLUSTERS)) for p in YAMLS])
def test_every_yaml_parses(path: Path) -> None:
    docs = load_docs(path.read_text())
    assert docs, f"{path}: empty"
    assert all(isinstance(d, dict) for d in docs), f"{path}: not YAML mappings"


def test_the_strict_loader_refuses_a_duplicated_key() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'replicas'"):
        load_docs("spec:\n  replicas: 1\n  replicas: 2\n")


# ------------------------------------------------------------------------- KubeRay manifests


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_matches_the_crd_schema(path: Path) -> None:
    doc = manifest(path.name)
    assert doc.get("apiVersion") == "ray.io/v1", f"{path.name}: apiVersion {doc.get('apiVersion')}"
    errors = schema_errors(doc)
    assert not errors, f"{path.name} would be refused by KubeRay {KUBERAY_VERSION}:\n" + "\n".join(
        errors
    )


def _broken(name: str, dotted: str, edit: str, value: Any) -> dict[str, Any]:
    """``name``'s manifest with the field at ``dotted`` renamed to ``value`` or set to it."""
    doc = copy.deepcopy(manifest(name))
    *parents, leaf = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    node: Any = doc
    for key in parents:
        node = node[key]
    if edit == "rename":
        node[value] = node.pop(leaf)
    else:
        node[leaf] = value
    return doc


POD = "spec.rayClusterConfig.headGroupSpec.template.spec.containers.0"
MISTAKES = [
    # Misspelt fields of KubeRay's own (kubectl without strict would drop them silently) ...
    ("raycluster.yaml", "spec.workerGroupSpecs.1.maxReplicas", "rename", "maxReplica"),
    ("rayjob-embed.yaml", "spec.shutdownAfterJobFinishes", "rename", "shutdownAfterJobFinish"),
    # ... and one deep in a pod template (the core/v1 schema KubeRay embeds).
    ("rayservice.yaml", f"{POD}.envFrom", "rename", "envFromm"),
    # Wrong types and values.
    ("raycluster.yaml", "spec.workerGroupSpecs.0.minReplicas", "set", "two"),
    ("rayjob-pick.yaml", "spec.backoffLimit", "set", "0"),
    ("rayservice.yaml", "spec.rayClusterConfig.authOptions.mode", "set", "tokens"),
    ("raycluster.yaml", "spec.headGroupSpec.rayStartParams.num-cpus", "set", 0),
]
CAUGHT_AS = [
    "'maxReplica' was unexpected",
    "'shutdownAfterJobFinish' was unexpected",
    "'envFromm' was unexpected",
    "'two' is not of type 'integer'",
    "'0' is not of type 'integer'",
    "'tokens' is not one of ['disabled', 'token']",
    "0 is not of type 'string'",
]


@pytest.mark.parametrize(
    ("mistake", "expected"), list(zip(MISTAKES, CAUGHT_AS, strict=True)), ids=CAUGHT_AS
)
def test_strict_validation_catches_mistakes(mistake: tuple[Any, ...], expected: str) -> None:
    name = mistake[0]
    assert not schema_errors(manifest(name))
    errors = schema_errors(_broken(*mistake))
    assert any(expected in e for e in errors), f"not caught: {expected}; got {errors}"


def test_an_unknown_metadata_field_is_refused() -> None:
    doc = copy.deepcopy(manifest("raycluster.yaml"))
    doc["metadata"]["label"] = {"app": "keeper"}
    assert "metadata.label: unknown field" in schema_errors(doc)


SPECS = [
    (f"{p.name}:{where}", p.name, where)
    for p in MANIFESTS
    for where, _ in cluster_specs(manifest(p.name))
]


def _spec(name: str, where: str) -> dict[str, Any]:
    return dict(cluster_specs(manifest(name)))[where]


@pytest.mark.parametrize(("name", "where"), [s[1:] for s in SPECS], ids=[s[0] for s in SPECS])
def test_every_cluster_has_token_auth_and_the_installed_ray(name: str, where: str) -> None:
    cluster = _spec(name, where)
    assert cluster["authOptions"] == {"mode": "token", "secretName": "keeper-ray-token"}, (
        f"{name}: {where}.authOptions: token auth with the keeper-ray-token Secret"
    )
    assert cluster["rayVersion"] == RAY_VERSION, f"{name}: rayVersion {cluster['rayVersion']}"
    head = cluster["headGroupSpec"]["rayStartParams"]
    assert head.get("num-cpus") == "0", f"{name}: the head takes no tasks"
    for group in cluster.get("workerGroupSpecs") or []:
        lo, n, hi = group["minReplicas"], group["replicas"], group["maxReplicas"]
        assert 0 <= lo <= n <= hi, f"{name}: group {group['groupName']}: {lo} <= {n} <= {hi}"
        for c in group["template"]["spec"]["containers"]:
            res = c.get("resources", {})
            assert res.get("limits", {}).get(GPU) == res.get("requests", {}).get(GPU), (
                f"{name}: {group['groupName']}: GPU request != limit"
            )
    for where_c, c in containers(cluster):
        assert c["image"].startswith("ghcr.io/your-org/keeper:"), f"{name}: {where_c}: image"


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayservice.yaml"])
def test_long_lived_clusters_autoscale_a_cpu_and_a_gpu_group(name: str) -> None:
    ((_, cluster),) = cluster_specs(manifest(name))
    assert cluster.get("enableInTreeAutoscaling") is True, f"{name}: autoscaler off"
    groups = cluster["workerGroupSpecs"]
    cpu = [g for g in groups if gpus_per_pod(g) == 0]
    gpu = [g for g in groups if gpus_per_pod(g) > 0]
    assert cpu, f"{name}: needs a CPU-only worker group"
    assert gpu, f"{name}: needs a worker group with {GPU} limits"
    for g in gpu:
        tolerations = g["template"]["spec"].get("tolerations") or []
        assert any(t.get("key") == GPU for t in tolerations), f"{name}: {g['groupName']}: taint"


# ------------------------------------------------------------------------------------ secrets


def _env_lists(doc: Any) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    for path, node in walk(doc):
        if path.endswith(".env") and isinstance(node, list):
            yield path, node


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_no_secret_is_written_in_a_manifest(path: Path) -> None:
    doc = manifest(path.name)
    for where, env in _env_lists(doc):
        for var in env:
            if SECRET_NAME.search(var["name"]) or var["name"].startswith("MLFLOW_TRACKING_"):
                assert "value" not in var, (
                    f"{path.name}: {where}: {var['name']} has a literal value; "
                    "take it from a Secret (valueFrom.secretKeyRef or envFrom.secretRef)"
                )
            # KubeRay sets these from authOptions' Secret; a second source would disagree.
            assert var["name"] not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"), f"{path.name}: {where}"
    text = path.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text), f"{path.name}: an AWS access key id"


@pytest.mark.parametrize(
    ("name", "var", "literal"),
    [
        ("rayservice.yaml", "KEEPER_API_TOKEN", "s3cret"),
        ("rayjob-pick.yaml", "AWS_SECRET_ACCESS_KEY", "x"),
    ],
)
def test_a_literal_secret_is_caught(name: str, var: str, literal: str) -> None:
    doc = copy.deepcopy(manifest(name))
    _, cluster = cluster_specs(doc)[0]
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0].setdefault("env", []).append(
        {"name": var, "value": literal}
    )
    found = [
        v
        for _, env in _env_lists(doc)
        for v in env
        if SECRET_NAME.search(v["name"]) and "value" in v
    ]
    assert found == [{"name": var, "value": literal}]


def test_the_rayservice_takes_its_api_token_and_registry_from_secrets() -> None:
    ((_, cluster),) = cluster_specs(manifest("rayservice.yaml"))
    wanted = {
        # Without the token every route answers 503; without the tracking URI each SeriesRanker
        # would follow a private sqlite registry. Both required (no `optional`).
        "KEEPER_API_TOKEN": {"name": "keeper-api-token", "key": "token"},
        "MLFLOW_TRACKING_URI": {"name": "keeper-mlflow", "key": "MLFLOW_TRACKING_URI"},
    }
    for where, c in containers(cluster):
        env = {v["name"]: v for v in c.get("env") or []}
        for var, ref in wanted.items():
            got = env.get(var, {}).get("valueFrom", {}).get("secretKeyRef")
            assert got == ref, f"rayservice.yaml: {where}: {var} from Secret {ref}, got {got}"


# ---------------------------------------------------------------------------- job entrypoints


def _job_models() -> dict[str, type[BaseModel]]:
    from keeper_train.jobs.embed import EmbedConfig
    from keeper_train.jobs.finetune import FinetuneConfig
    from keeper_train.jobs.pick import PickJobConfig
    from keeper_train.jobs.select import SelectJobConfig
    from keeper_train.jobs.train_head import TrainHeadConfig

    return {
        "embed": EmbedConfig,
        "pick": PickJobConfig,
        "train_head": TrainHeadConfig,
        "finetune": FinetuneConfig,
        "select": SelectJobConfig,
    }


def _shell_lines(lines: list[str]) -> list[str]:
    """Commands from shell lines: continuations (``\\``) joined, trailing ``# ...`` dropped."""
    out, pending = [], ""
    for line in lines:
        text = line.split(" # ")[0].rstrip() if not line.lstrip().startswith("#") else ""
        pending += text.removesuffix("\\") + " "
        if not text.endswith("\\"):
            if pending.strip():
                out.append(pending.strip())
            pending = ""
    return out


def commented_commands(path: Path) -> list[str]:
    """The commands in a YAML file's comments (its header's launch lines)."""
    lines = [
        line.lstrip()[1:].removeprefix(" ")
        for line in path.read_text().splitlines()
        if line.lstrip().startswith("#")
    ]
    return _shell_lines(lines)


def readme_commands(path: Path) -> list[str]:
    """The commands in the ```bash blocks of a Markdown file."""
    lines, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            inside = not inside and line.strip() in ("```bash", "```sh", "```shell")
            lines.append("")
            continue
        if inside:
            lines.append(line)
    return _shell_lines(lines)


def job_command(command: str) -> tuple[str, list[str]] | None:
    """(module, argv) of a ``python -m keeper_train.jobs.<job> ...`` command, else None."""
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    for i, w in enumerate(words[:-1]):
        if w == "-m" and words[i + 1].startswith(JOB_PREFIX):
            return words[i + 1], words[i + 2 :]
    return None


def local_path(path: str) -> Path:
    for prefix in REPO_IN:
        if path.startswith(prefix):
            return ROOT / path.removeprefix(prefix)
    return ROOT / path


def _named_commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for p in MANIFESTS:
        doc = manifest(p.name)
        if doc["kind"] == "RayJob":
            words = shlex.split(doc["spec"]["entrypoint"])
            assert words[:2] == ["python", "-m"], f"{p.name}: entrypoint is not `python -m ...`"
            out.append((f"{p.name}:entrypoint", words[2], words[3:]))
    sources = [(p, commented_commands(p)) for p in [*MANIFESTS, AWS]]
    sources.append((README, readme_commands(README)))
    for path, commands in sources:
        for i, command in enumerate(commands):
            if (job := job_command(command)) is not None:
                out.append((f"{path.relative_to(CLUSTERS)}:{i}", *job))
    return out


COMMANDS = _named_commands()
MODULES = sorted({m for _, m, _ in COMMANDS})


def test_the_files_name_every_job_the_issue_asks_for() -> None:
    entrypoints = {m for w, m, _ in COMMANDS if w.endswith(":entrypoint")}
    wanted = {JOB_PREFIX + j for j in ("embed", "pick", "train_head", "finetune", "select")}
    assert entrypoints >= wanted, f"no RayJob for {sorted(wanted - entrypoints)}"
    assert len(COMMANDS) > len(entrypoints), "the headers' launch commands were not found"


def job_config(module: str, argv: list[str], where: str) -> BaseModel:
    """The config ``python -m module argv`` would run with; fails naming the bad part."""
    job = module.removeprefix(JOB_PREFIX)
    models = _job_models()
    assert job in models, f"{where}: {module} is not a job this test knows; add its config model"
    words = iter(argv)
    config, overrides = None, []
    for w in words:
        if w == "--config":
            config = local_path(next(words))
        elif "=" in w and not w.startswith("-"):
            overrides.append(w)
        else:
            pytest.fail(f"{where}: {module} takes --config FILE and key=value, not {w!r}")
    assert config is not None, f"{where}: no --config"
    assert config.is_file(), f"{where}: config {config} not in the repo"
    return load_config(models[job], config, overrides)


@pytest.mark.parametrize(("where", "module", "argv"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_named_job_config_is_valid(where: str, module: str, argv: list[str]) -> None:
    job_config(module, argv, where)


def test_a_misspelt_override_is_caught() -> None:
    from keeper_core.errors import ConfigError

    ((_, module, argv),) = [c for c in COMMANDS if c[0] == "rayjob-embed.yaml:entrypoint"]
    with pytest.raises(ConfigError, match="batch_sise"):
        job_config(module, [*argv, "batch_sise=8"], "test")
    with pytest.raises(ConfigError, match="concurrency"):
        job_config(module, [*argv, "concurrency=two"], "test")


@pytest.mark.parametrize("module", MODULES)
def test_named_job_module_runs_help(module: str) -> None:
    importlib.import_module(module)
    run = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, (
        f"`python -m {module} --help` exited {run.returncode}:\n{run.stderr}"
    )
    assert "--config" in run.stdout


def gpus_needed(cfg: BaseModel) -> float:
    """GPUs the job asks Ray for at once (its actors' or Train workers' total)."""
    from keeper_train.jobs.finetune import FinetuneConfig
    from keeper_train.jobs.select import SelectJobConfig
    from keeper_train.jobs.train_head import TrainHeadConfig

    if isinstance(cfg, FinetuneConfig | TrainHeadConfig):
        return cfg.num_workers if cfg.use_gpu else 0
    if isinstance(cfg, SelectJobConfig):
        return cfg.concurrency * cfg.num_gpus_per_vlm if cfg.vlm is not None else 0
    return cfg.concurrency * cfg.num_gpus_per_worker  # type: ignore[attr-defined]


RAYJOBS = [p.name for p in MANIFESTS if manifest(p.name)["kind"] == "RayJob"]
# Jobs with CPU work on workers: decode (embed, pick, finetune), Ray Train workers (train_head).
# select's CPU stages run in its driver, on the head.
CPU_WORKERS = {"embed", "pick", "train_head", "finetune"}
# Config fields naming data a job reads or writes: on a RayJob's cluster they must be shared.
DATA_FIELDS = ("input", "output", "embeddings", "series", "storage", "table", "queries")
# Jobs whose driver reads or writes the MLflow registry (pick: the champion ranker).
MLFLOW = {"pick", "train_head", "finetune"}


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_cluster_is_sized_for_its_job(name: str) -> None:
    doc = manifest(name)
    spec = doc["spec"]
    words = shlex.split(spec["entrypoint"])
    cfg = job_config(words[2], words[3:], name)
    job = words[2].removeprefix(JOB_PREFIX)
    groups = spec["rayClusterSpec"].get("workerGroupSpecs") or []
    gpu_groups = [g for g in groups if gpus_per_pod(g) > 0]
    cpu_groups = [g for g in groups if gpus_per_pod(g) == 0]
    autoscaled = spec["rayClusterSpec"].get("enableInTreeAutoscaling", False)
    have = sum(
        gpus_per_pod(g) * (g["maxReplicas"] if autoscaled else g["replicas"]) for g in gpu_groups
    )
    need = gpus_needed(cfg)
    assert need <= have, f"{name}: the job asks for {need} GPUs at once, the cluster has {have}"
    assert bool(gpu_groups) == (need > 0), f"{name}: a GPU group iff the job uses GPUs ({need})"
    assert bool(cpu_groups) == (job in CPU_WORKERS), f"{name}: CPU workers iff {job} has CPU work"
    for g in gpu_groups:
        tolerations = g["template"]["spec"].get("tolerations") or []
        assert any(t.get("key") == GPU for t in tolerations), f"{name}: {g['groupName']}: taint"
    assert spec["shutdownAfterJobFinishes"] is True, f"{name}: the cluster outlives the job"
    assert spec["backoffLimit"] == 0, f"{name}: see the comment on backoffLimit"
    assert ray_address_auto(cfg), f"{name}: ray_address=auto: join the RayJob's cluster"
    local = {
        f: v
        for f in DATA_FIELDS
        if isinstance(v := getattr(cfg, f, None), str) and not v.startswith("s3://")
    }
    assert not local, f"{name}: {local}: a pod's disk goes with the cluster; use s3:// prefixes"
    if job in MLFLOW:
        heads = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
        refs = [s["secretRef"]["name"] for s in heads[0].get("envFrom") or [] if "secretRef" in s]
        assert "keeper-mlflow" in refs, f"{name}: the driver needs MLFLOW_TRACKING_URI"


def ray_address_auto(cfg: BaseModel) -> bool:
    return getattr(cfg, "ray_address", None) == "auto"


@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_header_commands_name_this_manifest(path: Path) -> None:
    doc = manifest(path.name)
    name, kind = doc["metadata"]["name"], doc["kind"].lower()
    commands = commented_commands(path)
    assert f"kubectl apply -f clusters/k8s/{path.name}" in commands, f"{path.name}: no launch line"
    for c in commands:
        m = re.match(rf"kubectl (?:get|describe|delete) {kind} (\S+)", c)
        if m:
            assert m.group(1) == name, f"{path.name}: `{c}` names {m.group(1)}, not {name}"
    named = set(re.findall(r"clusters/[\w./-]+\.(?:yaml|sh|md)", path.read_text()))
    missing = sorted(n for n in named if not (ROOT / n).exists())
    assert not missing, f"{path.name} names files that do not exist: {missing}"


# ------------------------------------------------------------------------------------- README


def test_readme_walks_a_newcomer_to_a_running_rayservice() -> None:
    from keeper_serve.ingress import ROUTES

    commands = readme_commands(README)
    text = " ; ".join(commands)
    for step in (
        f"helm install kuberay-operator kuberay/kuberay-operator --version {KUBERAY_VERSION}",
        "kubectl create secret generic keeper-ray-token",
        "kubectl create secret generic keeper-api-token",
        "kubectl create secret generic keeper-mlflow",
        "docker build -f docker/Dockerfile",
        "clusters/k8s/rayservice.yaml",
        "kubectl port-forward svc/keeper-api-serve-svc 8000:8000",
        "Authorization: Bearer",
    ):
        assert step in text, f"clusters/README.md: no command with {step!r}"
    (service,) = [
        m for m in map(manifest, [p.name for p in MANIFESTS]) if m["kind"] == "RayService"
    ]
    assert f"rayservice {service['metadata']['name']}" in text
    paths = re.findall(r"http://127\.0\.0\.1:8000(/[\w/.-]*)", text)
    assert paths, "clusters/README.md: no curl of the service"
    assert set(paths) <= ROUTES, f"routes {paths} not all in {sorted(ROUTES)}"
    named = set(re.findall(r"clusters/[\w./-]+\.(?:yaml|sh|md)", README.read_text()))
    assert not [n for n in named if not (ROOT / n).exists()], "README names a missing file"
    for p in [*MANIFESTS, AWS]:
        assert str(p.relative_to(CLUSTERS)) in README.read_text(), f"README: no row for {p.name}"


# ------------------------------------------------------------------------ AWS cluster launcher


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_aws_launcher_yaml_passes_rays_own_checks() -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    (raw,) = load_docs(AWS.read_text())
    jsonschema.validate(raw, _ray_schema())
    validate_config(prepare_config(copy.deepcopy(raw)))  # what `ray up` runs before launching


def test_ray_schema_catches_a_misspelt_launcher_field() -> None:
    (raw,) = load_docs(AWS.read_text())
    raw["available_node_types"]["gpu"]["max_worker"] = raw["available_node_types"]["gpu"].pop(
        "max_workers"
    )
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(raw, _ray_schema())


def test_aws_cluster_has_cpu_and_gpu_workers_on_instance_roles() -> None:
    (raw,) = load_docs(AWS.read_text())
    types = raw["available_node_types"]
    head = raw["head_node_type"]
    workers = {n: t for n, t in types.items() if n != head}
    assert types[head]["resources"] == {"CPU": 0}, "the head takes no tasks"
    gpu = {n for n, t in workers.items() if t["node_config"]["InstanceType"][0] in "gp"}
    assert gpu, "needs a GPU (g*/p*) worker type"
    assert set(workers) - gpu, "needs a CPU worker type"
    for n, t in workers.items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"], n
    for n, t in types.items():
        assert t["node_config"]["IamInstanceProfile"]["Arn"], f"{n}: S3 through an instance role"
    text = AWS.read_text()
    for key in ("aws_access_key_id", "aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"):
        assert key.lower() not in text.lower(), f"cluster.yaml: {key}: use the instance role"
    # Every node installs keeper with the script `make setup` and the Dockerfile run (CI proves
    # it), which also checks that the venv's Ray satisfies the packages' pin.
    assert f'"ray[data,default,serve]=={RAY_VERSION}"' in text  # one Ray version on every node
    installs = [c for c in raw["setup_commands"] if ".ci/install.sh" in c]
    assert installs == ["~/keeper/.ci/install.sh --venv ~/venv --extras turbo"], raw[
        "setup_commands"
    ]
    assert raw["file_mounts"]["/home/ubuntu/keeper"] == "."
