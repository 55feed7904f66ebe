"""keeper pick on the session's Ray over a library holding file names that are not UTF-8 (an old
Windows archive's Latin-1 names): they are recorded as failed (``bad_name``), counted, and every
output of the rest is written."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from keeper_core import storage
from keeper_train.jobs import embed, pick

pytestmark = pytest.mark.integration


def _jpeg(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (96, 128, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write(path: bytes, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_pick_records_latin1_names_and_completes(ray_cluster: str, tmp_path: Path) -> None:
    root = tmp_path / "library"
    raw = os.fsencode(root)
    _write(raw + b"/IMG_0001.JPG", _jpeg(1))
    _write(raw + "/Fête/IMG_0002.JPG".encode(), _jpeg(2))  # UTF-8: an ordinary name
    _write(raw + b"/caf\xe9.jpg", _jpeg(3))  # Latin-1 "café.jpg"
    _write(raw + b"/\xc9t\xe9 2003/IMG_0004.JPG", _jpeg(4))  # a Latin-1 folder
    out = tmp_path / "out"
    cfg = pick.PickJobConfig(
        input=str(root),
        output=str(out),
        zero_shot=True,
        max_failure_fraction=0.5,
        ray_address=ray_cluster,
    )

    s = pick.run(cfg)
    c = s.counts
    assert (c["in"], c["picked"], c["failed"], c["lost"]) == (4, 2, 2, 0)
    assert s.status == "ok"
    assert s.embed["embedded"] == 2
    assert s.embed["failed"] == 2
    picks = storage.read_parquet(s.outputs["picks_parquet"]).to_pandas()
    assert sorted(picks["image_uri"]) == [f"{root}/Fête/IMG_0002.JPG", f"{root}/IMG_0001.JPG"]
    failed = pd.read_csv(s.outputs["failed_csv"])
    assert sorted(failed["image_uri"]) == [
        f"{root}/\\xc9t\\xe9 2003/IMG_0004.JPG",
        f"{root}/caf\\xe9.jpg",
    ]
    assert set(failed["reason"]) == {embed.BAD_NAME}
    assert "bad_name" in Path(s.outputs["contact_sheet"]).read_text(encoding="utf-8")
    assert len(list((out / "xmp").rglob("*.xmp"))) == 2

    # A second run embeds nothing, and does not read the bad names again.
    again = pick.run(cfg)
    assert again.embed["attempted"] == 0
    assert again.embed["failed_before"] == 2
    assert again.counts["failed"] == 2
