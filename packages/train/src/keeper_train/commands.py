"""keeper_train's subcommands for the ``keeper`` CLI (entry-point group ``keeper.commands``).

Every flag defaults to "not given" (``None``): a job's pydantic config holds the one default, so a
``--config`` file's value is never replaced by a flag the user did not type. The parsers live here
and only here; each job takes its typed config (``promote.run(PromoteConfig(...))``), and its
``python -m keeper_train.jobs.<job>`` entry point goes through this same parser. Kept
import-light: ray, torch and the jobs are imported only when a command runs.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Iterable
from typing import Any, TypeVar

from pydantic import BaseModel

SubParsers = Any  # argparse._SubParsersAction is private
C = TypeVar("C", bound=BaseModel)

_BOOL = argparse.BooleanOptionalAction  # --flag / --no-flag, None when neither is given


def given(args: argparse.Namespace, keys: Iterable[str]) -> dict[str, Any]:
    """The flags among ``keys`` the user gave (not None), by destination name."""
    return {k: v for k in keys if (v := getattr(args, k)) is not None}


def dests(p: argparse.ArgumentParser, *, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The destination names of every argument ``p`` takes, in order, less ``skip`` (and
    ``--help``): the one list of a command's flags, so a flag added to the parser reaches the
    job without being named a second time."""
    out = (a.dest for a in p._actions if not isinstance(a, argparse._HelpAction))
    return tuple(d for d in out if d not in {*skip})


def as_overrides(values: dict[str, Any]) -> list[str]:
    """Flags as a job's ``key=value`` overrides, each value written as the YAML scalar it is.

    Strings are single-quoted, so a path such as ``on`` or ``123`` stays a string.
    """

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, str):
            return "'" + v.replace("'", "''") + "'"
        return str(v)

    return [f"{k}={scalar(v)}" for k, v in values.items()]


def validated(model: type[C], values: dict[str, Any]) -> C:
    """``model`` from the given flags, a failure named by field (keeper_train.config.validate).

    Raises:
        ConfigError: a field fails validation or a required one is missing.
    """
    from keeper_train.config import validate

    return validate(model, values)


def _runs_job(
    p: argparse.ArgumentParser,
    job: str,
    nested: dict[str, str] | None = None,
    *,
    overrides: str = "any other field as key=value",
) -> None:
    """Ends ``p``: its ``key=value`` overrides, and what it runs: ``keeper_train.jobs.<job>``'s
    ``main`` with ``--config`` (and ``--json``) when given, then every other flag of ``p`` that
    was given, as an override of the config field of its name (``nested`` names a flag's dotted
    field instead, ``max_gap_s`` -> ``grouping.max_gap_s``), then the overrides typed, which
    win."""
    dotted = nested or {}
    keys = dests(p, skip=("config", "json", *dotted))
    p.add_argument("overrides", nargs="*", help=overrides)

    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module(f"keeper_train.jobs.{job}")
        argv = ["--config", args.config] if args.config else []
        argv += ["--json", args.json] if getattr(args, "json", None) else []
        values = given(args, keys)
        values.update({dotted[k]: v for k, v in given(args, dotted).items()})
        return int(module.main([*argv, *as_overrides(values), *args.overrides]))

    p.set_defaults(func=run)


def _add_training_run_arguments(p: argparse.ArgumentParser, use_gpu: str) -> None:
    """The flags keeper train-head and keeper finetune share: where the run goes and how."""
    p.add_argument("--seed", type=int, help="split and initialisation seed")
    p.add_argument("--split-by", help="column that keeps rows in one split (e.g. base_photo)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers")
    p.add_argument("--use-gpu", action=_BOOL, help=use_gpu)
    p.add_argument("--storage", help="checkpoints: folder or s3:// prefix")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--register", help="registered model name (new version, alias challenger)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI")
    p.add_argument("--ray-address", help="join this Ray cluster (default: local)")
    p.add_argument("--json", help="also write the results here")


# --------------------------------------------------------------------------------------------
# keeper embed, keeper train-head: flags become key=value overrides of the job's YAML config


