"""Corpus-wide near-duplicate groups from an embedding table, the best member of each kept.

    keeper dedup --table s3://bucket/emb/vit-b-32 --output s3://bucket/dedup/ [--keep-by sharpness]
    python -m keeper_train.jobs.dedup --config FILE table=... output=...   # the same job

Each row's ``k`` nearest neighbours come from a vector index (``--index``, one ``keeper index``
wrote for this table, or one built in memory: ``keeper_core.vector_index.choose_backend``), so the
cost is N searches, not N^2 comparisons. The candidate pairs then go through the same marking as
``keeper pick`` (``keeper_core.culling.mark_duplicates``): exact copies by content hash; near
copies at cosine >= ``similarity`` whose 64-bit dHashes are within ``max_hamming`` bits and whose
recorded capture times are not more than ``max_gap_s`` apart. The cosine and time defaults are
keeper pick's (``GroupingConfig``: their rationale is measured there); the dHash bound is wider
(``max_hamming``: lightly cropped copies count). The pixel guard is what keeps random or
merely topical embeddings (two photos of one subject) from counting as copies.

A group is a kept image and every image marked a duplicate of it; the kept one is the member
with the largest ``keep_by`` (a numeric column of the table: ``sharpness`` by default; ``pixels``
= width x height), ties by URI. Outputs under OUTPUT: ``groups.parquet`` (one row per member of
a group of two or more: group, kept, duplicate kind, cosine and dHash distance to the kept image,
its score), ``index.html`` + ``pages/`` (the largest ``report_groups`` groups as a contact sheet,
with thumbnails decoded from the images under ``thumbs/``) and ``_SUMMARY.json``.

A re-run into the same OUTPUT (after a kill, or with other settings) rewrites every file, and
once the new ``index.html`` is in place removes the pages and thumbnails an earlier run left
that this one's sheet does not show (only ``pages/page-NNNN.html`` and ``thumbs/xx/<hex>.jpg``
names): a page of an older run's groups is never left beside this run's.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from keeper_core import run_lock, storage
from keeper_core.contact_sheet import (
    SheetSummary,
    thumbnail_jpeg,
    thumbnail_name,
    write_contact_sheet,
)
from keeper_core.corpus import EMBEDDINGS, embedding_matrix
from keeper_core.culling import (
    DUPLICATE_EVIDENCE,
    copy_sets,
    follow_marks,
    mark_duplicates,
    table_frame,
)
from keeper_core.errors import ConfigError, DataError, KeeperError
from keeper_core.grouping import GroupingConfig
from keeper_core.images import decode_image, read_image_bytes
from keeper_core.vector_index import VectorIndex, build
from keeper_train.config import job_main

_GROUPING = GroupingConfig()
GROUP_COLUMNS = (
    "group",
    "group_size",
    "image_uri",
    "image_id",
    "kept",
    "duplicate_of",
    "kind",
    "cosine",
    "hamming",
    "score",
)


class DedupConfig(BaseModel):
    """Everything keeper dedup takes. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")

    table: str = Field(description="keeper embed's output folder or s3:// prefix")
    output: str = Field(description="folder or s3:// prefix for groups, report and summary")
    index: str | None = Field(
        None, description="a keeper index of this table (default: built in memory)"
    )

    @field_validator("table", "output", "index")
    @classmethod
    def _utf8_path(cls, v: str | None) -> str | None:
        return None if v is None else storage.utf8_path(v)  # the summary and sheet name them

    k: int = Field(10, ge=1, le=1000, description="neighbours searched per image")
    similarity: float = Field(
        _GROUPING.near_duplicate_similarity,
        gt=-1,
        le=1,
        description="cosine at or above which two images may be copies (keeper pick's default)",
    )
    max_hamming: int = Field(
        8,
        ge=0,
        le=64,
        description="most dHash bits two copies differ by (64: no pixel guard). 8, not keeper "
        "pick's 4: corpus dedup wants lightly cropped copies too. Measured on the 17 base "
        "photos of keeper_core.synthetic: a re-encode at quality 60 moved the hash 0-1 bits, "
        "a resize to half 0-4, a 0.5 % crop per side 0-5, a 1 % crop 0-10, while two "
        "different photos were never closer than 13",
    )
    max_gap_s: float = Field(
        _GROUPING.max_gap_s,
        gt=0,
        description="two recorded capture times further apart are different moments, not copies",
    )
    keep_by: str = Field(
        "sharpness",
        description="the group member kept: largest value of this numeric column (checked "
        "against the table's schema before any work), or pixels",
    )
    report_groups: int = Field(200, ge=0, description="largest groups shown in index.html")


