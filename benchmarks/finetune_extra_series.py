"""An experiment for issue 12's embedding-only bar: more scenes, not more of the same series.

    .venv/bin/python benchmarks/finetune_extra_series.py --fold 0 --extra 3000 --seed 0 \
        --out benchmarks/results/finetune_quality_seeds/fold0-extra3000-seed0.json

docs/finetuning.md section 8 found the ViT fitting its ~10 training scenes: a fold's training
series are crops covering 50-90 % of the same few photos. This adds ``--extra`` series rendered
from the fold's **training photos only** with ``keeper_core.synthetic.render_series`` and crop
windows covering ``--area`` of the photo (default 2-50 %: many more distinct views of each photo),
each shot saved as JPEG q92 and prepared like the corpus (``ImagePreparation``), then trains the
frozen MLP and last-blocks+lora on the fold's train series plus these with
``benchmarks/finetune_quality.py``'s ``train_one`` (embedding only, its settings, one torch
thread). Both rows get the same extra data; the val and test series are the corpus's, unchanged.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import finetune_quality as fq
import numpy as np
import torch

from keeper_core import synthetic
from keeper_core.preparation import ImagePreparation


def extra_series(
    photos: list[str], n: int, area: tuple[float, float], fold: int
) -> list[dict[str, object]]:
    """``n`` series of ``photos`` (round-robin), rows as ``fq.series_rows`` makes them."""
    base = synthetic.load_photos(photos)
    prep = ImagePreparation(fq.MODEL)
    rows: list[dict[str, object]] = []
    for i in range(n):
        shots = synthetic.render_series(
            base[photos[i % len(photos)]],
            np.random.default_rng([99, fold, i]),
            min_shots=2,
            max_shots=5,
            size=(86, 64),
            area=area,
        )
        px, q, best = [], [], 0
        for j, (img, degradation) in enumerate(shots):
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=92)
            pixels, quality = fq.prepare_image(prep, buf.getvalue(), f"extra-{i}-{j}")
            px.append(pixels)
            q.append(quality)
            best = j if degradation == "none" else best
        rows.append(
            {
                "pixels": np.stack(px).reshape(-1),
                "quality": np.stack(q).astype(np.float32).reshape(-1),
                "length": len(shots),
                "best": best,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--extra", type=int, default=3000, help="extra training series")
    p.add_argument("--area", default="0.02,0.5", help="crop window range, share of the photo")
    p.add_argument("--methods", default="frozen,last-blocks+lora")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default="/tmp/keeper-finetune-quality")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    df, px, q = fq.prepare_corpus(Path(a.cache), 3000)
    val_photos, test_photos = fq.folds()[a.fold]
    train_photos = [x for x in synthetic.PHOTOS if x not in val_photos + test_photos]
    split = fq.fold_split(df, a.fold)
    data = {n: fq.series_rows(df, px, q, split == n) for n in ("train", "val", "test")}
    lo, hi = (float(v) for v in a.area.split(","))
    extra = extra_series(train_photos, a.extra, (lo, hi), a.fold)
    data["train"] += extra
    train_q = np.concatenate(
        [q[split == "train"], *[np.reshape(r["quality"], (r["length"], -1)) for r in extra]]
    )
    print(f"train series {len(data['train'])} ({a.extra} extra)", flush=True)
    res = {}
    for m in a.methods.split(","):
        val, tst, _, secs, _ = fq.train_one(m, "embedding", data, train_q, seed=a.seed)
        res[m] = {"val": val.top1, "test": tst.top1, "secs": secs}
        print(m, res[m], flush=True)
    Path(a.out).write_text(json.dumps({"args": vars(a), "res": res}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
