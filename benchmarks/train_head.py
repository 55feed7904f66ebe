"""Head-training throughput: a plain PyTorch loop against Ray Train with 1 and 2 workers.

    .venv/bin/python benchmarks/train_head.py [--epochs 20] [--heads mlp,transformer] \
        [--workers 1,2] [--scale 16] [--out benchmarks/results/train_head.json]

Same data (the quality bar's corpus, series split: 464 train and 87 val series, embedding +
quality features, see benchmarks/quality_bar.py) and the same head config (the quality bar's
tuned MLP and transformer), every run exactly ``--epochs`` epochs (no early stopping). An epoch
is one pass over the train series plus an evaluation on val, as in the job.

1. plain: ``keeper_core.training.train_epoch`` + ``evaluate`` in this process (what
   ``train_head.train_single_process`` does), with 1 torch thread and with one per core.
2. Ray Train: ``TorchTrainer(train_head.train_loop_per_worker)`` with 1 and 2 CPU workers on
   a local Ray of its own, exactly as ``keeper train-head`` runs it: data-parallel (DDP, gloo), a
   checkpoint per epoch to local storage, per-epoch metrics to MLflow (sqlite under --cache).
   A controller callback stamps the wall time of every ``ray.train.report``, so start-up
   (fit() called -> first epoch begins: controller, worker group, process group, model, each
   worker reading its Ray Data shard) is split from the steady epoch time (median gap between reports) and teardown.
   Each runs twice: with Ray's default controller poll (2 s) and with the job's
   ``report_poll_s`` (0.2 s). The controller drains reports once per poll through a queue of
   one, so no epoch is shorter than the poll.
3. ``--scale``: the plain loops and the Ray runs (job's poll) once more on the train series
   repeated 16 times, so an epoch's compute outlasts the poll and the workers' speed shows.
4. The whole job, ``train_head.run`` with 1 worker and baselines off, for what MLflow set-up,
   model logging and registration add on top of ``fit``.

Series/s is train series per steady epoch second. The machine is shared, so the JSON records
the 1-minute load average at start and end; run it when the load is low.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality_bar as qb  # the sibling benchmark: same data, same tuned heads
from embed import machine_info, write_record

from keeper_core.heads import make_head
from keeper_core.training import evaluate, train_epoch
from keeper_train import raytrain
from keeper_train.jobs import train_head
from keeper_train.jobs.train_head import Prepared, TrainHeadConfig

RAY_DEFAULT_POLL_S = 2.0  # ray.train.v2 DEFAULT_HEALTH_CHECK_INTERVAL_S
ROWS = {"mlp": "MLP, embedding+quality", "transformer": "transformer, embedding+quality"}


def stamp_callback(path: str) -> Any:
    """A Ray Train controller callback appending the wall time of every report to ``path``."""
    from ray.train import UserCallback

    class Stamps(UserCallback):
        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            with open(path, "a") as f:
                f.write(f"{time.time()}\n")

    return Stamps()


def config_for(fold: qb.Fold, head: str, epochs: int) -> tuple[TrainHeadConfig, Prepared]:
    row = ROWS[head]
    hp = qb.CHOSEN[row]
    cfg = TrainHeadConfig.model_validate(
        {
            **fold.fields,
            **hp,
            "head": head,
            "features": "embedding+quality",
            "epochs": epochs,
            "patience": epochs,
            "seed": 0,
        }
    )
    return cfg, fold.prepared(row, hp)


def plain(cfg: TrainHeadConfig, p: Prepared, threads: int) -> dict[str, Any]:
    """The single-process loop, timed per epoch."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        torch.manual_seed(cfg.seed)
        model = make_head(p.ranker_config.head)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        setup = time.perf_counter() - t0
        epochs = []
        for epoch in range(cfg.epochs):
            t = time.perf_counter()
            rng = np.random.default_rng([cfg.seed, epoch, 0])
            train_epoch(
                model, opt, p.splits["train"], batch_size=cfg.batch_size, loss=cfg.loss, rng=rng
            )
            evaluate(model, p.splits["val"])
            epochs.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
    finally:
        torch.set_num_threads(before)
    name = f"plain loop, {threads} torch thread(s)"
    return _row(name, 0, setup, epochs[0], epochs[1:], total, p)


