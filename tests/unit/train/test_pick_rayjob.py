"""The KubeRay RayJob of keeper pick names a real job with real config fields."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from keeper_train.config import parse_overrides, validate
from keeper_train.jobs.pick import PickJobConfig

ROOT = Path(__file__).resolve().parents[3]


def test_rayjob_entrypoint_is_a_valid_pick_config() -> None:
    doc = yaml.safe_load((ROOT / "clusters/k8s/rayjob-pick.yaml").read_text())
    assert doc["kind"] == "RayJob"
    assert doc["spec"]["rayClusterSpec"]["authOptions"]["mode"] == "token"
    words = shlex.split(doc["spec"]["entrypoint"])
    assert words[:3] == ["python", "-m", "keeper_train.jobs.pick"]
    config = words[words.index("--config") + 1]
    local = ROOT / config.removeprefix("/home/ray/keeper/")
    data = yaml.safe_load(local.read_text())
    data.update(parse_overrides([w for w in words if "=" in w and not w.startswith("-")]))
    cfg = validate(PickJobConfig, data)
    assert cfg.input.startswith("s3://")
    assert cfg.num_gpus_per_worker == 1