def add_embed_parser(subparsers: SubParsers) -> None:
    """``keeper embed``: the Ray Data embedding job (keeper_train.jobs.embed)."""
    p = subparsers.add_parser(
        "embed",
        help="embed an image corpus with CLIP on Ray Data (resumable)",
        description="Embed a folder, s3:// prefix or manifest of images into a Parquet table. "
        "A flag given here overrides --config; one not given leaves the config's value (or "
        "EmbedConfig's default) alone.",
    )
    p.add_argument("--config", help="YAML config (EmbedConfig fields)")
    p.add_argument("--input", help="folder, s3:// prefix, or CSV/Parquet manifest (required)")
    p.add_argument("--output", help="folder or s3:// prefix for the table (required)")
    p.add_argument("--model", help="ModelSpec ARCH[:WEIGHTS] (default keeper-tiny:random)")
    p.add_argument("--batch-size", type=int, help="images per model forward pass")
    p.add_argument("--concurrency", type=int, help="model actors")
    p.add_argument("--num-gpus-per-worker", type=float, help="GPUs per model actor")
    p.add_argument(
        "--decode",
        choices=["auto", "cpu", "pil", "turbo", "gpu", "nvimgcodec"],
        help="JPEG decoder (gpu: nvJPEG through torchvision, nvimgcodec: NVIDIA nvImageCodec, "
        "both on the model actors' GPUs; default auto = CPU)",
    )
    p.add_argument(
        "--decode-placement",
        choices=["auto", "tasks", "actor"],
        help="decode in CPU tasks or inside the model actors (default auto)",
    )
    p.add_argument(
        "--max-failure-fraction", type=float, help="failed share of the table that fails the job"
    )
    p.add_argument("--retry-errors", action=_BOOL, help="re-attempt every recorded failure")
    p.add_argument(
        "--prune",
        action=_BOOL,
        help="remove the rows of files under --input found neither listed nor moved (deleted)",
    )
    p.add_argument(
        "--max-prune-fraction",
        type=float,
        help="largest share of the input's rows --prune removes for files not found moved "
        "(default 0.25: a disk not mounted lists like one emptied)",
    )
    p.add_argument(
        "--find-copies",
        action=_BOOL,
        help="embed a copy of a photo once (default on): reads the last 16 KB of new files "
        "whose size another has; --no-find-copies for a corpus known to hold none",
    )
    p.add_argument("--ray-address", help="join this Ray cluster (default: local)")
    _runs_job(p, "embed", overrides="any other EmbedConfig field as key=value")


def add_train_head_parser(subparsers: SubParsers) -> None:
    """``keeper train-head``: train a series-ranking head on Ray Train (jobs.train_head)."""
    p = subparsers.add_parser(
        "train-head",
        help="train a series-ranking head (Ray Train + MLflow)",
        description="Train a ranking head on an embedding table and a labelled series manifest. "
        "A flag given here overrides --config; one not given leaves the config's value alone.",
    )
    p.add_argument("--config", help="YAML config (TrainHeadConfig fields)")
    p.add_argument("--embeddings", help="output of keeper embed (required)")
    p.add_argument("--series", help="labelled series manifest, CSV/Parquet (required)")
    p.add_argument("--head", choices=["linear", "mlp", "transformer"], help="head architecture")
    p.add_argument(
        "--features",
        choices=["embedding", "embedding+quality", "quality"],
        help="what the head sees",
    )
    p.add_argument("--loss", choices=["series-softmax", "pairwise"], help="training loss")
    p.add_argument("--epochs", type=int, help="maximum epochs")
    p.add_argument("--lr", type=float, help="learning rate (AdamW)")
    p.add_argument("--batch-size", type=int, help="series per batch per worker")
    _add_training_run_arguments(p, use_gpu="one GPU per worker")
    _runs_job(p, "train_head", overrides="any other TrainHeadConfig field as key=value")


