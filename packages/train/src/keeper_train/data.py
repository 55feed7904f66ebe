"""Joining a series manifest to an embedding table (from ``keeper embed``).

Both sides name images by the URI keeper embed recorded: ``read_series_manifest`` resolves a
manifest's relative ``image_uri`` against the manifest's folder with the same function keeper
embed uses (``keeper_core.storage.resolve``). Both sides are compared by
``keeper_core.storage.same_key`` (local paths normalised and absolute), so ``corpus/manifest.csv`` and ``./corpus/manifest.csv`` (or its absolute path) join the same
table.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Self

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field, field_validator, model_validator

from keeper_core import storage
from keeper_core.errors import ConfigError, DataError, StorageError
from keeper_core.ranker import QUALITY_INPUTS
from keeper_core.series import check_split_key, read_series_manifest, split_series

log = logging.getLogger("keeper.data")

_KEY = "_join_key"
_EXAMPLES = 3
#: The columns every table ``keeper embed`` writes has (keeper_train.jobs.embed.embedding_table),
#: whatever its version; quality features, capture metadata and dhash follow.
EMBED_TABLE_COLUMNS = ("image_id", "image_uri", "embedding", "model_spec")


def check_embed_table(columns: Sequence[str], *, source: str) -> None:
    """Refuse a table that is not one ``keeper embed`` wrote, naming the columns it lacks.

    Raises:
        DataError: a column of ``EMBED_TABLE_COLUMNS`` is missing.
    """
    missing = [c for c in EMBED_TABLE_COLUMNS if c not in columns]
    if missing:
        raise DataError(
            f"not a keeper embed table: missing columns {missing} (has {list(columns)[:12]})",
            source=source,
        )


class SplitSettings(BaseModel):
    """How a training job splits a manifest's series into train, val and test
    (``assign_split``'s arguments), checked when the config is built, before any data is read."""

    split_by: str = Field("series_id", description="column that keeps rows in one split")
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    val_groups: list[str] | None = Field(None, description="split_by values forced into val")
    test_groups: list[str] | None = Field(None, description="split_by values forced into test")

    @field_validator("split_fractions")
    @classmethod
    def _fractions(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        # split_series' own rule (each >= 0, sum 1), on no rows: checked before the data is read.
        try:
            split_series(pd.DataFrame({"series_id": []}), fractions=v)
        except ConfigError as e:
            raise ValueError(str(e)) from e
        return v

    @model_validator(mode="after")
    def _split_consistent(self) -> Self:
        if (self.val_groups or self.test_groups) and self.split_by == "series_id":
            raise ValueError("val_groups/test_groups need split_by set to a group column")
        if bool(self.val_groups) != bool(self.test_groups):
            given = "val_groups" if self.val_groups else "test_groups"
            raise ValueError(
                f"{given} without {'test_groups' if self.val_groups else 'val_groups'}: named "
                "groups send every other row to train, so that split would be empty; name both"
            )
        if not (self.val_groups or self.test_groups) and min(self.split_fractions) <= 0:
            raise ValueError(
                f"split_fractions {self.split_fractions}: train, val and test each need a "
                "fraction > 0 (an empty split is refused)"
            )
        return self


def read_embeddings(embeddings: str) -> pd.DataFrame:
    """The embedding table under a ``keeper embed`` output (folder or s3:// prefix).

    Raises:
        DataError: no rows, or not a table keeper embed wrote (a column of
            ``EMBED_TABLE_COLUMNS`` or a quality feature missing).
        StorageError: nothing to read there.
    """
    table = storage.read_parquet(storage.join(embeddings, "embeddings")).to_pandas()
    check_embed_table(list(table.columns), source=embeddings)
    # What rankers, their quality features and the sharpness rule read: keeper embed writes them.
    lacking = [c for c in QUALITY_INPUTS if c not in table.columns]
    if lacking:
        raise DataError(
            f"the table lacks the quality feature columns {lacking} that keeper embed writes "
            "(rankers and the sharpness rule read them)",
            source=embeddings,
        )
    if table.empty:
        raise DataError("the embedding table is empty", source=embeddings)
    return table


def join_series(embeddings: str, series: str) -> tuple[pd.DataFrame, str, int, pd.DataFrame]:
    """Manifest rows with their embedding-table columns, for series whose images all have one.

    A series with an image missing from the table is dropped, with a warning that says how
    many series and images, and how many of those images keeper embed recorded as failed.

    Returns:
        (rows in manifest order with a fresh index and the manifest's resolved ``image_uri``,
        the embedding model spec, the number of series dropped because an image has no
        embedding, the raw embedding table).

    Raises:
        DataError: empty table, mixed model specs, an image twice in the table, a manifest
            column the table has too, or no complete series at all (naming how many images
            matched and examples of both sides).
    """
    from keeper_core.embedding import check_same_spec  # imports torch: only when joining

    manifest = read_series_manifest(series)
    table = read_embeddings(embeddings)
    spec = check_same_spec(*set(table["model_spec"].astype(str)))
    keyed = table.drop(columns=["image_uri"]).assign(
        **{_KEY: [storage.same_key(str(u)) for u in table["image_uri"]]}
    )
    dup = keyed[_KEY].duplicated(keep=False)
    if dup.any():
        raise DataError(
            f"the embedding table holds {int(dup.sum())} rows for "
            f"{keyed.loc[dup, _KEY].nunique()} images embedded twice, e.g. "
            f"{keyed.loc[dup, _KEY].iloc[0]!r}",
            source=embeddings,
        )
    clash = sorted(set(manifest.columns) & set(keyed.columns))
    if clash:
        raise DataError(
            f"manifest columns {clash} are also columns of the embedding table (what models "
            "read): rename or drop them in the manifest",
            source=series,
        )
    df = manifest.assign(**{_KEY: [storage.same_key(u) for u in manifest["image_uri"]]}).merge(
        keyed, on=_KEY, how="left", validate="one_to_one"
    )
    missing = df["embedding"].isna()
    complete = ~missing.groupby(df["series_id"]).transform("any")
    dropped = int(df.loc[~complete, "series_id"].nunique())
    if missing.any():
        why = _why_missing(df.loc[missing, "image_uri"].tolist(), embeddings)
        n_series = df["series_id"].nunique()
        if complete.any():
            log.warning("dropped %d of %d series: %s", dropped, n_series, why)
        else:
            raise DataError(
                f"no series has an embedding for every image: {why}; the table's URIs look "
                f"like {table['image_uri'].head(_EXAMPLES).tolist()} (was it embedded from "
                "this manifest?)",
                source=series,
            )
    df = df[complete.to_numpy()].drop(columns=[_KEY]).reset_index(drop=True)
    return df, spec, dropped, table


def _why_missing(uris: list[str], embeddings: str) -> str:
    """How many images lack an embedding, how many keeper embed recorded as failed, examples."""
    failed = _failed_keys(embeddings)
    n_failed = sum(storage.same_key(u) in failed for u in uris)
    return (
        f"{len(uris)} images have no embedding ({n_failed} recorded as failed under "
        f"{storage.join(embeddings, 'errors')}, {len(uris) - n_failed} never embedded), "
        f"e.g. {uris[:_EXAMPLES]}"
    )


def _failed_keys(embeddings: str) -> set[str]:
    try:
        errors = storage.read_parquet(storage.join(embeddings, "errors"), columns=["image_uri"])
    except (StorageError, DataError):  # no errors table: nothing failed
        return set()
    return {storage.same_key(str(u)) for u in errors.column(0).to_pylist()}


def assign_split(
    df: pd.DataFrame,
    *,
    by: str = "series_id",
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    seed: int = 0,
    val_groups: list[str] | None = None,
    test_groups: list[str] | None = None,
) -> pd.DataFrame:
    """A copy of ``df`` with a ``split`` column: named groups of column ``by`` go to val / test
    and the rest to train; without named groups, ``split_series``'s deterministic hash split.

    Either way a series stays whole: one whose rows carry several values of ``by`` (a burst
    straddling two base photos) is refused, as ``split_series`` refuses it, since naming groups
    would otherwise put its keeper on one side and the rest of its shots on the other.

    Raises:
        DataError: ``by`` is not a column, null in some row, a series spans several of its
            values, or a named group does not occur.
    """
    if not (val_groups or test_groups):
        return split_series(df, fractions=fractions, seed=seed, by=by)
    if by not in df.columns:
        raise DataError(f"split_by column {by!r} is not in the manifest")
    check_split_key(df, by)
    key = df[by].astype(str)
    known = set(key)
    unknown = [g for g in (val_groups or []) + (test_groups or []) if g not in known]
    if unknown:
        raise DataError(f"{by} values {unknown} do not occur (have {sorted(known)})")
    out = df.copy()
    out["split"] = np.where(
        key.isin(test_groups or []), "test", np.where(key.isin(val_groups or []), "val", "train")
    )
    return out
