"""Evaluate any logged or registered ranker on a labelled series manifest, beside the baselines.

    python -m keeper_train.jobs.evaluate --model models:/keeper-ranker@champion \
        --embeddings keeper-demo/embeddings/keeper-tiny_random \
        --series keeper-demo/corpus/manifest.csv --json eval.json --html eval.html
    keeper evaluate --model models:/keeper-ranker/3 --embeddings ... --series ...

The model is loaded through MLflow's pyfunc flavour, as Serve loads it; an alias is resolved to
its version first (and printed), so the version evaluated is the one reported. Every series of the
manifest whose images all have an embedding is scored, and the table is the one training prints:
the model, the sharpness rule, random. Embeddings of another ModelSpec than the model was trained
on are refused, never scored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from keeper_core import storage
from keeper_core.bestof import Comparison, compare_methods, write_report
from keeper_core.errors import DataError, KeeperError, ModelLoadError
from keeper_core.images import decode_image
from keeper_core.ranker import RankerConfig, SeriesRanker
from keeper_train import tracking
from keeper_train.commands import add_evaluate_arguments
from keeper_train.data import join_series

SHARPNESS = "sharpness rule"


@dataclass
class EvalData:
    """Labelled rows to evaluate on: the manifest joined to the embedding table."""

    rows: pd.DataFrame  # join_series rows, 0..n-1 index, manifest order
    spec: str  # the table's embedding ModelSpec
    dropped: int  # series left out because an image has no embedding
    embeddings: str
    series: str
    manifest_sha256: str


@dataclass
class LoadedModel:
    """A pyfunc ranker and where it came from."""

    ref: tracking.ModelRef
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel
    config: RankerConfig

    def input_columns(self) -> list[str]:
        """The columns the model's signature takes (the ranker's own if it has none)."""
        schema = self.pyfunc.metadata.get_input_schema()
        if schema is not None and schema.has_input_names():
            return [str(c) for c in schema.input_names()]
        return ["series_id", "image_uri", "embedding", *self.config.quality_names]


def load_data(embeddings: str, series: str) -> EvalData:
    """Join a labelled series manifest to an embedding table (see ``join_series``)."""
    rows, spec, dropped, _ = join_series(embeddings, series)
    return EvalData(
        rows=rows,
        spec=spec,
        dropped=dropped,
        embeddings=embeddings,
        series=series,
        manifest_sha256=hashlib.sha256(storage.read_bytes(series)).hexdigest(),
    )


def load_model(client: Any, uri: str) -> LoadedModel:
    """Resolve ``uri`` (alias -> version) and load it with ``mlflow.pyfunc.load_model``.

    Raises:
        ModelLoadError: the URI does not resolve or load, or it is not a keeper series ranker.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = tracking.resolve_model(client, uri)
    try:
        model = mlflow.pyfunc.load_model(ref.load_uri)
    except (MlflowException, OSError) as e:
        raise ModelLoadError(uri, str(e)) from e
    # A models-from-code pyfunc wraps keeper_core.mlflow_pyfunc.KeeperRankerModel, whose
    # load_context built a SeriesRanker from ranker.json + safetensors.
    try:
        ranker = getattr(model.unwrap_python_model(), "ranker", None)
    except MlflowException:
        ranker = None
    if not isinstance(ranker, SeriesRanker):
        raise ModelLoadError(uri, "not a keeper series ranker (keeper_core.mlflow_pyfunc)")
    return LoadedModel(ref=ref, pyfunc=model, config=ranker.config)


def predict(model: LoadedModel, data: EvalData) -> pd.DataFrame:
    """The model's ``series_id, image_uri, score, prob, rank`` for every row, in row order.

    Raises:
        DataError: the table's embeddings come from another ModelSpec than the model's, or the
            table lacks a column the model needs.
    """
    cfg = model.config
    if cfg.features != "quality" and cfg.embedding_spec != data.spec:
        raise DataError(
            f"the embeddings are from {data.spec!r} but {model.ref.label()} was trained on "
            f"{cfg.embedding_spec!r}: embed the corpus with that spec (specs never mix)",
            source=data.embeddings,
        )
    cols = model.input_columns()
    missing = [c for c in cols if c not in data.rows.columns]
    if missing:
        raise DataError(f"{model.ref.label()} needs columns {missing}", source=data.embeddings)
    out = model.pyfunc.predict(data.rows[cols])
    uris = data.rows["image_uri"].astype(str).to_numpy()
    if len(out) != len(uris) or not (out["image_uri"].astype(str).to_numpy() == uris).all():
        raise DataError(f"{model.ref.label()} returned rows out of input order")
    return out.reset_index(drop=True)