def add_finetune_parser(subparsers: SubParsers) -> None:
    """``keeper finetune``: LoRA / last-blocks fine-tune of the CLIP tower (jobs.finetune)."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune the CLIP vision tower with a ranking head (LoRA / last blocks, Ray Train)",
        description="Fine-tune the vision tower and a series-ranking head on a labelled series "
        "manifest of images. A flag given here overrides --config; one not given leaves the "
        "config's value alone.",
    )
    p.add_argument("--config", help="YAML config (FinetuneConfig fields)")
    p.add_argument("--series", help="labelled series manifest of images, CSV/Parquet (required)")
    p.add_argument("--model", help="base CLIP ModelSpec ARCH[:WEIGHTS]")
    p.add_argument(
        "--method", choices=["lora", "last-blocks", "last-blocks+lora"], help="what trains"
    )
    p.add_argument("--rank", type=int, help="LoRA rank")
    p.add_argument("--alpha", type=int, help="LoRA alpha")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout")
    p.add_argument("--lora-blocks", type=int, help="LoRA on the last N blocks (default all)")
    p.add_argument("--unfreeze-blocks", type=int, help="blocks trained in full (last-blocks*)")
    p.add_argument("--head", choices=["linear", "mlp", "transformer"], help="head architecture")
    p.add_argument(
        "--features", choices=["embedding", "embedding+quality"], help="what the head sees"
    )
    p.add_argument("--lr-backbone", type=float, help="learning rate of unfrozen blocks")
    p.add_argument("--lr-lora", type=float, help="learning rate of the LoRA adapters")
    p.add_argument("--lr-head", type=float, help="learning rate of the head")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (matrices only)")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up, then cosine")
    p.add_argument("--epochs", type=int, help="maximum epochs")
    p.add_argument("--grad-accum", type=int, help="batches per optimizer step")
    p.add_argument("--batch-size", type=int, help="series per batch per worker")
    _add_training_run_arguments(p, use_gpu="one GPU per worker (bf16 autocast)")
    _runs_job(p, "finetune", overrides="any other FinetuneConfig field as key=value")


def _is_override(arg: str) -> bool:
    """``key=value`` (a field name before the ``=``), not a model URI such as ``models:/m@a``."""
    key, sep, _ = arg.partition("=")
    return bool(sep) and key.replace("_", "").replace(".", "").isalnum()


def _split_words(words: list[str]) -> tuple[str | None, list[str]]:
    """A command's bare words as (its one positional, the ``key=value`` overrides).

    The first word that is not ``key=value`` is the positional (None when every word is one:
    ``--config F key=value``); the rest, in order, are overrides. The words may come before,
    between or after the flags (keeper_core.cli.KeeperParser gathers them).
    """
    first = next((i for i, w in enumerate(words) if not _is_override(w)), None)
    if first is None:
        return None, list(words)
    return words[first], [*words[:first], *words[first + 1 :]]


def add_export_parser(subparsers: SubParsers) -> None:
    """``keeper export``: a registered ranker as one checkpoint or a folder (jobs.export)."""
    p = subparsers.add_parser(
        "export",
        help="export a registered ranker: a fine-tuned tower merged into one open_clip "
        "checkpoint (--merge), or its ranker folder",
        description="Resolve MODEL_URI, download its ranker and write it to --output. With "
        "--merge a fine-tuned tower is folded into one open_clip safetensors checkpoint, verified "
        "against the adapter-on tower, and the ModelSpec that loads it is printed. A flag given "
        "here overrides --config; one not given leaves the config's value (or ExportConfig's "
        "default) alone.",
    )
    p.add_argument("--config", help="YAML config (ExportConfig fields)")
    p.add_argument(
        "words",
        nargs="*",
        metavar="MODEL_URI|key=value",
        help="the model: models:/NAME@ALIAS, models:/NAME/VERSION or a logged model URI "
        "(required); and any other ExportConfig field as key=value, before or after the flags",
    )
    p.add_argument(
        "--output",
        help="--merge: a .safetensors file (path or s3://); else a folder or s3:// prefix "
        "(required)",
    )
    p.add_argument(
        "--merge",
        action=_BOOL,
        help="fold a fine-tuned tower into one open_clip checkpoint (default: copy the folder)",
    )
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else embedded)"
    )
    p.add_argument(
        "--data-dir", help="embedded MLflow store when no tracking URI is set (default keeper-data)"
    )

    def run_export(args: argparse.Namespace) -> int:
        from keeper_train.config import load_config
        from keeper_train.jobs import export

        args.model, overrides = _split_words(args.words)
        flags = as_overrides(given(args, ("model", *dests(p, skip=("config", "words")))))
        cfg = load_config(export.ExportConfig, args.config, [*flags, *overrides])
        print(export.format_result(export.run(cfg)))
        return 0

    p.set_defaults(func=run_export)


def add_export_embeddings_parser(subparsers: SubParsers) -> None:
    """``keeper export-embeddings``: the table in clip-retrieval's layout (jobs.export_embeddings)."""
    p = subparsers.add_parser(
        "export-embeddings",
        help="write an embedding table as clip-retrieval's img_emb/*.npy + metadata/*.parquet",
        description="Export keeper embed's table in clip-retrieval's layout, for autofaiss and "
        "clip-retrieval's back end. A flag given here overrides --config.",
    )
    p.add_argument("--config", help="YAML config (ExportEmbeddingsConfig fields)")
    p.add_argument("--table", help="keeper embed's output folder or s3:// prefix (required)")
    p.add_argument("--output", help="folder or s3:// prefix to write (required)")
    p.add_argument("--format", choices=["clip-retrieval"], help="layout (default clip-retrieval)")
    p.add_argument("--dtype", choices=["float16", "float32"], help="default float16")
    _runs_job(p, "export_embeddings")


