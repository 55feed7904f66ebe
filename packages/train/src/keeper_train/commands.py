"""keeper_train's subcommands for the ``keeper`` CLI (entry-point group ``keeper.commands``).

Kept import-light: ray and torch are imported only when a command runs.
"""

from __future__ import annotations

import argparse
from typing import Any

SubParsers = Any  # argparse._SubParsersAction is private


def add_embed_parser(subparsers: SubParsers) -> None:
    """``keeper embed``: the Ray Data embedding job (keeper_train.jobs.embed)."""
    p = subparsers.add_parser(
        "embed",
        help="embed an image corpus with CLIP on Ray Data (resumable)",
        description="Embed a folder, s3:// prefix or manifest of images into a Parquet table.",
    )
    p.add_argument("--input", required=True, help="folder, s3:// prefix, or CSV/Parquet manifest")
    p.add_argument("--output", required=True, help="folder or s3:// prefix for the table")
    p.add_argument("--model", default="keeper-tiny:random", help="ModelSpec ARCH[:WEIGHTS]")
    p.add_argument("--config", help="YAML config; flags given here override it")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--concurrency", type=int, help="model actors")
    p.add_argument("--num-gpus-per-worker", type=float)
    p.add_argument("--max-failure-fraction", type=float)
    p.add_argument("--retry-errors", action="store_true", default=None)
    p.add_argument("--ray-address")
    p.add_argument("overrides", nargs="*", help="any other EmbedConfig field as key=value")

    def run(args: argparse.Namespace) -> int:
        from keeper_train.jobs import embed

        flags = {
            "input": args.input,
            "output": args.output,
            "model": args.model,
            "batch_size": args.batch_size,
            "concurrency": args.concurrency,
            "num_gpus_per_worker": args.num_gpus_per_worker,
            "max_failure_fraction": args.max_failure_fraction,
            "retry_errors": args.retry_errors,
            "ray_address": args.ray_address,
        }
        argv = ["--config", args.config] if args.config else []
        argv += [f"{k}={v}" for k, v in flags.items() if v is not None]
        return embed.main([*argv, *args.overrides])

    p.set_defaults(func=run)


def add_demo_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's flags (shared by ``keeper demo`` and ``python -m keeper_train.jobs.demo``)."""
    p.add_argument(
        "--out", default="keeper-demo", help="output folder (corpus, embeddings, report)"
    )
    p.add_argument("--model", default="keeper-tiny:random", help="ModelSpec ARCH[:WEIGHTS]")
    p.add_argument("--series", type=int, default=150, help="series in the generated corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--manifest", help="use this series manifest instead of generating a corpus")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--report-series", type=int, default=60, help="series shown in the report")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (default: local)")
    p.add_argument("--epochs", type=int, default=40, help="training epochs of the ranking head")
    p.add_argument("--model-name", default="keeper-demo-ranker", help="registered model name")


def add_demo_parser(subparsers: SubParsers) -> None:
    """``keeper demo``: the offline end-to-end demo (keeper_train.jobs.demo)."""
    p = subparsers.add_parser("demo", help="run the offline best-of-series demo end to end")
    add_demo_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from keeper_train.jobs import demo

        return demo.run_safely(args)

    p.set_defaults(func=run)


def add_train_head_parser(subparsers: SubParsers) -> None:
    """``keeper train-head``: train a series-ranking head on Ray Train (jobs.train_head)."""
    p = subparsers.add_parser("train-head", help="train a series-ranking head (Ray Train + MLflow)")
    p.add_argument("--embeddings", required=True, help="output of keeper embed")
    p.add_argument("--series", required=True, help="series manifest (CSV/Parquet)")
    p.add_argument("--config", help="YAML config; flags given here override it")
    p.add_argument("--head", choices=["linear", "mlp", "transformer"])
    p.add_argument("--features", choices=["embedding", "embedding+quality", "quality"])
    p.add_argument("--loss", choices=["series-softmax", "pairwise"])
    p.add_argument("--epochs", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--num-workers", type=int)
    p.add_argument("--use-gpu", action="store_true", default=None)
    p.add_argument("--storage", help="checkpoints: folder or s3:// prefix")
    p.add_argument("--experiment")
    p.add_argument("--register", help="registered model name (new version, alias challenger)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("overrides", nargs="*", help="any other TrainHeadConfig field as key=value")

    def run(args: argparse.Namespace) -> int:
        from keeper_train.jobs import train_head

        keys = ["embeddings", "series", "head", "features", "loss", "epochs", "lr", "batch_size"]
        keys += ["seed", "num_workers", "use_gpu", "storage", "experiment", "register"]
        argv = ["--config", args.config] if args.config else []
        argv += ["--json", args.json] if args.json else []
        argv += [f"{k}={getattr(args, k)}" for k in keys if getattr(args, k) is not None]
        return train_head.main([*argv, *args.overrides])

    p.set_defaults(func=run)


def _add_registry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else embedded)"
    )
    p.add_argument(
        "--data-dir", default="keeper-data", help="embedded MLflow store when none is set"
    )
    p.add_argument("--json", help="also write the results here (path or s3://)")


def add_evaluate_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``keeper evaluate`` and ``python -m keeper_train.jobs.evaluate``."""
    p.add_argument(
        "--model",
        required=True,
        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a logged model URI (runs:/..., models:/m-...)",
    )
    p.add_argument("--embeddings", required=True, help="output of keeper embed")
    p.add_argument("--series", required=True, help="labelled series manifest (CSV/Parquet)")
    p.add_argument("--html", help="write the series report (thumbnails, keeper, picks) here")
    p.add_argument("--report-series", type=int, default=60, help="series shown in the report")
    _add_registry_arguments(p)


def add_evaluate_parser(subparsers: SubParsers) -> None:
    """``keeper evaluate``: a logged or registered ranker vs the baselines (jobs.evaluate)."""
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a registered ranker version on a labelled series manifest",
        description="Score every series with the model, beside the sharpness rule and random.",
    )
    add_evaluate_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from keeper_train.jobs import evaluate

        return evaluate.run_cli(args)

    p.set_defaults(func=run)


def add_promote_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``keeper promote`` and ``python -m keeper_train.jobs.promote``."""
    p.add_argument("name", help="registered model name")
    p.add_argument("--embeddings", help="output of keeper embed (to evaluate on)")
    p.add_argument("--series", help="labelled series manifest (CSV/Parquet)")
    p.add_argument(
        "--min-gain",
        type=float,
        default=0.01,
        help="top-1 gain over the champion needed, absolute (0.01 = 1 point)",
    )
    p.add_argument(
        "--rollback", action="store_true", help="move @champion back to the previous champion"
    )
    _add_registry_arguments(p)


def add_promote_parser(subparsers: SubParsers) -> None:
    """``keeper promote``: gate @challenger against @champion, or roll back (jobs.promote)."""
    p = subparsers.add_parser(
        "promote",
        help="promote @challenger to @champion if it is better, or --rollback",
        description="Evaluate @challenger and @champion on the same series; move @champion to "
        "the challenger only if top-1 gains at least --min-gain and MRR does not regress.",
    )
    add_promote_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from keeper_train.jobs import promote

        return promote.run_cli(args)

    p.set_defaults(func=run)
