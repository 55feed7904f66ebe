"""Train a series-ranking head on Ray Train, tracked in MLflow, registered as a challenger.

    python -m keeper_train.jobs.train_head --config packages/train/configs/train_head.yaml \
        embeddings=keeper-demo/embeddings/keeper-tiny_random series=keeper-demo/corpus/manifest.csv
    keeper train-head --embeddings DIR_OR_S3 --series MANIFEST --head mlp \
        --features embedding+quality --register keeper-ranker

The driver joins the embedding table (from ``keeper embed``) to the series manifest, splits by
series (or by another column, e.g. ``base_photo``) deterministically, standardises the quality
features with train statistics, and hands the train and val series to a Ray Train
``TorchTrainer`` as Ray Datasets (one Arrow row per series; the train set padded so every worker
gets an equal shard and makes the same number of steps, see ``keeper_core.training``):
data-parallel workers, a checkpoint every epoch (local or ``s3://``), resumed from the latest one
when a worker is lost, early stopping on val top-1. The best epoch's weights are
the model. One MLflow run holds everything: parameters, dataset fingerprints, per-epoch metrics
(logged by rank 0 only), the test table beside its baselines (sharpness rule, aesthetic prompt
score, a pairwise-loss head) and the model (a pyfunc over safetensors + JSON, no pickle),
registered as a new version with alias ``challenger``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from keeper_core import registry, storage
from keeper_core.errors import DataError, KeeperError
from keeper_core.heads import HeadConfig, make_head
from keeper_core.metrics import SeriesMetrics, format_table, series_metrics
from keeper_core.ranker import (
    QUALITY_INPUTS,
    FeatureSet,
    RankerConfig,
    SeriesRanker,
    feature_matrix,
    fit_standardizer,
    series_arrays,
)
from keeper_core.training import (
    LossKind,
    Series,
    evaluate,
    series_from_arrow,
    series_to_arrow,
    shard_order,
    steps_per_epoch,
    train_epoch,
)
from keeper_train import raytrain
from keeper_train.config import configure_logging, load_config
from keeper_train.data import SplitSettings, assign_split, join_series
from keeper_train.tracking import SPLIT_COLUMNS

log = logging.getLogger("keeper.train_head")


class TrainHeadConfig(raytrain.WorkerPlacement, SplitSettings):
    """Everything train_head takes; unknown keys are errors."""

    # populate_by_name: the field is register_model (BaseModel has a `register`), the key "register".
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    embeddings: str = Field(description="output of keeper embed (folder or s3:// prefix)")
    series: str = Field(description="series manifest: series_id, image_uri, is_best")
    head: Literal["linear", "mlp", "transformer"] = "mlp"
    features: FeatureSet = "embedding+quality"
    loss: LossKind = "series-softmax"
    hidden: int = Field(128, ge=1)
    layers: int = Field(2, ge=1)
    heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    epochs: int = Field(40, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(
        32, ge=1, description="series per batch per worker (a step sees num_workers x this)"
    )
    patience: int = Field(10, ge=1, description="epochs without val top-1 gain before stopping")
    seed: int = 0
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    storage: str = Field("keeper-data/checkpoints", description="checkpoints: folder or s3://")
    max_failures: int = Field(2, ge=0, description="worker failures to recover from")
    report_poll_s: float = Field(
        0.2,
        gt=0,
        description=(
            "how often the Ray Train controller polls workers for reports; Ray's default of 2 s "
            "floors every epoch at 2 s (an environment RAY_TRAIN_HEALTH_CHECK_INTERVAL_S wins)"
        ),
    )
    experiment: str = "keeper-series-ranker"
    register_model: str | None = Field(
        None, alias="register", description="registered model name (alias challenger)"
    )
    tracking_uri: str | None = None
    data_dir: str = Field("keeper-data", description="embedded MLflow store when none is set")
    baselines: bool = True
    fail_at_epoch: int | None = Field(None, ge=0, description="fault drill: fail once there")
    ray_address: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainHeadConfig:
        if self.head == "transformer" and self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        return self


# --------------------------------------------------------------------------------------------
# Data: table + manifest -> features -> series per split


class Prepared(BaseModel):
    """The driver's view of the data, ready to train on."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    table: pd.DataFrame  # one row per image, manifest order, with split and features
    ranker_config: RankerConfig
    splits: dict[str, list[tuple[np.ndarray, int]]]
    rows: dict[str, list[np.ndarray]]  # row positions of each series, per split
    fingerprints: dict[str, str]
    dropped_series: int


