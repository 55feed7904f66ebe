"""The demo's last step: ``keeper pick`` over a library with capture times and no labels.

    python -m keeper_train.jobs.pick_demo --out keeper-demo

Generates a camera library (``keeper_core.synthetic_library``: bursts at 5-15 frames/s, scenes
minutes apart, two camera bodies interleaved, exact and near duplicates, a file that is not a
photo) under OUT/library, culls it with the champion the demo registered (or the zero-shot rule
when there is none), and prints keeper pick's summary. The generator's truth (which shots form a
burst, which is the clean one) is never shown to keeper pick; it is only used afterwards to say
how the grouping and the picks did.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from keeper_core import storage
from keeper_core.errors import KeeperError
from keeper_core.grouping import pairwise_scores
from keeper_core.synthetic_library import generate_library
from keeper_train.jobs import pick
from keeper_train.jobs.demo import quiet_libraries


def against_truth(picks: pd.DataFrame, truth: pd.DataFrame) -> dict[str, float]:
    """Grouping precision/recall/F1 over same-burst pairs, and the keeper top-1 per true burst.

    Duplicates the generator planted are left out (they have no burst of their own).
    """
    truth = truth[truth["duplicate_of"].fillna("").astype(str) == ""]
    t = truth.assign(_k=truth["image_uri"].astype(str).map(storage.same_key))
    p = picks.assign(_k=picks["image_uri"].astype(str).map(storage.same_key))
    both = t.merge(p[["_k", "group", "decision"]], on="_k", how="inner")
    precision, recall, f1 = pairwise_scores(both["series_id"].tolist(), both["group"].tolist())
    bursts = both[both.groupby("series_id")["series_id"].transform("size") > 1]
    best = bursts[bursts["is_best"].astype(int) == 1]
    hits = (best["decision"] == "keep").mean() if len(best) else float("nan")
    return {
        "pair_precision": precision,
        "pair_recall": recall,
        "pair_f1": f1,
        "bursts": float(len(best)),
        "keeper_top1": float(hits),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m keeper_train.jobs.pick_demo")
    parser.add_argument("--out", default="keeper-demo", help="the demo's folder")
    parser.add_argument("--bursts", type=int, default=40, help="bursts and single shots to make")
    parser.add_argument("--model-name", default="keeper-demo-ranker", help="registered ranker")
    args = parser.parse_args(argv)
    out = Path(args.out)
    library = out / "library"
    try:
        manifest = library / "library.csv"
        if not manifest.exists():
            manifest = generate_library(
                library, n_bursts=args.bursts, seed=7, exact_duplicates=3, near_duplicates=2
            )
        notes = library / "DCIM" / "NOTES.jpg"
        if not notes.exists():  # written once: a re-run of the demo finds nothing changed
            notes.write_bytes(b"not a photo: keeper lists it as failed")
        cfg = pick.PickJobConfig(
            input=str(library),
            output=str(out / "picks"),
            ranker_name=args.model_name,
            data_dir=str(out),
        )
        with quiet_libraries():  # MLflow's download bar for the champion, as the other steps
            summary = pick.run(cfg)
    except KeeperError as e:
        print(f"keeper pick demo: error: {e}", file=sys.stderr)
        return 2
    print(pick.format_summary(summary))
    picks = storage.read_parquet(summary.outputs["picks_parquet"]).to_pandas()
    score = against_truth(picks, pd.read_csv(manifest, dtype=str, keep_default_na=False))
    print(
        f"  truth     (the generator's, never shown to keeper pick) grouping pairwise "
        f"F1 {score['pair_f1']:.3f} (precision {score['pair_precision']:.3f}, recall "
        f"{score['pair_recall']:.3f}); the clean shot kept in {score['keeper_top1']:.1%} "
        f"of {int(score['bursts'])} bursts"
    )
    print(f"open {Path(summary.outputs['contact_sheet']).resolve()}")
    return 0 if summary.status == "ok" else 3


if __name__ == "__main__":
    sys.exit(main())
