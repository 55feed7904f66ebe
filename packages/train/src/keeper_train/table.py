"""What an embedding table's output folder holds, read once per run.

``keeper embed`` writes Parquet parts to ``DST/embeddings`` and ``DST/errors``. A run reads the
URIs they hold once when it plans (what is done, what failed and whether it may be retried), and
at the end reads only the parts written since: on S3 that is one LIST and one GET per new part,
not a GET per part of the whole table, again and again.

Invariants restored by every run (a task retried by Ray Data, or a job killed between writes,
can break them): every image URI is in at most one embeddings part, in at most one errors row,
and never in both (a later success removes its error row). An errors table of many small parts
(one per decode task with a failure) is rewritten as one part at the end of the run that wrote
them, so the next plan reads one part, not thousands.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from keeper_core import storage
from keeper_core.capture import epoch_time

#: An errors table of more parts than this is rewritten as one part at the end of a run
#: (``ErrorRows.compact``): below it, reading the parts costs a plan little.
COMPACT_OVER = 64
_IO_THREADS = 8  # parts read (a plan's read of the table) or deleted at once (requests, on S3)
#: Parts rewritten at once (``EmbeddedParts.update``): a part's read and write are I/O (a GET and
#: a PUT on S3) and Parquet work that releases the GIL. A prune of 1 % of a million 512-d rows
#: scattered over 972 parts: 29 s one at a time, 19 s at 4 or 8 on 2 cores, the driver's peak
#: +84, +263 and +462 MB (``benchmarks/prune_scale.py --dim 512``): 4.
REWRITE_THREADS = 4


def in_set(values: pd.Series, members: set[str]) -> np.ndarray:
    """Whether each of ``values`` is in ``members``, as a bool array; costs ``len(values)``.

    ``Series.isin(members)`` costs ``len(members)`` on every call whatever the Series' length:
    pandas 3's ``str`` columns make an Arrow scalar of each member (~5 s for a set of a million
    URIs, measured: benchmarks/plan_scale.py), and a table's parts are many small Series.
    """
    return np.fromiter((v in members for v in values.tolist()), dtype=bool, count=len(values))


def _keys(uris: pd.Series) -> pd.Series:
    """``storage.same_key`` of each URI."""
    return pd.Series([storage.same_key(str(u)) for u in uris], index=uris.index, dtype=object)


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns in its order: a missing one null (``retryable``:
    False, as ``ErrorRows`` reads it), other columns dropped, types cast."""
    cols = []
    for f in schema:
        if f.name in table.column_names:
            cols.append(table[f.name].cast(f.type))
        elif f.name == "retryable":
            cols.append(pa.array([False] * table.num_rows, f.type))
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def list_parts(folder: str) -> list[str]:
    """The Parquet parts under ``folder``, by name; none when a local folder does not exist yet."""
    if not storage.is_s3(folder) and not Path(folder.removeprefix("file://")).is_dir():
        return []
    return sorted(storage.list_files(folder, suffixes=[".parquet"]))


def _rewrite_without(
    part: str, keep: list[bool], change: Callable[[pa.Table], pa.Table] | None = None
) -> None:
    """Drop the rows of ``part`` where ``keep`` is False (delete the part when none is left),
    the rest ``change``d first when given."""
    if not any(keep):
        storage.delete(part)
        return
    table = storage.read_parquet(part)
    if change is not None:
        table = change(table)
    storage.write_parquet(table.filter(pa.array(keep)), part)


#: A row's file stamp as the embeddings and errors tables keep it (``storage.Stamp``: size, then
#: mtime in ns); -1 in :attr:`EmbeddedParts.stamps` where a row has none (written before they
#: were kept, a shard member, a manifest row).
STAMP_COLUMNS = ("file_size", "file_mtime_ns")


