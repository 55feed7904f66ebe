"""WebDataset tar shards (as img2dataset writes them) read as an image corpus, local or ``s3://``.

A shard is a POSIX tar whose members group into samples by key: the member's path up to the
first ``.`` of its basename (``000000012.jpg``, ``000000012.txt``, ``000000012.json`` form sample
``000000012``). Each image gets a stable URI, ``<shard>#<member>``
(``s3://b/shards/00001.tar#000010012.jpg``).

keeper indexes each shard once (:func:`index_shard`: the tar headers, the small caption and
metadata members, never the image data) and then reads every image by its byte range
(:func:`read_member`). So each decode task fetches only its own images; the embed job's
per-image resume, error table and safety checks apply unchanged; and a shard whose images are
all in the table or the error table is skipped from its cached index (:func:`load_or_index`)
without being opened again. Ray Data's ``read_webdataset`` instead makes one read task per
whole shard, sends rows of raw bytes through the object store, and can resume only per shard.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from keeper_core import storage
from keeper_core.errors import DataError, ImageDecodeError, StorageError
from keeper_core.formats import IMAGE_SUFFIXES

__all__ = [
    "IMAGE_EXTENSIONS",
    "SAMPLE_PROBLEMS",
    "SampleProblem",
    "ShardIndex",
    "ShardSample",
    "index_cache_name",
    "index_shard",
    "is_webdataset",
    "list_shards",
    "load_or_index",
    "member_uri",
    "names_shards",
    "read_member",
    "split_member_uri",
]

#: A sample's image member: the first of these extensions it has (lower case, no dot).
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
#: Every reason a :class:`SampleProblem` may carry (stable strings: they may land in tables).
SAMPLE_PROBLEMS = (
    "missing_image",  # a key with no image member
    "caption_too_long",  # the .txt member is over the index's byte limit (not read)
    "caption_not_utf8",
    "metadata_too_long",  # the .json member is over the index's byte limit (not read)
    "invalid_json",
    "duplicate_member",  # a second member with the same key and extension (the first is kept)
    "unsupported_member",  # a link, device or sparse file where a file was expected
)
#: Caption and metadata members longer than this are not read into an index (img2dataset's are
#: a few hundred bytes; 64 KiB leaves room for long alt texts without letting a stray big
#: member bloat the cached index).
DEFAULT_MAX_INDEX_BYTES = 64 * 1024
_FORMAT, _VERSION = "keeper.shard-index", 1
_SIDECARS = (".parquet", "_stats.json")  # img2dataset writes these beside each shard
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_MAX_EXPANSION = 1_000_000  # a typo like {0..9999999999} must fail, not fill memory
# S3 reads while indexing: one ranged GET per chunk. Small images are read through (they share
# chunks with the headers between them); a member larger than a chunk is skipped by seeking.
_INDEX_CHUNK = 8 * 1024 * 1024
_BLOCK = tarfile.BLOCKSIZE
_TAR_HASH = ".tar#"  # where a member URI is cut: a shard's own path must not hold it


# ---------------------------------------------------------------------------------------------
# URIs and listing


def member_uri(shard: str, member: str) -> str:
    """The URI of one member of a shard: ``<shard>#<member>``.

    Raises:
        DataError: ``shard`` does not end in ``.tar`` or holds ``.tar#`` before its end (the
            URI could not be split back: :func:`split_member_uri` cuts at the first one), or
            ``member`` is empty.
    """
    if not shard.lower().endswith(".tar"):
        raise DataError("a shard URI must end in .tar", source=shard)
    if _TAR_HASH in shard.lower():
        raise DataError(f"a shard URI must not hold {_TAR_HASH!r} (rename it)", source=shard)
    if not member:
        raise DataError("empty member name", source=shard)
    return f"{shard}#{member}"


def split_member_uri(uri: str) -> tuple[str, str] | None:
    """``(shard, member)`` for a URI made by :func:`member_uri`; None for any other URI."""
    i = uri.lower().find(_TAR_HASH)
    if i < 0 or i + 5 == len(uri):
        return None
    return uri[: i + 4], uri[i + 5 :]


def _is_brace_pattern(src: str) -> bool:
    return any(".." in g or "," in g for g in _BRACE.findall(src))


def _visible(uri: str) -> str | None:
    """The lower-case basename, or None for hidden files (editor/OS droppings, temp files)."""
    name = uri.rsplit("/", 1)[-1].lower()
    return None if name.startswith(".") else name


def names_shards(src: str) -> bool:
    """Whether ``src`` itself names shards: a ``.tar`` URI or a brace pattern ending in ``.tar``
    (decided from the string; nothing is listed)."""
    return src.strip().lower().endswith(".tar")


def is_webdataset(src: str) -> bool:
    """Whether ``src`` names WebDataset shards rather than loose images or a manifest.

    True for a single ``.tar`` URI, a brace pattern ending in ``.tar``
    (``shards/{00000..00009}.tar``), or a folder / ``s3://`` prefix holding ``.tar`` files and no
    loose images (img2dataset's ``.parquet`` and ``_stats.json`` sidecars do not count as images).
    A local path that is not a folder is False (the caller reports it as it would without shards).

    Raises:
        StorageError: an ``s3://`` prefix cannot be listed (missing bucket, access denied).
    """
    src = src.strip()
    if names_shards(src):
        return True
    if _is_brace_pattern(src):
        return False
    if not storage.is_s3(src) and not Path(src.removeprefix("file://")).is_dir():
        return False
    has_tar = False
    for uri in storage.list_files(src):
        name = _visible(uri)
        if name is None or name.endswith(_SIDECARS):
            continue
        if name.endswith(IMAGE_SUFFIXES):
            return False
        has_tar = has_tar or name.endswith(".tar")
    return has_tar


def _expand_group(body: str, pattern: str) -> list[str]:
    m = _RANGE.match(body)
    if m is None:
        if ".." in body:
            raise DataError(f"unsupported brace range {{{body}}} (integers only)", source=pattern)
        return body.split(",") if "," in body else [f"{{{body}}}"]  # "{x}" stays literal
    lo, hi = m.group(1), m.group(2)
    # Zero-padded when either end is written with a leading zero (braceexpand's rule).
    padded = any(s.lstrip("-").startswith("0") and s.lstrip("-") != "0" for s in (lo, hi))
    width = max(len(lo), len(hi)) if padded else 0
    a, b = int(lo), int(hi)
    if abs(b - a) + 1 > _MAX_EXPANSION:
        raise DataError(
            f"brace range {{{body}}} names over {_MAX_EXPANSION:,} shards", source=pattern
        )
    step = 1 if b >= a else -1
    return [f"{i:0{width}d}" for i in range(a, b + step, step)]


def _expand(pattern: str) -> list[str]:
    literals = _BRACE.split(pattern)  # [lit, group, lit, group, ..., lit]
    if any(c in lit for lit in literals[::2] for c in "{}"):
        raise DataError("nested or unbalanced braces", source=pattern)
    groups = [_expand_group(g, pattern) for g in literals[1::2]]
    total = 1
    for g in groups:
        total *= len(g)
    if total > _MAX_EXPANSION:
        raise DataError(f"brace pattern names over {_MAX_EXPANSION:,} shards", source=pattern)
    out = []
    for combo in itertools.product(*groups):
        parts = [literals[0]]
        for value, lit in zip(combo, literals[2::2], strict=True):
            parts += [value, lit]
        out.append("".join(parts))
    return out


def _listing_base(pattern: str) -> str:
    head = pattern[: pattern.index("{")]
    base = head[: head.rfind("/") + 1] if "/" in head else ""
    if storage.is_s3(pattern) and base in ("", "s3://"):
        raise DataError("the brace pattern must follow the bucket name", source=pattern)
    return base or "."


def list_shards(src: str) -> list[str]:
    """The shard URIs ``src`` names, sorted.

    Args:
        src: a ``.tar`` URI, a brace pattern (``s3://b/shards/{00000..00099}.tar``; integer
            ranges, zero-padded when written so, and comma lists ``{a,b}``; several groups
            expand to every combination), or a folder / ``s3://`` prefix (every ``.tar`` under
            it, recursively; hidden files are skipped).

    Raises:
        DataError: no shard, a named shard that does not exist (names it, and how many are
            missing), a malformed brace pattern, or a shard whose path holds ``.tar#`` (its
            members' URIs could not be split back; named).
        StorageError: a listing failed (missing bucket, access denied, unreachable endpoint).
    """
    shards = _list_shards(src.strip())
    bad = next((s for s in shards if _TAR_HASH in s.lower()), None)
    if bad is not None:
        raise DataError(f"a shard's path holds {_TAR_HASH!r}, {bad!r}: rename it", source=src)
    return shards


def _list_shards(src: str) -> list[str]:
    if _is_brace_pattern(src):
        shards = sorted(set(_expand(src)))
        bad = [s for s in shards if not s.lower().endswith(".tar")]
        if bad:
            raise DataError(f"pattern names a non-.tar file, {bad[0]!r}", source=src)
        base = _listing_base(src)
        try:  # one listing, not a HEAD per shard: patterns often name thousands
            present = {storage.same_key(u) for u in storage.list_files(base, suffixes=[".tar"])}
        except StorageError:
            if storage.is_s3(base):
                raise
            present = set()  # a missing local folder: every shard is missing
        missing = [s for s in shards if storage.same_key(s) not in present]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(shards)} shards do not exist, first {missing[0]!r}",
                source=src,
            )
        return shards
    if src.lower().endswith(".tar"):
        if not storage.exists(src):
            raise DataError("the shard does not exist", source=src)
        return [src]
    if not storage.is_s3(src) and not Path(src.removeprefix("file://")).is_dir():
        raise DataError("no such folder, .tar file or brace pattern", source=src)
    shards = [u for u in storage.list_files(src, suffixes=[".tar"]) if _visible(u) is not None]
    if not shards:
        raise DataError("no .tar shards under it", source=src)
    return shards


# ---------------------------------------------------------------------------------------------
# The index


@dataclass(frozen=True)
class SampleProblem:
    """Something wrong with one sample (not with the shard as a whole)."""

    #: ``<shard>#<member at fault>``; for ``missing_image``, ``<shard>#<key>``.
    uri: str
    key: str
    reason: str  # one of SAMPLE_PROBLEMS
    detail: str


@dataclass(frozen=True)
class ShardSample:
    """One sample of a shard: its image member's place in the tar, caption and metadata."""

    key: str
    #: The image member's name (None: no image; the sample is listed as ``missing_image``).
    image: str | None = None
    #: Where the image's bytes start in the tar, and how many there are.
    offset: int = 0
    size: int = 0
    caption: str | None = None
    #: The ``.json`` member as compact JSON text (parsed and written again), or None.
    metadata: str | None = None
    #: ``(reason, member, detail)`` for each problem, reason one of ``SAMPLE_PROBLEMS``.
    problems: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class ShardIndex:
    """What :func:`index_shard` learned from one shard's headers; cacheable as JSON.

    A corrupt or truncated tar does not raise: ``error`` holds the :class:`DataError` message
    (naming the shard and the last good member) and ``samples`` the members before the damage,
    each of which is whole. Check ``error`` (or call :meth:`raise_for_error`).
    """

    shard: str
    #: The shard's size and version tag (``storage.object_info``) when it was indexed.
    size: int
    etag: str
    samples: tuple[ShardSample, ...]
    error: str | None = None
    last_member: str | None = None
    max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES

    def uris(self) -> list[str]:
        """The image URIs (``<shard>#<member>``), in tar order."""
        return [member_uri(self.shard, s.image) for s in self.samples if s.image is not None]

    def rows(self) -> list[dict[str, Any]]:
        """One dict per image: image_uri, offset, size, caption, metadata, shard, key."""
        return [
            {
                "image_uri": member_uri(self.shard, s.image),
                "offset": s.offset,
                "size": s.size,
                "caption": s.caption,
                "metadata": s.metadata,
                "shard": self.shard,
                "key": s.key,
            }
            for s in self.samples
            if s.image is not None
        ]

    def missing_image(self) -> list[str]:
        """Keys of the samples that have no image member."""
        return [s.key for s in self.samples if s.image is None]

    def problems(self) -> list[SampleProblem]:
        """Every sample's problems (``missing_image`` first for its sample), in tar order."""
        out = []
        for s in self.samples:
            if s.image is None:
                uri = member_uri(self.shard, s.key)
                out.append(SampleProblem(uri, s.key, "missing_image", "no jpg/jpeg/png/webp"))
            for reason, member, detail in s.problems:
                out.append(SampleProblem(member_uri(self.shard, member), s.key, reason, detail))
        return out

    def raise_for_error(self) -> None:
        """Raise the shard's DataError if it is corrupt or truncated."""
        if self.error is not None:
            raise DataError(self.error.removeprefix(f"{self.shard}: "), source=self.shard)

    def to_json(self) -> bytes:
        """The index as JSON (ASCII; lone surrogates from odd member names survive)."""
        doc = {
            "format": _FORMAT,
            "version": _VERSION,
            "shard": self.shard,
            "size": self.size,
            "etag": self.etag,
            "error": self.error,
            "last_member": self.last_member,
            "max_index_bytes": self.max_index_bytes,
            "samples": [
                [s.key, s.image, s.offset, s.size, s.caption, s.metadata, list(s.problems)]
                for s in self.samples
            ],
        }
        return json.dumps(doc, separators=(",", ":")).encode("ascii")

    @classmethod
    def from_json(cls, data: bytes | str, *, source: str | None = None) -> ShardIndex:
        """An index written by :meth:`to_json`.

        Raises:
            DataError: not JSON, not a shard index, another format version, or malformed.
        """
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
                raise DataError("not a keeper shard index", source=source)
            if doc.get("version") != _VERSION:
                raise DataError(f"shard index version {doc.get('version')!r}", source=source)
            samples = tuple(
                ShardSample(
                    key=str(k),
                    image=None if im is None else str(im),
                    offset=int(off),
                    size=int(n),
                    caption=cap,
                    metadata=meta,
                    problems=tuple((str(r), str(m), str(d)) for r, m, d in probs),
                )
                for k, im, off, n, cap, meta, probs in doc["samples"]
            )
            return cls(
                shard=str(doc["shard"]),
                size=int(doc["size"]),
                etag=str(doc["etag"]),
                samples=samples,
                error=doc["error"],
                last_member=doc["last_member"],
                max_index_bytes=int(doc["max_index_bytes"]),
            )
        except DataError:
            raise
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise DataError(f"malformed shard index: {type(e).__name__}: {e}", source=source) from e