def compare(data: EvalData, predictions: Mapping[str, pd.DataFrame]) -> Comparison:
    """Each model's scores and the sharpness rule over the same series (random is implied)."""
    scores = {name: p["score"].to_numpy(dtype=np.float64) for name, p in predictions.items()}
    scores[SHARPNESS] = data.rows["sharpness"].to_numpy(dtype=np.float64)
    return compare_methods(data.rows, scores)


def model_info(model: LoadedModel) -> dict[str, Any]:
    """What was evaluated, for JSON output and printing."""
    r = model.ref
    return {
        "uri": r.uri,
        "loaded": r.load_uri,
        "name": r.name,
        "version": r.version,
        "alias": r.alias,
        "run_id": r.run_id,
        "embedding_spec": model.config.embedding_spec,
        "features": model.config.features,
        "head": model.config.head.kind,
    }


def trained_on_same_manifest(client: Any, model: LoadedModel, data: EvalData) -> bool:
    """Whether the model's training run read this very manifest (its numbers include train data)."""
    from mlflow.exceptions import MlflowException

    if not model.ref.run_id:
        return False
    try:
        tags = client.get_run(model.ref.run_id).data.tags
    except MlflowException:  # a deleted run: the model version outlives it
        return False
    return bool(tags.get("keeper.manifest_sha256") == data.manifest_sha256)


def thumbnail_source(uri: str) -> Image.Image | None:
    """The image for a report thumbnail, or None (a placeholder) when it cannot be read."""
    try:
        return decode_image(storage.read_bytes(uri), draft_size=(256, 256))
    except KeeperError:
        return None


def write_html(
    path: str,
    title: str,
    data: EvalData,
    comparison: Comparison,
    predictions: Mapping[str, pd.DataFrame],
    *,
    max_series: int,
    notes: Sequence[str] = (),
    warnings: Sequence[str] = (),
) -> Path:
    """The series report: thumbnails, the true keeper, each method's pick, model probabilities."""
    shown = {name: p["prob"].to_numpy(dtype=np.float64) for name, p in predictions.items()}
    shown[SHARPNESS] = data.rows["sharpness"].to_numpy(dtype=np.float64)
    return write_report(
        path,
        title,
        comparison,
        shown,
        thumbnail_source,
        max_series=max_series,
        notes=[*notes, "Model values are probabilities within the series; sharpness is raw."],
        warnings=warnings,
        note_column="degradation" if "degradation" in data.rows.columns else None,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate ``args.model`` on ``args.embeddings`` + ``args.series``; returns the summary."""
    import mlflow

    uri = tracking.tracking_uri(args.tracking_uri, args.data_dir)
    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve against the global tracking URI
    client = mlflow.MlflowClient(uri)
    data = load_data(args.embeddings, args.series)
    model = load_model(client, args.model)
    if model.ref.version:
        print(f"{args.model} -> {model.ref.name} version {model.ref.version}")
    label = model.ref.label()
    preds = {label: predict(model, data)}
    comparison = compare(data, preds)
    warnings = []
    same = trained_on_same_manifest(client, model, data)
    if same:
        warnings.append(
            f"{label} was trained on this manifest: these numbers include its training series"
        )
    summary: dict[str, Any] = {
        "model": model_info(model),
        "tracking_uri": uri,
        "embeddings": data.embeddings,
        "series": data.series,
        "embedding_spec": data.spec,
        "trained_on_this_manifest": same,
        "series_scored": len(comparison.series),
        "series_left_out": comparison.left_out,
        "series_dropped": data.dropped,
        "metrics": {k: v.as_dict() for k, v in comparison.results.items()},
        "table": comparison.table(),
    }
    if args.html:
        report = write_html(
            args.html,
            f"keeper evaluate: {label} on {len(comparison.series)} series",
            data,
            comparison,
            preds,
            max_series=args.report_series,
            notes=[f"model {args.model} ({model.ref.load_uri}); series {data.series}"],
            warnings=warnings,
        )
        summary["html"] = str(report)
    print(summary["table"])
    for w in warnings:
        print(f"WARNING: {w}")
    if args.json:
        storage.write_bytes(args.json, json.dumps(summary, indent=2).encode())
    return summary


def run_cli(args: argparse.Namespace) -> int:
    """``run`` with keeper's exit codes: 0 done, 2 refused (the reason on stderr)."""
    try:
        run(args)
    except KeeperError as e:
        print(f"keeper evaluate: error: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.evaluate --model URI --embeddings DIR --series MANIFEST``."""
    parser = argparse.ArgumentParser(
        prog="python -m keeper_train.jobs.evaluate", description=__doc__.split("\n")[0]
    )
    add_evaluate_arguments(parser)
    return run_cli(parser.parse_args(argv))


if __name__ == "__main__":
    from keeper_train.jobs import evaluate

    sys.exit(evaluate.main())
