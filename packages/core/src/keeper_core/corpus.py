"""An embedded corpus: the rows of ``keeper embed``'s table, read for selection.

``keeper select`` (over a whole table) and ``POST /v1/select`` (candidates named by ``image_id``)
read a table through :func:`read_corpus`, so both refuse the same malformed tables the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from keeper_core import storage
from keeper_core.errors import DataError, StorageError

#: keeper embed's output layout: OUTPUT/embeddings/part-*.parquet (and OUTPUT/errors/).
EMBEDDINGS = "embeddings"
#: The columns selection reads.
COLUMNS = ["image_id", "image_uri", "embedding", "model_spec", "width", "height"]


@dataclass
class Corpus:
    """Every row of an embedding table, as arrays indexed by row (table order)."""

    image_id: list[str]
    image_uri: list[str]
    width: np.ndarray  # float64: the original's displayed size
    height: np.ndarray
    embeddings: np.ndarray  # (N, D) float32, unit norm
    spec: str  # the one ModelSpec every row was embedded with

    def __len__(self) -> int:
        return len(self.image_uri)


def read_corpus(table: str) -> Corpus:
    """The rows of keeper embed's table under ``table`` (``table/embeddings``), local or s3://.

    Raises:
        DataError: no embedding table there, no rows, a column missing, embeddings of several
            model specs (one table, one spec: similarities across specs mean nothing), or
            malformed embeddings.
    """
    folder = storage.join(table, EMBEDDINGS)
    try:
        t = storage.read_parquet(folder, columns=COLUMNS)
    except StorageError as e:
        raise DataError(
            f"no embedding table here (keeper embed writes {folder}/part-*.parquet): {e.cause}",
            source=table,
        ) from e
    if t.column("model_spec").null_count:
        raise DataError("rows without a model_spec", source=table)
    specs = sorted(set(t.column("model_spec").to_pylist()))
    if len(specs) > 1:
        raise DataError(
            f"the table mixes embeddings of {len(specs)} model specs {specs}: similarities across "
            "specs mean nothing, so selection reads one spec per table (embed into one output "
            "per model)",
            source=table,
        )
    n = t.num_rows
    if not n:
        raise DataError("the embedding table has no rows: nothing to select from", source=table)
    emb = embedding_matrix(t, source=table)
    return Corpus(
        image_id=[str(x) for x in t.column("image_id").to_pylist()],
        image_uri=[str(x) for x in t.column("image_uri").to_pylist()],
        width=t.column("width").to_numpy(zero_copy_only=False).astype(np.float64),
        height=t.column("height").to_numpy(zero_copy_only=False).astype(np.float64),
        embeddings=emb,
        spec=specs[0],
    )


def embedding_matrix(t: pa.Table, *, source: str | None = None) -> np.ndarray:
    """The ``embedding`` column of a table as a writable (N, D) float32 array.

    Raises:
        DataError: a row without an embedding, a column that is not a list of floats, or
            embeddings of different lengths.
    """
    col = t.column("embedding").combine_chunks()
    if col.null_count:
        raise DataError(f"{col.null_count} row(s) without an embedding", source=source)
    if not (pa.types.is_list(col.type) or pa.types.is_fixed_size_list(col.type)):
        raise DataError(f"embedding column is {col.type}, not a list of floats", source=source)
    if not len(col):
        return np.zeros((0, getattr(col.type, "list_size", 0)), np.float32)
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    if (lengths != lengths[0]).any():
        raise DataError("embeddings of different lengths in one table", source=source)
    flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32)  # a copy: writable
    return flat.reshape(len(col), int(lengths[0]))