def ray_fit(
    cfg: TrainHeadConfig,
    p: Prepared,
    workers: int,
    cache: Path,
    tracking_uri: str,
    poll: float | None,
) -> dict[str, Any]:
    """One TorchTrainer.fit of the job's train loop, report times stamped by the controller."""
    import mlflow
    import ray.train
    from ray.train.torch import TorchTrainer

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("train-head-benchmark") or client.get_experiment(
        client.create_experiment("train-head-benchmark")
    )
    run_name = f"bench-{cfg.head}-{workers}w-{time.strftime('%Y%m%dT%H%M%S')}"
    run_id = client.create_run(exp.experiment_id, run_name=run_name).info.run_id
    stamps = cache / f"{run_name}.stamps"
    trainer = TorchTrainer(
        train_head.train_loop_per_worker,
        train_loop_config=train_head.loop_config(
            cfg.model_copy(update={"fail_at_epoch": None, "storage": str(cache / "checkpoints")}),
            p,
            run_id=run_id,
            tracking_uri=tracking_uri,
            run_name=run_name,
        ),
        datasets=train_head.datasets(p, workers, cfg.seed),
        dataset_config=raytrain.data_config(),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=str(cache / "checkpoints"),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[stamp_callback(str(stamps))],
        ),
    )
    t0 = time.time()
    # poll None: Ray's own default (2 s), set explicitly so nothing inherited changes it.
    with raytrain.controller_poll(RAY_DEFAULT_POLL_S if poll is None else poll):
        result = trainer.fit()
    total = time.time() - t0
    client.set_terminated(run_id)
    if result.error:
        raise result.error
    times = [float(x) for x in stamps.read_text().split()]
    if len(times) != cfg.epochs:
        raise AssertionError(f"{len(times)} reports for {cfg.epochs} epochs")
    gaps = [float(g) for g in np.diff(times)]
    steady = float(np.median(gaps))
    # The first report ends the first epoch: start-up is what came before it, less one epoch.
    startup = times[0] - t0 - steady
    teardown = t0 + total - times[-1]
    how = "Ray's default poll 2 s" if poll is None else f"poll {poll:g} s"
    row = _row(f"Ray Train, {workers} worker(s), {how}", workers, startup, None, gaps, total, p)
    row["teardown_s"] = round(teardown, 2)
    return row


def _row(
    name: str,
    workers: int,
    startup: float,
    first: float | None,
    steady: list[float],
    total: float,
    p: Prepared,
) -> dict[str, Any]:
    """One table row; ``steady`` holds the epoch times after the first."""
    n, epoch = len(p.splits["train"]), float(np.median(steady))
    return {
        "method": name,
        "workers": workers,
        "startup_s": round(startup, 2),
        "first_epoch_s": None if first is None else round(first, 4),
        "steady_epoch_s": round(epoch, 4),
        "steady_epoch_p90_s": round(float(np.percentile(steady, 90)), 4),
        "series_per_s": round(n / epoch, 1),
        "total_s": round(total, 2),
        "series_per_s_end_to_end": round(n * (len(steady) + 1) / total, 1),
        "epochs": len(steady) + 1,
        "train_series": n,
    }


def epoch_extras(p: Prepared, work: Path, tracking_uri: str, reps: int = 10) -> dict[str, float]:
    """What the Ray loop adds to an epoch besides the maths, timed in this process (median).

    The checkpoint (model, optimizer, best weights) is saved and then copied, as Ray Train
    persists it to local storage; the three per-epoch metrics go to MLflow's sqlite store.
    """
    import shutil

    import mlflow

    model = make_head(p.ranker_config.head)
    opt = torch.optim.AdamW(model.parameters())
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "best": model.state_dict()}
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("train-head-benchmark") or client.get_experiment(
        client.create_experiment("train-head-benchmark")
    )
    run_id = client.create_run(exp.experiment_id, run_name="epoch-extras").info.run_id
    ckpt, log = [], []
    dest = Path(tempfile.mkdtemp(prefix="persisted-", dir=work))
    for i in range(reps):
        t = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=work) as d:
            torch.save(state, Path(d) / "state.pt")
            shutil.copytree(d, dest / str(i))
        ckpt.append(time.perf_counter() - t)
        t = time.perf_counter()
        for key in ("train_loss", "val_top1", "val_mrr"):
            client.log_metric(run_id, key, 0.5, step=i)
        log.append(time.perf_counter() - t)
    client.set_terminated(run_id)
    return {
        "checkpoint_save_and_copy_s": round(float(np.median(ckpt)), 4),
        "mlflow_3_metrics_sqlite_s": round(float(np.median(log)), 4),
        "checkpoint_bytes": (dest / "0" / "state.pt").stat().st_size,
    }


