"""Where a job's Ray work goes: custom resources and Ray Train's placement, as configured."""

from __future__ import annotations

import pytest

from keeper_train.jobs.finetune import FinetuneConfig
from keeper_train.jobs.train_head import TrainHeadConfig


def test_scaling_config_adds_custom_resources_to_a_cpu_and_gpu_worker() -> None:
    cfg = TrainHeadConfig(
        embeddings="e",
        series="s.csv",
        placement_strategy="STRICT_SPREAD",
        resources_per_worker={"keeper_gpu_node": 1},
    )
    sc = cfg.scaling_config(2, use_gpu=False)
    assert sc.num_workers == 2
    assert sc.placement_strategy == "STRICT_SPREAD"
    assert sc.resources_per_worker == {"CPU": 1.0, "keeper_gpu_node": 1.0}
    gpu = cfg.scaling_config(2, use_gpu=True)
    assert gpu.resources_per_worker == {"CPU": 1.0, "GPU": 1.0, "keeper_gpu_node": 1.0}


def test_default_placement_is_rays() -> None:
    sc = TrainHeadConfig(embeddings="e", series="s.csv").scaling_config(1, use_gpu=False)
    assert sc.placement_strategy == "PACK"
    assert sc.resources_per_worker is None  # Ray's default: one CPU (or GPU) a worker


@pytest.mark.parametrize(
    ("resources", "match"),
    [({"GPU": 1}, "not a custom resource"), ({"x": 0}, "must be > 0")],
)
def test_resources_per_worker_refuses_builtins_and_zero(
    resources: dict[str, float], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        FinetuneConfig(series="s.csv", resources_per_worker=resources)


def test_unknown_placement_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="STRICT_SPREAD"):
        TrainHeadConfig(embeddings="e", series="s.csv", placement_strategy="EVERYWHERE")