def prepare(cfg: TrainHeadConfig) -> Prepared:
    """Join, validate, split and featurise. Raises DataError naming what is wrong."""
    df, spec, dropped, table = join_series(cfg.embeddings, cfg.series)
    df = assign_split(
        df, by=cfg.split_by, fractions=cfg.split_fractions, seed=cfg.seed,
        val_groups=cfg.val_groups, test_groups=cfg.test_groups,
    )  # fmt: skip
    for name in ("train", "val", "test"):
        if not (df["split"] == name).any():
            raise DataError(f"the {name} split is empty (split_by={cfg.split_by})")

    uses_q = cfg.features != "embedding"
    mean, std = fit_standardizer(df.loc[df["split"] == "train", list(QUALITY_INPUTS)].to_numpy())
    embed_dim = len(df["embedding"].iloc[0]) if cfg.features != "quality" else 0
    in_dim = embed_dim + (len(QUALITY_INPUTS) if uses_q else 0)
    rc = RankerConfig(
        head=HeadConfig(
            kind=cfg.head,
            in_dim=in_dim,
            hidden=cfg.hidden,
            layers=cfg.layers,
            heads=cfg.heads,
            dropout=cfg.dropout,
        ),
        features=cfg.features,
        embedding_spec=spec,
        embed_dim=embed_dim,
        quality_names=list(QUALITY_INPUTS) if uses_q else [],
        quality_mean=mean if uses_q else [],
        quality_std=std if uses_q else [],
    )
    x = feature_matrix(df, rc)
    splits: dict[str, list[tuple[np.ndarray, int]]] = {}
    rows: dict[str, list[np.ndarray]] = {}
    for name in ("train", "val", "test"):
        part = df[df["split"] == name]
        _, xs, rs = series_arrays(part, x[part.index.to_numpy()])
        idx = part.index.to_numpy()
        best = part["is_best"].to_numpy()
        rows[name] = [idx[r] for r in rs]
        splits[name] = [(s, int(np.argmax(best[r]))) for s, r in zip(xs, rs, strict=True)]
    return Prepared(
        table=df,
        ranker_config=rc,
        splits=splits,
        rows=rows,
        fingerprints=_fingerprints(cfg, table, spec),
        dropped_series=dropped,
    )


def _fingerprints(cfg: TrainHeadConfig, table: pd.DataFrame, spec: str) -> dict[str, str]:
    pairs = "\n".join(sorted(table["image_uri"].astype(str) + " " + table["image_id"].astype(str)))
    return {
        "manifest_sha256": hashlib.sha256(storage.read_bytes(cfg.series)).hexdigest(),
        "embeddings_sha256": hashlib.sha256(pairs.encode()).hexdigest(),
        "embedding_spec": spec,
        "embedding_rows": str(len(table)),
    }


# --------------------------------------------------------------------------------------------
# The Ray Train loop (runs on every worker)


