"""Fine-tune the CLIP vision tower with a series-ranking head on Ray Train (LoRA or last blocks).

    python -m keeper_train.jobs.finetune --config packages/train/configs/finetune.yaml \
        series=keeper-demo/corpus/manifest.csv method=lora register=keeper-ranker
    keeper finetune --series MANIFEST --model ViT-B-32:laion2b_s34b_b79k --method lora \
        --features embedding --num-workers 2 --register keeper-ranker

Plan, execute, summarise:

1. Plan (driver): read the manifest, split it (by series or by a group column such as
   ``base_photo``), check the tuning targets against the base tower and load the base weights
   once (a bad base fails here, not in every worker after decoding) before anything else runs;
   record the base's version (sha256 / ETag) and a checkpoint path made absolute.
2. Decode once (Ray Data): CPU tasks read every image (local or ``s3://``) and prepare it with
   keeper_core's ``ImagePreparation``, exactly as ``keeper embed`` and the Serve ingress do:
   uint8 model pixels and the quality features. Images that fail are recorded with the reason and
   their series left out (counted). The images are grouped into one row per series (train padded
   to a multiple of the worker count, as ``keeper_core.training.shard_order`` does, so every
   worker makes the same number of steps) and materialised: the pixel cache every epoch reads,
   because on a GPU node decoding, not the model, is the bottleneck.
3. Train (Ray Train ``TorchTrainer``, DDP): each worker builds the tower (base weights + LoRA
   adapters / unfrozen blocks, ``keeper_core.tower``) and the head; AdamW over only the trainable
   parameters in three groups with their own learning rates (backbone, LoRA, head), linear
   warm-up then cosine decay, gradient accumulation, bf16 autocast on GPU. Batches are whole
   series; the same random flip and shift goes to every shot of a series. A checkpoint every
   epoch (trained tensors as safetensors + optimizer + scheduler), local or ``s3://``; a lost
   worker resumes from the last one; early stopping on validation top-1.
4. Summarise (driver): the best epoch's ranker on the test split beside the sharpness rule and
   random; one MLflow run with parameters, per-epoch metrics, trainable parameter count and share,
   peak memory, images/s and the share of step time spent waiting for data; the ranker logged
   (base spec + adapter + head: no copy of the frozen backbone, no pickle) and registered as
   ``@challenger``, promoted like any head with ``keeper promote``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from keeper_core import registry, storage
from keeper_core.errors import DataError, KeeperError
from keeper_core.heads import HeadConfig, series_softmax_loss
from keeper_core.metrics import SeriesMetrics, format_table, series_metrics
from keeper_core.quality import FEATURE_NAMES
from keeper_core.ranker import QUALITY_INPUTS, RankerConfig, fit_standardizer
from keeper_core.series import read_series_manifest
from keeper_core.tower import TowerConfig, TuneMethod
from keeper_core.training import shard_order
from keeper_train import raytrain
from keeper_train.config import configure_logging, load_config
from keeper_train.data import SplitSettings, assign_split
from keeper_train.tracking import SPLIT_COLUMNS

log = logging.getLogger("keeper.finetune")

SPLITS = ("train", "val", "test")
_QUALITY_COLUMNS = [FEATURE_NAMES.index(n) for n in QUALITY_INPUTS]


class FinetuneConfig(raytrain.WorkerPlacement, SplitSettings):
    """Everything finetune takes; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    series: str = Field(description="series manifest: series_id, image_uri, is_best")
    model: str = Field("keeper-tiny:random", description="base CLIP ModelSpec ARCH[:WEIGHTS]")
    method: TuneMethod = "lora"
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: int = Field(16, ge=1, description="LoRA alpha (update scale alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_blocks: int | None = Field(None, ge=1, description="LoRA on the last N blocks; null: all")
    unfreeze_blocks: int = Field(1, ge=1, description="blocks trained in full (last-blocks*)")
    lora_modules: tuple[str, ...] | None = Field(
        None,
        description="the parts of a block LoRA adapts; null: the tower's defaults (open_clip "
        "ViT: attn, mlp.c_fc, mlp.c_proj; timm ViT such as SigLIP: attn.qkv, attn.proj, "
        "mlp.fc1, mlp.fc2)",
    )
    targets: tuple[str, ...] | None = Field(None, description="explicit LoRA module names")
    head: Literal["linear", "mlp", "transformer"] = "mlp"
    features: Literal["embedding", "embedding+quality"] = "embedding"
    hidden: int = Field(128, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    lr_backbone: float = Field(1e-6, gt=0, description="unfrozen blocks (PhotoTriage: ~1e-6)")
    lr_lora: float = Field(1e-4, gt=0, description="LoRA adapters")
    lr_head: float = Field(1e-3, gt=0, description="the head")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW, on matrices only")
    warmup_epochs: float = Field(1.0, ge=0, description="linear warm-up, then cosine to 0")
    epochs: int = Field(10, ge=1)
    grad_accum: int = Field(1, ge=1, description="batches per optimizer step")
    batch_size: int = Field(8, ge=1, description="series per batch per worker")
    patience: int = Field(5, ge=1, description="epochs without val top-1 gain before stopping")
    max_shift: float = Field(
        0.0625, ge=0, lt=0.5, description="random shift, fraction of the side (series-wide)"
    )
    flip: bool = Field(True, description="random horizontal flip (series-wide)")
    cache_pixels: bool = Field(
        True, description="decode once and keep the pixels (false: decode again every epoch)"
    )
    decode_batch: int = Field(16, ge=1, description="images per decode task batch")
    decode_cpus: float = Field(0.5, gt=0, description="CPUs each decode task asks for")
    seed: int = 0
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    bf16: bool = Field(
        True, description="bf16 autocast on a GPU that has bf16 (else, and on CPU, fp32)"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="per CPU worker; null: the CPUs Ray gives it"
    )
    storage: str = Field("keeper-data/checkpoints", description="checkpoints: folder or s3://")
    max_failures: int = Field(2, ge=0)
    report_poll_s: float = Field(0.2, gt=0)
    experiment: str = "keeper-series-ranker"
    register_model: str | None = Field(None, alias="register")
    tracking_uri: str | None = None
    data_dir: str = Field("keeper-data", description="embedded MLflow store when none is set")
    fail_at_epoch: int | None = Field(None, ge=0, description="fault drill: fail once there")
    ray_address: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> FinetuneConfig:
        if self.head == "transformer" and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        self.tower_config()  # method/targets consistency, named
        return self

    def tower_config(self) -> TowerConfig:
        return TowerConfig(
            base_spec=self.model,
            method=self.method,
            lora_blocks=self.lora_blocks,
            unfreeze_blocks=self.unfreeze_blocks,
            lora_modules=self.lora_modules,
            targets=self.targets,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.lora_dropout,
        )


class EpochStats(BaseModel):
    epoch: int
    train_loss: float
    val_top1: float
    val_mrr: float
    lr_head: float
    images_per_s: float
    data_wait_share: float
    seconds: float


class FinetuneSummary(BaseModel):
    """What a run produced; also logged to MLflow."""

    run_id: str
    run_name: str
    tracking_uri: str
    method: str
    base_spec: str
    tower_id: str
    images: dict[str, int]  # in, prepared, failed
    series: dict[str, int]  # per split, and dropped
    trainable_params: int
    total_params: int
    trainable_share: float
    best_epoch: int
    epochs_run: int
    epochs: list[EpochStats]
    test: dict[str, dict[str, float]]
    peak_memory_mb: float
    images_per_s: float
    data_wait_share: float
    fit_seconds: float
    decode_seconds: float
    total_seconds: float
    model_uri: str
    registered: dict[str, str] | None = None
    table: str


# --------------------------------------------------------------------------------------------
# Plan: manifest -> splits, targets checked


class Plan(BaseModel):
    """The driver's plan: which images, which series in which split, the ranker's config."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    rows: pd.DataFrame  # one row per image: series_id, image_uri, is_best, split, position
    tower: TowerConfig
    image_size: int
    manifest_sha256: str


def pin_base(spec: str) -> tuple[str, str | None]:
    """The base ModelSpec as the run records it, and the version of its weights; loaded once.

    A checkpoint path is made absolute: the tuned ranker is loaded later from other folders
    (evaluate, serve, a Ray worker's own), where a relative one names another file or none. The
    version (``keeper_core.models.weights_version``: a file's sha256, an S3 object's ETag) pins the
    weights under that name. Then keeper's loader loads them, as every worker will: a missing
    file or object, a checkpoint of another architecture, an unknown or unreachable hub tag fails
    here, before any image is decoded, not in each worker after all of them are.

    Raises:
        ModelLoadError: the base cannot load (named, with the cause).
    """
    from keeper_core.models import ModelSpec, load_clip, weights_version

    s = ModelSpec.parse(spec)
    if s.weights_kind == "file":
        path = Path(s.weights.removeprefix("file://")).expanduser()
        s = ModelSpec(s.arch, os.path.abspath(path))  # abspath: a symlink stays the name
        spec = str(s)
    if s.is_random:
        return spec, None
    # Before the load: a file replaced in between fails the workers' check, never passes unseen.
    version = weights_version(s)
    load_clip(s, "cpu")
    return spec, version


def plan(cfg: FinetuneConfig) -> Plan:
    """Read and split the manifest; check the tuning against the tower, then the base weights.

    Raises:
        ConfigError: a LoRA target or block count the tower does not have (named).
        DataError: a bad manifest or an empty split.
        ModelLoadError: the base weights cannot load (``pin_base``).
        StorageError: the manifest cannot be read (checked before the tower is built).
    """
    from keeper_core.models import ModelSpec, load_clip, preprocess_config
    from keeper_core.tower import apply_tuning

    tower = cfg.tower_config()
    # The cheap check first: a manifest that is not there fails before the tower is built.
    manifest_bytes = storage.read_bytes(cfg.series)
    # The structure check builds the architecture with random weights: a bad target fails
    # before any weights are read or downloaded.
    arch = ModelSpec.parse(cfg.model).arch
    probe = load_clip(f"{arch}:random", "cpu").model.visual
    assert isinstance(probe, torch.nn.Module)
    apply_tuning(probe, tower)
    del probe
    spec, version = pin_base(cfg.model)
    tower = TowerConfig.model_validate(
        {**tower.model_dump(), "base_spec": spec, "base_weights": version}
    )
    manifest = read_series_manifest(cfg.series)
    df = assign_split(
        manifest, by=cfg.split_by, fractions=cfg.split_fractions, seed=cfg.seed,
        val_groups=cfg.val_groups, test_groups=cfg.test_groups,
    )  # fmt: skip
    for name in SPLITS:
        if not (df["split"] == name).any():
            raise DataError(f"the {name} split is empty (split_by={cfg.split_by})")
    df = df.reset_index(drop=True)
    df["position"] = df.groupby("series_id", sort=False).cumcount().astype(np.int32)
    return Plan(
        rows=df[["series_id", "image_uri", "is_best", "split", "position"]],
        tower=tower,
        image_size=preprocess_config(cfg.model).image_size,
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
    )


# --------------------------------------------------------------------------------------------
# Decode once (Ray Data CPU tasks), one row per series


def prepare_images(batch: pd.DataFrame, spec: str) -> pa.Table:
    """A Ray Data task: image URIs -> uint8 model pixels + quality features, or the error."""
    from keeper_core.preparation import ImagePreparation

    prep = ImagePreparation(spec)
    pixels: list[np.ndarray | None] = []
    quality: list[np.ndarray | None] = []
    errors: list[str | None] = []
    for uri in batch["image_uri"].astype(str):
        try:
            decoded = prep.decode(storage.read_bytes(uri), source=uri)
            pixels.append(prep.resize(decoded).reshape(-1))
            quality.append(prep.quality([decoded])[0, _QUALITY_COLUMNS])
            errors.append(None)
        except KeeperError as e:
            pixels.append(None)
            quality.append(None)
            errors.append(f"{type(e).__name__}: {e}")
    # Explicit Arrow list types: left to Ray, a batch with a failed image (None) would get
    # another column type than one without, and the blocks could not be concatenated.
    out = pa.Table.from_pandas(batch, preserve_index=False)
    out = out.append_column("pixels", pa.array(pixels, pa.large_list(pa.uint8())))
    out = out.append_column("quality", pa.array(quality, pa.list_(pa.float32())))
    return out.append_column("error", pa.array(errors, pa.string()))


def series_rows(group: pd.DataFrame, slots: dict[str, list[int]]) -> pa.Table:
    """Ray Data ``map_groups``: the images of one series -> one row per slot it fills.

    A train series fills one slot, or two when it pads the last shard; a series the driver left
    out (a failed image) fills none.
    """
    sid = str(group["series_id"].iloc[0])
    mine = slots.get(sid, [])
    group = group.sort_values("position")
    if not mine:
        group = group.iloc[:0]
    pixels = [np.concatenate([np.asarray(p, np.uint8) for p in group["pixels"]])] if mine else []
    quality = (
        [np.concatenate([np.asarray(q, np.float32) for q in group["quality"]])] if mine else []
    )
    best = int(np.argmax(group["is_best"].to_numpy())) if mine else 0
    n = len(mine)
    return pa.table(
        {
            "slot": pa.array(np.asarray(mine, np.int64)),
            "series_id": pa.array([sid] * n, pa.string()),
            "split": pa.array([str(group["split"].iloc[0]) if mine else ""] * n, pa.string()),
            "best": pa.array(np.full(n, best, np.int32)),
            "length": pa.array(np.full(n, len(group), np.int32)),
            "pixels": pa.array(pixels * n, pa.large_list(pa.uint8())),
            "quality": pa.array(quality * n, pa.list_(pa.float32())),
        }
    )


class Prepared(BaseModel):
    """Series datasets per split (materialised when cached) and what decoding found."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    datasets: dict[str, Any]
    counts: dict[str, int]  # series per split
    dropped_series: int
    images: dict[str, int]
    errors: pd.DataFrame
    quality_mean: list[float]
    quality_std: list[float]
    example: pd.DataFrame  # a few test rows: series_id, image_uri, quality columns
    decode_seconds: float


def prepare(cfg: FinetuneConfig, p: Plan) -> Prepared:
    """Decode every image once on Ray Data CPU tasks; group into series rows per split."""
    import ray.data

    t0 = time.perf_counter()
    rows = p.rows.copy()
    fn: Any = prepare_images  # Ray's stubs know no UDF with keyword arguments
    lazy = ray.data.from_pandas(rows).map_batches(
        fn,
        fn_kwargs={"spec": cfg.model},
        batch_size=cfg.decode_batch,
        batch_format="pandas",
        num_cpus=cfg.decode_cpus,
    )
    images = lazy.materialize()
    meta = images.select_columns(["series_id", "image_uri", "split", "quality", "error"])
    info = meta.to_pandas()
    failed = info["error"].notna().to_numpy()
    bad_series = set(info.loc[failed, "series_id"].astype(str))
    errors = info.loc[failed, ["image_uri", "error"]].assign(stage="prepare")
    for _, e in errors.head(5).iterrows():
        log.warning("cannot prepare %s: %s", e["image_uri"], e["error"])
    keep = ~info["series_id"].astype(str).isin(bad_series).to_numpy()

    series = (
        info.loc[keep].drop_duplicates("series_id")[["series_id", "split"]].reset_index(drop=True)
    )
    slots: dict[str, list[int]] = {}
    counts: dict[str, int] = {}
    for name in SPLITS:
        ids = series.loc[series["split"] == name, "series_id"].astype(str).tolist()
        if not ids:
            raise DataError(f"no {name} series left after {len(bad_series)} were dropped")
        counts[name] = len(ids)
        order = (
            shard_order(len(ids), cfg.num_workers, cfg.seed)
            if name == "train"
            else np.arange(len(ids))
        )
        for slot, i in enumerate(order):
            slots.setdefault(ids[int(i)], []).append(slot)

    train_q = np.stack(info.loc[keep & (info["split"] == "train").to_numpy(), "quality"].to_numpy())
    mean, std = fit_standardizer(train_q)
    source = images if cfg.cache_pixels else lazy  # uncached: every epoch decodes again
    # Hash-shuffle partitions sized to the pixels (~256 MB each), not Ray's default of 200:
    # on a small corpus 200 partitions cost more scheduling than the data costs to move.
    pixel_bytes = len(info) * 3 * p.image_size**2
    partitions = int(np.clip(math.ceil(pixel_bytes / 2**28), 1, 200))
    group_fn: Any = series_rows
    grouped = source.groupby("series_id", num_partitions=partitions).map_groups(
        group_fn, fn_kwargs={"slots": slots}, batch_format="pandas"
    )
    if cfg.cache_pixels:
        grouped = grouped.materialize()  # the pixel cache: grouped once, read every epoch
    datasets = {}
    for name in SPLITS:
        ds = grouped.filter(expr=f"split == '{name}'")
        # Train in slot order: with preserve_order, the equal split then gives each rank the
        # same series on every run and after every restart. Val and test are read whole.
        ds = ds.sort("slot") if name == "train" else ds
        datasets[name] = ds.materialize() if cfg.cache_pixels else ds
    test_rows = info.loc[keep & (info["split"] == "test").to_numpy()].head(8)
    example = pd.DataFrame(
        {"series_id": test_rows["series_id"].astype(str), "image_uri": test_rows["image_uri"]}
    )
    q = np.stack(test_rows["quality"].to_numpy()).astype(np.float64)
    for j, name in enumerate(QUALITY_INPUTS):
        example[name] = q[:, j]
    return Prepared(
        datasets=datasets,
        counts=counts,
        dropped_series=int(info.loc[~keep, "series_id"].nunique()),
        images={"in": len(info), "prepared": int((~failed).sum()), "failed": int(failed.sum())},
        errors=errors.reset_index(drop=True),
        quality_mean=mean,
        quality_std=std,
        example=example.reset_index(drop=True),
        decode_seconds=time.perf_counter() - t0,
    )


def ranker_config(cfg: FinetuneConfig, p: Plan, prepared: Prepared) -> RankerConfig:
    """The ranker every worker builds: head over the tuned embedding (+ standardised quality)."""
    from keeper_core.models import embed_dim

    dim = embed_dim(cfg.model)
    uses_q = cfg.features == "embedding+quality"
    n_q = len(QUALITY_INPUTS) if uses_q else 0
    return RankerConfig(
        head=HeadConfig(
            kind=cfg.head,
            in_dim=dim + n_q,
            hidden=cfg.hidden,
            layers=cfg.layers,
            heads=cfg.heads,
            dropout=cfg.dropout,
        ),
        features=cfg.features,
        embedding_spec=cfg.model,  # replaced by the tuned tower's id when saved
        embed_dim=dim,
        quality_names=list(QUALITY_INPUTS) if uses_q else [],
        quality_mean=prepared.quality_mean if uses_q else [],
        quality_std=prepared.quality_std if uses_q else [],
        tower=p.tower,
    )


# --------------------------------------------------------------------------------------------
# Train (every Ray Train worker)


def unpack(
    batch: dict[str, np.ndarray], image_size: int, *, rng: np.random.Generator | None = None,
    max_shift: int = 0, flip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Series rows -> flat pixels (N, 3, S, S) uint8, mask (B, L), best (B,), quality (N, Q).

    With ``rng``, each series gets one random flip/shift for all its shots (augment_series).
    """
    from keeper_core.finetune import augment_series

    lengths = np.asarray(batch["length"])
    s = image_size
    pixels, quality = [], []
    for i, n in enumerate(lengths):
        px = torch.from_numpy(
            np.asarray(batch["pixels"][i], np.uint8).reshape(int(n), 3, s, s).copy()
        )
        if rng is not None:
            px = augment_series(px, rng, max_shift=max_shift, flip=flip)
        pixels.append(px)
        q = np.asarray(batch["quality"][i], np.float32).reshape(int(n), -1)
        quality.append(torch.from_numpy(q.copy()))
    mask = torch.zeros((len(lengths), int(lengths.max())), dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, : int(n)] = True
    best = torch.as_tensor(np.asarray(batch["best"], np.int64))
    return torch.cat(pixels), mask, best, torch.cat(quality)


def warmup_cosine(warmup: int, total: int) -> Any:
    """LambdaLR factor: linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def param_groups(ranker: Any, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Trainable parameters only, by group with its learning rate; no decay on norms and biases."""
    groups = []
    named = {
        "backbone": (ranker.parts.backbone, cfg["lr_backbone"]),
        "lora": (ranker.parts.lora, cfg["lr_lora"]),
        "head": (dict(ranker.model.head.named_parameters()), cfg["lr_head"]),
    }
    for name, (params, lr) in named.items():
        for decay in (True, False):
            ps = [p for p in params.values() if p.requires_grad and (p.ndim >= 2) == decay]
            if ps:
                wd = cfg["weight_decay"] if decay else 0.0
                groups.append({"params": ps, "lr": lr, "weight_decay": wd, "name": name})
    return groups


def accumulation_window(i: int, steps: int, grad_accum: int) -> tuple[bool, int]:
    """For batch ``i`` of an epoch's ``steps`` (0-based): whether it ends an optimizer step, and
    how many batches its accumulation window holds (``grad_accum``, fewer in a last, partial
    window). Scaling each batch's loss by ``1 / window`` makes every step's gradient the mean
    over its batches, the last step's included."""
    if not 0 <= i < steps:
        raise DataError(f"batch {i} lies beyond the epoch's {steps} batches")
    start = i - i % grad_accum
    window = min(grad_accum, steps - start)
    return i + 1 == start + window, window


def backward_batch(
    model: torch.nn.Module, pixels: torch.Tensor, mask: torch.Tensor, best: torch.Tensor,
    quality: torch.Tensor, *, sync: bool, scale: float, autocast: Any,
) -> torch.Tensor:  # fmt: skip
    """Forward and backward of one batch; returns its (unscaled) series-softmax loss.

    The gradient is ``scale`` times the loss's. Under DDP, without ``sync`` the batch only
    accumulates local gradients: forward and backward run inside one ``no_sync()`` (DDP decides
    in the forward whether the backward all-reduces, and ``no_sync()`` is a one-shot context
    manager: entering it a second time fails).
    """
    ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if not sync and isinstance(model, torch.nn.parallel.DistributedDataParallel):
        ctx = model.no_sync()
    with ctx:
        with autocast():
            scores = model(pixels, mask, quality)
        loss = series_softmax_loss(scores.float(), mask, best)
        (loss * scale).backward()
    return loss.detach()


def optimizer_step(opt: torch.optim.Optimizer, sched: Any) -> float:
    """One optimizer and scheduler step; returns the last group's (the head's) lr the step used."""
    lr = float(opt.param_groups[-1]["lr"])
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return lr


def epoch_rng(seed: int, epoch: int, rank: int) -> np.random.Generator:
    """Seed one epoch's randomness on one worker from (seed, epoch, rank) alone: torch's
    generators (dropout in the head and the LoRA adapters) are reseeded, and the numpy generator
    of the augmentation is returned.

    A checkpoint keeps no generator state, and the restarted worker's build reseeds torch with
    ``seed``: without this, a resumed run would replay epoch 0's dropout masks, and train
    otherwise than an uninterrupted one.
    """
    torch.manual_seed(
        int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0])
    )
    return np.random.default_rng([seed, epoch, rank])


@dataclass
class EpochRun:
    """What one epoch of training did on one worker."""

    loss_sum: float = 0.0  # series-softmax loss summed over the series
    series: int = 0
    images: int = 0
    wait_s: float = 0.0  # waiting for batches (and unpacking them)
    lr_head: float = 0.0  # the head's lr of the epoch's last update


def train_epoch(
    model: torch.nn.Module, opt: torch.optim.Optimizer, sched: Any,
    batches: Iterable[dict[str, np.ndarray]], *, seed: int, epoch: int, rank: int, steps: int,
    grad_accum: int, image_size: int, max_shift: int, flip: bool, device: torch.device,
    autocast: Any,
) -> EpochRun:  # fmt: skip
    """One epoch over this worker's ``batches`` of series rows: forward and backward of each, an
    optimizer and scheduler step at the end of every accumulation window.

    Its randomness (augmentation, dropout) comes from ``epoch_rng(seed, epoch, rank)`` alone.

    Raises:
        DataError: the shard held another number of batches than ``steps`` (unequal shards).
    """
    rng = epoch_rng(seed, epoch, rank)
    model.train()
    out = EpochRun(lr_head=float(opt.param_groups[-1]["lr"]))
    seen = 0
    t_wait = time.perf_counter()
    for i, batch in enumerate(batches):
        pixels, mask, best, quality = unpack(
            batch, image_size, rng=rng, max_shift=max_shift, flip=flip
        )
        out.wait_s += time.perf_counter() - t_wait
        last, window = accumulation_window(i, steps, grad_accum)
        loss = backward_batch(
            model, pixels.to(device), mask.to(device), best.to(device), quality.to(device),
            sync=last, scale=1.0 / window, autocast=autocast,
        )  # fmt: skip
        if last:
            out.lr_head = optimizer_step(opt, sched)
        out.loss_sum += float(loss) * len(best)
        out.series += len(best)
        out.images += len(pixels)
        seen += 1
        t_wait = time.perf_counter()
    if seen != steps:
        raise DataError(f"worker {rank} made {seen} steps, expected {steps}: unequal shards")
    return out


def _flat(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{kind}/{k}": v for kind, part in state.items() for k, v in part.items()}


def _nested(flat: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {"adapter": {}, "blocks": {}, "head": {}}
    for key, v in flat.items():
        kind, _, name = key.partition("/")
        out[kind][name] = v
    return out


TRAINED, BEST, STATE = "trained.safetensors", "best.safetensors", "state.pt"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this worker: CUDA allocations on a GPU, else the process's max RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """DDP over equal shards of series; checkpoint and early stopping as train_head does."""
    import mlflow
    import ray.train
    import ray.train.torch
    from safetensors.torch import load_file, save_file

    from keeper_core.finetune import TunedRanker
    from keeper_core.models import autocast_dtype

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu" and config["torch_threads"]:
        torch.set_num_threads(config["torch_threads"])
    rc = RankerConfig.model_validate(config["ranker"])
    ranker = TunedRanker.build(rc, device=device, seed=config["seed"])
    model = ranker.model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(param_groups(ranker, config))
    shard_series = math.ceil(config["train_series"] / world)
    steps = math.ceil(shard_series / config["batch_size"])
    updates = math.ceil(steps / config["grad_accum"])
    warmup = round(config["warmup_epochs"] * updates)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, warmup_cosine(warmup, updates * config["epochs"])
    )
    start, best_top1, best_epoch, stale = 0, -1.0, -1, 0
    best_state = _flat(ranker.trained_state())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure: continue after the last epoch
        with checkpoint.as_directory() as d:
            ranker.load_trained_state(_nested(load_file(str(Path(d) / TRAINED))), source=d)
            best_state = load_file(str(Path(d) / BEST))
            state = raytrain.load_state(Path(d) / STATE)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, best_top1, best_epoch = state["epoch"] + 1, state["best_top1"], state["best_epoch"]
        stale = state["stale"]
    ddp = ray.train.torch.prepare_model(model)
    assert isinstance(ddp, torch.nn.Module)
    amp = autocast_dtype(device) if config["bf16"] else None
    # bf16 only: fp16 (a GPU without bf16, V100/T4) would need loss scaling, which this loop has
    # not, or small gradients underflow to zero. Such a GPU trains in fp32.
    amp = amp if amp == torch.bfloat16 else None
    autocast = (
        (lambda: torch.autocast(device_type=device.type, dtype=amp))
        if amp is not None
        else contextlib.nullcontext
    )
    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard("val")
    client = mlflow.MlflowClient(config["tracking_uri"]) if rank == 0 else None
    nodes = raytrain.worker_nodes(world)  # a collective: every worker takes part
    if client is not None:  # this attempt's workers (a restart may place them elsewhere)
        client.set_tag(config["run_id"], "keeper.worker_nodes", ",".join(nodes))
    image_size = config["image_size"]
    shift = round(config["max_shift"] * image_size)

    for epoch in range(start, config["epochs"]):
        raytrain.maybe_fail(config, epoch, rank)
        t_epoch = time.perf_counter()
        batches = train_it.iter_batches(
            batch_size=config["batch_size"],
            batch_format="numpy",
            prefetch_batches=2,
            local_shuffle_buffer_size=4 * config["batch_size"],
            local_shuffle_seed=config["seed"] * 100_003 + epoch * 1_009 + rank,
        )
        ep = train_epoch(
            ddp, opt, sched, batches, seed=config["seed"], epoch=epoch, rank=rank, steps=steps,
            grad_accum=config["grad_accum"], image_size=image_size, max_shift=shift,
            flip=config["flip"], device=device, autocast=autocast,
        )  # fmt: skip
        seconds = time.perf_counter() - t_epoch
        train_loss = raytrain.mean_over_workers(ep.loss_sum / max(ep.series, 1), world, device)
        val = _evaluate(model, val_it, image_size, device, autocast)
        if val.top1 > best_top1:
            best_top1, best_epoch, stale = val.top1, epoch, 0
            best_state = _flat(ranker.trained_state())
        else:
            stale += 1
        metrics = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_top1": val.top1,
            "val_mrr": val.mrr,
            "best_val_top1": best_top1,
            "best_epoch": best_epoch,
            "lr_head": ep.lr_head,
            "images_per_s": world * ep.images / seconds,
            "data_wait_share": ep.wait_s / seconds,
            "seconds": seconds,
            "peak_memory_mb": peak_memory_mb(device),
            "trainable_params": trainable,
            "total_params": total,
        }
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                save_file(_flat(ranker.trained_state()), str(Path(d) / TRAINED))
                save_file(best_state, str(Path(d) / BEST))
                torch.save(
                    {
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch,
                        "best_top1": best_top1,
                        "best_epoch": best_epoch,
                        "stale": stale,
                    },
                    Path(d) / STATE,
                )
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        if client is not None:
            for key in EpochStats.model_fields:
                if key != "epoch":
                    client.log_metric(config["run_id"], key, float(metrics[key]), step=epoch)
        if stale >= config["patience"]:
            break


@torch.no_grad()
def _evaluate(
    model: torch.nn.Module, it: Any, image_size: int, device: torch.device, autocast: Any
) -> SeriesMetrics:
    """Series metrics over every batch ``it`` yields (the whole val set on every worker)."""
    model.eval()
    scores: list[np.ndarray] = []
    best: list[int] = []
    for batch in it.iter_batches(batch_size=32, batch_format="numpy"):
        pixels, mask, b, quality = unpack(batch, image_size)
        with autocast():
            s = model(pixels.to(device), mask.to(device), quality.to(device)).float().cpu()
        scores += [s[j, : int(mask[j].sum())].numpy() for j in range(len(b))]
        best += b.tolist()
    return series_metrics(scores, best)


# --------------------------------------------------------------------------------------------
# The job


def fit(
    cfg: FinetuneConfig, p: Plan, prepared: Prepared, rc: RankerConfig, *, run_id: str,
    tracking_uri: str, run_name: str,
) -> tuple[Any, float]:  # fmt: skip
    """Ray Train's fit; returns its result (checkpoint + metrics history) and the seconds."""
    import ray.train
    from ray.train.torch import TorchTrainer

    storage_path, fs = raytrain.storage_for_ray(cfg.storage)
    loop = {
        "ranker": rc.model_dump(),
        "train_series": prepared.counts["train"],
        "image_size": p.image_size,
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "run_name": run_name,
        **cfg.model_dump(
            include={
                "epochs", "lr_backbone", "lr_lora", "lr_head", "weight_decay", "warmup_epochs",
                "grad_accum", "batch_size", "patience", "seed", "max_shift", "flip", "bf16",
                "torch_threads", "fail_at_epoch", "storage",
            }
        ),
    }  # fmt: skip
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop,
        datasets={"train": prepared.datasets["train"], "val": prepared.datasets["val"]},
        dataset_config=raytrain.data_config(),
        scaling_config=cfg.scaling_config(cfg.num_workers, cfg.use_gpu),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    t = time.perf_counter()
    result = raytrain.fit(trainer, cfg.report_poll_s)
    if result.checkpoint is None:
        raise KeeperError(f"training produced no checkpoint: {result.error}")
    return result, time.perf_counter() - t


def test_metrics(ranker: Any, ds: Any, image_size: int) -> dict[str, SeriesMetrics]:
    """The fine-tuned ranker beside the sharpness rule on the test series (random is implied)."""
    ranker.model.eval()
    scores: list[np.ndarray] = []
    sharp: list[np.ndarray] = []
    best: list[int] = []
    j = QUALITY_INPUTS.index("sharpness")
    for batch in ds.iter_batches(batch_size=32, batch_format="numpy"):
        pixels, mask, b, quality = unpack(batch, image_size)
        with torch.no_grad():
            s = ranker.model(pixels.to(ranker.device), mask.to(ranker.device), quality)
        lengths = mask.sum(1).tolist()
        scores += [s[i, :n].float().cpu().numpy() for i, n in enumerate(lengths)]
        q = quality[:, j].numpy()
        starts = np.concatenate([[0], np.cumsum(lengths)])
        sharp += [q[starts[i] : starts[i + 1]] for i in range(len(lengths))]
        best += b.tolist()
    return {
        "fine-tuned": series_metrics(scores, best),
        "sharpness rule": series_metrics(sharp, best),
    }


def record(
    cfg: FinetuneConfig, p: Plan, prepared: Prepared, rc: RankerConfig, result: Any, *,
    client: Any, run_id: str,
) -> dict[str, Any]:  # fmt: skip
    """The best epoch's ranker on test; logged (pyfunc over safetensors + JSON) and registered."""
    import mlflow
    from safetensors.torch import load_file

    from keeper_core.finetune import TunedRanker
    from keeper_train import tracking

    ranker = TunedRanker.build(rc, device="cpu")
    with result.checkpoint.as_directory() as d:
        ranker.load_trained_state(_nested(load_file(str(Path(d) / BEST))), source=d)
    results = test_metrics(ranker, prepared.datasets["test"], p.image_size)
    table_text = format_table(results)
    for name, m in results.items():
        key = name.replace(" ", "_")
        mlflow.log_metrics({f"test_{key}_{k}": float(v) for k, v in m.as_dict().items()})
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "results.txt").write_text(table_text + "\n")
        mlflow.log_artifacts(d, artifact_path="evaluation")
        folder = ranker.save(Path(d) / "ranker")
        cols = ["series_id", "image_uri", *ranker.config.quality_names]
        info = tracking.log_ranker(folder, prepared.example[cols])
    out: dict[str, Any] = {
        "test": {k: v.as_dict() for k, v in results.items()},
        "table": table_text,
        "model_uri": info.model_uri,
        "tower_id": ranker.config.embedding_spec,
    }
    if cfg.register_model:
        out["registered"] = {
            "name": cfg.register_model,
            "version": tracking.register(client, info.model_uri, cfg.register_model, run_id),
            "alias": tracking.CHALLENGER,
        }
    return out


def epoch_history(client: Any, run_id: str) -> list[EpochStats]:
    """Per-epoch metrics as rank 0 logged them to the run (an epoch run twice across a restart:
    its last values)."""
    keys = [k for k in EpochStats.model_fields if k != "epoch"]
    values: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            values.setdefault(int(m.step), {})[key] = float(m.value)
    return [EpochStats(epoch=e, **v) for e, v in sorted(values.items()) if set(keys) <= set(v)]


def run(cfg: FinetuneConfig) -> FinetuneSummary:
    """Plan, decode once, train on Ray Train, record, all inside one MLflow run."""
    import mlflow

    from keeper_train import tracking
    from keeper_train.cluster import init_ray

    t0 = time.perf_counter()
    # A tracking URI MLflow has no store for is refused before any work (Ray, decoding).
    uri = tracking.tracking_uri(cfg.tracking_uri, cfg.data_dir)
    p = plan(cfg)
    init_ray(cfg.ray_address)
    prepared = prepare(cfg, p)
    log.info(
        "images %s, series %s (%d dropped), decoded in %.1f s",
        prepared.images, prepared.counts, prepared.dropped_series, prepared.decode_seconds,
    )  # fmt: skip
    rc = ranker_config(cfg, p, prepared)
    registry.use_tracking_store(uri)  # mlflow.start_run and log_model use the global store
    client = mlflow.MlflowClient(uri)
    exp_id = tracking.experiment_id(client, cfg.experiment, cfg.data_dir)
    run_name = f"finetune-{cfg.method}-{cfg.features}-{time.strftime('%Y%m%dT%H%M%S')}"
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as active:
        run_id = active.info.run_id
        _log_inputs(cfg, p, prepared)
        result, fit_s = fit(
            cfg, p, prepared, rc, run_id=run_id, tracking_uri=uri, run_name=run_name
        )
        recorded = record(cfg, p, prepared, rc, result, client=client, run_id=run_id)
        history = epoch_history(client, run_id)
        last = result.metrics
        steady = history[1:] or history  # the first epoch pays for start-up
        summary = FinetuneSummary(
            run_id=run_id,
            run_name=run_name,
            tracking_uri=uri,
            method=cfg.method,
            base_spec=p.tower.base_spec,
            tower_id=recorded["tower_id"],
            images=prepared.images,
            series={**prepared.counts, "dropped": prepared.dropped_series},
            trainable_params=int(last["trainable_params"]),
            total_params=int(last["total_params"]),
            trainable_share=last["trainable_params"] / last["total_params"],
            best_epoch=int(last["best_epoch"]),
            epochs_run=int(last["epoch"]) + 1,
            epochs=history,
            test=recorded["test"],
            peak_memory_mb=float(last["peak_memory_mb"]),
            images_per_s=float(np.mean([e.images_per_s for e in steady])),
            data_wait_share=float(np.mean([e.data_wait_share for e in steady])),
            fit_seconds=round(fit_s, 2),
            decode_seconds=round(prepared.decode_seconds, 2),
            total_seconds=round(time.perf_counter() - t0, 2),
            model_uri=recorded["model_uri"],
            registered=recorded.get("registered"),
            table=recorded["table"],
        )
        mlflow.log_metrics(
            {
                "trainable_params": summary.trainable_params,
                "trainable_share": summary.trainable_share,
                "peak_memory_mb": summary.peak_memory_mb,
                "steady_images_per_s": summary.images_per_s,
                "steady_data_wait_share": summary.data_wait_share,
                "best_epoch": summary.best_epoch,
                "epochs_run": summary.epochs_run,
                "decode_seconds": summary.decode_seconds,
            }
        )
    return summary


def _log_inputs(cfg: FinetuneConfig, p: Plan, prepared: Prepared) -> None:
    """Parameters, the manifest fingerprint, the split (promote refuses series trained on)."""
    import mlflow

    mlflow.log_params(cfg.model_dump(by_alias=True, exclude={"val_groups", "test_groups"}))
    mlflow.set_tags({"keeper.manifest_sha256": p.manifest_sha256, "keeper.kind": "fine-tuned"})
    mlflow.log_params({f"series_{k}": v for k, v in prepared.counts.items()})
    mlflow.log_params({f"images_{k}": v for k, v in prepared.images.items()})
    with tempfile.TemporaryDirectory() as d:
        # No image_id: the manifest's images are decoded, not read from a table that hashed them.
        recorded = [c for c in SPLIT_COLUMNS if c in p.rows.columns]
        p.rows[recorded].to_csv(Path(d) / "split.csv", index=False)
        mlflow.log_artifact(str(Path(d) / "split.csv"))
        if len(prepared.errors):
            prepared.errors.to_csv(Path(d) / "errors.csv", index=False)
            mlflow.log_artifact(str(Path(d) / "errors.csv"))


def format_summary(s: FinetuneSummary) -> str:
    lines = [
        s.table,
        f"{s.method} on {s.base_spec}: {s.trainable_params:,} of {s.total_params:,} parameters "
        f"trained ({100 * s.trainable_share:.2f} %), best epoch {s.best_epoch} of {s.epochs_run}",
        f"images {s.images['in']} in = {s.images['prepared']} prepared + {s.images['failed']} "
        f"failed; series {s.series}",
        f"decode {s.decode_seconds:.1f} s once; fit {s.fit_seconds:.1f} s; steady "
        f"{s.images_per_s:.1f} images/s, {100 * s.data_wait_share:.1f} % of step time waiting "
        f"for data; peak memory {s.peak_memory_mb:.0f} MB",
        f"mlflow run {s.run_id} ({s.tracking_uri}); model {s.model_uri}",
    ]
    if s.registered:
        r = s.registered
        lines.append(f"registered {r['name']} version {r['version']} as @{r['alias']}")
    if s.base_spec.endswith(":random"):
        lines.append("random base weights: these figures say nothing about real photos")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.finetune --config FILE [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m keeper_train.jobs.finetune", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", help="YAML config (packages/train/configs/finetune.yaml)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. method=last-blocks")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        cfg = load_config(FinetuneConfig, args.config, args.overrides)
        summary = run(cfg)
    except KeeperError as e:
        print(f"keeper finetune: error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    if args.json:
        storage.write_bytes(args.json, summary.model_dump_json(indent=2).encode())
    return 0


if __name__ == "__main__":
    from keeper_train.jobs import finetune

    sys.exit(finetune.main())
