"""Evaluate any logged or registered ranker on a labelled series manifest, beside the baselines.

    keeper evaluate --model models:/keeper-ranker@champion \
        --embeddings keeper-demo/embeddings/keeper-tiny_random \
        --series keeper-demo/test-manifest.csv --json eval.json --html eval.html
    keeper evaluate --model models:/keeper-ranker/3 --embeddings ... --series ...
    python -m keeper_train.jobs.evaluate ...       # the same command

The model is loaded through MLflow's pyfunc flavour, as Serve loads it; an alias is resolved to
its version first (and printed), so the version evaluated is the one reported. Every series of the
manifest whose images all have an embedding is scored, and the table is the one training prints:
the model, the sharpness rule, random. Embeddings of another ModelSpec than the model was trained
on are refused, never scored. A fine-tuned ranker (its own vision tower) reads and embeds each
``image_uri`` itself, so the table gives it only the rows and quality columns; it is judged by the
same numbers and the same promotion gate. Series the model was trained or validated on (its run's
recorded split) are counted and warned about: those numbers are not held-out figures.
"""

from __future__ import annotations

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
from pydantic import BaseModel, ConfigDict, Field

from keeper_core import storage
from keeper_core.bestof import Comparison, compare_methods, write_report
from keeper_core.errors import DataError, KeeperError, ModelLoadError
from keeper_core.finetune import TunedRanker
from keeper_core.images import decode_image
from keeper_core.ranker import RankerConfig, SeriesRanker
from keeper_train import tracking
from keeper_train.data import join_series

SHARPNESS = "sharpness rule"


class EvaluateConfig(BaseModel):
    """What ``keeper evaluate`` takes; the CLI's flags map onto these fields."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        description="models:/NAME@ALIAS, models:/NAME/VERSION, or a logged model URI"
    )
    embeddings: str = Field(description="output of keeper embed")
    series: str = Field(description="labelled series manifest (CSV/Parquet)")
    html: str | None = Field(None, description="write the series report here")
    report_series: int = Field(60, ge=1, description="series shown in the report")
    tracking_uri: str | None = None
    data_dir: str = Field("keeper-data", description="embedded MLflow store when none is set")
    json_out: str | None = Field(None, description="also write the summary here (path or s3://)")


@dataclass(frozen=True)
class Overlap:
    """Series of an evaluation set that share an image with a model's train or val split."""

    series: int  # series with at least one such image
    of: int  # series checked
    by_split: dict[str, int]  # split -> series with an image in it

    def describe(self) -> str:
        parts = ", ".join(f"{n} with {split} images" for split, n in self.by_split.items() if n)
        return f"{self.series} of {self.of} series ({parts})"


def split_overlap(rows: pd.DataFrame, split: pd.DataFrame) -> Overlap:
    """Which series of ``rows`` share an image with the train or val rows of a recorded split.

    Images are matched by ``storage.same_key`` of their resolved ``image_uri`` (as the join to the
    embedding table matches them): series ids alone are not evidence (two corpora
    generated alike both have an ``s00000``).

    Args:
        rows: the evaluation rows (``series_id, image_uri``).
        split: a training run's ``series_id, image_uri, split`` rows (``tracking.training_split``).
    """
    by_split = {}
    hit = np.zeros(len(rows), dtype=bool)
    uris = rows["image_uri"].astype(str).map(storage.same_key)
    for name in ("train", "val"):
        seen = {storage.same_key(str(u)) for u in split.loc[split["split"] == name, "image_uri"]}
        in_split = uris.isin(seen).to_numpy()
        by_split[name] = int(rows.loc[in_split, "series_id"].nunique())
        hit |= in_split
    return Overlap(
        series=int(rows.loc[hit, "series_id"].nunique()),
        of=int(rows["series_id"].nunique()),
        by_split=by_split,
    )


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

    @property
    def tuned(self) -> bool:
        """A fine-tuned ranker: it embeds ``image_uri`` with its own tower."""
        return self.config.tower is not None

    @property
    def kind(self) -> str:
        return "fine-tuned" if self.tuned else "head"

    def input_columns(self) -> list[str]:
        """The columns the model's signature takes (the ranker's own if it has none)."""
        schema = self.pyfunc.metadata.get_input_schema()
        if schema is not None and schema.has_input_names():
            return [str(c) for c in schema.input_names()]
        quality = self.config.quality_names if self.config.features != "embedding" else []
        return ["series_id", "image_uri", *([] if self.tuned else ["embedding"]), *quality]


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
        ModelLoadError: the URI does not resolve or load, or it is not a keeper series ranker
            (a head or a fine-tuned one).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    ref = tracking.resolve_model(client, uri)
    try:
        model = mlflow.pyfunc.load_model(ref.load_uri)
    except (MlflowException, OSError) as e:
        raise ModelLoadError(uri, str(e)) from e
    # A models-from-code pyfunc wraps keeper_core.mlflow_pyfunc.KeeperRankerModel, whose
    # load_context built the ranker from ranker.json + safetensors (load_ranker: either kind).
    try:
        ranker = getattr(model.unwrap_python_model(), "ranker", None)
    except MlflowException:
        ranker = None
    if not isinstance(ranker, SeriesRanker | TunedRanker):
        raise ModelLoadError(uri, "not a keeper series ranker (keeper_core.mlflow_pyfunc)")
    return LoadedModel(ref=ref, pyfunc=model, config=ranker.config)