@dataclass
class EmbeddedParts:
    """part file -> the image URIs it holds, for every part under ``folder``, and the stamps of
    their files when they were listed for embedding (:attr:`stamps`)."""

    folder: str
    by_part: dict[str, list[str]] = field(default_factory=dict)
    #: part -> (rows, 2) int64: each row's file size and mtime (ns), -1 where none; 16 bytes a
    #: row (not a tuple each: a million rows' ids would hold ~0.5 GB in the driver)
    stamps: dict[str, np.ndarray] = field(default_factory=dict)
    #: part -> the model specs its rows hold (their ``model_spec`` column; none where it has none)
    specs: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def read(cls, folder: str, known: EmbeddedParts | None = None) -> EmbeddedParts:
        """List ``folder``; read the parts ``known`` does not hold yet, :data:`_IO_THREADS` at
        once (every plan reads the whole table: on S3 a GET a part)."""
        parts = list_parts(folder)
        seen = known if known is not None else cls(folder)
        new = [p for p in parts if p not in seen.by_part]

        def one(part: str) -> tuple[list[str], np.ndarray, frozenset[str]]:
            t = _read_columns(part, ("image_uri", "model_spec", *STAMP_COLUMNS))
            specs = frozenset(
                str(v)
                for v in (
                    pc.unique(t.column("model_spec")).to_pylist()
                    if "model_spec" in t.column_names
                    else []
                )
                if v is not None
            )
            stamps = np.stack(
                [
                    t.column(c).fill_null(-1).to_numpy()
                    if c in t.column_names
                    else np.full(t.num_rows, -1, np.int64)
                    for c in STAMP_COLUMNS
                ],
                axis=1,
            ).astype(np.int64)
            return t.column("image_uri").to_pylist(), stamps, specs

        read = dict(zip(new, storage.map_in_threads(one, new, _IO_THREADS), strict=True))
        return cls(
            folder,
            {p: read[p][0] if p in read else seen.by_part[p] for p in parts},
            {p: read[p][1] if p in read else seen.stamps[p] for p in parts},
            {p: read[p][2] if p in read else seen.specs.get(p, frozenset()) for p in parts},
        )

    def model_specs(self) -> set[str]:
        """The model specs the rows hold."""
        return set().union(*self.specs.values())

    def uris(self) -> set[str]:
        return {u for uris in self.by_part.values() for u in uris}

    def stamped(self) -> Iterator[tuple[str, storage.Stamp | None]]:
        """Each row's URI and stamp (None where it has none)."""
        for part, uris in self.by_part.items():
            for u, (size, mtime) in zip(uris, self.stamps[part].tolist(), strict=True):
                yield u, storage.Stamp(size, mtime) if size >= 0 and mtime >= 0 else None

    def ids(self, uris: set[str]) -> dict[str, tuple[str | None, str | None]]:
        """``image_id`` and ``content_id`` (None: written before it was kept) of ``uris``' rows,
        reading only the parts that hold them."""

        def of_part(part: str) -> list[tuple[str, tuple[str | None, str | None]]]:
            t = _read_columns(part, ("image_uri", "image_id", "content_id"))
            ids = t.column("image_id").to_pylist() if "image_id" in t.column_names else None
            cids = t.column("content_id").to_pylist() if "content_id" in t.column_names else None
            return [
                (u, (ids[i] if ids else None, cids[i] if cids else None))
                for i, u in enumerate(t.column("image_uri").to_pylist())
                if u in uris
            ]

        holding = [p for p, have in self.by_part.items() if not uris.isdisjoint(have)]
        out: dict[str, tuple[str | None, str | None]] = {}
        for found in storage.map_in_threads(of_part, holding, _IO_THREADS):
            for u, both in found:
                out.setdefault(u, both)
        return out

    def dedupe(self) -> int:
        """Make every URI appear once; the first part by name keeps it. Returns rows removed.

        Parts are named by a hash of their rows, so a retried task rewrites its own part; a retry
        that formed a different batch can still leave a row in two parts.
        """
        seen: set[str] = set()
        removed = 0
        for part in sorted(self.by_part):
            uris = self.by_part[part]
            keep = []
            for u in uris:  # a row at a time: one part may hold a URI twice
                keep.append(u not in seen)
                seen.add(u)
            if all(keep):
                continue
            removed += keep.count(False)
            _rewrite_without(part, keep)
            self._kept(part, keep)
        return removed

    def update(self, drop: set[str], stamps: dict[str, storage.Stamp]) -> int:
        """Remove the rows of ``drop`` (files changed since: embedded again this run) and give
        the rows of ``stamps`` those stamps (files whose content did not change), rewriting each
        part that holds one once, :data:`REWRITE_THREADS` at once. Returns the rows removed."""
        touched = {
            part: [u not in drop for u in uris]
            for part, uris in sorted(self.by_part.items())
            if any(u in drop or u in stamps for u in uris)
        }

        def rewrite(part: str) -> None:
            _rewrite_without(part, touched[part], lambda t: _restamped(t, stamps))

        for _ in storage.map_in_threads(rewrite, touched, REWRITE_THREADS):
            pass  # a failure raises here, in the parts' order
        removed = 0
        for part, keep in touched.items():
            for i, u in enumerate(self.by_part[part]):
                if u in stamps:
                    self.stamps[part][i] = stamps[u]
            self._kept(part, keep)
            removed += keep.count(False)
        return removed

    def remove(self, uris: set[str]) -> int:
        """Remove the rows of ``uris``; returns how many there were."""
        return self.update(uris, {})

    def copy_rows(
        self,
        rows: dict[str, str],
        stamps: dict[str, storage.Stamp],
        name: str,
        *,
        image_ids: dict[str, str] | None = None,
    ) -> None:
        """Write, as one new part ``name``, a copy of each row ``rows`` names (new URI -> the URI
        of the row to copy) under its new URI and with its ``stamps`` (and ``image_ids``: the
        new file's own sha256, which differs where only its metadata does); every other column
        (the embedding, features, capture metadata, content id) as the row holds it, but a
        capture time taken from the file's modification time, which is the new file's."""
        wanted = set(rows.values())

        def of_part(part: str) -> list[tuple[str, pa.Table]]:
            t = storage.read_parquet(part)
            return [
                (u, t.slice(i, 1))
                for i, u in enumerate(t.column("image_uri").to_pylist())
                if u in wanted
            ]

        holding = sorted(p for p, uris in self.by_part.items() if not wanted.isdisjoint(uris))
        found: dict[str, pa.Table] = {}
        for rows_of_part in storage.map_in_threads(of_part, holding, _IO_THREADS):
            for u, row in rows_of_part:
                found.setdefault(u, row)
        new = [u for u in rows if rows[u] in found]
        if not new:
            return
        table = pa.concat_tables(
            [found[rows[u]] for u in new], promote_options="default"
        ).combine_chunks()
        table = table.set_column(
            table.column_names.index("image_uri"), "image_uri", pa.array(new, pa.string())
        )
        table = _restamped(table, {u: stamps[u] for u in new})
        if image_ids and "image_id" in table.column_names:
            ids = [
                image_ids.get(u, i) for u, i in zip(new, table["image_id"].to_pylist(), strict=True)
            ]
            table = table.set_column(
                table.column_names.index("image_id"), "image_id", pa.array(ids, pa.string())
            )
        table = _file_times(table, [stamps[u].mtime_ns for u in new])
        part = storage.join(self.folder, name)
        storage.write_parquet(table, part)
        self.by_part[part] = new
        self.stamps[part] = np.array([stamps[u] for u in new], dtype=np.int64).reshape(-1, 2)

    def _kept(self, part: str, keep: list[bool]) -> None:
        kept = [u for u, k in zip(self.by_part[part], keep, strict=True) if k]
        if kept:
            self.by_part[part] = kept
            self.stamps[part] = self.stamps[part][np.array(keep, dtype=bool)]
        else:
            del self.by_part[part]
            del self.stamps[part]