class DedupSummary(BaseModel):
    table: str
    output: str
    model_spec: str
    images: int
    groups: int
    duplicates: int
    exact: int
    near: int
    kept_by: str
    index: str
    seconds: dict[str, float]
    notes: list[str]


def run(cfg: DedupConfig) -> DedupSummary:
    """``keeper dedup``, holding the output's lock (``run_lock``: one run per output at a time;
    ``BusyError`` where another holds it)."""
    with run_lock.holding(cfg.output, job="keeper dedup"):
        return _run(cfg)


def _run(cfg: DedupConfig) -> DedupSummary:
    t0 = time.perf_counter()
    seconds: dict[str, float] = {}
    df, emb, spec = read_table(cfg.table, cfg.keep_by)
    seconds["read"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    uris = df["image_uri"].tolist()
    if cfg.index:
        index = VectorIndex.load(cfg.index)
        missing = len(set(uris) - set(index.ids))
        if missing:
            raise DataError(
                f"the index holds {len(index)} rows and lacks {missing} of the table's: run "
                f"keeper index on {cfg.table} again",
                source=cfg.index,
            )
        described = f"{cfg.index} ({index.meta.params.backend})"
    else:
        index = build(emb, uris, model_spec=spec)
        described = f"built in memory ({index.meta.params.backend})"
    a, b = neighbour_pairs(index, df, emb, cfg.k, spec)
    seconds["neighbours"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    score = keep_scores(df, cfg.keep_by)
    grouping = GroupingConfig(
        near_duplicate_similarity=cfg.similarity,
        near_duplicate_max_hamming=cfg.max_hamming,
        max_gap_s=cfg.max_gap_s,
    )
    dup_of, kind = mark_duplicates(
        df, emb, np.arange(len(df)), grouping, prefer=score, pairs=(a, b)
    )
    groups = group_frame(df, emb, dup_of, kind, score)
    seconds["mark"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    storage.write_parquet(
        pa.Table.from_pandas(groups, preserve_index=False),
        storage.join(cfg.output, "groups.parquet"),
    )
    counts = groups["kind"].value_counts()
    notes = []
    if spec.endswith(":random"):
        notes.append(
            f"{spec} has random weights: its cosines mean nothing, and the dHash guard decides"
        )
    summary = DedupSummary(
        table=cfg.table,
        output=cfg.output,
        model_spec=spec,
        images=len(df),
        groups=int(groups["group"].nunique()) if len(groups) else 0,
        duplicates=int((~groups["kept"]).sum()),
        exact=int(counts.get("exact", 0)),
        near=int(counts.get("near", 0)),
        kept_by=cfg.keep_by,
        index=described,
        seconds=seconds,
        notes=notes,
    )
    write_report(cfg, groups, summary)
    seconds["write"] = time.perf_counter() - t0
    summary.seconds = {k: round(v, 3) for k, v in seconds.items()}
    storage.write_bytes(
        storage.join(cfg.output, "_SUMMARY.json"), summary.model_dump_json(indent=2).encode()
    )
    return summary


def neighbour_pairs(
    index: VectorIndex, df: pd.DataFrame, emb: np.ndarray, k: int, spec: str
) -> tuple[np.ndarray, np.ndarray]:
    """Each photo's ``k`` nearest other photos, as row pairs for ``mark_duplicates``.

    One row of each set of copies (``copy_sets``: the same bytes, or the same but a JPEG's
    metadata) is searched, for ``k`` neighbours beyond its own copies: a photo stored in more
    places than ``k`` would otherwise find only itself. A pair through a copy counts for its
    set. Every neighbour is passed on, whatever the index scored it: ``mark_duplicates`` tests
    each pair on the float32 embeddings, and an approximate index's scores (usearch's i8 reads
    cosines up to ~0.006 low) would drop true copies at a cut of their own.
    """
    row = {u: i for i, u in enumerate(df["image_uri"].tolist())}
    sets = pd.Series(copy_sets(df))
    size = sets.map(sets.value_counts()).to_numpy()
    first = ~sets.duplicated().to_numpy()
    a_parts, b_parts = [], []
    for copies in np.unique(size[first]):
        rows = np.flatnonzero(first & (size == copies))
        n = min(k + int(copies), len(index))  # a row finds itself and its copies first
        found = index.search(emb[rows], n, model_spec=spec)
        a_parts.append(np.repeat(rows, n))
        b_parts.append(np.array([row.get(u, -1) for hits in found.ids for u in hits], np.int64))
    a, b = np.concatenate(a_parts), np.concatenate(b_parts)
    known = b >= 0  # an index row the table no longer has
    return a[known], b[known]


def numeric_columns(schema: pa.Schema) -> list[str]:
    """The columns ``keep_by`` may name: integer or floating point (``pixels`` aside)."""
    return [f.name for f in schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]


def check_keep_by(schema: pa.Schema, keep_by: str) -> None:
    """Refuse a ``keep_by`` that is not a numeric column of the table, naming the choices.

    A text column (``image_uri``) would make every score -inf and keep each group's image by
    URI without a word: refused, as a missing column is.

    Raises:
        ConfigError: ``keep_by`` is neither ``pixels`` nor a numeric column.
    """
    if keep_by == "pixels":
        return
    numeric = numeric_columns(schema)
    if keep_by in numeric:
        return
    if keep_by in schema.names:
        what = f"a column of type {schema.field(keep_by).type}, not a number"
    else:
        what = "not a column of the table"
    raise ConfigError(
        f"keep_by {keep_by!r} is {what}: keep_by is pixels or a numeric column: {numeric}"
    )


def read_table(table: str, keep_by: str) -> tuple[pd.DataFrame, np.ndarray, str]:
    """The table's rows (the columns dedup reads), embeddings (N, D) and its one model spec."""
    folder = storage.join(table, EMBEDDINGS)
    t = storage.read_parquet(folder)
    check_keep_by(t.schema, keep_by)  # first: before the rows are looked at
    if not t.num_rows:
        raise DataError("the embedding table has no rows", source=folder)
    specs = set(t.column("model_spec").to_pylist())
    if len(specs) != 1:
        raise DataError(f"the table mixes model specs {sorted(map(str, specs))}", source=folder)
    emb = embedding_matrix(t, source=folder)
    wanted = [*DUPLICATE_EVIDENCE, "width", "height"]
    if keep_by != "pixels":
        wanted.append(keep_by)
    df = table_frame(t.select([c for c in dict.fromkeys(wanted) if c in t.column_names]))
    if df["image_uri"].duplicated().any():
        raise DataError("an image_uri appears twice: run keeper embed again to dedupe its parts")
    return df, emb, str(specs.pop())


def keep_scores(df: pd.DataFrame, keep_by: str) -> np.ndarray:
    """The number each group keeps its largest of; a missing value ranks last."""
    if keep_by == "pixels":
        values = df["width"].to_numpy(np.float64) * df["height"].to_numpy(np.float64)
    else:
        values = pd.to_numeric(df[keep_by], errors="coerce").to_numpy(np.float64)
    return np.where(np.isfinite(values), values, -np.inf).clip(-1e300)


def group_frame(
    df: pd.DataFrame,
    emb: np.ndarray,
    dup_of: np.ndarray,
    kind: list[str | None],
    score: np.ndarray,
) -> pd.DataFrame:
    """One row per member of a group of two or more, largest groups first.

    An exact copy may point at a row that is itself a near duplicate: its group is that row's,
    and it is a near duplicate of the row kept (:func:`keeper_core.culling.follow_marks`).
    """
    head, kind = follow_marks(dup_of, kind)
    head = np.where(head >= 0, head, np.arange(len(df)))
    in_group = head != np.arange(len(df))
    in_group[head[in_group]] = True  # a kept image with at least one copy
    rows = np.flatnonzero(in_group)
    if not rows.size:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in GROUP_COLUMNS})
    heads = head[rows]
    size = pd.Series(heads).map(pd.Series(heads).value_counts()).to_numpy()
    uris = df["image_uri"].to_numpy()
    # Largest groups first, then by kept image; in a group the kept image first, then by URI.
    order = np.lexsort((uris[rows], rows != heads, heads, -size))
    rows, heads, size = rows[order], heads[order], size[order]
    number = {h: i for i, h in enumerate(pd.unique(heads))}
    ham = np.full(len(rows), np.nan)
    if "dhash" in df.columns:
        hashes = df["dhash"].to_numpy()
        ok = pd.notna(hashes[rows]) & pd.notna(hashes[heads])
        x = hashes[rows][ok].astype(np.int64).view(np.uint64)
        y = hashes[heads][ok].astype(np.int64).view(np.uint64)
        ham[ok] = np.bitwise_count(x ^ y)
    return pd.DataFrame(
        {
            "group": [number[h] for h in heads],
            "group_size": size.astype(np.int64),
            "image_uri": uris[rows],
            "image_id": df["image_id"].to_numpy()[rows],
            "kept": rows == heads,
            "duplicate_of": np.where(rows == heads, None, uris[heads]),
            "kind": [kind[r] for r in rows],
            "cosine": np.einsum("ij,ij->i", emb[rows], emb[heads]),
            "hamming": ham,
            "score": score[rows],
        }
    )


def write_report(cfg: DedupConfig, groups: pd.DataFrame, summary: DedupSummary) -> None:
    """The largest groups as a contact sheet (keeper pick's), thumbnails decoded here."""
    shown = groups[groups["group"] < cfg.report_groups].reset_index(drop=True)
    position = {u: i for i, u in enumerate(shown["image_uri"])}

    def thumb(row: Any) -> None:
        try:
            image = decode_image(read_image_bytes(row.image_uri), source=row.image_uri)
            storage.write_bytes(
                storage.join(cfg.output, thumbnail_name(row.image_id)),
                thumbnail_jpeg(image),
                durable=False,
            )
        except KeeperError:
            pass  # the sheet shows a grey box with the file name: the image is gone or broken

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(thumb, shown.itertuples()))
    picks = pd.DataFrame(
        {
            "image_uri": shown["image_uri"],
            "image_id": shown["image_id"],
            "group": shown["group"],
            "group_size": shown["group_size"],
            "capture_time": None,
            "camera": "",
            "rank": shown.groupby("group").cumcount() + 1,
            "score": shown["score"].replace(-np.inf, np.nan),
            "prob": np.nan,
            "decision": np.where(shown["kept"], "keep", "reject"),
            "reasons": [
                [] if k else [f"{kind} copy (cosine {c:.3f}, dHash {h:.0f} bits)"]
                for k, kind, c, h in zip(
                    shown["kept"], shown["kind"], shown["cosine"], shown["hamming"], strict=True
                )
            ],
            "duplicate_of": [
                -1 if d is None else position.get(d, -1) for d in shown["duplicate_of"]
            ],
            "duplicate_kind": shown["kind"],
        }
    )
    index_html = write_contact_sheet(
        cfg.output,
        picks,
        SheetSummary(
            images=summary.images,
            groups=summary.groups,
            keepers=summary.groups,
            alternates=0,
            rejects=summary.duplicates,
            duplicates=summary.duplicates,
            failed=0,
            seconds={k: round(v, 2) for k, v in summary.seconds.items()},
            ranker=f"kept by {summary.kept_by}",
            notes=[
                *summary.notes,
                f"the {min(cfg.report_groups, summary.groups)} largest of {summary.groups} "
                "duplicate groups; every group is in groups.parquet",
            ],
        ),
        title=f"keeper dedup: {cfg.table}",
    )
    pages = set(_PAGE_LINK.findall(storage.read_bytes(index_html).decode("utf-8")))
    thumbs = {thumbnail_name(i) for i in shown["image_id"]}
    prune(cfg.output, pages, thumbs)