def predict(model: LoadedModel, data: EvalData) -> pd.DataFrame:
    """The model's ``series_id, image_uri, score, prob, rank`` for every row, in row order.

    A fine-tuned ranker embeds the images itself: the table's embeddings (of whatever spec) are
    not its input, only its rows and quality columns are.

    Raises:
        DataError: a head's embeddings come from another ModelSpec than the table's, the table
            lacks a column the model needs, or (fine-tuned) an image cannot be read.
    """
    cfg = model.config
    if not model.tuned and cfg.features != "quality" and cfg.embedding_spec != data.spec:
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
    tower = model.config.tower
    return {
        "uri": r.uri,
        "loaded": r.load_uri,
        "name": r.name,
        "version": r.version,
        "alias": r.alias,
        "run_id": r.run_id,
        "kind": model.kind,
        "method": tower.method if tower is not None else None,
        "base_spec": tower.base_spec if tower is not None else None,
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


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``cfg.model`` on ``cfg.embeddings`` + ``cfg.series``; ``format_summary`` prints it.

    Raises:
        KeeperError: the data cannot be read, the model cannot be loaded, or specs differ.
    """
    import mlflow

    data = load_data(cfg.embeddings, cfg.series)  # a wrong path fails before the registry
    uri = tracking.tracking_uri(cfg.tracking_uri, cfg.data_dir)
    mlflow.set_tracking_uri(uri)  # models:/ URIs resolve against the global tracking URI
    client = mlflow.MlflowClient(uri)
    model = load_model(client, cfg.model)
    label = model.ref.label()
    preds = {label: predict(model, data)}
    comparison = compare(data, preds)
    warnings = []
    same = trained_on_same_manifest(client, model, data)
    split = tracking.training_split(client, model.ref.run_id)
    overlap = split_overlap(data.rows, split) if split is not None else None
    if overlap is not None and overlap.series:
        warnings.append(
            f"{overlap.describe()} share images with {label}'s training split: "
            "these numbers are not held-out figures"
        )
    elif same:
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
        "series_seen_in_training": overlap.series if overlap is not None else None,
        "series_scored": len(comparison.series),
        "series_left_out": comparison.left_out,
        "series_dropped": data.dropped,
        "metrics": {k: v.as_dict() for k, v in comparison.results.items()},
        "table": comparison.table(),
        "warnings": warnings,
    }
    if cfg.html:
        report = write_html(
            cfg.html,
            f"keeper evaluate: {label} on {len(comparison.series)} series",
            data,
            comparison,
            preds,
            max_series=cfg.report_series,
            notes=[f"model {cfg.model} ({model.ref.load_uri}); series {data.series}"],
            warnings=warnings,
        )
        summary["html"] = str(report)
    if cfg.json_out:
        storage.write_bytes(cfg.json_out, json.dumps(summary, indent=2).encode())
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    """What ``keeper evaluate`` prints: the version evaluated, the table, any warning."""
    m = summary["model"]
    lines = [f"{m['uri']} -> {m['name']} version {m['version']}"] if m["version"] else []
    if m.get("kind") == "fine-tuned":
        lines.append(f"fine-tuned ranker ({m['method']} on {m['base_spec']}): embeds the images")
    lines.append(summary["table"])
    lines += [f"WARNING: {w}" for w in summary["warnings"]]
    if "html" in summary:
        lines.append(f"report: {summary['html']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.evaluate ARGS`` is ``keeper evaluate ARGS``."""
    from keeper_core.cli import main as keeper

    return keeper(["evaluate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
