"""The main job, offline on embedded defaults: which shot of each burst is the keeper?

    python -m keeper_train.jobs.demo --out keeper-demo          # what `make demo` runs
    python -m keeper_train.jobs.demo --model ViT-B-32:laion2b_s34b_b79k   # real weights

1. generates a best-of-series corpus from real photos (scikit-image's): bursts of 2-5 shots, one
   clean, the others degraded;
2. embeds it with the Ray Data embed job (keeper_train.jobs.embed) on a local Ray: safe decode,
   quality features, CLIP embeddings, Parquet;
3. scores every image with the aesthetic prompt set, ranks every burst by (a) the sharpness rule
   and (b) the aesthetic prompt score, prints top-1/2/3, mean rank and MRR beside the random
   baseline, and writes an HTML report;
4. learns the keeper: trains an MLP head on embedding + quality features on Ray Train
   (keeper_train.jobs.train_head, tracked in MLflow, registered as @challenger), promotes it through
   the registry gate on the held-out test series (keeper_train.jobs.promote), and evaluates
   @champion there with an HTML report of its picks (keeper_train.jobs.evaluate).

With random weights (the default, ``keeper-tiny:random``) prompt scores are meaningless: it says so.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from keeper_core import storage
from keeper_core.bestof import RANDOM_WEIGHTS_WARNING, compare_methods, write_report
from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import KeeperError
from keeper_core.images import decode_image
from keeper_core.models import ModelSpec
from keeper_core.scoring import AestheticConfig, aesthetic_scores
from keeper_core.series import read_series_manifest, split_series
from keeper_core.synthetic import generate_corpus
from keeper_train.commands import add_demo_arguments
from keeper_train.jobs import embed


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m keeper_train.jobs.demo", description=__doc__.split("\n")[0]
    )
    add_demo_arguments(p)
    return p.parse_args(argv)


def _slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", spec).strip("_")[:80]


def _thumbnail_source(uri: str) -> Image.Image | None:
    try:
        return decode_image(storage.read_bytes(uri), draft_size=(256, 256))
    except KeeperError:
        return None


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    spec = ModelSpec.parse(args.model)
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    manifest_uri = args.manifest or str(
        generate_corpus(out / "corpus", n_series=args.series, seed=args.seed)
    )
    manifest = read_series_manifest(manifest_uri)
    timings["corpus"] = time.perf_counter() - t0
    print(
        f"corpus: {manifest['series_id'].nunique()} series, {len(manifest)} images ({manifest_uri})"
    )

    t = time.perf_counter()
    cfg = embed.EmbedConfig(
        input=manifest_uri,
        output=str(out / "embeddings" / _slug(str(spec))),
        model=str(spec),
        batch_size=args.batch_size,
        rows_per_file=256,
        ray_address=args.ray_address,
    )
    summary = embed.run(cfg)
    print(embed.format_summary(summary))
    timings["embed job"] = time.perf_counter() - t

    t = time.perf_counter()
    table = storage.read_parquet(storage.join(cfg.output, embed.EMBEDDINGS)).to_pandas()
    rows = manifest[["image_uri"]].merge(table, on="image_uri", how="left")
    has = rows["embedding"].notna().to_numpy()
    emb = np.stack(rows.loc[has, "embedding"].to_numpy()).astype(np.float32) if has.any() else None
    aesthetic = np.full(len(rows), np.nan)
    if emb is not None:
        embedder = ClipEmbedder(spec)
        config = AestheticConfig.default()
        aes = aesthetic_scores(emb, embedder.prompt_embeddings(config.all_prompts()), config)
        aesthetic[has] = aes.total
    scores = {
        "sharpness rule": rows["sharpness"].to_numpy(dtype=np.float64),
        "aesthetic prompts": aesthetic,
    }
    comparison = compare_methods(manifest, scores)
    timings["score"] = time.perf_counter() - t

    t = time.perf_counter()
    warnings = [RANDOM_WEIGHTS_WARNING.format(spec=spec)] if spec.is_random else []
    counts = summary["counts"]
    notes = [
        f"{counts['in']} images: {counts['skipped']} already embedded, {counts['embedded']} embedded, "
        f"{counts['failed']} failed this run; {comparison.left_out} series left out "
        "(an image without a score)."
    ]
    report = write_report(
        out / "report.html",
        f"keeper demo: best-of-series on {len(comparison.series)} series ({spec})",
        comparison,
        scores,
        _thumbnail_source,
        max_series=args.report_series,
        warnings=warnings,
        notes=notes,
    )
    timings["report"] = time.perf_counter() - t

    t = time.perf_counter()
    learned = learn_the_keeper(args, out, cfg.output, manifest_uri, manifest)
    timings["train+promote+evaluate"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    result = {
        "model_spec": str(spec),
        "random_weights": spec.is_random,
        "embed": summary,
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
    print("Held-out test series, the trained head beside its baselines:")
    print(learned["train"]["table"])
    print()
    print(f"registry: {learned['promotion']}")
    print("  ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    for w in warnings:
        print(f"WARNING: {w}")
    print(f"report:  {report.resolve()}")
    print(f"ranker:  {learned['evaluation']['html']}")
    print(f"metrics: {(out / 'metrics.json').resolve()}")
    return 0 if summary["status"] == "ok" else embed.EXIT_TOO_MANY_FAILURES


def learn_the_keeper(
    args: argparse.Namespace, out: Path, embeddings: str, manifest_uri: str, manifest: pd.DataFrame
) -> dict[str, Any]:
    """Train (Ray Train) -> register @challenger -> promote on the test split -> evaluate @champion."""
    from keeper_train import tracking
    from keeper_train.jobs import evaluate, promote, train_head

    uri = tracking.tracking_uri(None, out)
    cfg = train_head.TrainHeadConfig(
        embeddings=embeddings,
        series=manifest_uri,
        head="mlp",
        features="embedding+quality",
        epochs=args.epochs,
        storage=str(out / "checkpoints"),
        tracking_uri=uri,
        data_dir=str(out),
        register=args.model_name,
        ray_address=args.ray_address,
    )
    trained = train_head.run(cfg)
    # The same deterministic split train_head used: its test series, as a manifest of their own.
    split = split_series(manifest, fractions=cfg.split_fractions, seed=cfg.seed, by=cfg.split_by)
    test_manifest = out / "test-manifest.csv"
    split[split["split"] == "test"].drop(columns="split").to_csv(test_manifest, index=False)
    common = {"tracking_uri": uri, "data_dir": str(out), "json": None}
    promoted = promote.run(
        argparse.Namespace(
            name=args.model_name,
            embeddings=embeddings,
            series=str(test_manifest),
            min_gain=0.01,
            rollback=False,
            **common,
        )
    )
    evaluated = evaluate.run(
        argparse.Namespace(
            model=f"models:/{args.model_name}@{tracking.CHAMPION}",
            embeddings=embeddings,
            series=str(test_manifest),
            html=str((out / "ranker-report.html").resolve()),
            report_series=args.report_series,
            **common,
        )
    )
    return {
        "train": {k: trained[k] for k in ("run_id", "table", "test", "registered", "epochs_run")},
        "promotion": f"{promoted['decision']} v{promoted['challenger']}: {promoted['reason']}",
        "evaluation": {k: evaluated[k] for k in ("model", "metrics", "html")},
        "tracking_uri": uri,
    }


def main(argv: Sequence[str] | None = None) -> int:
    return run_safely(parse_args(argv))


def run_safely(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except KeeperError as e:
        print(f"keeper demo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    from keeper_train.jobs import demo

    sys.exit(demo.main())