def add_index_parser(subparsers: SubParsers) -> None:
    """``keeper index``: the nearest-neighbour index of an embedding table (jobs.index)."""
    p = subparsers.add_parser(
        "index",
        help="build or grow the nearest-neighbour index of an embedding table",
        description="Build the vector index of keeper embed's table under TABLE/index (or "
        "--output), or add the rows it lacks. A flag given here overrides --config.",
    )
    p.add_argument("--config", help="YAML config (IndexConfig fields)")
    p.add_argument("--table", help="keeper embed's output folder or s3:// prefix (required)")
    p.add_argument("--output", help="where the index goes (default TABLE/index)")
    p.add_argument("--backend", choices=["auto", "exact", "faiss", "usearch"], help="default auto")
    p.add_argument("--rebuild", action=_BOOL, help="build anew instead of adding")
    _runs_job(p, "index", overrides="any other IndexConfig field as key=value")


def add_dedup_parser(subparsers: SubParsers) -> None:
    """``keeper dedup``: corpus-wide near-duplicate groups (jobs.dedup)."""
    p = subparsers.add_parser(
        "dedup",
        help="find every near-duplicate group of an embedding table and keep the best member",
        description="Group exact and near copies across a whole embedding table (neighbours "
        "from a vector index, then keeper pick's duplicate tests), keep each group's best "
        "member, write groups.parquet and an HTML report. A flag given here overrides --config.",
    )
    p.add_argument("--config", help="YAML config (DedupConfig fields)")
    p.add_argument("--table", help="keeper embed's output folder or s3:// prefix (required)")
    p.add_argument("--output", help="folder or s3:// prefix for the results (required)")
    p.add_argument("--index", help="a keeper index of the table (default: built in memory)")
    p.add_argument("--similarity", type=float, help="cosine threshold (default 0.98)")
    p.add_argument("--keep-by", help="numeric column (default sharpness) or pixels")
    _runs_job(p, "dedup", overrides="any other DedupConfig field as key=value")


REFERENCE_NESTED = {
    "batch_size": "embed.batch_size",
    "concurrency": "embed.concurrency",
    "num_gpus_per_worker": "embed.num_gpus_per_worker",
    "max_failure_fraction": "embed.max_failure_fraction",
}