def restamp_written(folder: str, written: dict[str, tuple[storage.Stamp, str]]) -> int:
    """Give the rows of files keeper itself rewrote, content unchanged (``--xmp embed``: file URI
    -> its new stamp and content digest), those stamps; returns the rows restamped.

    Else the next plan would read each of them again to find what keeper already knows: at the
    first ``--xmp embed`` run, every JPEG of the library. A row whose ``content_id`` is not the
    rewritten file's (changed by someone after it was embedded) keeps its stamp, so the next
    plan embeds it again.
    """
    if not written:
        return 0
    parts = EmbeddedParts.read(folder)
    by_key = {storage.same_key(u): w for u, w in written.items()}
    rows = {
        u: w
        for u, st in parts.stamped()
        if (w := written.get(u) or by_key.get(storage.same_key(u))) is not None and st != w[0]
    }
    ids = parts.ids(set(rows))
    stamps = {u: w[0] for u, w in rows.items() if ids.get(u, (None, None))[1] == w[1]}
    if stamps:
        parts.update(set(), stamps)
    return len(stamps)


def _read_columns(part: str, columns: tuple[str, ...]) -> pa.Table:
    """The ``columns`` of ``part`` it has (a column written after the part was: left out)."""
    f = pq.ParquetFile(pa.BufferReader(storage.read_bytes(part)))
    return f.read(columns=[c for c in columns if c in f.schema_arrow.names])