def _state_path(d: str) -> Path:
    return Path(d) / "state.pt"


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Data-parallel training: each worker trains on its equal shard of the train series.

    Every worker reads its shard once (``get_dataset_shard("train")``), checks it holds
    ``ceil(train_series / world)`` series (so all make the same number of all-reduce steps; a
    mismatch fails the run instead of hanging it), shuffles it every epoch with a generator seeded
    by (seed, epoch, rank), and evaluates the whole val set, so every worker takes the same
    early-stopping decision.
    """
    import mlflow
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train = _read_dataset("train")
    val = _read_dataset("val")
    expected = math.ceil(config["train_series"] / world)
    if len(train) != expected:
        raise DataError(
            f"worker {rank} of {world} got {len(train)} train series, expected {expected}: "
            "unequal shards would make unequal numbers of all-reduce steps"
        )
    nodes = raytrain.worker_nodes(world)
    torch.manual_seed(config["seed"])
    model = make_head(HeadConfig.model_validate(config["head"]))
    # On the device before the optimizer exists: a resumed optimizer's state (read onto the CPU)
    # is moved to its parameters' device by load_state_dict, so they must already be there.
    device = ray.train.torch.get_device()
    model.to(device)
    opt = torch.optim.AdamW(
        model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"]
    )
    start, best_top1, best_epoch, stale = 0, -1.0, -1, 0
    best_state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # a restart after a failure: continue where the last epoch ended
        with checkpoint.as_directory() as d:
            state = raytrain.load_state(_state_path(d))
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start, best_top1, best_epoch = state["epoch"] + 1, state["best_top1"], state["best_epoch"]
        stale, best_state = state["stale"], state["best_model"]
    # DDP wraps `model` itself, so `model` stays the plain head.
    trained = ray.train.torch.prepare_model(model)
    assert isinstance(trained, torch.nn.Module)
    client = mlflow.MlflowClient(config["tracking_uri"]) if rank == 0 else None

    for epoch in range(start, config["epochs"]):
        raytrain.maybe_fail(config, epoch, rank)
        rng = np.random.default_rng([config["seed"], epoch, rank])
        loss = train_epoch(
            trained,
            opt,
            train,
            batch_size=config["batch_size"],
            loss=config["loss"],
            rng=rng,
            device=device,
        )
        loss = raytrain.mean_over_workers(loss, world, device)
        metrics_val = evaluate(model, val, device=str(device))
        if metrics_val.top1 > best_top1:
            best_top1, best_epoch, stale = metrics_val.top1, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
        stop = stale >= config["patience"]
        metrics = {
            "epoch": epoch,
            "train_loss": loss,
            "val_top1": metrics_val.top1,
            "val_mrr": metrics_val.mrr,
            "best_val_top1": best_top1,
            "best_epoch": best_epoch,
        }
        with tempfile.TemporaryDirectory() as d:
            ckpt = None
            if rank == 0:
                torch.save(
                    {
                        "model": model.state_dict(),
                        "optimizer": opt.state_dict(),
                        "epoch": epoch,
                        "best_top1": best_top1,
                        "best_epoch": best_epoch,
                        "stale": stale,
                        "best_model": best_state,
                        "worker_nodes": nodes,
                    },
                    _state_path(d),
                )
                ckpt = ray.train.Checkpoint.from_directory(d)
            ray.train.report(metrics, checkpoint=ckpt)
        if client is not None:
            for key in ("train_loss", "val_top1", "val_mrr"):
                client.log_metric(config["run_id"], key, float(metrics[key]), step=epoch)
        if stop:
            break


def _read_dataset(name: str) -> list[Series]:
    """This worker's part of a dataset passed to the trainer, read once, in series order."""
    import ray.train

    it = ray.train.get_dataset_shard(name)
    return series_from_arrow(list(it.iter_batches(batch_size=None, batch_format="pyarrow")))


# --------------------------------------------------------------------------------------------
# The job


def loop_config(
    cfg: TrainHeadConfig, prepared: Prepared, *, run_id: str, tracking_uri: str, run_name: str
) -> dict[str, Any]:
    """What every worker's ``train_loop_per_worker`` receives (the series go in ``datasets``)."""
    return {
        "head": prepared.ranker_config.head.model_dump(),
        "train_series": len(prepared.splits["train"]),
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "weight_decay": cfg.weight_decay,
        "batch_size": cfg.batch_size,
        "loss": cfg.loss,
        "patience": cfg.patience,
        "seed": cfg.seed,
        "run_id": run_id,
        "tracking_uri": tracking_uri,
        "fail_at_epoch": cfg.fail_at_epoch,
        "storage": cfg.storage,
        "run_name": run_name,
    }


BLOCK_SERIES = 1024  # series per Ray Data block: ~10 MB at 5 images x 516 float32 features


def datasets(prepared: Prepared, num_workers: int, seed: int) -> dict[str, Any]:
    """The trainer's ``datasets``: train padded for ``num_workers`` equal shards, val whole.

    Val is not split: every worker evaluates all of it, so all take the same early-stopping
    decision without a collective (and must, or some would report once more than others).
    """
    import ray.data

    def dataset(table: Any) -> Any:
        rows = range(0, table.num_rows, BLOCK_SERIES)
        ds = ray.data.from_arrow([table.slice(i, BLOCK_SERIES) for i in rows])
        # Read once per worker from memory: a progress bar per worker would be noise.
        ds.context.enable_progress_bars = False
        return ds

    train = prepared.splits["train"]
    return {
        "train": dataset(series_to_arrow(train, shard_order(len(train), num_workers, seed))),
        "val": dataset(series_to_arrow(prepared.splits["val"])),
    }


