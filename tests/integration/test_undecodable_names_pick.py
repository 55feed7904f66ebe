"""keeper pick on the session's Ray over a library holding file names that are not UTF-8 (an old
Windows archive's Latin-1 names): they are recorded as failed (``bad_name``), counted, and every
output of the rest is written."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
from support import noise_jpeg, write_at_bytes_path

from keeper_core import storage
from keeper_train.jobs import embed, pick

pytestmark = pytest.mark.integration


def test_pick_records_latin1_names_and_completes(ray_cluster: str, tmp_path: Path) -> None:
    root = tmp_path / "library"
    raw = os.fsencode(root)
    write_at_bytes_path(raw + b"/IMG_0001.JPG", noise_jpeg(1, (128, 96)))
    write_at_bytes_path(
        raw + "/Fête/IMG_0002.JPG".encode(), noise_jpeg(2, (128, 96))
    )  # UTF-8: an ordinary name
    write_at_bytes_path(raw + b"/caf\xe9.jpg", noise_jpeg(3, (128, 96)))  # Latin-1 "café.jpg"
    write_at_bytes_path(
        raw + b"/\xc9t\xe9 2003/IMG_0004.JPG", noise_jpeg(4, (128, 96))
    )  # a Latin-1 folder
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