def add_reference_parser(subparsers: SubParsers) -> None:
    """``keeper reference add|list|remove``: reference collections (jobs.reference)."""
    p = subparsers.add_parser(
        "reference",
        help="manage reference collections: named image sets that POST /v1/compare compares with",
        description="A reference collection is a named set of images (a portfolio) embedded "
        "once under ROOT/NAME/, with reference.json beside its table.",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    add = actions.add_parser(
        "add",
        help="embed a folder, s3:// prefix or manifest into a collection (creates or grows it)",
        description="Run keeper embed on --input into ROOT/NAME/ (only images not there yet), "
        "then write ROOT/NAME/reference.json. A collection holds one model spec: an add with "
        "another is refused. A flag given here overrides --config; one not given leaves the "
        "config's value alone.",
    )
    add.add_argument(
        "words",
        nargs="*",
        metavar="NAME|key=value",
        help="the collection (required); and other fields as key=value (embed.FIELD: "
        "EmbedConfig's), before or after the flags",
    )
    add.add_argument("--config", help="YAML config (ReferenceAddConfig fields)")
    add.add_argument("--input", help="folder, s3:// prefix, or CSV/Parquet manifest (required)")
    add.add_argument("--root", help="folder or s3:// prefix holding collections (required)")
    add.add_argument(
        "--model",
        help="ModelSpec ARCH[:WEIGHTS] (default: the collection's own; keeper-tiny:random for "
        "a new one)",
    )
    add.add_argument("--description", help="what the collection is (replaces the stored one)")
    add.add_argument("--batch-size", type=int, help="images per model forward pass")
    add.add_argument("--concurrency", type=int, help="model actors")
    add.add_argument("--num-gpus-per-worker", type=float, help="GPUs per model actor")
    add.add_argument(
        "--max-failure-fraction", type=float, help="failed share of the table that fails the add"
    )
    add.add_argument("--ray-address", help="join this Ray cluster (default: local)")

    def run_add(args: argparse.Namespace) -> int:
        from keeper_train.jobs import reference

        args.name, overrides = _split_words(args.words)
        argv = ["--config", args.config] if args.config else []
        values = given(args, ("name", *dests(add, skip=("words", "config", *REFERENCE_NESTED))))
        values.update({REFERENCE_NESTED[k]: v for k, v in given(args, REFERENCE_NESTED).items()})
        return reference.main([*argv, *as_overrides(values), *overrides])

    add.set_defaults(func=run_add)

    ls = actions.add_parser("list", help="the collections under a root")
    ls.add_argument("--root", required=True, help="folder or s3:// prefix holding collections")
    ls.add_argument("--json", action="store_true", help="print a JSON list of reference.json")

    def run_list(args: argparse.Namespace) -> int:
        from keeper_train.jobs import reference

        rows = reference.list_references(args.root)
        print(reference.list_json(rows) if args.json else reference.format_list(args.root, rows))
        return 0

    ls.set_defaults(func=run_list)

    rm = actions.add_parser(
        "remove", help="delete a collection (reference.json first, then its table)"
    )
    rm.add_argument("name", help="the collection")
    rm.add_argument("--root", required=True, help="folder or s3:// prefix holding collections")

    def run_remove(args: argparse.Namespace) -> int:
        from keeper_train.jobs import reference

        n = reference.remove(args.root, args.name)
        print(f"keeper reference remove: removed {args.name!r} ({n} files) from {args.root}")
        return 0

    rm.set_defaults(func=run_remove)


def add_feedback_export_parser(subparsers: SubParsers) -> None:
    """``keeper feedback-export``: people's decisions -> train-head's input (jobs.feedback_export)."""
    p = subparsers.add_parser(
        "feedback-export",
        help="turn a feedback root (events + offers) into series that keeper train-head takes",
        description="Join the standing decisions under ROOT/events to what was offered under "
        "ROOT/offers; write keeper embed's layout (embeddings/, _KEEPER_TABLE.json) with "
        "series.csv and _SUMMARY.json (what was used, what was skipped and why). A flag given "
        "here overrides --config.",
    )
    p.add_argument("--config", help="YAML config (FeedbackExportConfig fields)")
    p.add_argument("--feedback", help="feedback root: ROOT/events and ROOT/offers (required)")
    p.add_argument("--output", help="folder or s3:// prefix to write (required)")
    p.add_argument(
        "--pairs", action=_BOOL, help="accepted-vs-rejected pairs from groups with no keeper"
    )
    _runs_job(p, "feedback_export", overrides="any other field as key=value, e.g. since=2026-06-01")


def _add_pick_run_xmp_arguments(p: argparse.ArgumentParser) -> None:
    """Where a pick run put its XMP, for the jobs that find it again (``xmp_feedback.PickRunXmp``:
    feedback-from-xmp, unpick)."""
    p.add_argument(
        "--xmp",
        choices=["mirror", "beside", "embed"],
        help="where pick put them (default: from its summary; embed: in the JPEGs themselves)",
    )
    p.add_argument(
        "--xmp-naming", choices=["basename", "full"], help="pick's --xmp-naming (default basename)"
    )
    p.add_argument("--input-root", help="mirror: the folder pick mirrored paths from")


def add_feedback_from_xmp_parser(subparsers: SubParsers) -> None:
    """``keeper feedback-from-xmp``: a photographer's sidecar culls -> feedback (jobs.xmp_feedback)."""
    p = subparsers.add_parser(
        "feedback-from-xmp",
        help="record the ratings a person gave in a photo tool to a pick run's XMP sidecars "
        "as feedback",
        description="Read the XMP sidecars of a keeper pick run (placed as pick placed them), "
        "turn the ratings a person changed (rejected, keeper of its group, accepted) into "
        "decisions under ROOT/events with their offers under ROOT/offers, as the review page "
        "records them. Running it again records only what changed. A flag given here "
        "overrides --config.",
    )
    p.add_argument("--config", help="YAML config (XmpFeedbackConfig fields)")
    p.add_argument("--run", help="the keeper pick output folder (required)")
    p.add_argument("--feedback", help="feedback root to write: ROOT/events, ROOT/offers (required)")
    p.add_argument("--client", help="who decided, as the events name them (default xmp)")
    _add_pick_run_xmp_arguments(p)
    _runs_job(p, "xmp_feedback")


def add_unpick_parser(subparsers: SubParsers) -> None:
    """``keeper unpick``: keeper's fields out of a pick run's XMP again (jobs.unpick)."""
    p = subparsers.add_parser(
        "unpick",
        help="undo what a keeper pick run wrote into XMP: its fields out of every sidecar and "
        "JPEG, a person's ratings kept",
        description="Remove keeper's fields (and the ratings and labels keeper set, where they "
        "still hold its values) from the XMP sidecars and JPEGs a keeper pick run wrote, found "
        "as pick placed them; a sidecar left empty is deleted, a JPEG left with an empty packet "
        "loses its XMP segment. Every other field, and a rating a person gave, stays. A flag "
        "given here overrides --config.",
    )
    p.add_argument("--config", help="YAML config (UnpickConfig fields)")
    p.add_argument("--run", help="the keeper pick output folder (required)")
    p.add_argument(
        "--dry-run", action=_BOOL, help="say what would change; write nothing (default off)"
    )
    p.add_argument(
        "--keepers",
        action=_BOOL,
        help="also remove keeper's copies and links from the run's --copy-keepers / "
        "--link-keepers folder (a copy changed since stays; default off)",
    )
    _add_pick_run_xmp_arguments(p)
    _runs_job(p, "unpick")


def add_ab_report_parser(subparsers: SubParsers) -> None:
    """``keeper ab-report``: champion and challenger measured on decisions (jobs.ab_report)."""
    p = subparsers.add_parser(
        "ab-report",
        help="per-arm online figures (top-1, acceptance, click-through) from a feedback root",
        description="Join what the server offered (ROOT/offers) to people's standing decisions "
        "(ROOT/events) and print each A/B arm's online top-1, acceptance, click-through, "
        "zero-result rate and mean keeper rank with exact intervals, then the challenger's gain.",
    )
    p.add_argument("--config", help="YAML config (ABReportConfig fields)")
    p.add_argument("--feedback", help="feedback root: ROOT/offers and ROOT/events (required)")
    p.add_argument("--since", help="only answers offered at or after this ISO 8601 time")
    p.add_argument("--until", help="only answers offered before this ISO 8601 time")
    p.add_argument("--confidence", type=float, help="coverage of every interval (default 0.95)")
    p.add_argument("--json-out", help="also write the report here (path or s3://)")
    _runs_job(p, "ab_report")


# --------------------------------------------------------------------------------------------
# keeper demo, evaluate, promote: flags become the job's typed config


def add_demo_parser(subparsers: SubParsers) -> None:
    """``keeper demo``: the offline end-to-end demo (keeper_train.jobs.demo)."""
    p = subparsers.add_parser(
        "demo",
        help="run the offline best-of-series demo end to end",
        description="Generate a corpus, embed it on Ray Data, score it, train a head on Ray Train, "
        "promote it through the registry gate and evaluate it (defaults: DemoConfig).",
    )
    p.add_argument("--out", help="output folder: corpus, embeddings, reports (default keeper-demo)")
    p.add_argument("--model", help="ModelSpec ARCH[:WEIGHTS] (default keeper-tiny:random)")
    p.add_argument("--series", type=int, help="series in the generated corpus (default 150)")
    p.add_argument("--seed", type=int, help="corpus seed (default 0)")
    p.add_argument("--manifest", help="use this series manifest instead of generating a corpus")
    p.add_argument("--batch-size", type=int, help="images per embedding forward pass")
    p.add_argument("--report-series", type=int, help="series shown in the reports (default 60)")
    p.add_argument("--ray-address", help="join this Ray cluster (default: local)")
    p.add_argument("--epochs", type=int, help="training epochs of the ranking head (default 40)")
    p.add_argument("--model-name", help="registered model name (default keeper-demo-ranker)")

    def run(args: argparse.Namespace) -> int:
        from keeper_train.jobs import demo

        return demo.run(validated(demo.DemoConfig, given(args, dests(p))))

    p.set_defaults(func=run)


def _add_registry_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else embedded)"
    )
    p.add_argument(
        "--data-dir", help="embedded MLflow store when no tracking URI is set (default keeper-data)"
    )
    p.add_argument(
        "--json",
        dest="json_out",
        metavar="PATH",
        help="also write the results here (path or s3://)",
    )


