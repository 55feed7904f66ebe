"""``culling.copy_sets``: exact copies are the same bytes, or a JPEG's same bytes but for the
metadata a photo tool saved into one of them; older rows without ``content_id`` still join."""

from __future__ import annotations

import numpy as np
import pandas as pd

from keeper_core.culling import copy_sets, mark_duplicates
from keeper_core.grouping import GroupingConfig


def test_a_copy_with_a_saved_rating_is_the_same_photo() -> None:
    df = pd.DataFrame(
        {
            # b is a with a rating saved into it (other bytes, same content); c was embedded
            # before content_id was kept, byte-identical to a; d is another photo.
            "image_id": ["A", "B", "A", "D"],
            "content_id": ["C1", "C1", None, "C4"],
        }
    )
    keys = copy_sets(df)
    assert keys[0] == keys[1] == keys[2] != keys[3]
    # a chain: e shares f's bytes, f shares g's content, g shares h's bytes
    chain = pd.DataFrame({"image_id": ["E", "E", "G", "G"], "content_id": [None, "X", "X", None]})
    assert len(set(copy_sets(chain))) == 1


def test_without_content_ids_it_is_the_image_id() -> None:
    df = pd.DataFrame({"image_id": ["A", "B", "A"]})
    assert copy_sets(df) == ["A", "B", "A"]
    assert copy_sets(df.assign(content_id=None)) == ["A", "B", "A"]


def test_mark_duplicates_calls_the_rated_copy_an_exact_duplicate() -> None:
    df = pd.DataFrame(
        {
            "image_uri": ["lib/IMG_1.JPG", "lib/copy/IMG_1.JPG"],
            "image_id": ["A", "B"],
            "content_id": ["C", "C"],
        }
    )
    emb = np.eye(2, 8, dtype=np.float32)  # unlike embeddings: only the content ids tell
    dup_of, kind = mark_duplicates(df, emb, np.array([0, 1]), GroupingConfig(), prefer=np.zeros(2))
    assert (dup_of.tolist(), kind) == ([-1, 0], [None, "exact"])