_PAGE_LINK = re.compile(r"href='pages/(page-\d{4,}\.html)'")
_PAGE_FILE = re.compile(r"page-\d{4,}\.html")
_THUMB_FILE = re.compile(r"thumbs/[0-9a-f]{2}/[0-9a-f]{2,128}\.jpg")


def prune(output: str, pages: set[str], thumbs: set[str]) -> int:
    """Remove the sheet files of an earlier run that this run's sheet does not show.

    Only names the contact sheet writes (``pages/page-NNNN.html``, ``thumbs/xx/<hex>.jpg``)
    are candidates; ``pages`` are the page names this run's ``index.html`` links, ``thumbs``
    the thumbnail paths (relative to OUTPUT) of the images it shows. Returns files removed.
    """
    removed = 0
    for sub, keep, pattern in (("pages", pages, _PAGE_FILE), ("thumbs", thumbs, _THUMB_FILE)):
        folder = storage.join(output, sub)
        if not storage.is_s3(folder) and not Path(folder.removeprefix("file://")).is_dir():
            continue
        for f in storage.list_files(folder):
            rel = f.removeprefix(folder.rstrip("/") + "/")
            name = rel if sub == "pages" else f"{sub}/{rel}"
            if pattern.fullmatch(name) and name not in keep:
                storage.delete(f)
                removed += 1
    return removed


def describe(s: DedupSummary) -> str:
    lines = [
        f"keeper dedup: {s.images} images, {s.groups} duplicate groups, {s.duplicates} "
        f"duplicates ({s.exact} exact, {s.near} near), kept by {s.kept_by}; index {s.index}",
        f"  {storage.join(s.output, 'index.html')}  {storage.join(s.output, 'groups.parquet')}",
    ]
    lines += [f"  note: {n}" for n in s.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    return job_main(
        argv,
        job="dedup",
        description="Corpus-wide near-duplicate groups of an embedding table",
        model=DedupConfig,
        run=run,
        describe=describe,
        exit_code=lambda _: 0,
        example="table=emb/ output=dedup/",
    )


if __name__ == "__main__":
    sys.exit(main())
