"""Re-cull benchmarks/pick.py's library from a pick run's table (the same embeddings, no Ray, ~2 s)
with the code as it is now: exact/near duplicate marks against the planted copies, zero-shot top-1.

    .venv/bin/python benchmarks/pick_recull.py /tmp/keeper-bench-pick/runs/3-pick-attempt1 \
        /tmp/keeper-bench-pick/library-seed0-b1200-320x240-e40-n40-m0.05

For a change to grouping, duplicate or decision rules that does not touch embedding: the figure
without the 9-minute cost runs of benchmarks/pick.py.
"""

from __future__ import annotations

import sys

import pandas as pd

from keeper_core import storage
from keeper_core.culling import cull

run, lib = sys.argv[1], sys.argv[2]
table = storage.read_parquet(f"{run}/table/embeddings").to_pandas()
truth = pd.read_csv(f"{lib}/library.csv", dtype=str, keep_default_na=False)
p = cull(table, scorer=None).picks
key = storage.same_key
p["_k"] = p["image_uri"].map(key)
uris = p["image_uri"].to_numpy()
planted = {
    key(u): key(s) for u, s in zip(truth["image_uri"], truth["duplicate_of"], strict=False) if s
}
for kind in ("exact", "near"):
    m = p[p["duplicate_kind"] == kind]
    pairs = {
        (key(u), key(uris[int(j)])) for u, j in zip(m["image_uri"], m["duplicate_of"], strict=False)
    }
    right = sum(1 for a, b in pairs if planted.get(a) == b or planted.get(b) == a)
    want = {a for a in planted if ("/export/web/" in a) == (kind == "near")}
    found = sum(1 for a in want if (a, planted[a]) in pairs or (planted[a], a) in pairs)
    print(
        f"{kind}: marked {len(pairs)} right {right} precision {right / max(len(pairs), 1):.3f} "
        f"recall {found}/{len(want)} = {found / max(len(want), 1):.3f}"
    )
t = truth[truth["duplicate_of"] == ""]
t = t[t.groupby("series_id")["series_id"].transform("size") > 1].assign(
    _k=lambda d: d["image_uri"].map(key)
)
both = t.merge(p, on="_k")
best = both[both["is_best"] == "1"]
print(
    f"zero-shot top-1 {best['decision'].eq('keep').mean():.4f} over {len(best)} bursts; "
    f"best shots marked near {int((best['duplicate_kind'] == 'near').sum())}"
)
