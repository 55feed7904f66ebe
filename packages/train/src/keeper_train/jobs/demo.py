"""The main job, offline on embedded defaults: which shot of each burst is the keeper?

    python -m keeper_train.jobs.demo --out keeper-demo          # what `make demo` runs
    python -m keeper_train.jobs.demo --model ViT-B-32:laion2b_s34b_b79k   # real weights
    keeper demo ...                                             # the same command

1. generates a best-of-series corpus from real photos (scikit-image's, all 17): bursts of 2-5
   shots, one clean, the others degraded;
2. embeds it with the Ray Data embed job (keeper_train.jobs.embed) on a local Ray: safe decode,
   quality features, CLIP embeddings, Parquet;
3. scores every image with the aesthetic prompt set, ranks every burst by (a) the sharpness rule
   and (b) the aesthetic prompt score, prints top-1/2/3, mean rank and MRR beside the random
   baseline, and writes an HTML report;
4. learns the keeper: trains an MLP head on embedding + quality features on Ray Train
   (keeper_train.jobs.train_head, tracked in MLflow, registered as @challenger) with whole base
   photos held out for val and test (``DEMO_VAL_PHOTOS``, ``DEMO_TEST_PHOTOS``: a split by series
   would put other bursts of the same scene in train and test, which inflates top-1 by 10-15
   points, docs/training.md), promotes it through the registry gate on those test series
   (keeper_train.jobs.promote), and evaluates @champion there with an HTML report of its picks
   (keeper_train.jobs.evaluate).

With ``--manifest`` the split is by series (a manifest of your own need not have base photos) and
the table says what that costs. With random weights (the default, ``keeper-tiny:random``) prompt
scores are meaningless: it says so.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, field_validator

from keeper_core import storage
from keeper_core.bestof import RANDOM_WEIGHTS_WARNING, Comparison, compare_methods, write_report
from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import DataError
from keeper_core.models import ModelSpec, spec_field
from keeper_core.scoring import AestheticConfig, aesthetic_scores
from keeper_core.series import read_series_manifest
from keeper_core.synthetic import PHOTOS, generate_corpus
from keeper_train.jobs import embed, evaluate

#: Base photos held out of training: every burst of these is val or test, never train. A mix of
#: colour and greyscale scenes; with 150 series, 26 val and 35 test series.
DEMO_VAL_PHOTOS = ("coffee", "moon", "text")
DEMO_TEST_PHOTOS = ("chelsea", "motorcycle", "coins", "gravel")
SERIES_SPLIT_CAVEAT = (
    "split by series: other bursts of the same scenes are in train, which inflates top-1 by "
    "10-15 points (docs/training.md)"
)


class DemoConfig(BaseModel):
    """What ``keeper demo`` takes; the CLI's flags map onto these fields."""

    model_config = ConfigDict(extra="forbid")

    out: str = Field("keeper-demo", description="output folder: corpus, embeddings, reports")
    model: str = Field("keeper-tiny:random", description="ModelSpec ARCH[:WEIGHTS]")
    series: int = Field(
        150,
        ge=len(PHOTOS),
        description="series in the generated corpus (a burst per photo at least)",
    )
    seed: int = 0
    manifest: str | None = Field(None, description="a series manifest instead of a corpus")
    batch_size: int = Field(64, ge=1)
    report_series: int = Field(60, ge=1, le=500, description="series shown in the reports")
    ray_address: str | None = None
    epochs: int = Field(40, ge=1, description="training epochs of the ranking head")
    model_name: str = Field("keeper-demo-ranker", description="registered model name")

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return spec_field(v)  # embed's own check: an unknown spec fails before work


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Inside the block, keep library chatter the demo already summarises off the screen.

    MLflow's INFO lines and artifact-download bars, open_clip's "no pretrained weights" (the demo
    prints its own RANDOM warning) and two known deprecation hints. Ray's worker output goes to
    Ray's log files (``cluster.init_ray``); Ray Data's progress stays. Restored on exit.
    """
    import mlflow  # noqa: F401 - configures its loggers on import, which must come first

    bar = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(bar)
    os.environ[bar] = "false"
    mlflow_log = logging.getLogger("mlflow")
    level = mlflow_log.level
    mlflow_log.setLevel(logging.WARNING)
    root = logging.getLogger()

    def not_random_init(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded for model")

    root.addFilter(not_random_init)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer")
            yield
    finally:
        root.removeFilter(not_random_init)
        mlflow_log.setLevel(level)
        if before is None:
            os.environ.pop(bar, None)
        else:
            os.environ[bar] = before


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:80]


def zero_shot(
    spec: ModelSpec, manifest: pd.DataFrame, embeddings: str
) -> tuple[Comparison, dict[str, np.ndarray]]:
    """The sharpness rule and the aesthetic prompt score on every series (no training)."""
    table = storage.read_parquet(storage.join(embeddings, embed.EMBEDDINGS)).to_pandas()
    rows = manifest[["image_uri"]].merge(table, on="image_uri", how="left")
    has = rows["embedding"].notna().to_numpy()
    aesthetic = np.full(len(rows), np.nan)
    if has.any():
        emb = np.stack(list(rows.loc[has, "embedding"])).astype(np.float32)
        config = AestheticConfig.default()
        prompts = ClipEmbedder(spec).prompt_embeddings(config.all_prompts())
        aesthetic[has] = aesthetic_scores(emb, prompts, config).total
    scores = {
        "sharpness rule": rows["sharpness"].to_numpy(dtype=np.float64),
        "aesthetic prompts": aesthetic,
    }
    return compare_methods(manifest, scores), scores


def run(cfg: DemoConfig) -> int:
    """The demo end to end; prints keeper's progress and summaries, returns the exit code."""
    with quiet_libraries():
        return _run(cfg)