def train_single_process(
    prepared: Prepared, cfg: TrainHeadConfig, loss: LossKind
) -> tuple[torch.nn.Module, SeriesMetrics]:
    """The same recipe in this process (the pairwise baseline, and the benchmark's reference)."""
    torch.manual_seed(cfg.seed)
    model = make_head(prepared.ranker_config.head)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, stale = -1.0, None, 0
    for epoch in range(cfg.epochs):
        rng = np.random.default_rng([cfg.seed, epoch, 0])
        train_epoch(
            model, opt, prepared.splits["train"], batch_size=cfg.batch_size, loss=loss, rng=rng
        )
        val = evaluate(model, prepared.splits["val"])
        if val.top1 > best:
            best, stale = val.top1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    return model, evaluate(model, prepared.splits["test"])


def baseline_metrics(prepared: Prepared, cfg: TrainHeadConfig) -> dict[str, SeriesMetrics]:
    """Test metrics of the baselines: sharpness rule, aesthetic prompts, a pairwise-loss head."""
    from keeper_core.embedding import ClipEmbedder
    from keeper_core.scoring import AestheticConfig, aesthetic_scores

    df, rows = prepared.table, prepared.rows["test"]
    best = [b for _, b in prepared.splits["test"]]
    sharp = df["sharpness"].to_numpy(dtype=np.float64)
    out = {"sharpness rule": series_metrics([sharp[r] for r in rows], best)}
    spec = prepared.ranker_config.embedding_spec
    assert spec is not None
    emb = np.stack([np.asarray(e, dtype=np.float32) for e in df["embedding"]])
    config = AestheticConfig.default()
    prompts = ClipEmbedder(spec).prompt_embeddings(config.all_prompts())
    aes = aesthetic_scores(emb, prompts, config).total
    out["aesthetic prompts"] = series_metrics([aes[r] for r in rows], best)
    _, out["pairwise-loss head"] = train_single_process(prepared, cfg, "pairwise")
    return out


def run(cfg: TrainHeadConfig) -> dict[str, Any]:
    """Train, evaluate, log, register. Returns the results (also logged to MLflow).

    Reads as the job does: prepare the data, fit on Ray Train, then record (test metrics beside
    the baselines, the model logged and registered), all inside one MLflow run.
    """
    import mlflow

    from keeper_train import tracking

    t0 = time.perf_counter()
    prepared = prepare(cfg)
    counts = {k: len(v) for k, v in prepared.splits.items()}
    log.info("series: %s (dropped %d without embeddings)", counts, prepared.dropped_series)
    n, w = counts["train"], cfg.num_workers
    log.info(
        "%d worker(s) x %d train series (%d repeated for equal shards), %d steps an epoch",
        w, math.ceil(n / w), w * math.ceil(n / w) - n, steps_per_epoch(n, w, cfg.batch_size),
    )  # fmt: skip

    uri = tracking.tracking_uri(cfg.tracking_uri, cfg.data_dir)
    registry.use_tracking_store(uri)  # mlflow.start_run and log_model use the global store
    client = mlflow.MlflowClient(uri)
    exp_id = tracking.experiment_id(client, cfg.experiment, cfg.data_dir)
    run_name = f"{cfg.head}-{cfg.features}-{time.strftime('%Y%m%dT%H%M%S')}"
    with mlflow.start_run(experiment_id=exp_id, run_name=run_name) as active:
        run_id = active.info.run_id
        _log_inputs(cfg, prepared, counts)
        state, fit_s = fit(cfg, prepared, run_id=run_id, tracking_uri=uri, run_name=run_name)
        summary = record(cfg, prepared, state, client=client, run_id=run_id)
        summary.update(
            run_name=run_name,
            tracking_uri=uri,
            series=counts,
            fit_seconds=round(fit_s, 2),
            total_seconds=round(time.perf_counter() - t0, 2),
        )
    return summary


def _log_inputs(cfg: TrainHeadConfig, prepared: Prepared, counts: dict[str, int]) -> None:
    """Parameters, data fingerprints and the split (promote refuses series trained on)."""
    import mlflow

    mlflow.log_params(cfg.model_dump(by_alias=True, exclude={"val_groups", "test_groups"}))
    mlflow.set_tags({f"keeper.{k}": v for k, v in prepared.fingerprints.items()})
    mlflow.log_params({f"series_{k}": v for k, v in counts.items()})
    with tempfile.TemporaryDirectory() as d:
        split_csv = Path(d) / "split.csv"
        prepared.table[list(SPLIT_COLUMNS)].to_csv(split_csv, index=False)
        mlflow.log_artifact(str(split_csv))