def add_evaluate_parser(subparsers: SubParsers) -> None:
    """``keeper evaluate``: logged or registered rankers vs the baselines (jobs.evaluate)."""
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate registered ranker versions on a labelled series manifest, in one table",
        description="Score every series with each model, beside the sharpness rule and random: "
        "one table, one row per model.",
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="URI",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, or a logged model URI (runs:/..., "
        "models:/m-...); repeat it to compare several models on the same series (a version "
        "named twice is evaluated once)",
    )
    p.add_argument("--embeddings", required=True, help="output of keeper embed")
    p.add_argument("--series", required=True, help="labelled series manifest (CSV/Parquet)")
    p.add_argument(
        "--html", help="write the series report (thumbnails, keeper, every model's pick) here"
    )
    p.add_argument("--report-series", type=int, help="series shown in the report (default 60)")
    _add_registry_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from keeper_train.jobs import evaluate

        cfg = validated(evaluate.EvaluateConfig, given(args, dests(p)))
        print(evaluate.format_summary(evaluate.run(cfg)))
        return 0

    p.set_defaults(func=run)


def add_promote_parser(subparsers: SubParsers) -> None:
    """``keeper promote``: gate @challenger against @champion, or roll back (jobs.promote)."""
    p = subparsers.add_parser(
        "promote",
        help="promote @challenger to @champion if it is surely better, or --rollback",
        description="Evaluate @challenger and @champion on the same held-out series; move "
        "@champion to the challenger only if top-1 gains at least --min-gain, the 95% CI of the "
        "gain (exact, from the series where the two disagree) excludes 0, and MRR does not "
        "regress. Series the challenger was trained or validated on are refused.",
    )
    p.add_argument("name", help="registered model name")
    p.add_argument("--embeddings", help="output of keeper embed (to evaluate on)")
    p.add_argument(
        "--champion-embeddings",
        help="the champion's own keeper embed output, where its embedding spec is not the "
        "challenger's (each is scored on its own table, over the series complete in both)",
    )
    p.add_argument("--series", help="held-out labelled series manifest (CSV/Parquet)")
    p.add_argument(
        "--min-gain",
        type=float,
        help="top-1 gain over the champion needed, absolute (default 0.01 = 1 point)",
    )
    p.add_argument(
        "--ci-gate",
        action=_BOOL,
        help="require the gain's CI lower bound above 0 (default on)",
    )
    p.add_argument("--confidence", type=float, help="coverage of the gain's CI (default 0.95)")
    p.add_argument("--version", help="judge this version instead of @challenger")
    p.add_argument(
        "--force", action=_BOOL, help="with --version: allow a version that was rolled back"
    )
    p.add_argument("--rollback", action=_BOOL, help="move @champion back to the previous champion")
    p.add_argument(
        "--online", help="a serving feedback root: also gate on the A/B's online top-1 gain"
    )
    p.add_argument(
        "--min-online-gain", type=float, help="online top-1 gain needed, absolute (default 0)"
    )
    p.add_argument(
        "--exit-code",
        action=_BOOL,
        help="exit 4 when the gate rejects the challenger (for CI pipelines; default: exit 0 "
        "whatever the decision, which --json records)",
    )
    _add_registry_arguments(p)

    def run(args: argparse.Namespace) -> int:
        from keeper_train.jobs import promote

        cfg = validated(promote.PromoteConfig, given(args, dests(p)))
        result = promote.run(cfg)
        print(promote.format_outcome(result))
        return promote.exit_status(result, exit_code=cfg.exit_code)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# keeper pick: flags become key=value overrides of the job's YAML config