def _run(cfg: DemoConfig) -> int:
    out = Path(cfg.out)
    spec = ModelSpec.parse(cfg.model)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    manifest_uri = cfg.manifest or str(
        generate_corpus(out / "corpus", n_series=cfg.series, seed=cfg.seed, photos=PHOTOS)
    )
    manifest = read_series_manifest(manifest_uri)
    timings["corpus"] = time.perf_counter() - t0
    print(
        f"corpus: {manifest['series_id'].nunique()} series, {len(manifest)} images ({manifest_uri})",
        flush=True,
    )

    t = time.perf_counter()
    ecfg = embed.EmbedConfig(
        input=manifest_uri,
        output=str(out / "embeddings" / _slug(str(spec))),
        model=str(spec),
        batch_size=cfg.batch_size,
        rows_per_file=256,
        ray_address=cfg.ray_address,
    )
    summary = embed.run(ecfg)
    print(embed.format_summary(summary), flush=True)
    timings["embed job"] = time.perf_counter() - t

    t = time.perf_counter()
    comparison, scores = zero_shot(spec, manifest, ecfg.output)
    timings["score"] = time.perf_counter() - t

    t = time.perf_counter()
    warnings = [RANDOM_WEIGHTS_WARNING.format(spec=spec)] if spec.is_random else []
    c = summary.counts
    notes = [
        f"{c.in_} images: {c.skipped} already embedded, {c.embedded} embedded, "
        f"{c.failed} failed this run; {comparison.left_out} series left out "
        "(an image without a score)."
    ]
    report = write_report(
        out / "report.html",
        f"keeper demo: best-of-series on {len(comparison.series)} series ({spec})",
        comparison,
        scores,
        evaluate.thumbnail_source,
        max_series=cfg.report_series,
        warnings=warnings,
        notes=notes,
    )
    timings["report"] = time.perf_counter() - t

    t = time.perf_counter()
    print(f"training the ranking head on Ray Train (up to {cfg.epochs} epochs) ...", flush=True)
    learned = learn_the_keeper(cfg, out, ecfg.output, manifest_uri, manifest)
    timings["train+promote+evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    result = {
        "model_spec": str(spec),
        "random_weights": spec.is_random,
        "embed": summary.model_dump(mode="json", by_alias=True),
        "series_scored": len(comparison.series),
        "series_left_out": comparison.left_out,
        "metrics": {k: v.as_dict() for k, v in comparison.results.items()},
        "learned": learned,
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    (out / "metrics.json").write_text(json.dumps(result, indent=2))

    print()
    print("All series, zero-shot rules:")
    print(comparison.table())
    print()
    print(f"Held-out test series ({learned['split']}), the trained head beside its baselines:")
    print(learned["train"]["table"])
    print()
    print(f"registry: {learned['promotion']}")
    print("  ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    for w in warnings:
        print(f"WARNING: {w}")
    print(f"report:  {report.resolve()}")
    print(f"ranker:  {learned['evaluation']['html']}")
    print(f"metrics: {(out / 'metrics.json').resolve()}")
    return 0 if summary.status == "ok" else embed.EXIT_TOO_MANY_FAILURES


def learn_the_keeper(
    cfg: DemoConfig, out: Path, embeddings: str, manifest_uri: str, manifest: pd.DataFrame
) -> dict[str, Any]:
    """Train (Ray Train) -> register @challenger -> promote on the test split -> evaluate @champion.

    The promotion and evaluation series are the test series the training run recorded (its
    ``split.csv``), so all three numbers are about the same held-out bursts.
    """
    import mlflow

    from keeper_train import tracking
    from keeper_train.jobs import promote, train_head

    uri = tracking.tracking_uri(None, out)
    by_photo = cfg.manifest is None
    split: dict[str, Any] = (
        {
            "split_by": "base_photo",
            "val_groups": list(DEMO_VAL_PHOTOS),
            "test_groups": list(DEMO_TEST_PHOTOS),
        }
        if by_photo
        else {"split_by": "series_id"}
    )
    tcfg = train_head.TrainHeadConfig(
        embeddings=embeddings,
        series=manifest_uri,
        head="mlp",
        features="embedding+quality",
        epochs=cfg.epochs,
        storage=str(out / "checkpoints"),
        tracking_uri=uri,
        data_dir=str(out),
        register_model=cfg.model_name,
        ray_address=cfg.ray_address,
        **split,
    )
    trained = train_head.run(tcfg)

    recorded = tracking.training_split(mlflow.MlflowClient(uri), trained["run_id"])
    if recorded is None:
        raise DataError(f"training run {trained['run_id']} recorded no split", source=uri)
    test_uris = set(recorded.loc[recorded["split"] == "test", "image_uri"].astype(str))
    test_manifest = out / "test-manifest.csv"
    manifest[manifest["image_uri"].astype(str).isin(test_uris)].to_csv(test_manifest, index=False)
    n_test = int(recorded.loc[recorded["split"] == "test", "series_id"].nunique())
    where = (
        f"{n_test} series of base photos never trained on: {', '.join(DEMO_TEST_PHOTOS)}"
        if by_photo
        else f"{n_test} series; {SERIES_SPLIT_CAVEAT}"
    )

    registry = {"tracking_uri": uri, "data_dir": str(out)}
    promoted = promote.run(
        promote.PromoteConfig(
            name=cfg.model_name, embeddings=embeddings, series=str(test_manifest), **registry
        )
    )
    evaluated = evaluate.run(
        evaluate.EvaluateConfig(
            model=f"models:/{cfg.model_name}@{tracking.CHAMPION}",
            embeddings=embeddings,
            series=str(test_manifest),
            html=str((out / "ranker-report.html").resolve()),
            report_series=cfg.report_series,
            **registry,
        )
    )
    return {
        "split": where,
        "train": {k: trained[k] for k in ("run_id", "table", "test", "registered", "epochs_run")},
        "promotion": f"{promoted['decision']} v{promoted['challenger']}: {promoted['reason']}",
        "promotion_outcome": {k: v for k, v in promoted.items() if k != "table"},
        "evaluation": {k: evaluated[k] for k in ("model", "metrics", "html")},
        "tracking_uri": uri,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m keeper_train.jobs.demo ARGS`` is ``keeper demo ARGS``."""
    from keeper_core.cli import main as keeper

    return keeper(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
