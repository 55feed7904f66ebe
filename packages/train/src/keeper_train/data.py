"""Joining a series manifest to an embedding table (from ``keeper embed``)."""

from __future__ import annotations

import pandas as pd

from keeper_core import storage
from keeper_core.embedding import check_same_spec
from keeper_core.errors import DataError
from keeper_core.series import read_series_manifest


def read_embeddings(embeddings: str) -> pd.DataFrame:
    """The embedding table under a ``keeper embed`` output (folder or s3:// prefix)."""
    table = storage.read_parquet(storage.join(embeddings, "embeddings")).to_pandas()
    if table.empty:
        raise DataError("the embedding table is empty", source=embeddings)
    return table


def join_series(embeddings: str, series: str) -> tuple[pd.DataFrame, str, int, pd.DataFrame]:
    """Manifest rows with their embedding-table columns, for series whose images all have one.

    Returns:
        (rows in manifest order with a fresh index, the embedding model spec, the number of
        series dropped because an image has no embedding, the raw embedding table).

    Raises:
        DataError: empty table, mixed model specs, or no complete series at all.
    """
    manifest = read_series_manifest(series)
    table = read_embeddings(embeddings)
    spec = check_same_spec(*set(table["model_spec"].astype(str)))
    df = manifest.merge(table, on="image_uri", how="left", validate="one_to_one")
    complete = df.groupby("series_id")["embedding"].transform(lambda s: s.notna().all())
    dropped = int(df.loc[~complete, "series_id"].nunique())
    df = df[complete.to_numpy()].reset_index(drop=True)
    if df.empty:
        raise DataError("no series has an embedding for every image", source=series)
    return df, spec, dropped, table