def job(cfg: TrainHeadConfig, cache: Path, tracking_uri: str) -> dict[str, Any]:
    """``train_head.run``, 1 worker, baselines off: the whole job around fit()."""
    run_cfg = cfg.model_copy(
        update={
            "num_workers": 1,
            "baselines": False,
            "storage": str(cache / "checkpoints"),
            "tracking_uri": tracking_uri,
            "experiment": "train-head-benchmark-job",
        }
    )
    t0 = time.perf_counter()
    summary = train_head.run(TrainHeadConfig.model_validate(run_cfg.model_dump()))
    total = time.perf_counter() - t0
    return {
        "method": f"train_head.run (whole job), 1 worker, poll {cfg.report_poll_s:g} s",
        "total_s": round(total, 2),
        "fit_s": summary["fit_seconds"],
        "outside_fit_s": round(total - summary["fit_seconds"], 2),
        "epochs": summary["epochs_run"],
    }


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--heads", default="mlp,transformer")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--no-job", action="store_true", help="skip the whole-job row")
    parser.add_argument(
        "--scale",
        type=int,
        default=16,
        help="also train on the train series repeated this often, keeper's poll (1: skip)",
    )
    parser.add_argument("--cache", type=Path, default=Path("/tmp/keeper-bench/qb"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_head.json"))
    args = parser.parse_args(argv)
    if args.epochs < 2:  # the first epoch is start-up; the steady figures need one more
        parser.error(f"--epochs must be at least 2 (got {args.epochs}): epoch 1 is timed apart")
    load_start = os.getloadavg()[0]
    cores = os.cpu_count() or 1

    emb, manifest = qb.make_data(args.cache, 660, 0)
    fold = qb.Fold(qb.split_fields(emb, manifest)["series"][0])
    work = Path(tempfile.mkdtemp(prefix="train-head-bench-", dir=args.cache))
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"

    import ray

    from keeper_train.cluster import init_ray

    # address="local": a Ray of our own, not one another process started on this machine.
    t = time.perf_counter()
    ray.init(address="local")
    ray_init_s = time.perf_counter() - t
    cluster = init_ray(None)  # already initialised: only describes it

    workers = [int(x) for x in args.workers.split(",")]
    heads: dict[str, Any] = {}
    for head in args.heads.split(","):
        cfg, p = config_for(fold, head, args.epochs)
        rows = [plain(cfg, p, 1), plain(cfg, p, cores)]
        # Ray's default controller poll (2 s) against the job's report_poll_s: the controller
        # drains worker reports once per poll through a queue of one, so an epoch shorter than
        # the poll waits for it.
        for poll in (None, cfg.report_poll_s):
            for w in workers:
                rows.append(ray_fit(cfg, p, w, work, tracking_uri, poll))
                print(rows[-1], flush=True)
        if args.scale > 1:
            # Epochs long enough that the workers' compute, not the poll, sets the pace: the
            # train series repeated --scale times (the same work per series).
            splits = {**p.splits, "train": p.splits["train"] * args.scale}
            big = p.model_copy(update={"splits": splits})
            scaled = [plain(cfg, big, 1), plain(cfg, big, cores)]
            scaled += [ray_fit(cfg, big, w, work, tracking_uri, cfg.report_poll_s) for w in workers]
            for row in scaled:
                row["method"] += f", train x{args.scale}"
                print(row, flush=True)
            rows += scaled
        heads[head] = {
            "config": qb.CHOSEN[ROWS[head]],
            "rows": rows,
            "epoch_extras": epoch_extras(p, work, tracking_uri),
        }
        if head == "mlp" and not args.no_job:
            heads[head]["job"] = job(cfg, work, tracking_uri)

    lines = [
        f"ray.init (a local Ray of its own): {ray_init_s:.1f} s; {cluster}",
        f"{args.epochs} epochs, {len(fold.prepared(ROWS['mlp'], {}).splits['train'])} train "
        f"series, val evaluated every epoch",
    ]
    header = (
        f"{'head':12s} {'method':50s} {'start-up s':>10s} {'epoch s':>9s} "
        f"{'series/s':>9s} {'total s':>8s} {'series/s e2e':>12s}"
    )
    lines += [header, "-" * len(header)]
    for head, h in heads.items():
        for r in h["rows"]:
            lines.append(
                f"{head:12s} {r['method']:50s} {r['startup_s']:10.2f} {r['steady_epoch_s']:9.3f} "
                f"{r['series_per_s']:9.0f} {r['total_s']:8.1f} {r['series_per_s_end_to_end']:12.0f}"
            )
        e = h["epoch_extras"]
        lines.append(
            f"{head:12s} per-epoch extras in the Ray loop: checkpoint save+persist "
            f"{e['checkpoint_save_and_copy_s']:.3f} s ({e['checkpoint_bytes'] / 1e3:.0f} kB), "
            f"3 MLflow metrics to sqlite {e['mlflow_3_metrics_sqlite_s']:.3f} s"
        )
        if "job" in h:
            j = h["job"]
            lines.append(
                f"{head:12s} {j['method']:50s} total {j['total_s']:.1f} s, fit {j['fit_s']:.1f} s, "
                f"outside fit {j['outside_fit_s']:.1f} s"
            )
    table = "\n".join(lines)
    print(table)
    results = {
        "command": " ".join(["python", *sys.argv]),
        "epochs": args.epochs,
        "ray_init_s": round(ray_init_s, 2),
        "cluster": cluster,
        "heads": heads,
        "machine": machine_info(),
        "loadavg_start": round(load_start, 2),
        "loadavg_end": round(os.getloadavg()[0], 2),
        "table": table,
    }
    write_record(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