def _file_times(table: pa.Table, mtime_ns: list[int]) -> pa.Table:
    """``table`` with the capture time of each row timed by its file's modification time
    (``time_source`` "mtime": the photo has no EXIF time) set from ``mtime_ns``, its file's, as
    ``capture.epoch_time`` sets it when the row is made."""
    sources = table["time_source"].to_pylist() if "time_source" in table.column_names else []
    if "mtime" not in sources:
        return table
    times = list(
        zip(table["capture_time"].to_pylist(), table["capture_ts"].to_pylist(), strict=True)
    )
    for k, (source, ns) in enumerate(zip(sources, mtime_ns, strict=True)):
        if source == "mtime":
            times[k] = epoch_time(ns / 1_000_000_000, "mtime")[:2]
    for col, values in (
        ("capture_time", [t[0] for t in times]),
        ("capture_ts", [t[1] for t in times]),
    ):
        i = table.column_names.index(col)
        table = table.set_column(i, col, pa.array(values, table.schema.field(col).type))
    return table


def _restamped(table: pa.Table, stamps: dict[str, storage.Stamp]) -> pa.Table:
    """``table`` with the stamp columns of the rows of ``stamps`` set (added where absent)."""
    uris = table.column("image_uri").to_pylist()
    if not any(u in stamps for u in uris):
        return table
    for k, name in enumerate(STAMP_COLUMNS):
        old = (
            table.column(name).to_pylist()
            if name in table.column_names
            else [None] * table.num_rows
        )
        new = pa.array(
            [stamps[u][k] if u in stamps else o for u, o in zip(uris, old, strict=True)], pa.int64()
        )
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, new)
        else:
            table = table.append_column(name, new)
    return table


