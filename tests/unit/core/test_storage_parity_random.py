"""keeper_core.storage over random histories, alike on a local folder and on S3.

Seeded histories (``KEEPER_HISTORIES=200`` runs more; a failure names its seed and the last
steps, so it replays) apply one sequence of calls to a local root under ``tmp_path`` and to an
``s3://`` prefix on the session's moto_server, beside a model of what the stores hold (key ->
bytes, and the local folders, which outlive their files). Names are awkward but legal: spaces,
``é`` and ``日本``, ``# ? % + = & ~ * : |``, a backslash, a tab, quotes, leading dots (one shaped
like an unfinished local write's temporary file), a 249-byte segment, nested folders, names that
are prefixes of others (``a``, ``a.txt``, ``a/a b``). After each step:

- the call answers the same on both stores, and as the model says, or raises the same error type
  (StorageError, TooLargeError, DataError; ValueError / TypeError for a bad argument), never a
  retryable one: write_bytes (durable or not), read_bytes (whole, or capped: a TooLargeError
  naming the size), read_head, read_range (in and past the end: DataError; size 0: b""), exists
  (files, folders / prefixes, with a trailing ``/``, names one character off), object_info (the
  size; an unchanged file keeps its tag, a changed one gets another), delete (idempotent),
  list_files / list_stamped (recursive, sorted, suffixes case-insensitive, paged, a folder never
  listing a longer name beside it; an unchanged file keeps its stamp), write_parquet /
  read_parquet (a file, or a folder's parts in name order, a column some part lacks read as null;
  a part that is not Parquet, or a type conflict: DataError), join / parent / resolve on the
  names (``resolve`` through ``<folder>/../<name>`` reaches the same object on both);
- a refused call (a bad argument; a URI ending in ``/`` that names a folder; a write where a
  local folder or file is in the way) changes nothing;
- every few steps the listings are the model's; at the end each store holds exactly the model's
  bytes, the local root no temporary file and no folder the model lacks, and nothing outside the
  root was touched: the local root's neighbours (``é root2/``, a file ``é roo``) and the bucket's
  keys beside the prefix are as they were.

Intended differences, modelled as storage.py documents them:

- S3 has no folders (``list_files``: "S3 has no folders to be missing"): a local folder outlives
  its last file and ``exists`` says so ("a file, folder, object or non-empty s3:// prefix"), an
  S3 prefix with no keys does not exist; listing a missing local folder, or a file, is a
  StorageError where S3 lists an empty prefix; a write to a name that is a local folder, or lies
  under a local file, is refused locally (StorageError, nothing changed) but made on S3 (the
  history deletes it again); a delete of a local folder is refused, on S3 that name is no object.
- The local listing skips names shaped like an unfinished write's temporary file
  (``.<name>.<8 chars>.tmp``); S3 lists them.
- S3 keys are literal, a local path goes through the OS (``resolve``): names with ``.`` / ``..``
  or empty segments are kept out of the histories' writes.
- ``resolve`` strips the ref it is given, so ``" lead"`` resolves to ``<base>/lead`` on both.
- Stamps and tags differ in kind (S3: whole-second LastModified, the ETag; local: st_mtime_ns, a
  hash of mtime and size): only what they promise is compared.

The plain tests below pin what these histories found (fixed: each failed on the old code): a
local name with NUL, a lone surrogate on either store, or a name that is not UTF-8 on S3 gave a
bare ValueError / UnicodeEncodeError, not a StorageError; a local URI ending in ``/`` read,
wrote and deleted the file without it; deleting a local name under a file was an error, not the
no-op a missing name is; ``replace_file`` wrote an ``s3://`` URI as a relative local path; a
local write to ``..`` was called retryable; ``resolve`` kept an empty segment on S3 that it
dropped beside a dot segment. moto_server answers a key holding a
newline with 404 (real S3 stores it): no newline either.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from keeper_core.errors import DataError, StorageError
from keeper_core.storage import (
    Stamp,
    TooLargeError,
    delete,
    exists,
    join,
    list_files,
    list_stamped,
    object_info,
    parent,
    read_bytes,
    read_head,
    read_parquet,
    read_range,
    replace_file,
    resolve,
    s3_client,
    write_bytes,
    write_parquet,
)

#: histories in the suite (~0.4 s each, nearly all of it waiting on moto_server);
#: KEEPER_HISTORIES=200 looks further
SEEDS = int(os.environ.get("KEEPER_HISTORIES", "12"))
STEPS = 30
#: Steps between full listings (a request per store), which show what a refused call changed
#: within the log's last 12 steps.
CHECK_EVERY = 8
STEP_KINDS = (
    ["write"] * 6
    + ["read"] * 3
    + ["head", "range", "range", "exists", "exists", "info", "info", "delete", "delete"]
    + ["listing", "listing", "parquet_write", "parquet_write", "parquet_read", "parquet_read"]
    + ["names", "refused", "refused"]
)
LONG = "é" * 120 + "-long.bin"  # 249 bytes: one local name holds 255
#: Named as a local write's temporary file is (".<name>.<8 chars>.tmp"): local listings skip it.
TMP_SHAPED = ".a.txt.abcd1234.tmp"
TMP_NAME = re.compile(r"^\..*\.[a-z0-9_]{8}\.tmp$", re.DOTALL)
SEGMENTS = [
    "a",
    "a.txt",
    "a b",
    "é",
    "日本",
    "#1",
    "why?",
    "100%",
    "a+b",
    "a%20b",
    "k=v&w",
    ".hidden",
    "...",
    "sp ",
    " lead",
    "photo.JPG",
    "x.parquet",
    "~",
    "q'\"",
    "back\\slash",
    "tab\tx",
    "*:|",
    LONG,
    TMP_SHAPED,
]
PARQUET_KEYS = ["t/p0.parquet", "t/p1.PARQUET", "t/日本/p 2.parquet", "t/#3.parquet"]
SAME = object()  # expect(): S3 answers as the local store does


def ancestors(key: str) -> list[str]:
    parts = key.split("/")
    return ["/".join(parts[:i]) for i in range(1, len(parts))]


def near(key: str) -> str:
    """A name one character off ``key`` (a string prefix, not a folder), never a dot segment."""
    cut = key[:-1]
    if len(key) > 1 and not cut.endswith("/") and cut.rsplit("/", 1)[-1] not in (".", ".."):
        return cut
    return key + "~"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)  # as write_parquet does: the same bytes
    return bytes(sink.getvalue().to_pybytes())


def show(want: object) -> str:
    return want.__name__ if isinstance(want, type) else f"{want!r:.120}"


class History:
    def __init__(self, seed: int, tmp_path: Path, bucket: str) -> None:
        self.seed, self.tmp_path, self.bucket = seed, tmp_path, bucket
        self.rng = random.Random(seed)
        self.prefix = f"h{seed}/é root"
        self.local = str(tmp_path / "é root")
        self.s3 = f"s3://{bucket}/{self.prefix}"
        self.roots = {"local": self.local, "s3": self.s3}
        self.files: dict[str, bytes] = {}  # what both stores hold
        self.dirs: set[str] = {""}  # the local folders: delete leaves them
        self.version: dict[str, int] = {}  # changes of each key so far
        self.seen: dict[tuple[str, str, str], tuple[int, object, bytes]] = {}
        keys = {"a", "a.txt", "a/a b", *PARQUET_KEYS}
        for _ in range(40):
            if len(keys) >= 16:
                break
            depth = self.rng.choice([1, 1, 2, 2, 3])
            keys.add("/".join(self.rng.choice(SEGMENTS) for _ in range(depth)))
        self.keys = sorted(keys)
        self.names = sorted({"", *keys, *(a for k in keys for a in ancestors(k))})
        self.log: list[str] = []

    def msg(self, what: str) -> str:
        tail = "\n  ".join(self.log[-12:])
        return f"seed {self.seed}: {what}\n  {tail}".replace(LONG, "<LONG>")

    # -- the model -------------------------------------------------------------------------

    def pick(self, files: float = 0.2) -> str:
        """A name: a file's with chance ``files``, else the pool's (sometimes one character off)."""
        r = self.rng.random()
        if r < files and self.files:
            return self.rng.choice(sorted(self.files))
        key = self.rng.choice(self.names)
        return near(key) if r > 0.9 else key

    def under(self, key: str) -> list[str]:
        return sorted(f for f in self.files if not key or f.startswith(key + "/"))

    def blocked(self, key: str) -> bool:
        """A local folder is at ``key``, or a local file where one of its folders should be."""
        return key in self.dirs or any(a in self.files for a in ancestors(key))

    def changed(self, key: str) -> None:
        self.version[key] = self.version.get(key, 0) + 1

    def mark(self, kind: str, where: str, key: str, value: object) -> None:
        """An unchanged file keeps its stamp or tag; a tag changes with the content (S3: the
        ETag; local: a hash of mtime and size, whose mtime may not tick between two quick
        writes, so there only a new size must show)."""
        data, version = self.files[key], self.version.get(key, 0)
        before = self.seen.get((kind, where, key))
        if before is not None:
            was, old, old_data = before
            if was == version:
                assert old == value, self.msg(f"{kind} of unchanged {key!r} on {where}: {value}")
            elif (
                kind == "tag" and old_data != data and (where == "s3" or len(old_data) != len(data))
            ):
                assert old != value, self.msg(f"changed {key!r} kept its tag on {where}")
        self.seen[(kind, where, key)] = (version, value, data)

    def expect(
        self, what: str, call: Callable[[str], Any], want: object, s3_want: object = SAME
    ) -> dict[str, Any]:
        """``call(root)`` on each store answers ``want`` (a value, or an exception type, matched
        exactly) locally and ``s3_want`` (by default the same) on S3."""
        self.log.append(what)
        got: dict[str, Any] = {}
        for where, root in self.roots.items():
            w = want if s3_want is SAME or where == "local" else s3_want
            raises = isinstance(w, type) and issubclass(w, BaseException)
            try:
                got[where] = value = call(root)
            except Exception as e:
                if not (raises and type(e) is w):  # exactly: a bare ValueError is no DataError
                    e.add_note(self.msg(f"{what} on {where}: raised, want {show(w)}"))
                    raise
                got[where] = e
            else:
                assert not raises, self.msg(
                    f"{what} on {where}: gave {value!r:.120}, not {show(w)}"
                )
                assert value == w, self.msg(f"{what} on {where}: {value!r:.120} != {show(w)}")
            retryable = getattr(got[where], "retryable", False)
            assert not retryable, self.msg(f"{what} on {where}: retryable {got[where]}")
        return got

    def put(self, what: str, key: str, data: bytes, write: Callable[[str], None]) -> None:
        if self.blocked(key):
            # S3 has no folders: the object is made there, locally a folder or file is in the way.
            self.expect(
                f"{what} (blocked locally)", lambda r: write(join(r, key)), StorageError, None
            )
            delete(join(self.s3, key))  # both stores hold the same again
            return
        self.expect(what, lambda r: write(join(r, key)), None)
        self.files[key] = data
        self.dirs.update(ancestors(key))
        self.changed(key)

    # -- steps -----------------------------------------------------------------------------

    def step_write(self) -> None:
        key = self.pick()
        if key.lower().endswith(".parquet") and self.rng.random() < 0.7:
            key = self.pick()  # mostly keep the Parquet parts readable
        data = self.rng.randbytes(self.rng.choice([0, 1, 3, 16, 40]))
        durable = self.rng.random() < 0.5
        what = f"write_bytes {key!r} {len(data)} B durable={durable}"

        def write(uri: str) -> None:  # what it returns differs by design (S3: the new ETag)
            write_bytes(uri, data, durable=durable)

        self.put(what, key, data, write)

    def step_read(self) -> None:
        key = self.pick(files=0.5)
        data = self.files.get(key)
        cap = None if self.rng.random() < 0.5 else self.rng.randint(0, len(data or b"") + 2)
        want: object = StorageError if data is None else data
        if data is not None and cap is not None and len(data) > cap:
            want = TooLargeError
        got = self.expect(
            f"read_bytes {key!r} max_bytes={cap}",
            lambda r: read_bytes(join(r, key), max_bytes=cap),
            want,
        )
        if want is TooLargeError:
            assert data is not None
            for where, e in got.items():
                sizes = (e.size, e.max_bytes)
                assert sizes == (len(data), cap), self.msg(f"TooLargeError {sizes} on {where}")

    def step_head(self) -> None:
        key, n = self.pick(files=0.5), self.rng.choice([1, 2, 5, 64])
        data = self.files.get(key)
        want = StorageError if data is None else data[:n]
        self.expect(f"read_head {key!r} {n}", lambda r: read_head(join(r, key), n), want)

    def step_range(self) -> None:
        key = self.pick(files=0.5)
        data = self.files.get(key)
        end = len(data or b"")
        offset = self.rng.randint(0, end + 2)
        size = self.rng.randint(0, max(0, end - offset) + 2)
        want: object
        if size == 0:
            want = b""  # asked for nothing: nothing is looked at
        elif data is None:
            want = StorageError
        elif offset + size <= end:
            want = data[offset : offset + size]
        else:
            want = DataError
        what = f"read_range {key!r} {offset}+{size} of {end}"
        self.expect(what, lambda r: read_range(join(r, key), offset, size), want)

    def step_exists(self) -> None:
        key = self.pick()
        slash = "/" if key in self.dirs and self.rng.random() < 0.3 else ""
        in_files = key in self.files
        self.expect(
            f"exists {key + slash!r}",
            lambda r: exists(join(r, key) + slash),
            in_files or key in self.dirs,
            in_files or bool(self.under(key)),  # S3: a non-empty prefix
        )

    def step_info(self) -> None:
        key = self.pick(files=0.5)
        data = self.files.get(key)
        tags: dict[str, str] = {}

        def size(root: str) -> int:
            got = object_info(join(root, key))
            tags[root] = got.etag
            assert got.mtime is not None
            return got.size

        self.expect(f"object_info {key!r}", size, StorageError if data is None else len(data))
        for where, root in self.roots.items():
            if root in tags:
                self.mark("tag", where, key, tags[root])

    def step_delete(self) -> None:
        key = self.pick()
        above = [a for a in ancestors(key) if a in self.files]
        if above:
            # Defect (test_deleting_a_name_under_a_file_is_a_no_op): locally "not a directory".
            key = above[0]
        self.expect(
            f"delete {key!r}",
            lambda r: delete(join(r, key)),
            StorageError if key in self.dirs else None,
            None,  # S3: a folder's name is no object, and a missing one is no error
        )
        if self.files.pop(key, None) is not None:
            self.changed(key)

    def step_listing(self) -> None:
        target = self.rng.choice(sorted(self.dirs)) if self.rng.random() < 0.5 else self.pick()
        slash = "/" if self.rng.random() < 0.2 else ""
        suffixes = self.rng.choice([None, None, [".txt"], [".JPG", ".parquet"], [".tmp"], ["b"]])
        page = self.rng.choice([1000, 1000, 1000, 4])
        stamped = self.rng.random() < 0.5
        ends = tuple(s.lower() for s in suffixes or [])
        names = [
            k[len(target) + 1 :] if target else k
            for k in self.under(target)
            if not ends or k.lower().endswith(ends)
        ]
        local = [n for n in names if not TMP_NAME.match(n.rsplit("/", 1)[-1])]
        stamps: dict[str, list[tuple[str, Stamp]]] = {}

        def call(root: str) -> list[str]:
            head = join(root, target) + "/"
            lister = list_stamped if stamped else list_files
            entries = lister(join(root, target) + slash, suffixes=suffixes, page_size=page)
            uris = [e[0] for e in entries] if stamped else entries
            assert all(u.startswith(head) for u in uris), uris
            rel = [u[len(head) :] for u in uris]
            if stamped:
                stamps[root] = [
                    (target + "/" + n if target else n, e[1])
                    for n, e in zip(rel, entries, strict=True)
                ]
            return rel

        self.expect(
            f"{'list_stamped' if stamped else 'list_files'} {target + slash!r} {suffixes} "
            f"page={page}",
            call,
            local if target in self.dirs else StorageError,
            names,
        )
        for where, root in self.roots.items():
            for key, stamp in stamps.get(root, []):
                self.stamp(where, key, stamp)

    def stamp(self, where: str, key: str, stamp: Stamp) -> None:
        assert stamp.size == len(self.files[key]), self.msg(f"stamp {stamp} of {key!r}")
        if where == "s3":
            assert stamp.mtime_ns % 1_000_000_000 == 0, self.msg(f"S3 stamp {stamp}")
        self.mark("stamp", where, key, stamp)

    def step_parquet_write(self) -> None:
        key = self.rng.choice(PARQUET_KEYS) if self.rng.random() < 0.8 else self.pick()
        n = self.rng.randint(0, 3)
        cols: dict[str, pa.Array] = {"x": pa.array([self.rng.randint(-9, 9) for _ in range(n)])}
        r = self.rng.random()
        if r < 0.05:  # a type conflict with the other parts
            cols["x"] = pa.array([str(i) for i in range(n)], pa.string())
        elif r > 0.6:  # a column the other parts may lack: null there
            cols["s"] = pa.array(["é日本"[: i + 1] for i in range(n)], pa.string())
        table = pa.table(cols)
        what = f"write_parquet {key!r} {table.schema.names} {table.schema.types}"
        self.put(what, key, parquet_bytes(table), lambda u: write_parquet(table, u))

    def want_parquet(self, target: str, columns: list[str] | None) -> object:
        if target in self.files:
            parts = [target]
        else:
            parts = [k for k in self.under(target) if k.lower().endswith(".parquet")]
        if not parts:
            return StorageError
        try:
            tables = [pq.read_table(pa.BufferReader(self.files[p]), columns=columns) for p in parts]
        except (pa.ArrowException, KeyError):
            return DataError
        try:
            return pa.concat_tables(tables, promote_options="default")
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return DataError

    def step_parquet_read(self) -> None:
        target = self.rng.choice(["t", "t", "t/日本", "", *PARQUET_KEYS, self.pick()])
        columns = self.rng.choice([None, None, ["x"], ["s"]])
        self.expect(
            f"read_parquet {target!r} columns={columns}",
            lambda r: read_parquet(join(r, target), columns=columns),
            self.want_parquet(target, columns),
        )

    def step_names(self) -> None:
        key = self.rng.choice(self.keys)
        self.log.append(f"names {key!r}")
        for where, root in self.roots.items():
            uri = join(root, key)
            other = join(self.roots["s3" if where == "local" else "local"], key)
            up = key.rpartition("/")[0]
            assert uri == root + "/" + key, self.msg(f"join on {where}: {uri!r}")
            assert join(root + "/", "/" + key + "/") == uri, self.msg(f"join on {where}")
            assert join(root, *key.split("/")) == uri, self.msg(f"join of parts on {where}")
            assert parent(uri) == (join(root, up) if up else root), self.msg(f"parent on {where}")
            # resolve strips the ref, an absolute one too (a manifest line's blanks): the same on
            # both stores, though "sp " is then out of a manifest's reach.
            assert resolve(key, root) == join(root, key.strip()), self.msg(f"resolve on {where}")
            assert resolve(other, root) == other.strip(), self.msg(f"resolve {other!r} on {where}")
        folders = sorted(self.dirs - {""})
        if not folders:
            return
        # "<folder>/../<name>" names one object on both: S3 by resolve, locally through the OS
        # (which needs the folder: hence one that exists locally).
        ref = f"{self.rng.choice(folders)}/../{self.pick() or 'a'}"
        if ref != ref.strip():
            return
        norm = posixpath.normpath(ref)
        assert resolve(ref, self.s3) == join(self.s3, norm), self.msg(f"resolve {ref!r} on S3")
        assert resolve(ref, self.local) == join(self.local, ref), self.msg(f"resolve {ref!r}")
        data = self.files.get(norm)
        self.expect(
            f"read_bytes of resolve({ref!r})",
            lambda r: read_bytes(resolve(ref, r)),
            StorageError if data is None else data,
        )

    def step_refused(self) -> None:
        key = self.pick()
        folder = self.rng.choice(sorted(self.dirs))  # with a trailing "/": a folder, not a file
        table = pa.table({"x": [1]})
        text: Any = "text"  # not bytes
        rows: Any = {"x": [1]}  # not a pyarrow.Table
        cases: list[tuple[str, Callable[[str], Any], type[Exception]]] = [
            (
                "read_bytes max_bytes=-1",
                lambda r: read_bytes(join(r, key), max_bytes=-1),
                ValueError,
            ),
            ("read_head n=0", lambda r: read_head(join(r, key), 0), ValueError),
            ("read_range offset=-1", lambda r: read_range(join(r, key), -1, 1), ValueError),
            ("read_range size=-1", lambda r: read_range(join(r, key), 0, -1), ValueError),
            ("list_files page_size=0", lambda r: list_files(join(r, key), page_size=0), ValueError),
            ("list_stamped page_size=1001", lambda r: list_stamped(r, page_size=1001), ValueError),
            ("write_bytes str", lambda r: write_bytes(join(r, key), text), TypeError),
            ("write_parquet dict", lambda r: write_parquet(rows, join(r, key)), TypeError),
            (
                "write_bytes folder/",
                lambda r: write_bytes(join(r, folder) + "/", b"x"),
                StorageError,
            ),
            (
                "write_parquet folder/",
                lambda r: write_parquet(table, join(r, folder) + "/"),
                StorageError,
            ),
            ("read_bytes folder/", lambda r: read_bytes(join(r, folder) + "/"), StorageError),
            (
                "read_bytes folder/ max_bytes",
                lambda r: read_bytes(join(r, folder) + "/", max_bytes=9),
                StorageError,
            ),
            ("read_head folder/", lambda r: read_head(join(r, folder) + "/"), StorageError),
            ("read_range folder/", lambda r: read_range(join(r, folder) + "/", 0, 1), StorageError),
            ("object_info folder/", lambda r: object_info(join(r, folder) + "/"), StorageError),
            ("delete folder/", lambda r: delete(join(r, folder) + "/"), StorageError),
        ]
        what, call, exc = self.rng.choice(cases)
        self.expect(f"refused: {what} ({key!r}, folder {folder!r})", call, exc)

    # -- whole-store checks ----------------------------------------------------------------

    def check_listing(self) -> None:
        """Both listings are the model's, with sizes (S3 lists the temporary-shaped names)."""
        sizes = [(k, len(self.files[k])) for k in sorted(self.files)]
        stamps: dict[str, list[tuple[str, Stamp]]] = {}

        def call(root: str) -> list[tuple[str, int]]:
            got = list_stamped(root)
            keys = [u.removeprefix(root + "/") for u, _ in got]
            stamps[root] = [(k, st) for k, (_, st) in zip(keys, got, strict=True)]
            return [(k, st.size) for k, (_, st) in zip(keys, got, strict=True)]

        local = [(k, n) for k, n in sizes if not TMP_NAME.match(k.rsplit("/", 1)[-1])]
        self.expect("check: list_stamped of the root", call, local, sizes)
        for where, root in self.roots.items():
            for key, st in stamps[root]:
                self.stamp(where, key, st)

    def neighbours(self) -> dict[str, bytes | None]:
        """Everything under tmp_path outside the local root (a folder: None)."""
        out: dict[str, bytes | None] = {}
        for folder, dirs, files in os.walk(self.tmp_path):
            if Path(folder) == Path(self.local):
                dirs[:] = []
                continue
            for d in dirs:
                out[os.path.join(folder, d)] = None
            for f in files:
                out[os.path.join(folder, f)] = Path(folder, f).read_bytes()
        out.pop(self.local, None)
        return out

    def bucket_keys(self) -> dict[str, str]:
        """Every key in the bucket, with its ETag (S3's MD5 of a single-part object's bytes)."""
        pages = s3_client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
        return {o["Key"]: o["ETag"].strip('"') for p in pages for o in p.get("Contents", [])}

    def start(self) -> None:
        os.makedirs(self.local)
        # Neighbours whose names the root's is a prefix of: never listed, never touched.
        (self.tmp_path / "é root2").mkdir()
        (self.tmp_path / "é root2" / "x.txt").write_bytes(b"neighbour")
        (self.tmp_path / "é roo").write_bytes(b"neighbour")
        self.outside_s3: dict[str, str] = {}
        for k in (f"h{self.seed}/é root2/x.txt", f"h{self.seed}/é roo"):
            write_bytes(f"s3://{self.bucket}/{k}", b"neighbour")
            self.outside_s3[k] = hashlib.md5(b"neighbour").hexdigest()
        self.outside_local = self.neighbours()

    def finish(self) -> None:
        """Each store holds the model's bytes (S3: by ETag), and nothing beside the root changed."""
        on_disk: dict[str, bytes] = {}
        folders = {""}
        for folder, dirs, files in os.walk(self.local):
            rel = os.path.relpath(folder, self.local).replace(os.sep, "/")
            rel = "" if rel == "." else rel
            folders.update(f"{rel}/{d}" if rel else d for d in dirs)
            for f in files:
                on_disk[f"{rel}/{f}" if rel else f] = Path(folder, f).read_bytes()
        assert on_disk == self.files, self.msg(f"local files {sorted(on_disk)} != model")
        assert folders == self.dirs, self.msg(f"local folders {sorted(folders ^ self.dirs)}")
        want = dict(self.outside_s3)
        want.update(
            {f"{self.prefix}/{k}": hashlib.md5(v).hexdigest() for k, v in self.files.items()}
        )
        assert self.bucket_keys() == want, self.msg("the bucket is not the model's (or beside it)")
        assert self.neighbours() == self.outside_local, self.msg("touched outside the local root")


