"""The main job, offline on embedded defaults: which shot of each burst is the keeper?

    python -m keeper_core.demo --out keeper-demo            # what `make demo` runs
    python -m keeper_core.demo --model ViT-B-32:laion2b_s34b_b79k   # real weights, where reachable

Generates a best-of-series corpus from real photos (scikit-image's), embeds it with CLIP, computes
handcrafted quality features and aesthetic prompt scores, ranks every series by (a) the sharpness
rule and (b) the aesthetic prompt score, prints top-1/top-2/MRR against the random baseline, and
writes an HTML report. With random weights (the default, ``keeper-tiny:random``) the prompt scores
are meaningless and the job says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from keeper_core import storage
from keeper_core.embedding import ClipEmbedder
from keeper_core.errors import ImageDecodeError, KeeperError
from keeper_core.images import DecodeLimits, decode_image
from keeper_core.metrics import SeriesMetrics, format_table, series_metrics
from keeper_core.models import ModelSpec, preprocess_config
from keeper_core.quality import FEATURE_NAMES, quality_features
from keeper_core.report import SeriesView, ShotView, series_report_html, thumbnail_data_uri
from keeper_core.scoring import AestheticConfig, aesthetic_scores
from keeper_core.series import read_series_manifest
from keeper_core.synthetic import generate_corpus

RANDOM_WEIGHTS_WARNING = (
    "model weights are RANDOM ({spec}): aesthetic prompt scores are meaningless until real "
    "weights are given (--model ViT-B-32:laion2b_s34b_b79k, or ViT-B-32:/path/to/checkpoint)."
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m keeper_core.demo", description=__doc__.split("\n")[0]
    )
    p.add_argument("--out", default="keeper-demo", help="output folder (corpus, report, metrics)")
    p.add_argument("--model", default="keeper-tiny:random", help="ModelSpec ARCH[:WEIGHTS]")
    p.add_argument("--series", type=int, default=150, help="series in the generated corpus")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--manifest", default=None, help="use this series manifest instead of generating"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--report-series", type=int, default=60, help="series shown in the HTML report")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    manifest_uri = args.manifest or str(
        generate_corpus(out / "corpus", n_series=args.series, seed=args.seed)
    )
    df = read_series_manifest(manifest_uri)
    timings["corpus"] = time.perf_counter() - t0
    print(f"corpus: {df['series_id'].nunique()} series, {len(df)} images ({manifest_uri})")

    # Decode every image once; bad ones are recorded with their reason, never dropped silently.
    t = time.perf_counter()
    spec = ModelSpec.parse(args.model)
    size = preprocess_config(spec).image_size
    limits = DecodeLimits()
    images, errors = {}, {}
    for uri in df["image_uri"]:
        try:
            images[uri] = decode_image(
                storage.read_bytes(uri), limits=limits, source=uri, draft_size=(size, size)
            )
        except (ImageDecodeError, KeeperError) as e:
            errors[uri] = str(e)
    ok = df[df["image_uri"].isin(list(images))].reset_index(drop=True)
    timings["decode"] = time.perf_counter() - t

    t = time.perf_counter()
    feats = quality_features([images[u] for u in ok["image_uri"]])
    timings["quality"] = time.perf_counter() - t

    t = time.perf_counter()
    embedder = ClipEmbedder(spec, batch_size=args.batch_size)
    uris = list(ok["image_uri"])
    emb = np.concatenate(
        [
            embedder.embed_images([images[u] for u in uris[i : i + args.batch_size]])
            for i in range(0, len(uris), args.batch_size)
        ]
    )
    timings["embed"] = time.perf_counter() - t

    t = time.perf_counter()
    config = AestheticConfig.default()
    aes = aesthetic_scores(emb, embedder.prompt_embeddings(config.all_prompts()), config)
    timings["score"] = time.perf_counter() - t

    methods = {
        "sharpness rule": feats[:, FEATURE_NAMES.index("sharpness")],
        "aesthetic prompts": aes.total,
    }
    groups = [g for _, g in ok.groupby("series_id", sort=True) if g["is_best"].sum() == 1]
    best = [int(np.argmax(g["is_best"].to_numpy())) for g in groups]
    results: dict[str, SeriesMetrics] = {
        name: series_metrics([s[g.index.to_numpy()] for g in groups], best)
        for name, s in methods.items()
    }
    table = format_table(results)

    t = time.perf_counter()
    warnings = [RANDOM_WEIGHTS_WARNING.format(spec=spec)] if spec.is_random else []
    views = []
    for g in groups[: args.report_series]:
        idx = g.index.to_numpy()
        shots = [
            ShotView(
                uri=str(row.image_uri),
                thumbnail=thumbnail_data_uri(images[row.image_uri]),
                is_best=bool(row.is_best),
                scores={name: float(s[i]) for name, s in methods.items()},
                note=str(getattr(row, "degradation", "")),
            )
            for i, row in zip(idx, g.itertuples(), strict=True)
        ]
        picks = {name: int(np.argmax(s[idx])) for name, s in methods.items()}
        views.append(SeriesView(series_id=str(g["series_id"].iloc[0]), shots=shots, picks=picks))
    report = out / "report.html"
    report.write_text(
        series_report_html(
            f"keeper demo: best-of-series on {len(groups)} series ({spec})",
            views,
            metrics_rows={k: v.as_dict() for k, v in results.items()},
            warnings=warnings,
            notes=[
                f"{len(errors)} image(s) failed to decode." if errors else "All images decoded."
            ],
        )
    )
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0

    summary = {
        "model_spec": str(spec),
        "random_weights": spec.is_random,
        "images_in": len(df),
        "images_done": len(ok),
        "images_failed": len(errors),
        "errors": errors,
        "metrics": {k: v.as_dict() for k, v in results.items()},
        "seconds": {k: round(v, 3) for k, v in timings.items()},
    }
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))

    print()
    print(table)
    print()
    stages = "  ".join(f"{k} {v:.1f}s" for k, v in timings.items())
    print(f"images: {len(df)} in = {len(ok)} done + {len(errors)} failed   |   {stages}")
    for w in warnings:
        print(f"WARNING: {w}")
    print(f"report:  {report.resolve()}")
    print(f"metrics: {(out / 'metrics.json').resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