@dataclass
class ErrorRows:
    """The errors table: one DataFrame per part (``image_uri, reason, retryable, run_id, at``)."""

    folder: str
    by_part: dict[str, pd.DataFrame] = field(default_factory=dict)

    #: file_size, file_mtime_ns: the file's stamp when it failed (null before they were kept)
    COLUMNS = ("image_uri", "reason", "retryable", "run_id", "at", *STAMP_COLUMNS)

    @classmethod
    def read(cls, folder: str, known: ErrorRows | None = None) -> ErrorRows:
        seen = known.by_part if known is not None else {}
        return cls(folder, {p: seen[p] if p in seen else cls._read(p) for p in list_parts(folder)})

    @classmethod
    def _read(cls, part: str) -> pd.DataFrame:
        # int64 as pandas' Int64: a stamp's nanoseconds do not survive a float64 (nulls' dtype)
        df = storage.read_parquet(part).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
        if "retryable" not in df.columns:  # written before failures said whether they may pass
            df["retryable"] = False
        for col in ("reason", "run_id", "at"):
            if col not in df.columns:
                df[col] = ""
        for col in STAMP_COLUMNS:
            if col not in df.columns:
                df[col] = pd.Series([pd.NA] * len(df), dtype="Int64")
        return df[list(cls.COLUMNS)].reset_index(drop=True)

    def rows(self) -> pd.DataFrame:
        frames = [df for df in self.by_part.values() if len(df)]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in self.COLUMNS})
        return pd.concat(frames, ignore_index=True)

    def uris(self) -> set[str]:
        return set(self.rows()["image_uri"].astype(str))

    def remove(self, keys: set[str]) -> int:
        """Delete the rows of the files ``keys`` name (``storage.same_key`` of their URIs, e.g.
        of images embedded since), however each row spells its file: a photo that failed as
        ``lib/x.jpg`` and was embedded as ``/home/me/lib/x.jpg`` is no failure. Returns rows
        removed.

        Rows are looked up in ``keys`` (``in_set``): with ``Series.isin`` every errors part (one
        per decode task that failed an image) paid for the whole set, parts x embedded images.
        """
        return sum(
            self._keep(part, (~in_set(_keys(df["image_uri"]), keys)).tolist())
            for part, df in sorted(self.by_part.items())
        )

    def reread(self, stale: Callable[[str, pd.DataFrame], bool]) -> ErrorRows:
        """The table read again, each part as held here except those ``stale(part, rows)``
        names (and any part new since), which are read from the store: parts are named by their
        URIs, so a part written since (a retried failure failing again, a twin's failure) can
        have replaced one of the same name that this view holds as it was."""
        known = {k: df for k, df in self.by_part.items() if not stale(k, df)}
        return ErrorRows.read(self.folder, known=ErrorRows(self.folder, known))

    def dedupe(self) -> int:
        """Keep one row per file (``storage.same_key``: one file failed under two spellings is
        one failure): the latest attempt's (by ``at``, then part name). One row in two parts at
        the same ``at`` (a compaction killed before its deletes) is kept in the larger part, so
        the small parts go whole instead of the large one being rewritten."""
        latest: dict[str, tuple[str, int]] = {}
        keyed = {part: _keys(df["image_uri"]).tolist() for part, df in self.by_part.items()}
        order = sorted(
            (str(at), len(df), part, i, key)
            for part, df in self.by_part.items()
            for i, (key, at) in enumerate(zip(keyed[part], df["at"], strict=True))
        )
        for _, _, part, i, key in order:
            latest[key] = (part, i)
        return sum(
            self._keep(part, [latest[k] == (part, i) for i, k in enumerate(keyed[part])])
            for part, df in sorted(self.by_part.items())
        )

    def compact(self, schema: pa.Schema, name: str) -> int:
        """The table as one part, ``name``, once it has more than ``COMPACT_OVER`` parts; returns
        the parts it replaced (0 when it had few enough).

        Decode tasks write one part per batch with a failure, so a run that fails 10 % of 1M
        images leaves ~6,250 parts, each a read (a request on S3) for every later plan. Every
        column of ``schema`` is kept (a column a part lacks is null there; ``retryable``
        False). The new part is written before the old ones are deleted: a run killed between
        leaves rows twice, which the next run's ``dedupe`` resolves.
        """
        parts = sorted(self.by_part)
        if len(parts) <= COMPACT_OVER:
            return 0
        tables = list(storage.map_in_threads(storage.read_parquet, parts, _IO_THREADS))
        table = pa.concat_tables(
            [_conform(t, schema) for t in tables], promote_options="none"
        ).combine_chunks()
        new = storage.join(self.folder, name)
        storage.write_parquet(table, new)
        for _ in storage.map_in_threads(
            storage.delete, [p for p in parts if p != new], _IO_THREADS
        ):
            pass  # a failure raises here, in the parts' order
        self.by_part = {new: self.rows()}
        return len(parts)

    def _keep(self, part: str, keep: list[bool]) -> int:
        """Rewrite ``part`` with only the rows where ``keep``; returns rows dropped."""
        if all(keep):
            return 0
        _rewrite_without(part, keep)
        kept = self.by_part[part][keep].reset_index(drop=True)
        if len(kept):
            self.by_part[part] = kept
        else:
            del self.by_part[part]
        return keep.count(False)