class _RangeFile(io.RawIOBase):
    """A read-only, seekable view of an S3 object through ranged GETs of ``chunk`` bytes.

    Seeking past a member costs nothing, so indexing reads headers and small members and skips
    any member larger than a chunk. Every GET is retried by ``storage.read_range``.
    """

    def __init__(self, uri: str, size: int, chunk: int) -> None:
        self.uri, self.size, self.chunk = uri, size, chunk
        self.pos, self.buf_at, self.buf = 0, 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        out = bytearray()
        while self.pos < end:
            if not self.buf_at <= self.pos < self.buf_at + len(self.buf):
                length = min(max(self.chunk, end - self.pos), self.size - self.pos)
                self.buf_at, self.buf = self.pos, storage.read_range(self.uri, self.pos, length)
            i = self.pos - self.buf_at
            piece = self.buf[i : i + end - self.pos]
            out += piece
            self.pos += len(piece)
        return bytes(out)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


def _open_shard(uri: str, size: int) -> IO[bytes]:
    if storage.is_s3(uri):
        # A RawIOBase: reads bytes, though typeshed does not call it an IO[bytes].
        return _RangeFile(uri, size, _INDEX_CHUNK)  # type: ignore[return-value]
    try:
        return Path(uri.removeprefix("file://")).open("rb")
    except OSError as e:
        raise StorageError(uri, f"{type(e).__name__}: {e}", retryable=True) from e


