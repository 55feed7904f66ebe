"""keeper_core.capacity: the arithmetic of the embed capacity model."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import pytest

from keeper_core.capacity import (
    Cluster,
    NodeGroup,
    StageCosts,
    calibrate_efficiency,
    cost_per_million,
    decode_cores_per_gpu,
    predict,
)
from keeper_core.errors import ConfigError

# 10 ms of decode a core, 1,000 img/s a GPU, no write, no transfer, no overhead: easy sums.
GPU_COSTS = StageCosts(
    decode_cpu_s=0.010, model_images_per_s_core=10.0, write_cpu_s=0.0, model_images_per_s_gpu=1000
)


def gpu_cluster(cpu_nodes: int, gpu_nodes: int = 1, cores: int = 16) -> Cluster:
    return Cluster(
        cpu=NodeGroup(count=cpu_nodes, cores=cores),
        gpu=NodeGroup(count=gpu_nodes, cores=cores, gpus=1),
    )


def test_one_gpu_node_fed_by_its_own_cores() -> None:
    p = predict(GPU_COSTS, gpu_cluster(0))
    # 16 cores - 1 for the actor = 15 decode cores at 100 img/s each: 1,500 > the GPU's 1,000.
    assert p.images_per_s == pytest.approx(1000)
    assert p.bottleneck == "model"
    assert p.capacity["decode"] == pytest.approx(1500)
    assert p.utilisation["decode"] == pytest.approx(1000 / 1500)
    assert p.utilisation["model"] == pytest.approx(1.0)


def test_bottleneck_switches_from_decode_to_model() -> None:
    # 1 GPU at 1,000 img/s needs 10 decode cores; 15 on the GPU node already exceed that.
    costs = StageCosts(
        decode_cpu_s=0.010,
        model_images_per_s_core=10.0,
        write_cpu_s=0.0,
        model_images_per_s_gpu=2000,
    )
    few = predict(costs, gpu_cluster(0))
    many = predict(costs, gpu_cluster(2))
    assert few.bottleneck == "decode"
    assert few.images_per_s == pytest.approx(1500)
    assert many.bottleneck == "model"
    assert many.images_per_s == pytest.approx(2000)
    assert many.utilisation["model"] == pytest.approx(1.0)
    assert many.utilisation["decode"] == pytest.approx(2000 / (47 * 100))


def test_transfer_binds_when_the_link_is_slow() -> None:
    costs = StageCosts(
        decode_cpu_s=0.001,
        model_images_per_s_core=10.0,
        write_cpu_s=0.0,
        model_images_per_s_gpu=100_000,
        pixel_bytes=100_000,
        transfer_bytes_per_s=1e9,  # 10,000 img/s into the GPU node
    )
    p = predict(costs, gpu_cluster(10))
    assert p.bottleneck == "transfer"
    # The GPU node's own 15 decode cores (15,000 img/s) plus what its link carries (10,000).
    assert p.images_per_s == pytest.approx(25_000)
    assert p.crossing_fraction == pytest.approx(0.4)
    assert p.utilisation["transfer"] == pytest.approx(1.0)
    # A link that is not full: decode binds, and fewer images cross than the decode cores' share.
    few = predict(costs, gpu_cluster(1, cores=8))
    assert few.bottleneck == "decode"
    assert few.images_per_s == pytest.approx(15_000)
    assert few.crossing_fraction == pytest.approx(8 / 15)
    alone = predict(costs, gpu_cluster(0))
    assert alone.capacity["transfer"] == math.inf
    assert alone.bottleneck == "decode"


def test_monotonic_in_nodes() -> None:
    for costs in (GPU_COSTS, StageCosts(0.002, 50.0, 0.001, model_images_per_s_gpu=30_000)):
        rates = [predict(costs, gpu_cluster(n)).images_per_s for n in range(0, 40)]
        assert all(b >= a for a, b in itertools.pairwise(rates))
        more_gpus = [predict(costs, gpu_cluster(4, g)).images_per_s for g in range(1, 6)]
        assert all(b >= a for a, b in itertools.pairwise(more_gpus))
    slow_link = StageCosts(
        0.002, 50.0, 0.0, model_images_per_s_gpu=30_000, transfer_bytes_per_s=1e8
    )
    rates = [predict(slow_link, gpu_cluster(n)).images_per_s for n in range(0, 40)]
    assert all(b >= a for a, b in itertools.pairwise(rates))
    assert predict(slow_link, gpu_cluster(39)).bottleneck == "transfer"


def test_cpu_only_costs_add_on_shared_cores() -> None:
    costs = StageCosts(decode_cpu_s=0.010, model_images_per_s_core=10.0, write_cpu_s=0.005)
    p = predict(costs, Cluster(cpu=NodeGroup(count=1, cores=2)))
    # per image: 0.1 model + 0.01 decode + 0.005 write core-seconds on 2 cores
    assert p.images_per_s == pytest.approx(2 / 0.115)
    assert p.bottleneck == "model"
    assert p.crossing_fraction == 0.0


def test_cpu_only_model_nodes_cap_the_model() -> None:
    costs = StageCosts(decode_cpu_s=0.010, model_images_per_s_core=10.0, write_cpu_s=0.0)
    one = predict(costs, Cluster(cpu=NodeGroup(count=8, cores=4), model_nodes=1))
    assert one.images_per_s == pytest.approx(40)  # 4 cores x 10 img/s: decode nodes cannot help
    assert one.bottleneck == "model"
    eight = predict(costs, Cluster(cpu=NodeGroup(count=8, cores=4), model_nodes=8))
    assert eight.images_per_s == pytest.approx(32 / 0.11)


def test_colocated_nodes_pay_transfer_in_core_time() -> None:
    costs = StageCosts(
        decode_cpu_s=0.010,
        model_images_per_s_core=10.0,
        write_cpu_s=0.0,
        pixel_bytes=1e6,
        transfer_bytes_per_s=1e8,  # 10 ms an image
    )
    one = predict(costs, Cluster(cpu=NodeGroup(1, 2), colocated=True, physical_cores=2))
    three = predict(
        costs,
        Cluster(cpu=NodeGroup(2, 1), colocated=True, physical_cores=2, crossing_fraction=0.5),
    )
    assert one.images_per_s == pytest.approx(2 / 0.11)
    assert three.images_per_s == pytest.approx(2 / 0.115)
    assert three.images_per_s < one.images_per_s


def test_cost_per_million() -> None:
    assert cost_per_million(3.6, 1000) == pytest.approx(1.0)  # 1,000 s at $0.001/s
    p = predict(GPU_COSTS, gpu_cluster(0))
    assert p.usd_per_million == 0.0
    c = Cluster(cpu=NodeGroup(2, 16, hourly_usd=0.5), gpu=NodeGroup(1, 16, gpus=1, hourly_usd=1.0))
    p = predict(GPU_COSTS, c)
    assert p.hourly_usd == pytest.approx(2.0)
    assert p.usd_per_million == pytest.approx(2.0 * 1e6 / (p.images_per_s * 3600))
    with pytest.raises(ConfigError):
        cost_per_million(1.0, 0)


def test_cpu_to_gpu_ratio() -> None:
    assert decode_cores_per_gpu(GPU_COSTS) == pytest.approx(10.0)
    # cores that lose half their time to the pipeline's own processes: twice as many
    assert decode_cores_per_gpu(replace(GPU_COSTS, cpu_efficiency=0.5)) == pytest.approx(20.0)
    with pytest.raises(ConfigError, match="model_images_per_s_gpu"):
        decode_cores_per_gpu(StageCosts(0.01, 10.0, 0.0))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: StageCosts(0.0, 10.0, 0.0), "decode_cpu_s"),
        (lambda: StageCosts(0.01, 10.0, -1.0), "write_cpu_s"),
        (lambda: Cluster(gpu=NodeGroup(1, 8)), "no GPUs"),
        (lambda: Cluster(cpu=NodeGroup(1, 8, gpus=1)), "must have no GPUs"),
        (lambda: Cluster(), "no cores"),
        (lambda: Cluster(cpu=NodeGroup(1, 2), colocated=True), "physical_cores"),
        (lambda: Cluster(cpu=NodeGroup(2, 2), model_nodes=3), "model_nodes"),
    ],
)
def test_bad_inputs_are_config_errors(make: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()  # type: ignore[operator]


def test_gpu_cluster_needs_a_gpu_figure() -> None:
    with pytest.raises(ConfigError, match="model_images_per_s_gpu"):
        predict(StageCosts(0.01, 10.0, 0.0), gpu_cluster(1))


def test_efficiency_scales_cores_not_gpus_and_calibrates() -> None:
    costs = StageCosts(decode_cpu_s=0.010, model_images_per_s_core=10.0, write_cpu_s=0.0)
    local = Cluster(cpu=NodeGroup(1, 2), colocated=True, physical_cores=2)
    ideal = predict(costs, local).images_per_s
    half = predict(replace(costs, cpu_efficiency=0.5), local).images_per_s
    assert half == pytest.approx(ideal / 2)
    assert calibrate_efficiency(costs, local, ideal / 4) == pytest.approx(0.25)
    assert calibrate_efficiency(costs, local, ideal * 2) == 1.0
    model_bound = replace(GPU_COSTS, cpu_efficiency=0.5)
    assert predict(model_bound, gpu_cluster(2)).images_per_s == pytest.approx(1000)
    with pytest.raises(ConfigError, match="bound by model"):
        calibrate_efficiency(GPU_COSTS, gpu_cluster(2), 900)
    with pytest.raises(ConfigError, match="cpu_efficiency"):
        StageCosts(0.01, 10.0, 0.0, cpu_efficiency=0.0)
