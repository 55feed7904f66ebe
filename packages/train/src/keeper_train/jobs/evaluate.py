"""Evaluate logged or registered rankers on labelled series: one table, beside the baselines.

    keeper evaluate --model models:/keeper-ranker@champion \
        --embeddings keeper-demo/embeddings/keeper-tiny_random \
        --series keeper-demo/test-manifest.csv --json eval.json --html eval.html
    keeper evaluate --model models:/keeper-ranker@champion --model models:/keeper-ranker/7 \
        --embeddings ... --series ...        # several models, one row each, on the same series
    python -m keeper_train.jobs.evaluate ...       # the same command

Each model is loaded as Serve loads it: its files are downloaded (``registry.download_model``: no
code from the artifact store is imported, unpickled or run) and its ranker is built from
``ranker.json`` + safetensors; it predicts through MLflow's pyfunc interface under its logged
signature. An alias is resolved to its version first (and printed), so the version evaluated is
the one reported, and two URIs that name the same version are evaluated once. Every series of the
manifest whose images all have an embedding is scored by every model, and the table is the one
training prints: one row per model (``keeper-ranker v3 (mlp, embedding+quality)``), the sharpness
rule, random. Embeddings of another ModelSpec than a head was trained on are refused, never scored
(before any model is scored). A fine-tuned ranker (its own vision tower) reads and embeds each
``image_uri`` itself, so the table gives it only the rows and quality columns; it is judged by the
same numbers and the same promotion gate. Series a model was trained or validated on (its run's
recorded split) are counted and warned about, model by model: those numbers are not held-out
figures.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from keeper_core import registry, storage
from keeper_core.bestof import Comparison, compare_methods, write_report
from keeper_core.errors import DataError, KeeperError, ModelLoadError
from keeper_core.finetune import TunedRanker
from keeper_core.images import decode_image, read_image_bytes
from keeper_core.metrics import format_table
from keeper_core.ranker import RankerConfig, SeriesRanker, load_ranker
from keeper_train import tracking
from keeper_train.data import join_series

SHARPNESS = "sharpness rule"


class EvaluateConfig(BaseModel):
    """What ``keeper evaluate`` takes; the CLI's flags map onto these fields."""

    model_config = ConfigDict(extra="forbid")

    model: list[str] = Field(
        min_length=1,
        description="models:/NAME@ALIAS, models:/NAME/VERSION, or a logged model URI; one or a "
        "list of them (one table row per model, the first one's picks in the report first)",
    )
    embeddings: str = Field(description="output of keeper embed")
    series: str = Field(description="labelled series manifest (CSV/Parquet)")
    html: str | None = Field(None, description="write the series report here")
    report_series: int = Field(60, ge=1, le=500, description="series shown in the report")
    tracking_uri: str | None = None
    data_dir: str = Field("keeper-data", description="embedded MLflow store when none is set")
    json_out: str | None = Field(None, description="also write the summary here (path or s3://)")

    @field_validator("model", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value  # one URI stays valid

    @field_validator("model")
    @classmethod
    def _not_blank(cls, value: list[str]) -> list[str]:
        if any(not uri.strip() for uri in value):
            raise ValueError("a model URI must not be empty")
        return value

    @field_validator("embeddings", "series", "html", "json_out")
    @classmethod
    def _utf8_path(cls, v: str | None) -> str | None:
        return None if v is None else storage.utf8_path(v)  # the report and summary name them


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
    embedding table matches them), and by content (``image_id``, the file's sha256) where both
    sides have it: the same photos under another path (a mirror, a local copy of the bucket)
    are the same photos. Series ids alone are not evidence (two corpora generated alike both
    have an ``s00000``).

    Args:
        rows: the evaluation rows (``series_id, image_uri`` and ``image_id`` where known).
        split: a training run's ``series_id, image_uri, split`` rows, with ``image_id`` where the
            run recorded it (``tracking.training_split``).
    """
    by_split = {}
    hit = np.zeros(len(rows), dtype=bool)
    uris = rows["image_uri"].astype(str).map(storage.same_key)
    by_content = "image_id" in rows.columns and "image_id" in split.columns
    for name in ("train", "val"):
        part = split.loc[split["split"] == name]
        seen = {storage.same_key(str(u)) for u in part["image_uri"]}
        in_split = uris.isin(seen).to_numpy()
        if by_content:
            ids = set(part["image_id"].dropna().astype(str))
            in_split = in_split | rows["image_id"].astype(str).isin(ids).to_numpy()
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
    """A ranker behind MLflow's pyfunc interface, and where it came from."""

    ref: tracking.ModelRef
    pyfunc: Any  # mlflow.pyfunc.PyFuncModel over the ranker (see ``load_ref``)
    config: RankerConfig

    @property
    def tuned(self) -> bool:
        """A fine-tuned ranker: it embeds ``image_uri`` with its own tower."""
        return self.config.tower is not None

    @property
    def kind(self) -> str:
        return "fine-tuned" if self.tuned else "head"

    @property
    def label(self) -> str:
        """``NAME vN`` (or the URI): its key in metrics, predictions and the report."""
        return self.ref.label()

    @property
    def title(self) -> str:
        """Its row in the table: ``NAME vN (mlp, embedding+quality)``, ``NAME vN (fine-tuned
        lora, embedding)``."""
        tower = self.config.tower
        what = f"fine-tuned {tower.method}" if tower is not None else self.config.head.kind
        return f"{self.label} ({what}, {self.config.features})"

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


def common_series(a: EvalData, b: EvalData) -> tuple[EvalData, EvalData]:
    """Two joins of one manifest (two tables: a challenger on a new embedding spec beside the
    champion's), each kept to the series complete in both, so the two models are compared on
    the same series; ``dropped`` counts the rest of each.

    Raises:
        DataError: the two are not joins of one manifest, or no series is complete in both.
    """
    if a.manifest_sha256 != b.manifest_sha256:
        raise DataError(f"{a.series} and {b.series} are not one manifest", source=b.embeddings)
    keep = set(a.rows["series_id"]) & set(b.rows["series_id"])
    if not keep:
        raise DataError(
            f"no series has every image embedded in both {a.embeddings} and {b.embeddings}",
            source=a.series,
        )

    def only(d: EvalData) -> EvalData:
        rows = d.rows[d.rows["series_id"].isin(keep)].reset_index(drop=True)
        return replace(d, rows=rows, dropped=d.dropped + d.rows["series_id"].nunique() - len(keep))

    a, b = only(a), only(b)
    same = a.rows["image_uri"].astype(str).to_numpy() == b.rows["image_uri"].astype(str).to_numpy()
    if len(a.rows) != len(b.rows) or not same.all():
        raise DataError("the two tables joined the manifest's images otherwise", source=a.series)
    return a, b


def load_model(client: Any, uri: str) -> LoadedModel:
    """Resolve ``uri`` (alias -> version) and load it (see ``load_ref``).

    Raises:
        ModelLoadError: the URI does not resolve or load, or it is not a keeper series ranker
            (a head or a fine-tuned one).
    """
    return load_ref(client, tracking.resolve_model(client, uri))


class _RankerImpl:
    """The pyfunc implementation ``PyFuncModel.predict`` calls: keeper's own ``KeeperRankerModel``
    over a ranker loaded here, as MLflow's wrapper calls it once its ``load_context`` has run."""

    def __init__(self, python_model: Any) -> None:
        from mlflow.pyfunc import PythonModelContext

        self.python_model = python_model  # what PyFuncModel.unwrap_python_model returns
        self.context = PythonModelContext(artifacts={}, model_config=None)

    def predict(self, model_input: pd.DataFrame, params: Any = None) -> pd.DataFrame:
        out: pd.DataFrame = self.python_model.predict(self.context, model_input, params=params)
        return out


def load_ref(client: Any, ref: tracking.ModelRef) -> LoadedModel:
    """Load a resolved model: its files only, never its code.

    The artifacts are downloaded from ``client``'s store (``registry.download_model``: nothing is
    imported, unpickled or run; a model that is not a keeper ranker folder is refused), the ranker
    is built from ``ranker.json`` + safetensors (``load_ranker``: either kind), and it is wrapped
    as an ``mlflow.pyfunc.PyFuncModel`` with the MLmodel's metadata, so ``predict`` enforces the
    logged signature and calls ``KeeperRankerModel.predict`` as ``mlflow.pyfunc.load_model``'s
    model would, without running the stored ``mlflow_pyfunc.py``. The download is deleted once
    the ranker is loaded (it keeps no reference to its folder).

    Raises:
        ModelLoadError: (naming ``ref.uri``) the download failed, the model is not a keeper
            series ranker, or its ranker does not load.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model
    from mlflow.pyfunc import PyFuncModel

    from keeper_core.mlflow_pyfunc import KeeperRankerModel

    uri = ref.uri
    with tempfile.TemporaryDirectory(prefix="keeper-evaluate-") as d:
        root, folder = registry.download_model(client, ref, d)
        try:
            meta = Model.load(str(root))
        except Exception as e:  # MlflowException, OSError, YAML or schema errors: unreadable
            raise ModelLoadError(uri, f"cannot read {ref.load_uri}'s MLmodel: {e}") from e
        try:
            ranker = load_ranker(folder)
        except KeeperError as e:
            raise ModelLoadError(uri, str(e)) from e
        except ImportError as e:  # peft: keeper-core[finetune] is not installed here
            raise ModelLoadError(uri, f"{ref.label()} needs keeper-core[finetune]: {e}") from e
    if not isinstance(ranker, SeriesRanker | TunedRanker):
        raise ModelLoadError(uri, "not a keeper series ranker (keeper_core.ranker.load_ranker)")
    python_model = KeeperRankerModel()
    python_model.ranker = ranker  # what its load_context would have built from the same folder
    try:
        model = PyFuncModel(
            model_meta=meta, model_impl=_RankerImpl(python_model), model_id=meta.model_id
        )
    except MlflowException as e:
        raise ModelLoadError(uri, str(e)) from e
    return LoadedModel(ref=ref, pyfunc=model, config=ranker.config)


@dataclass
class Candidate:
    """A model to evaluate, loaded once however many of the URIs given name it."""

    model: LoadedModel
    uris: list[str]  # every URI given that resolved to it, in the order given


def load_models(client: Any, uris: Sequence[str]) -> list[Candidate]:
    """Resolve every URI (alias -> version), then load each distinct model once, in order.

    Raises:
        ModelLoadError: see ``load_model``; every URI is resolved before any model loads.
    """
    named: dict[str, list[tracking.ModelRef]] = {}
    for ref in [tracking.resolve_model(client, uri) for uri in uris]:
        named.setdefault(ref.load_uri, []).append(ref)
    return [Candidate(load_ref(client, refs[0]), [r.uri for r in refs]) for refs in named.values()]


def check_inputs(model: LoadedModel, data: EvalData) -> list[str]:
    """The columns of ``data.rows`` the model takes (see ``predict`` for what is refused)."""
    cfg = model.config
    if not model.tuned and cfg.features != "quality" and cfg.embedding_spec != data.spec:
        raise DataError(
            f"the embeddings are from {data.spec!r} but {model.label} was trained on "
            f"{cfg.embedding_spec!r}: embed the corpus with that spec (specs never mix; keeper "
            "promote scores a champion of another spec on its own table, --champion-embeddings)",
            source=data.embeddings,
        )
    cols = model.input_columns()
    missing = [c for c in cols if c not in data.rows.columns]
    if missing:
        raise DataError(f"{model.label} needs columns {missing}", source=data.embeddings)
    return cols


def predict(model: LoadedModel, data: EvalData) -> pd.DataFrame:
    """The model's ``series_id, image_uri, score, prob, rank`` for every row, in row order.

    A fine-tuned ranker embeds the images itself: the table's embeddings (of whatever spec) are
    not its input, only its rows and quality columns are.

    Raises:
        DataError: a head's embeddings come from another ModelSpec than the table's, the table
            lacks a column the model needs, or (fine-tuned) an image cannot be read.
    """
    cols = check_inputs(model, data)
    out = model.pyfunc.predict(data.rows[cols])
    uris = data.rows["image_uri"].astype(str).to_numpy()
    if len(out) != len(uris) or not (out["image_uri"].astype(str).to_numpy() == uris).all():
        raise DataError(f"{model.label} returned rows out of input order")
    # Its inputs were finite (a ranker refuses non-finite features), so a non-finite score is
    # the model's own failure. compare_methods leaves a series with one out for every method:
    # a model failing where it would lose would be compared, and promoted, on the rest only.
    broken = ~np.isfinite(out["score"].to_numpy(dtype=np.float64))
    if broken.any():
        raise DataError(
            f"{model.label} gave {int(broken.sum())} of {len(uris)} images a NaN or infinite "
            f"score (e.g. {uris[np.flatnonzero(broken)[0]]}): a broken model is not compared "
            "on the series it still scores",
            source=data.embeddings,
        )
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
        "label": model.label,
        "title": model.title,
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


@dataclass(frozen=True)
class TrainingCheck:
    """Whether a model's numbers on the evaluation series are held-out figures."""

    same_manifest: bool  # its training run read this very manifest
    overlap: Overlap | None  # series sharing images with its recorded split; None: none recorded

    def warning(self, label: str) -> str | None:
        if self.overlap is not None and self.overlap.series:
            return (
                f"{self.overlap.describe()} share images with {label}'s training split: "
                "these numbers are not held-out figures"
            )
        if self.same_manifest:
            return (
                f"{label} was trained on this manifest: these numbers include its training series"
            )
        return None


def training_check(client: Any, model: LoadedModel, data: EvalData) -> TrainingCheck:
    """Check ``data`` against what ``model``'s training run recorded (split, manifest hash)."""
    split = tracking.training_split(client, model.ref.run_id)
    return TrainingCheck(
        same_manifest=trained_on_same_manifest(client, model, data),
        overlap=split_overlap(data.rows, split) if split is not None else None,
    )


def thumbnail_source(uri: str) -> Image.Image | None:
    """The image for a report thumbnail, or None (a placeholder) when it cannot be read."""
    try:
        return decode_image(read_image_bytes(uri), draft_size=(256, 256))
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
    """Evaluate every model of ``cfg.model`` on ``cfg.embeddings`` + ``cfg.series``, in one table.

    Returns:
        The summary ``format_summary`` prints: ``models`` (each one's info, the URIs that named
        it, its metrics and warnings), ``metrics`` by model label (``NAME vN``) and for the
        sharpness rule, the ``table``, every ``warning``; ``model`` and the top-level
        ``trained_on_this_manifest`` / ``series_seen_in_training`` are the first model's.

    Raises:
        KeeperError: the data cannot be read, a model cannot be loaded, or a head's embedding
            spec is not the table's (refused before any model is scored).
    """
    import mlflow

    data = load_data(cfg.embeddings, cfg.series)  # a wrong path fails before the registry
    uri = tracking.tracking_uri(cfg.tracking_uri, cfg.data_dir)
    registry.use_tracking_store(uri)  # the client's store, for anything reading the global one
    client = mlflow.MlflowClient(uri)
    candidates = load_models(client, cfg.model)
    for c in candidates:
        check_inputs(c.model, data)
    preds = {c.model.label: predict(c.model, data) for c in candidates}
    comparison = compare(data, preds)
    checks = [training_check(client, c.model, data) for c in candidates]
    summary = summarise(data, candidates, checks, comparison, tracking_uri=uri)
    if cfg.html:
        notes = [
            f"{c.model.title}: {', '.join(c.uris)} ({c.model.ref.load_uri})" for c in candidates
        ]
        report = write_html(
            cfg.html,
            f"keeper evaluate: {', '.join(preds)} on {len(comparison.series)} series",
            data,
            comparison,
            preds,
            max_series=cfg.report_series,
            notes=[*notes, f"series {data.series}"],
            warnings=summary["warnings"],
        )
        summary["html"] = str(report)
    if cfg.json_out:
        storage.write_bytes(cfg.json_out, json.dumps(summary, indent=2).encode())
    return summary


def summarise(
    data: EvalData,
    candidates: Sequence[Candidate],
    checks: Sequence[TrainingCheck],
    comparison: Comparison,
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """The summary ``run`` returns (see there); the table's rows are the models' titles."""
    models = []
    for c, check in zip(candidates, checks, strict=True):
        warning = check.warning(c.model.label)
        models.append(
            {
                **model_info(c.model),
                "uris": list(c.uris),
                "trained_on_this_manifest": check.same_manifest,
                "series_seen_in_training": check.overlap.series if check.overlap else None,
                "metrics": comparison.results[c.model.label].as_dict(),
                "warnings": [warning] if warning else [],
            }
        )
    titles = {c.model.label: c.model.title for c in candidates}
    return {
        "model": model_info(candidates[0].model),
        "models": models,
        "tracking_uri": tracking_uri,
        "embeddings": data.embeddings,
        "series": data.series,
        "embedding_spec": data.spec,
        "trained_on_this_manifest": models[0]["trained_on_this_manifest"],
        "series_seen_in_training": models[0]["series_seen_in_training"],
        "series_scored": len(comparison.series),
        "series_left_out": comparison.left_out,
        "series_dropped": data.dropped,
        "metrics": {k: v.as_dict() for k, v in comparison.results.items()},
        "table": format_table({titles.get(k, k): v for k, v in comparison.results.items()}),
        "warnings": [w for m in models for w in m["warnings"]],
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """What ``keeper evaluate`` prints: the versions evaluated, the table, any warning."""
    lines = []
    for m in summary["models"]:
        if m["version"]:
            lines += [f"{uri} -> {m['name']} version {m['version']}" for uri in m["uris"]]
        if len(m["uris"]) > 1:
            lines.append(f"{m['label']}: named {len(m['uris'])} times, evaluated once")
        if m["kind"] == "fine-tuned":
            lines.append(
                f"{m['label']}: fine-tuned ranker ({m['method']} on {m['base_spec']}): "
                "embeds the images"
            )
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
