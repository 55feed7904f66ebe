"""Export keeper embed's table in clip-retrieval's layout, for autofaiss and clip-retrieval's back end.

    keeper export-embeddings --table s3://bucket/emb/vit-b-32 --output s3://bucket/emb/vit-b-32-cr
    python -m keeper_train.jobs.export_embeddings --config FILE table=... output=...  # the same

clip-retrieval's ``inference`` writes, per output partition ``K``, ``img_emb/img_emb_K.npy``
(float16, unit-norm rows) and ``metadata/metadata_K.parquet`` whose row i describes row i of the
array (``image_path``, ``caption``, and the sample's metadata as columns). autofaiss builds an index
from ``img_emb/`` (``autofaiss build_index --embeddings=OUT/img_emb``), and clip-retrieval's back
end serves it with the metadata beside it; both take the files in name order. So each part of
keeper's table becomes one partition, in order:
``image_path`` is keeper's ``image_uri``; ``caption`` is carried when the corpus had captions (a
WebDataset); every other column (image_id, size, quality features, capture metadata, dhash)
follows as a metadata column. A ``keeper_export.json`` beside them names the model spec, the
dimension and the row count: the files themselves do not say which model made them, and a query
embedded with another model would be silently meaningless.

Streams one part at a time (memory: one part), local or ``s3://``. The table is read as it is:
``keeper embed`` leaves every image in exactly one part, so rows are neither merged nor dropped.

``K`` is zero-padded to a fixed ``PAD`` (8) digits, whatever the table's size (clip-retrieval pads
to the digits of its partition count, so its names change when the count crosses a power of ten):
a re-export after the table grew or shrank writes the same names for the same partition numbers,
and name order is number order. Before anything is written, an OUTPUT that holds partition files
this run would not write (``*.npy`` under ``img_emb/`` or ``text_emb/``, ``*.parquet`` under
``metadata/``: an export of a larger table, or one named another way) is refused: autofaiss
would index them beside this export's. No partition file is deleted; a re-export of a table of
the same or more parts overwrites every file of the previous one. ``keeper_export.json`` is
removed before the first partition is written and written after the last, so one on disk
describes the files beside it.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from keeper_core import run_lock, storage
from keeper_core.corpus import EMBEDDINGS, embedding_matrix
from keeper_core.errors import ConfigError, DataError
from keeper_train.config import job_main
from keeper_train.data import check_embed_table
from keeper_train.table import list_parts

IMG_EMB, METADATA, META = "img_emb", "metadata", "keeper_export.json"
TEXT_EMB = "text_emb"  # clip-retrieval's text embeddings: never written here, but read beside
PAD = 8  # digits of K in img_emb_K.npy / metadata_K.parquet: 10**8 partitions, whatever the table


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
    """``keeper export-embeddings``, holding the output's lock (``run_lock``: one run per output at a time;
    ``BusyError`` where another holds it)."""
    with run_lock.holding(cfg.output, job="keeper export-embeddings"):
        return _export(cfg)


def _export(cfg: ExportEmbeddingsConfig) -> ExportSummary:
    """Write every part of the table as one img_emb/metadata partition pair; then the sidecar.

    Raises:
        DataError: no table there, more parts than ``PAD`` digits number, a part that is not
            keeper embed's (a column missing), or parts of several model specs or dimensions.
        ConfigError: OUTPUT holds partition files this export would not overwrite.
    """
    folder = storage.join(cfg.table, EMBEDDINGS)
    parts = list_parts(folder)
    if not parts:
        raise DataError(f"no embedding table here (keeper embed writes {folder}/part-*.parquet)")
    if len(parts) > 10**PAD:
        raise DataError(
            f"{folder}: {len(parts)} parts; the export numbers partitions with {PAD} digits "
            f"(at most {10**PAD})"
        )
    _refuse_stale(cfg.output, len(parts))
    spec: str | None = None
    dim = rows = 0
    columns: list[str] = []
    for k, part in enumerate(parts):
        t = storage.read_parquet(part)
        check_embed_table(t.column_names, source=part)
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
        if k == 0:  # a run that fails half-way leaves no sidecar vouching for the files
            storage.delete(storage.join(cfg.output, META))
        emb_file, meta_file = _partition(k)
        buf = io.BytesIO()
        np.save(buf, emb.astype(cfg.dtype), allow_pickle=False)
        storage.write_bytes(storage.join(cfg.output, IMG_EMB, emb_file), buf.getvalue())
        meta = _metadata(t)
        columns = meta.column_names
        storage.write_parquet(meta, storage.join(cfg.output, METADATA, meta_file))
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


def _partition(k: int) -> tuple[str, str]:
    """Partition ``k``'s file names in ``img_emb/`` and ``metadata/``."""
    name = str(k).zfill(PAD)
    return f"img_emb_{name}.npy", f"metadata_{name}.parquet"


def _refuse_stale(output: str, partitions: int) -> None:
    """Refuse an OUTPUT holding partition files that an export of ``partitions`` would not write.

    Those are what autofaiss and clip-retrieval read (every ``*.npy`` under ``img_emb/`` and
    ``text_emb/``, every ``*.parquet`` under ``metadata/``, recursively): left beside this export,
    they would be indexed and served as if they were part of it.
    """
    names = [_partition(k) for k in range(partitions)]
    ours = {IMG_EMB: {e for e, _ in names}, METADATA: {m for _, m in names}, TEXT_EMB: set()}
    suffix = {IMG_EMB: ".npy", METADATA: ".parquet", TEXT_EMB: ".npy"}
    stale: list[str] = []
    for sub, written in ours.items():
        folder = storage.join(output, sub)
        if not storage.is_s3(folder) and not Path(folder.removeprefix("file://")).exists():
            continue
        prefix = folder.rstrip("/") + "/"
        stale += [
            f
            for f in storage.list_files(folder, suffixes=[suffix[sub]])
            if f.removeprefix(prefix) not in written
        ]
    if stale:
        shown = ", ".join(stale[:3]) + (f" and {len(stale) - 3} more" if len(stale) > 3 else "")
        raise ConfigError(
            f"output: {output} holds {len(stale)} partition files this export of {partitions} "
            f"partitions would not overwrite ({shown}); autofaiss and clip-retrieval would read "
            "them as part of it. Export to an empty output, or remove them first"
        )


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
