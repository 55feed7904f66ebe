"""keeper_train.data.assign_split: named val/test groups must keep a series whole.

``split_series`` (hash split by a group column) refuses a series whose rows carry several values
of that column; the named-group path (``val_groups`` / ``test_groups``) used to skip the check, so
a series straddling two base photos was cut in two: its keeper on one side, and on the other side a
keeper-less remnant that train-head labels with a made-up keeper (``argmax`` of all zeros = the
first row), or a one-image "series" that any scorer gets right.
"""

from __future__ import annotations

import pandas as pd
import pytest

from keeper_core.errors import DataError
from keeper_train.data import assign_split


def _manifest() -> pd.DataFrame:
    rows = [
        # s1 straddles two photos: its keeper comes from "cat", two of its shots from "moon".
        ("s1", "s1/0.jpg", 1, "cat"),
        ("s1", "s1/1.jpg", 0, "moon"),
        ("s1", "s1/2.jpg", 0, "moon"),
        ("s2", "s2/0.jpg", 1, "cat"),
        ("s2", "s2/1.jpg", 0, "cat"),
        ("s3", "s3/0.jpg", 1, "coins"),
        ("s3", "s3/1.jpg", 0, "coins"),
        ("s4", "s4/0.jpg", 1, "moon"),
        ("s4", "s4/1.jpg", 0, "moon"),
    ]
    return pd.DataFrame(rows, columns=["series_id", "image_uri", "is_best", "base_photo"])


def test_named_groups_refuse_a_series_that_spans_groups() -> None:
    df = _manifest()
    # The hash split by base_photo refuses this manifest ...
    with pytest.raises(DataError, match="spanning several base_photo"):
        assign_split(df, by="base_photo", fractions=(0.6, 0.2, 0.2))
    # ... and so must naming the groups: else s1's keeper trains while two of its shots test.
    with pytest.raises(DataError, match="spanning several base_photo"):
        assign_split(df, by="base_photo", val_groups=["coins"], test_groups=["moon"])


def test_named_groups_keep_every_series_in_one_split() -> None:
    df = _manifest()
    df.loc[df["series_id"] == "s1", "base_photo"] = "cat"
    out = assign_split(df, by="base_photo", val_groups=["coins"], test_groups=["moon"])
    assert out.groupby("series_id")["split"].nunique().max() == 1
    assert dict(out.groupby("series_id")["split"].first()) == {
        "s1": "train",
        "s2": "train",
        "s3": "val",
        "s4": "test",
    }


def test_named_groups_refuse_a_null_group() -> None:
    # A null base_photo used to become the string "nan" and go to train unnoticed.
    df = _manifest()
    df.loc[df["series_id"] == "s1", "base_photo"] = None
    with pytest.raises(DataError, match="null base_photo"):
        assign_split(df, by="base_photo", val_groups=["coins"], test_groups=["moon"])