def _split_name(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` by the WebDataset rule; None for hidden members (``._x.jpg``)."""
    folder, _, base = name.rpartition("/")
    if not base or base.startswith("."):
        return None
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _compact_json(raw: bytes) -> str:
    """Strict JSON, compact. NaN / Infinity (Python's parser takes them) and a number too large
    for a float (1e400, read as inf) are ValueErrors: no strict parser would read them back."""
    value = json.loads(raw, parse_constant=_not_json)
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # an escaped lone surrogate ("\\udc80"): keep it escaped
        text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    return text


class _Builder:
    """Samples in order of their key's first member."""

    def __init__(self, max_index_bytes: int) -> None:
        self.limit = max_index_bytes
        self.images: dict[str, dict[str, tuple[str, int, int]]] = {}
        self.caption: dict[str, str] = {}
        self.metadata: dict[str, str] = {}
        self.problems: dict[str, list[tuple[str, str, str]]] = {}
        self.seen: set[tuple[str, str]] = set()
        self.last: str | None = None  # the last member read whole

    def add(self, f: IO[bytes], m: tarfile.TarInfo) -> None:
        parts = _split_name(m.name)
        if parts is None or m.isdir():
            return
        key, ext = parts
        self.images.setdefault(key, {})
        problems = self.problems.setdefault(key, [])
        if not m.isfile() or m.issparse():
            problems.append(("unsupported_member", m.name, f"tar type {m.type!r}"))
            return
        if (key, ext) in self.seen:
            problems.append(("duplicate_member", m.name, "the first member is kept"))
            return
        self.seen.add((key, ext))
        if ext in IMAGE_EXTENSIONS:
            self.images[key][ext] = (m.name, m.offset_data, m.size)
        elif ext in ("txt", "json"):
            what = "caption" if ext == "txt" else "metadata"
            if m.size > self.limit:
                problems.append((f"{what}_too_long", m.name, f"{m.size} bytes > {self.limit}"))
                return
            f.seek(m.offset_data)
            raw = f.read(m.size)
            if len(raw) != m.size:
                raise tarfile.ReadError(f"member {m.name!r} ends early")
            if ext == "txt":
                try:
                    self.caption[key] = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    problems.append(("caption_not_utf8", m.name, str(e)))
            else:
                try:
                    self.metadata[key] = _compact_json(raw)
                except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
                    problems.append(("invalid_json", m.name, f"{type(e).__name__}: {e}"))

    def samples(self) -> tuple[ShardSample, ...]:
        out = []
        for key, images in self.images.items():
            pick = next((images[e] for e in IMAGE_EXTENSIONS if e in images), None)
            out.append(
                ShardSample(
                    key=key,
                    image=None if pick is None else pick[0],
                    offset=0 if pick is None else pick[1],
                    size=0 if pick is None else pick[2],
                    caption=self.caption.get(key),
                    metadata=self.metadata.get(key),
                    problems=tuple(self.problems.get(key, ())),
                )
            )
        return tuple(out)


#: The largest PAX extended header read (tarfile reads one whole into memory). Real ones hold a
#: long or non-ASCII name and a few attributes: hundreds of bytes.
PAX_MAX_BYTES = 1 << 20
#: The longest run of digits a PAX header may hold (a size or a time has 20 at most).
PAX_MAX_DIGITS = 64
_PAX_LENGTH = re.compile(rb"([0-9]{1,20}) ")
_PAX_DIGIT_RUN = re.compile(rb"[0-9]{%d}" % (PAX_MAX_DIGITS + 1))


def check_pax_header(buf: bytes) -> None:
    r"""Refuse a PAX extended header (its payload as read, NUL padding included) that is not a
    sequence of well-formed records (``LENGTH KEYWORD=VALUE\n``, 1-20 length digits, lengths
    that add up, NULs only after them) or that holds a run of over ``PAX_MAX_DIGITS`` digits.

    Why: before 3.11.10 (CVE-2024-6232) tarfile's PAX parser searches the whole payload with
    regular expressions (``\d+ hdrcharset=``, ``\d+ GNU.sparse.offset=``) that take time
    quadratic in a digit run, and a record without its newline makes ``[^\n]+`` run to the end
    from every match: 64 KiB of digits took 5.5 s here, a megabyte would take half an hour, in
    every shard a crafted one holds. On well-formed records with short digit runs each of those
    searches is linear. Raises tarfile.ReadError naming what is wrong.
    """
    pos, n = 0, len(buf)
    while pos < n and buf[pos] != 0:
        m = _PAX_LENGTH.match(buf, pos)
        if m is None:
            raise tarfile.ReadError(f"malformed PAX record at byte {pos}: no length")
        length = int(m.group(1))
        end = pos + length
        if length < 5 or end > n or buf[end - 1] != 0x0A:
            raise tarfile.ReadError(f"malformed PAX record at byte {pos}: length {length}")
        if buf[m.end()] == 0x3D or buf.find(b"=", m.end(), end - 1) < 0:  # keyword=value
            raise tarfile.ReadError(f"malformed PAX record at byte {pos}: no keyword=value")
        pos = end
    if buf.count(0, pos) != n - pos:
        raise tarfile.ReadError(f"PAX header holds bytes after its records (byte {pos} on)")
    if run := _PAX_DIGIT_RUN.search(buf):
        raise tarfile.ReadError(
            f"PAX header holds a run of over {PAX_MAX_DIGITS} digits (byte {run.start()})"
        )


class _CheckedTarInfo(tarfile.TarInfo):
    """tarfile's TarInfo, its PAX headers bounded and checked (``check_pax_header``) before
    tarfile parses them."""

    def _proc_pax(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size > PAX_MAX_BYTES:
            raise tarfile.ReadError(
                f"PAX header of {self.size} bytes at offset {self.offset} (at most "
                f"{PAX_MAX_BYTES} are read)"
            )
        f = tarfile_.fileobj
        start = f.tell()
        check_pax_header(f.read(self._block(self.size)))  # type: ignore[attr-defined]
        f.seek(start)
        return super()._proc_pax(tarfile_)  # type: ignore[misc]


def _scan(f: IO[bytes], size: int, builder: _Builder) -> None:
    try:
        _scan_members(f, size, builder)
    except ValueError as e:  # malformed PAX records (a sparse map, hdrcharset): tarfile's own
        raise tarfile.ReadError(f"{type(e).__name__}: {e}") from e


def _scan_members(f: IO[bytes], size: int, builder: _Builder) -> None:
    with tarfile.open(fileobj=f, mode="r:", tarinfo=_CheckedTarInfo) as tf:
        while (m := tf.next()) is not None:
            # A negative size (a base-256 field) sends tarfile back to this header for ever, or
            # to a negative offset, at its next(): refused before that call.
            if m.size < 0:
                raise tarfile.ReadError(f"member {m.name!r} has a negative size ({m.size})")
            # A sparse member's size is the file it expands to, not the bytes stored (and it is
            # not read: an unsupported_member); tarfile's next() finds a cut inside its data.
            if m.isfile() and not m.issparse() and m.offset_data + m.size > size:
                raise tarfile.ReadError(
                    f"member {m.name!r} needs {m.offset_data + m.size} bytes, the file has {size}"
                )
            builder.add(f, m)
            builder.last = m.name
            tf.members.clear()  # type: ignore[attr-defined]  # TarFile keeps every TarInfo
        # tarfile stops quietly at a bad header and at the end of the file; only a zero block
        # is a real end (a writer killed between members leaves none).
        f.seek(tf.offset)
        end = f.read(_BLOCK)
    if len(end) < _BLOCK:
        raise tarfile.ReadError("no end-of-archive marker (truncated)")
    if end.count(0) != _BLOCK:
        raise tarfile.ReadError(f"invalid tar header at offset {tf.offset}")


def index_shard(shard_uri: str, *, max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES) -> ShardIndex:
    """Read one shard's tar headers once and return its samples.

    For each key: the image member (the first of ``IMAGE_EXTENSIONS`` present), its data offset
    and size; the ``.txt`` caption (UTF-8) and the ``.json`` metadata, both read now (they are
    small) unless over ``max_index_bytes``; the sample's problems. Image data is never kept. A
    local shard is read by seeking from header to header. An S3 shard is read by ranged GETs of
    8 MiB: each is retried, and the sample data between headers is read through (small images
    share chunks with their headers) while a member larger than a chunk is skipped. The shard's
    version tag is taken first; a shard rewritten while it is being indexed is not detected.

    Args:
        shard_uri: a ``.tar`` file or object.
        max_index_bytes: the largest caption or metadata member read into the index; a longer
            one is recorded as ``caption_too_long`` / ``metadata_too_long``.

    Returns:
        The index. A corrupt or truncated tar is not raised: the index has ``error`` set (the
        DataError's message, naming the shard and the last good member) and holds the samples
        read before the damage (every member it lists lies wholly inside the file).

    Raises:
        StorageError: the shard cannot be read (missing, access denied, unreachable).
    """
    if max_index_bytes < 0:
        raise ValueError(f"max_index_bytes must be >= 0, got {max_index_bytes}")
    info = storage.object_info(shard_uri)
    builder = _Builder(max_index_bytes)
    error: str | None = None
    with _open_shard(shard_uri, info.size) as f:
        try:
            _scan(f, info.size, builder)
        except tarfile.TarError as e:
            last = builder.last
            after = f"after member {last!r}" if last is not None else "at the first member"
            error = str(DataError(f"corrupt or truncated tar {after}: {e}", source=shard_uri))
    return ShardIndex(
        shard=shard_uri,
        size=info.size,
        etag=info.etag,
        samples=builder.samples(),
        error=error,
        last_member=builder.last,
        max_index_bytes=max_index_bytes,
    )


def index_cache_name(shard_uri: str) -> str:
    """The file name of a shard's cached index: the sha1 of its URI (as ``storage.same_key``)."""
    return hashlib.sha1(storage.same_key(shard_uri).encode()).hexdigest() + ".json"


def load_or_index(
    shard_uri: str, cache_dir: str, *, max_index_bytes: int = DEFAULT_MAX_INDEX_BYTES
) -> ShardIndex:
    """The shard's index from ``<cache_dir>/<index_cache_name>``, or made and cached there.

    A cached index is used while the shard's version tag and size are the ones it was made
    from (one HEAD or stat) and it was made with the same ``max_index_bytes``; else, or when the
    cache file is unreadable as an index, the shard is indexed again and the cache replaced.

    Raises:
        StorageError: the shard or the cache cannot be read or written.
    """
    cache = storage.join(cache_dir, index_cache_name(shard_uri))
    info = storage.object_info(shard_uri)
    if storage.exists(cache):
        try:
            cached = ShardIndex.from_json(storage.read_bytes(cache), source=cache)
        except DataError:
            cached = None  # a damaged cache is made again, not trusted
        if (
            cached is not None
            and storage.same_key(cached.shard) == storage.same_key(shard_uri)
            and (cached.etag, cached.size) == (info.etag, info.size)
            and cached.max_index_bytes == max_index_bytes
        ):
            return cached
    index = index_shard(shard_uri, max_index_bytes=max_index_bytes)
    storage.write_bytes(cache, index.to_json(), durable=False)  # a cache: made again if lost
    return index


def read_member(uri: str, offset: int, size: int, *, max_bytes: int) -> bytes:
    """The bytes of one shard member, by the place its index gave (one ranged read).

    Args:
        uri: the member's URI, ``<shard>#<member>``.
        offset: where its data starts in the shard (``ShardSample.offset``).
        size: its length in bytes.
        max_bytes: the most bytes an image may have (the decoder's ``max_bytes``); checked
            before anything is read.

    Raises:
        ImageDecodeError: ``too_large`` (``size`` over ``max_bytes``), as the decoder names it.
        DataError: ``uri`` is not a member URI, or the shard is shorter than the index says.
        StorageError: as ``storage.read_range``.
    """
    parts = split_member_uri(uri)
    if parts is None:
        raise DataError("not a shard member URI (<shard>.tar#<member>)", source=uri)
    if size > max_bytes:
        raise ImageDecodeError("too_large", f"{size} bytes > limit {max_bytes}", source=uri)
    if offset < 0 or size < 0:  # index_shard lists neither: an index edited or made elsewhere
        raise DataError(f"a member at offset {offset} of size {size}", source=uri)
    return storage.read_range(parts[0], offset, size)
