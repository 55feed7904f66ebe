"""keeper dedup's groups: every member names the image its group keeps, and what it is to it."""

from __future__ import annotations

import numpy as np
import pandas as pd

from keeper_train.jobs.dedup import group_frame


def test_a_copy_of_a_near_duplicate_is_a_near_duplicate_of_the_kept_image() -> None:
    """An export of a photo (near) and a byte copy of the export (marked exact, to the export):
    one group, the photo kept, both named near duplicates of it."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=8)
    emb = np.stack([base, base + 0.01 * rng.normal(size=8), base + 0.01 * rng.normal(size=8)])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    emb[2] = emb[1]  # the copy's bytes are the export's
    df = pd.DataFrame(
        {
            "image_uri": ["/p/photo.jpg", "/p/export.jpg", "/p/export copy.jpg"],
            "image_id": ["a" * 64, "b" * 64, "b" * 64],
        }
    )
    groups = group_frame(
        df, emb, np.array([-1, 0, 1]), [None, "near", "exact"], np.array([3.0, 2.0, 2.0])
    )
    by = groups.set_index("image_uri")
    assert list(groups["group"]) == [0, 0, 0]
    assert bool(by.loc["/p/photo.jpg", "kept"])
    for uri in ("/p/export.jpg", "/p/export copy.jpg"):
        assert by.loc[uri, "duplicate_of"] == "/p/photo.jpg"
        assert by.loc[uri, "kind"] == "near"
    assert by.loc["/p/export copy.jpg", "cosine"] == by.loc["/p/export.jpg", "cosine"]