PICK_NESTED = {"max_gap_s": "grouping.max_gap_s", "min_similarity": "grouping.min_similarity"}


def add_pick_parser(subparsers: SubParsers) -> None:
    """``keeper pick``: cull a photo library (keeper_train.jobs.pick)."""
    p = subparsers.add_parser(
        "pick",
        help="cull a photo library: group bursts, keep the best, flag duplicates and failures",
        description="Embed a folder, s3:// prefix or manifest of photos (resumable), group them "
        "into bursts/scenes by capture time and similarity, rank each group with the registered "
        "champion (or a zero-shot rule, labelled as such), and write a picks table, an HTML "
        "contact sheet and XMP sidecars. Originals are never modified, unless --xmp embed "
        "asks for keeper's XMP inside JPEG originals. A flag given here "
        "overrides --config; one not given leaves the config's value alone.",
    )
    p.add_argument("--config", help="YAML config (PickJobConfig fields)")
    p.add_argument("--input", help="folder, s3:// prefix, or CSV/Parquet manifest (required)")
    p.add_argument("--output", help="folder or s3:// prefix for the results (required)")
    p.add_argument(
        "--embeddings", help="embedding table to reuse and extend (default OUTPUT/table)"
    )
    p.add_argument(
        "--model", help="ranker MODEL_URI (default models:/keeper-ranker@champion if it exists)"
    )
    p.add_argument("--zero-shot", action=_BOOL, help="rank with the zero-shot rule")
    p.add_argument("--clip-model", help="ModelSpec to embed with (default: the ranker's)")
    p.add_argument("--max-gap-s", type=float, help="longest gap between shots of one burst (s)")
    p.add_argument("--min-similarity", type=float, help="lowest cosine between burst neighbours")
    p.add_argument(
        "--xmp",
        choices=["mirror", "beside", "embed", "none"],
        help="where the XMP goes: sidecars under OUTPUT/xmp (default) or beside the originals, "
        "none, or embed: into each JPEG original itself (Lightroom Classic reads a JPEG's "
        "rating only there; the one setting that writes originals), sidecars beside the rest",
    )
    p.add_argument("--xmp-naming", choices=["basename", "full"], help="IMG_1.xmp or IMG_1.CR2.xmp")
    p.add_argument(
        "--overwrite-ratings",
        action=_BOOL,
        help="replace ratings and labels a person gave in existing sidecars (default: kept)",
    )
    p.add_argument("--copy-keepers", metavar="DIR", help="copy the keepers here")
    p.add_argument("--link-keepers", metavar="DIR", help="link the keepers here (see --link-mode)")
    p.add_argument("--link-mode", choices=["hardlink", "symlink"], help="default hardlink")
    p.add_argument(
        "--io-threads", type=int, help="sidecars written at once (default 16; for S3 latency)"
    )
    p.add_argument("--batch-size", type=int, help="images per model forward pass")
    p.add_argument("--concurrency", type=int, help="model actors")
    p.add_argument("--num-gpus-per-worker", type=float, help="GPUs per model actor")
    p.add_argument("--limit", type=int, help="only the first N photos (smoke runs)")
    p.add_argument(
        "--prune",
        action=_BOOL,
        help="remove the embedding table's rows of photos no longer under --input",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: embedded store)")
    p.add_argument("--data-dir", help="embedded MLflow store when no tracking URI is set")
    p.add_argument("--ray-address", help="join this Ray cluster (default: local)")
    _runs_job(p, "pick", PICK_NESTED, overrides="any other PickJobConfig field as key=value")