def fit(
    cfg: TrainHeadConfig, prepared: Prepared, *, run_id: str, tracking_uri: str, run_name: str
) -> tuple[dict[str, Any], float]:
    """Ray Train's fit; returns the last checkpoint's state (with the best epoch's weights)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from keeper_train.cluster import init_ray

    init_ray(cfg.ray_address)
    storage_path, fs = raytrain.storage_for_ray(cfg.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config(
            cfg, prepared, run_id=run_id, tracking_uri=tracking_uri, run_name=run_name
        ),
        datasets=datasets(prepared, cfg.num_workers, cfg.seed),
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
    t_fit = time.perf_counter()
    result = raytrain.fit(trainer, cfg.report_poll_s)
    fit_s = time.perf_counter() - t_fit
    if result.checkpoint is None:
        raise KeeperError(f"training produced no checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = raytrain.load_state(_state_path(d))
    return state, fit_s


def record(
    cfg: TrainHeadConfig, prepared: Prepared, state: dict[str, Any], *, client: Any, run_id: str
) -> dict[str, Any]:
    """Test metrics beside the baselines, logged; the best epoch's ranker logged and registered."""
    import mlflow

    from keeper_train import tracking

    ranker = SeriesRanker(prepared.ranker_config)
    ranker.head.load_state_dict(state["best_model"])
    ranker.head.eval()
    test = evaluate(ranker.head, prepared.splits["test"])
    results = {"trained head": test}
    if cfg.baselines:
        results.update(baseline_metrics(prepared, cfg))
    table_text = format_table(results)
    for name, m in results.items():
        key = name.replace(" ", "_")
        mlflow.log_metrics({f"test_{key}_{k}": float(v) for k, v in m.as_dict().items()})
    mlflow.log_metrics({"best_epoch": state["best_epoch"], "epochs_run": state["epoch"] + 1})
    # The last attempt's workers (a restart after a failure may place them elsewhere).
    mlflow.set_tag("keeper.worker_nodes", ",".join(state.get("worker_nodes", [])))
    summary: dict[str, Any] = {
        "run_id": run_id,
        "series_dropped": prepared.dropped_series,
        "best_epoch": state["best_epoch"],
        "epochs_run": state["epoch"] + 1,
        "test": {k: v.as_dict() for k, v in results.items()},
        "gain_over_random_pts": round(100 * (test.top1 - test.random_top1), 2),
        "worker_nodes": state.get("worker_nodes", []),
        "fingerprints": prepared.fingerprints,
    }
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "results.json").write_text(json.dumps(summary, indent=2))
        (Path(d) / "results.txt").write_text(table_text + "\n")
        mlflow.log_artifacts(d, artifact_path="evaluation")
        ranker_dir = ranker.save(Path(d) / "ranker")
        example = prepared.table[prepared.table["split"] == "test"].head(8)
        cols = ["series_id", "image_uri", "embedding", *ranker.config.quality_names]
        info = tracking.log_ranker(ranker_dir, example[[c for c in cols if c in example]])
    summary["model_uri"] = info.model_uri
    if cfg.register_model:
        summary["registered"] = {
            "name": cfg.register_model,
            "version": tracking.register(client, info.model_uri, cfg.register_model, run_id),
            "alias": tracking.CHALLENGER,
        }
    summary["table"] = table_text
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.train_head --config FILE [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m keeper_train.jobs.train_head", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", help="YAML config (packages/train/configs/train_head.yaml)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("overrides", nargs="*", help="key=value, e.g. head=transformer")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        cfg = load_config(TrainHeadConfig, args.config, args.overrides)
        summary = run(cfg)
    except KeeperError as e:
        print(f"keeper train-head: error: {e}", file=sys.stderr)
        return 2
    print(summary["table"])
    print(
        f"mlflow run {summary['run_id']} ({summary['tracking_uri']}); model {summary['model_uri']}"
    )
    nodes = summary.get("worker_nodes") or []
    if len(set(nodes)) > 1:
        print(
            f"{len(nodes)} workers on {len(set(nodes))} nodes: " + ", ".join(n[:8] for n in nodes)
        )
    if "registered" in summary:
        r = summary["registered"]
        print(f"registered {r['name']} version {r['version']} as @{r['alias']}")
    if args.json:
        storage.write_bytes(args.json, json.dumps(summary, indent=2).encode())
    return 0


if __name__ == "__main__":
    from keeper_train.jobs import train_head

    sys.exit(train_head.main())