@pytest.mark.parametrize("seed", range(SEEDS))
def test_storage_parity_history(seed: int, tmp_path: Path, s3_bucket: str) -> None:
    h = History(seed, tmp_path, s3_bucket)
    try:
        h.start()
        for step in range(1, STEPS + 1):
            getattr(h, "step_" + h.rng.choice(STEP_KINDS))()
            if step % CHECK_EVERY == 0 or step == STEPS:
                h.check_listing()
        h.finish()
    except BaseException as e:
        e.add_note(h.msg("history"))
        raise


# ---------------------------------------------------------------------------------------------
# Defects the histories found, kept out of them (strict: a fix turns these into failures to
# un-mark, and the history may then draw the case).


def base_for(where: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if where == "s3":
        return f"s3://{request.getfixturevalue('s3_bucket')}/defects"
    return str(tmp_path / "defects")


def test_a_local_name_with_nul_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        write_bytes(str(tmp_path / "a\x00b.jpg"), b"x")


def test_a_name_that_is_not_utf8_is_a_storage_error_on_s3(s3_bucket: str, tmp_path: Path) -> None:
    write_bytes(str(tmp_path / "caf\udce9.jpg"), b"x")  # locally a legal (Latin-1) name
    assert read_bytes(str(tmp_path / "caf\udce9.jpg")) == b"x"
    with pytest.raises(StorageError):
        write_bytes(f"s3://{s3_bucket}/caf\udce9.jpg", b"x")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lone_surrogate_is_a_storage_error(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with pytest.raises(StorageError):
        write_bytes(join(base_for(where, tmp_path, request), "x\ud800.jpg"), b"x")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_uri_ending_in_a_slash_never_names_a_file(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    f = join(base_for(where, tmp_path, request), "f.bin")
    write_bytes(f, b"kept")
    assert not exists(f + "/")
    for call in (read_bytes, lambda u: write_bytes(u, b"lost"), delete):
        with pytest.raises(StorageError):
            call(f + "/")
    assert read_bytes(f) == b"kept"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_deleting_a_name_under_a_file_is_a_no_op(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    base = base_for(where, tmp_path, request)
    write_bytes(join(base, "a"), b"file")
    delete(join(base, "a", "b"))
    assert read_bytes(join(base, "a")) == b"file"


def test_replace_file_refuses_an_s3_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(StorageError):
            replace_file("s3://keeper-bucket/k.bin", b"x", check=lambda _: None)
    finally:
        assert not (tmp_path / "s3:").exists(), "wrote a local file named after the URI"


def test_a_write_over_dotdot_is_not_retryable(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    with pytest.raises(StorageError) as dot:
        write_bytes(join(str(tmp_path / "r"), "."), b"x")
    assert not dot.value.retryable
    with pytest.raises(StorageError) as dotdot:
        write_bytes(join(str(tmp_path / "r"), ".."), b"x")
    assert not dotdot.value.retryable


def test_resolve_drops_empty_segments_on_s3_as_beside_dot_segments() -> None:
    assert resolve("./i//a.jpg", "s3://bk/m") == "s3://bk/m/i/a.jpg"
    assert resolve("i//a.jpg", "s3://bk/m") == "s3://bk/m/i/a.jpg"
