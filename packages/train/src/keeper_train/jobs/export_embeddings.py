"""Export keeper embed's table in clip-retrieval's layout, for autofaiss and clip-retrieval's back end.

    keeper export-embeddings --table s3://bucket/emb/vit-b-32 --output s3://bucket/emb/vit-b-32-cr
    python -m keeper_train.jobs.export_embeddings --config FILE table=... output=...  # the same

clip-retrieval's ``inference`` writes, per output partition ``K`` (zero-padded to the digits of the
partition count), ``img_emb/img_emb_K.npy`` (float16, unit-norm rows) and
``metadata/metadata_K.parquet`` whose row i describes row i of the array (``image_path``,
``caption``, and the sample's metadata as columns). autofaiss builds an index from ``img_emb/``
(``autofaiss build_index --embeddings=OUT/img_emb``), and clip-retrieval's back end serves it with
the metadata beside it. So each part of keeper's table becomes one partition, in order:
``image_path`` is keeper's ``image_uri``; ``caption`` is carried when the corpus had captions (a
WebDataset); every other column (image_id, size, quality features, capture metadata, dhash)
follows as a metadata column. A ``keeper_export.json`` beside them names the model spec, the
dimension and the row count: the files themselves do not say which model made them, and a query
embedded with another model would be silently meaningless.

Streams one part at a time (memory: one part), local or ``s3://``. The table is read as it is:
``keeper embed`` leaves every image in exactly one part, so rows are neither merged nor dropped.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from keeper_core import storage
from keeper_core.corpus import EMBEDDINGS, embedding_matrix
from keeper_core.errors import DataError
from keeper_train.config import job_main
from keeper_train.table import list_parts

IMG_EMB, METADATA, META = "img_emb", "metadata", "keeper_export.json"


class ExportEmbeddingsConfig(BaseModel):
    """Everything the export takes. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field(description="keeper embed's output folder or s3:// prefix")
    output: str = Field(description="folder or s3:// prefix for the clip-retrieval layout")
    format: Literal["clip-retrieval"] = "clip-retrieval"
    dtype: Literal["float16", "float32"] = Field(
        "float16", description="embedding dtype of the .npy files (clip-retrieval writes float16)"
    )


class ExportSummary(BaseModel):
    table: str
    output: str
    model_spec: str
    dim: int
    rows: int
    partitions: int
    columns: list[str]
    written_at: str


def export(cfg: ExportEmbeddingsConfig) -> ExportSummary:
    """Write every part of the table as one img_emb/metadata partition pair; then the sidecar.

    Raises:
        DataError: no table there, or parts of several model specs or dimensions.
    """
    folder = storage.join(cfg.table, EMBEDDINGS)
    parts = list_parts(folder)
    if not parts:
        raise DataError(f"no embedding table here (keeper embed writes {folder}/part-*.parquet)")
    digits = len(str(len(parts) - 1))
    spec: str | None = None
    dim = rows = 0
    columns: list[str] = []
    for k, part in enumerate(parts):
        t = storage.read_parquet(part)
        specs = set(t.column("model_spec").to_pylist())
        part_spec = specs.pop() if len(specs) == 1 else None
        if part_spec is None or (spec is not None and part_spec != spec):
            raise DataError(
                f"{part}: model specs {sorted({*specs, part_spec, spec} - {None})} in one table; "
                "an index of mixed embeddings means nothing"
            )
        spec = part_spec
        emb = embedding_matrix(t, source=part)
        if dim and emb.shape[1] != dim:
            raise DataError(f"{part}: embeddings of dimension {emb.shape[1]}, others {dim}")
        dim = emb.shape[1]
        name = str(k).zfill(digits)
        buf = io.BytesIO()
        np.save(buf, emb.astype(cfg.dtype), allow_pickle=False)
        storage.write_bytes(
            storage.join(cfg.output, IMG_EMB, f"img_emb_{name}.npy"), buf.getvalue()
        )
        meta = _metadata(t)
        columns = meta.column_names
        storage.write_parquet(meta, storage.join(cfg.output, METADATA, f"metadata_{name}.parquet"))
        rows += t.num_rows
    assert spec is not None
    summary = ExportSummary(
        table=cfg.table,
        output=cfg.output,
        model_spec=spec,
        dim=dim,
        rows=rows,
        partitions=len(parts),
        columns=columns,
        written_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    storage.write_bytes(storage.join(cfg.output, META), summary.model_dump_json(indent=2).encode())
    return summary


def _metadata(t: pa.Table) -> pa.Table:
    """keeper's columns as clip-retrieval's metadata: image_path first, then caption, the rest."""
    keep = [c for c in t.column_names if c not in ("embedding", "model_spec", "image_uri")]
    first = ["caption"] if "caption" in keep else []
    rest = [c for c in keep if c != "caption"]
    return pa.table(
        {"image_path": t.column("image_uri"), **{c: t.column(c) for c in [*first, *rest]}}
    )


def describe(s: ExportSummary) -> str:
    return (
        f"keeper export-embeddings: {s.rows} rows of {s.model_spec} (dim {s.dim}) in "
        f"{s.partitions} partitions -> {s.output} ({IMG_EMB}/, {METADATA}/, {META})\n"
        f"  autofaiss build_index --embeddings={storage.join(s.output, IMG_EMB)} "
        f"--index_path=knn.index --index_infos_path=infos.json"
    )


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv,
        job="export_embeddings",
        description="Export keeper embed's table in clip-retrieval's layout (img_emb/*.npy + "
        "metadata/*.parquet)",
        model=ExportEmbeddingsConfig,
        run=export,
        describe=describe,
        exit_code=lambda _: 0,
        example="table=emb/ output=emb-cr/",
    )


if __name__ == "__main__":
    sys.exit(main())
