"""A capacity model of ``keeper embed``: images/s of a cluster from measured per-stage costs.

The job is a stream of four stages: CPU decode tasks (read, decode, resize, quality features),
model actors, the transfer of decoded pixels between nodes, and Parquet writes. In steady state
each stage can pass at most its capacity, so the job runs at the smallest of them (the
bottleneck), and every other stage is busy that fraction of its time (its utilisation). On a
CPU-only cluster decode, model and write share the same cores, so their costs add per image
instead. ``benchmarks/capacity.py`` measures the costs and checks the predictions against runs.

    from keeper_core.capacity import Cluster, NodeGroup, StageCosts, predict
    costs = StageCosts(decode_cpu_s=0.017, model_images_per_s_gpu=33_400, ...)
    predict(costs, Cluster(cpu=NodeGroup(count=4, cores=16), gpu=NodeGroup(1, 16, gpus=1)))

Pure arithmetic: no Ray, no I/O. Every assumption is a field below; change it, not the code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from keeper_core.errors import ConfigError

Stage = Literal["decode", "model", "write", "transfer"]
STAGES: tuple[Stage, ...] = ("decode", "model", "write", "transfer")


@dataclass(frozen=True)
class StageCosts:
    """Measured per-image costs of each stage (one model, one image size, one decode backend).

    Attributes:
        decode_cpu_s: CPU-seconds one image costs a decode task on one core: read, decode
            (draft or full), resize to the model input, quality features, duplicate hash.
            Assumed to scale linearly with cores (one single-threaded task per core).
        model_images_per_s_gpu: the model's images/s on one GPU in steady state (None: no GPU
            figure, so a cluster with GPUs cannot be predicted).
        model_images_per_s_core: the model's images/s per CPU core on a CPU-only run, measured
            with every core of a node in its torch threads and divided by the cores; assumed
            linear in cores (optimistic on wide nodes: intra-op threading scales sub-linearly).
        write_cpu_s: CPU-seconds per image of the write stage (Arrow table + Parquet part).
        pixel_bytes: bytes of one decoded image as it crosses the object store (uint8 model
            input, 3 x S x S, plus its features).
        transfer_bytes_per_s: what one node pulls between raylets in bytes/s (measured between
            local raylets, or a NIC's rate for a real network).
        task_overhead_s: per-task cost of Ray's scheduling and object bookkeeping, CPU-seconds,
            paid once per decode task (``decode_batch`` images) and once per model batch.
        decode_batch: images per decode task (EmbedConfig.decode_batch_size).
        model_batch: images per model forward (EmbedConfig.batch_size).
        cpu_efficiency: share of a core's time that does stage work; the rest goes to Ray
            Data's own processes, (de)serialisation and oversubscribed threads. 1.0 assumes
            none is lost; calibrate it on a one-node run (``benchmarks/capacity.py`` does) and
            carry it to other clusters. GPU time is not scaled by it.
    """

    decode_cpu_s: float
    model_images_per_s_core: float
    write_cpu_s: float
    pixel_bytes: float = 3 * 224 * 224
    transfer_bytes_per_s: float = math.inf
    task_overhead_s: float = 0.0
    model_images_per_s_gpu: float | None = None
    decode_batch: int = 16
    model_batch: int = 64
    cpu_efficiency: float = 1.0

    def __post_init__(self) -> None:
        for name in ("decode_cpu_s", "model_images_per_s_core", "transfer_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"StageCosts.{name} must be > 0, got {getattr(self, name)}")
        for name in ("write_cpu_s", "pixel_bytes", "task_overhead_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"StageCosts.{name} must be >= 0, got {getattr(self, name)}")
        if self.model_images_per_s_gpu is not None and not self.model_images_per_s_gpu > 0:
            raise ConfigError("StageCosts.model_images_per_s_gpu must be > 0 (or None)")
        if not 0 < self.cpu_efficiency <= 1:
            raise ConfigError(
                f"StageCosts.cpu_efficiency must be in (0, 1], got {self.cpu_efficiency}"
            )
        if self.decode_batch < 1 or self.model_batch < 1:
            raise ConfigError("StageCosts.decode_batch and model_batch must be >= 1")

    @property
    def decode_image_s(self) -> float:
        """CPU-seconds per image of decode with the scheduling overhead of its task spread."""
        return self.decode_cpu_s + self.task_overhead_s / self.decode_batch

    @property
    def transfer_image_s(self) -> float:
        """Seconds one image's pixels take to cross from one raylet to another."""
        return self.pixel_bytes / self.transfer_bytes_per_s


@dataclass(frozen=True)
class NodeGroup:
    """``count`` identical nodes of ``cores`` CPUs (Ray's CPU count: vCPUs) and ``gpus`` GPUs.

    Attributes:
        hourly_usd: on-demand price of one node per hour (for cost per million images).
        name: an instance type or a label, for tables.
    """

    count: int
    cores: int
    gpus: int = 0
    hourly_usd: float = 0.0
    name: str = ""

    def __post_init__(self) -> None:
        if self.count < 0 or self.cores < 0 or self.gpus < 0 or self.hourly_usd < 0:
            raise ConfigError(f"NodeGroup fields must be >= 0: {self}")


@dataclass(frozen=True)
class Cluster:
    """N CPU-only nodes feeding M GPU nodes (either may be absent: ``count=0``).

    Attributes:
        cpu: the CPU-only nodes: decode (and write) only, or also the model on a CPU-only run.
        gpu: the GPU nodes: the model actors (one per GPU), their cores decode and write too.
        actor_cores: cores each GPU model actor keeps for itself (feeding the GPU, collating
            batches): EmbedConfig.num_cpus_per_worker, 1 with GPUs by default.
        model_nodes: on a CPU-only run, the nodes whose cores run model actors (keeper's
            default ``concurrency=1``: one). Decode spreads over every node.
        colocated: every node is a process group on one machine (``ray.cluster_utils`` or
            ``clusters/local``): the machine's ``physical_cores`` are shared by all, and moving
            pixels between raylets costs those cores CPU time instead of network bandwidth.
        physical_cores: the machine's cores when ``colocated``.
        crossing_fraction: share of images decoded on a node other than their model actor's
            (their pixels cross raylets). None: the share of decode cores off the model nodes,
            which is how Ray's scheduler spreads tasks by free CPU.
    """

    cpu: NodeGroup = field(default_factory=lambda: NodeGroup(count=0, cores=0))
    gpu: NodeGroup = field(default_factory=lambda: NodeGroup(count=0, cores=0))
    actor_cores: float = 1.0
    model_nodes: int = 1
    colocated: bool = False
    physical_cores: int = 0
    crossing_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.gpu.count and not self.gpu.gpus:
            raise ConfigError("Cluster.gpu nodes have no GPUs: put them in Cluster.cpu")
        if self.cpu.gpus:
            raise ConfigError("Cluster.cpu nodes must have no GPUs: put them in Cluster.gpu")
        if self.cpu.count * self.cpu.cores + self.gpu.count * self.gpu.cores == 0:
            raise ConfigError("Cluster has no cores")
        if self.colocated and self.physical_cores < 1:
            raise ConfigError("Cluster.colocated needs physical_cores >= 1")
        if self.crossing_fraction is not None and not 0 <= self.crossing_fraction <= 1:
            raise ConfigError("Cluster.crossing_fraction must be in [0, 1]")
        if not self.gpu.count and not 1 <= self.model_nodes <= max(self.cpu.count, 1):
            raise ConfigError("Cluster.model_nodes must be between 1 and the CPU nodes")

    @property
    def gpus(self) -> int:
        return self.gpu.count * self.gpu.gpus

    @property
    def hourly_usd(self) -> float:
        return self.cpu.count * self.cpu.hourly_usd + self.gpu.count * self.gpu.hourly_usd


@dataclass(frozen=True)
class Prediction:
    """What ``predict`` says a cluster does.

    Attributes:
        images_per_s: steady-state images/s of the job (start-up not included).
        bottleneck: the stage whose capacity is that rate.
        capacity: images/s each stage could pass if nothing else limited it (inf: unbounded).
        utilisation: the share of its capacity each stage uses at ``images_per_s``.
        crossing_fraction: the share of images whose pixels crossed raylets.
        hourly_usd: the cluster's price per hour.
    """

    images_per_s: float
    bottleneck: Stage
    capacity: dict[Stage, float]
    utilisation: dict[Stage, float]
    crossing_fraction: float
    hourly_usd: float

    @property
    def usd_per_million(self) -> float:
        """Price of embedding a million images at the predicted rate."""
        return cost_per_million(self.hourly_usd, self.images_per_s)


def cost_per_million(hourly_usd: float, images_per_s: float) -> float:
    """USD per million images: hours for 1e6 images at ``images_per_s``, times the hourly price."""
    if images_per_s <= 0:
        raise ConfigError(f"images_per_s must be > 0, got {images_per_s}")
    return hourly_usd * 1e6 / (images_per_s * 3600)


def _crossing(c: Cluster, decode_cores_off_model: float, decode_cores_total: float) -> float:
    if c.crossing_fraction is not None:
        return c.crossing_fraction
    return decode_cores_off_model / decode_cores_total if decode_cores_total > 0 else 0.0


def predict(costs: StageCosts, cluster: Cluster) -> Prediction:
    """Steady-state images/s of ``keeper embed`` on ``cluster``, with its bottleneck.

    With GPUs, the model runs on the GPUs (one actor each, ``actor_cores`` reserved) and every
    other core decodes and writes. Images decoded on a GPU node stay there; those decoded on a
    CPU node cross into the GPU nodes, each through a link of ``transfer_bytes_per_s``, and
    what the links cannot carry the GPU nodes' own cores decode. Without GPUs, the model shares cores with decode and write: each
    image costs the sum of the three stages' core-seconds, and the model can use at most the
    cores of ``model_nodes`` nodes. A colocated cluster shares ``physical_cores`` among all
    nodes and pays each crossing image's transfer in core time.

    Raises:
        ConfigError: a GPU cluster without ``model_images_per_s_gpu``.
    """
    c, k = cluster, costs
    model_batch_s = k.task_overhead_s / k.model_batch  # per image, on the model actor's core
    cap: dict[Stage, float] = {}
    if c.gpus:
        if k.model_images_per_s_gpu is None:
            raise ConfigError("a cluster with GPUs needs StageCosts.model_images_per_s_gpu")
        eff, per_image = k.cpu_efficiency, k.decode_image_s + k.write_cpu_s
        on = max(c.gpu.cores - c.gpu.gpus * c.actor_cores, 0.0) * c.gpu.count
        off = float(c.cpu.count * c.cpu.cores)
        if c.colocated:  # the actors' reservations are logical; the cores are one machine's
            on, off = max(c.physical_cores - c.gpus * c.actor_cores, 0.0), 0.0
        # Images decoded on a GPU node stay there; the rest cross into the GPU nodes' links,
        # and the GPU nodes' own decode fills in for what the links cannot carry.
        on_cap, off_cap = on * eff / per_image, off * eff / per_image
        per_link = k.transfer_bytes_per_s / k.pixel_bytes if k.pixel_bytes else math.inf
        link_cap = c.gpu.count * per_link
        crossing = min(off_cap, link_cap)
        fed = on_cap + crossing
        cap["model"] = c.gpus * k.model_images_per_s_gpu
        rate = min(cap["model"], fed)
        f = crossing / fed if fed else 0.0
        if c.crossing_fraction is not None:
            f = c.crossing_fraction
        cores = (on + off) * eff
        cap["decode"] = cores / k.decode_image_s
        cap["write"] = cores / k.write_cpu_s if k.write_cpu_s else math.inf
        cap["transfer"] = link_cap / f if f > 0 else math.inf
        if rate == cap["model"]:
            named: Stage = "model"
        elif off_cap > link_cap:
            named = "transfer"
        else:
            named = "decode" if k.decode_image_s >= k.write_cpu_s else "write"
        util: dict[Stage, float] = {s: rate / cap[s] if cap[s] else 0.0 for s in STAGES}
        return Prediction(rate, named, cap, util, f, c.hourly_usd)
    model_s = 1.0 / k.model_images_per_s_core + model_batch_s
    node_cores = float(c.cpu.cores)
    model_cores = c.model_nodes * node_cores
    total = c.cpu.count * node_cores
    f = _crossing(c, total - model_cores, total)
    transfer_s = f * k.transfer_image_s
    if c.colocated:
        model_cores = total = float(c.physical_cores)
    model_cores, total = model_cores * k.cpu_efficiency, total * k.cpu_efficiency
    if c.colocated:
        cap["transfer"] = total / transfer_s if transfer_s else math.inf
        per_image = model_s + k.decode_image_s + k.write_cpu_s + transfer_s
    else:
        per_link = k.transfer_bytes_per_s / k.pixel_bytes if k.pixel_bytes else math.inf
        cap["transfer"] = c.model_nodes * per_link / f if f > 0 else math.inf
        per_image = model_s + k.decode_image_s + k.write_cpu_s
    cap["model"] = model_cores / model_s
    cap["decode"] = total / k.decode_image_s
    cap["write"] = total / k.write_cpu_s if k.write_cpu_s else math.inf
    shared = total / per_image
    rate = min(cap["model"], shared, cap["transfer"])
    # On shared cores no stage reaches its capacity alone; the one taking most time is named.
    bottleneck = min(STAGES, key=lambda s: cap[s])
    if rate < min(cap.values()) * (1 - 1e-9):  # the sum of shared costs binds, not one stage
        shares: dict[Stage, float] = {s: rate / cap[s] for s in STAGES}
        bottleneck = max(STAGES, key=lambda s: shares[s])
    util = {s: (rate / cap[s] if cap[s] else 0.0) for s in STAGES}
    return Prediction(
        images_per_s=rate,
        bottleneck=bottleneck,
        capacity=cap,
        utilisation=util,
        crossing_fraction=f,
        hourly_usd=c.hourly_usd,
    )


def decode_cores_per_gpu(costs: StageCosts) -> float:
    """CPU cores that decode as fast as one GPU runs the model: the CPU:GPU sizing ratio."""
    if costs.model_images_per_s_gpu is None:
        raise ConfigError("decode_cores_per_gpu needs StageCosts.model_images_per_s_gpu")
    per_image = (costs.decode_image_s + costs.write_cpu_s) / costs.cpu_efficiency
    return costs.model_images_per_s_gpu * per_image


def calibrate_efficiency(
    costs: StageCosts, cluster: Cluster, measured_images_per_s: float
) -> float:
    """The ``cpu_efficiency`` at which ``predict`` gives the measured rate on ``cluster``.

    Exact when cores bind (the rate is then proportional to the efficiency); capped at 1.

    Raises:
        ConfigError: a non-positive measured rate, or a cluster whose CPUs do not bind there
            (its GPUs or links do), which says nothing about the cores.
    """
    if measured_images_per_s <= 0:
        raise ConfigError(f"measured_images_per_s must be > 0, got {measured_images_per_s}")
    ideal = predict(replace(costs, cpu_efficiency=1.0), cluster)
    if ideal.bottleneck == "transfer" or (cluster.gpus and ideal.bottleneck == "model"):
        raise ConfigError(
            f"cannot calibrate cpu_efficiency on a run bound by {ideal.bottleneck}, not the CPUs"
        )
    return min(1.0, measured_images_per_s / ideal.images_per_s)
