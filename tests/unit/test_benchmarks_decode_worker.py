"""benchmarks/decode_worker.py: its worker start-up measurement runs both variants for real (the
end-to-end half starts Ray twice per model and is left to the documented command)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from support import import_benchmark


def test_worker_startup_measures_a_heavy_and_a_light_worker(tmp_path: Path) -> None:
    decode_worker = import_benchmark("decode_worker")
    uris = []
    for i in range(2):
        path = tmp_path / f"{i}.jpg"
        arr = np.random.default_rng(i).integers(0, 256, (120, 160, 3), dtype=np.uint8)
        Image.fromarray(arr).save(path, quality=90)
        uris.append(str(path))
    r = decode_worker.worker_startup("keeper-tiny:random", uris, 1, tmp_path)
    assert r["heavy"]["imported"] == ["torch", "torchvision", "open_clip"]
    assert r["light"]["imported"] == []
    for side in ("heavy", "light"):
        assert r[side]["first_batch_s"] > 0
        assert r[side]["peak_rss_mib"] > 0
    text = decode_worker.table({**{"worker_startup": r}, "end_to_end": {}, "baseline_ref": "x"})
    assert "seconds to the first batch" in text