# --------------------------------------------------------------------------------------------
# keeper select: flags become key=value overrides of the job's YAML config

SELECT_NESTED = {
    "top_n": "cascade.top_n",
    "top_k": "cascade.top_k",
    "min_relevance": "cascade.min_relevance",
    "vlm": "vlm.source",
    "vlm_device": "vlm.device",
}


def add_select_parser(subparsers: SubParsers) -> None:
    """``keeper select``: the selection cascade over an embedding table (jobs.select)."""
    p = subparsers.add_parser(
        "select",
        help="select the images matching text queries: CLIP stages on every row of an "
        "embedding table, a VLM judge on the top-N (Ray Data)",
        description="Score every row of a keeper embed table against each query with the "
        "selection cascade (CLIP relevance -> size/aspect heuristics -> near-duplicate removal "
        "-> rerank -> VLM judge on the top-N -> top-k), and write per query a scored table "
        "and an HTML page, plus a summary. A flag given here overrides --config; one not given "
        "leaves the config's value alone.",
    )
    p.add_argument("--config", help="YAML config (SelectJobConfig fields)")
    p.add_argument("--table", help="keeper embed's output folder or s3:// prefix (required)")
    p.add_argument(
        "--queries", help="YAML/JSON file of queries {name, positive, negative} (or in --config)"
    )
    p.add_argument("--output", help="folder or s3:// prefix for the results (required)")
    p.add_argument("--top-n", type=int, help="candidates the VLM judges per query")
    p.add_argument("--top-k", type=int, help="picks per query")
    p.add_argument("--min-relevance", type=float, help="drop calibrated CLIP scores below this")
    p.add_argument("--vlm", help="VLM judge: a local folder, s3:// prefix or hub id")
    p.add_argument("--vlm-device", choices=["cpu", "cuda"], help="where the VLM runs")
    p.add_argument("--batch-size", type=int, help="survivors per VLM actor batch")
    p.add_argument("--concurrency", type=int, help="VLM actors")
    p.add_argument("--num-gpus-per-vlm", type=float, help="GPUs per VLM actor")
    p.add_argument("--ray-address", help="join this Ray cluster (default: local)")
    _runs_job(
        p,
        "select",
        SELECT_NESTED,
        overrides="any other SelectJobConfig field as key=value",
    )
