"""Storage for local paths and ``s3://`` URIs, one small API for both.

Every function takes a URI: a local path (``/data/x``, ``data/x``, ``file:///data/x``) or
``s3://bucket/key``. S3 goes through boto3 against whatever endpoint the environment names
(``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``: AWS, MinIO, Ceph, moto_server), with botocore's
own retries plus :func:`with_retries` for the streaming-body failures botocore does not retry.
Every failure raises :class:`~keeper_core.errors.StorageError` naming the URI and the cause;
content that is not what it claims (a corrupt Parquet file) raises
:class:`~keeper_core.errors.DataError`. No client is made at import time.

Environment knobs (all optional): ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` (botocore's own names),
``KEEPER_S3_CONNECT_TIMEOUT`` / ``KEEPER_S3_READ_TIMEOUT`` (seconds), ``KEEPER_CACHE_DIR`` (root of
the download cache; objects go under ``<root>/s3``).
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import functools
import hashlib
import logging
import math
import mimetypes
import os
import random
import re
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, NamedTuple, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
import urllib3.exceptions
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    InvalidConfigError,
    InvalidRegionError,
    InvalidRetryModeError,
    NoCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from keeper_core.errors import ConfigError, DataError, StorageError

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Failures of a streaming body read that botocore's retry handler never sees (it retries the
#: request, not the reading of a response already handed to us). Re-issuing the GET fixes them.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    ConnectionClosedError,
    ConnectionError,  # builtin: ConnectionResetError / BrokenPipeError from the socket
    urllib3.exceptions.ProtocolError,
)

_DEFAULT_MAX_ATTEMPTS = 5
_DEFAULT_CONNECT_TIMEOUT_S = 5.0
_DEFAULT_READ_TIMEOUT_S = 60.0
_CHUNK = 1 << 20  # 1 MiB: few syscalls per GB without holding much in memory
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Lenient on purpose: legacy buckets may hold upper case and underscores.
_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
#: Refusals of the request itself, the same on every try: a bucket name S3 does not accept, a key
#: over 1,024 bytes, an object archived in Glacier, one over the single-upload limit.
_PERMANENT = {
    "InvalidBucketName",
    "KeyTooLongError",
    "InvalidObjectState",
    "EntityTooLarge",
    "InvalidArgument",
    "MethodNotAllowed",
}
_DENIED = {"AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch"}
#: Content-Type of what keeper writes, by suffix. Without one S3 serves ``binary/octet-stream``
#: and a browser downloads a contact sheet (static hosting, a presigned URL) instead of showing it.
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".json": "application/json",
    ".csv": "text/csv; charset=utf-8",
    ".parquet": "application/vnd.apache.parquet",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".xmp": "application/rdf+xml",
    ".safetensors": "application/octet-stream",
}
_BINARY = "application/octet-stream"


@dataclass(frozen=True)
class ObjectInfo:
    """Size and version tag of one object; the tag changes whenever the content may have."""

    size: int
    etag: str
    #: Last modification, seconds since the epoch (UTC); None where the store gives none.
    mtime: float | None = None
    #: Seconds since the last modification by the store's own clock when it was asked (S3: the
    #: response's ``Date`` less ``LastModified``, so a client whose clock is off by minutes still
    #: reads the true age; locally now less the mtime); None where the store gives none. Not
    #: part of an info's identity.
    age_s: float | None = field(default=None, compare=False)


class TooLargeError(StorageError):
    """A file or object holds more bytes than a capped read allows (``read_bytes(max_bytes=)``).

    Not retryable: the same object is as large next time. Raised having read at most
    ``max_bytes + 1`` bytes of it.

    Attributes:
        max_bytes: the cap.
        size: its whole size where the store said (S3's ``Content-Range``, a local file's
            stat), else None: all that is known then is "more than ``max_bytes``".
    """

    def __init__(self, uri: str, max_bytes: int, size: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.size = size
        what = f"{size} bytes" if size is not None else f"more than {max_bytes} bytes"
        super().__init__(uri, f"{what} > limit {max_bytes}", retryable=False)


# ---------------------------------------------------------------------------------------------
# URIs


def is_s3(uri: str) -> bool:
    """True if ``uri`` is an ``s3://`` URI."""
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``; the key may be empty (a bucket root).

    Raises:
        StorageError: not an ``s3://`` URI, or the bucket name is missing or malformed.
    """
    if not is_s3(uri):
        raise StorageError(uri, "not an s3:// URI")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not _BUCKET.match(bucket):
        raise StorageError(uri, f"malformed bucket name {bucket!r}")
    if not valid_utf8(key):
        raise StorageError(uri, "an S3 key must be UTF-8 text (this name is not)")
    return bucket, key


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or ``s3://`` prefix with ``/``.

    Parts are always relative: their leading and trailing slashes are dropped, so
    ``join("s3://b/runs/", "/a/", "x.pt") == "s3://b/runs/a/x.pt"`` (unlike ``os.path.join``, a
    part starting with ``/`` does not discard the base).
    """
    if not base:
        raise StorageError(base, "empty base path")
    pieces = [p.strip("/") for p in parts if p.strip("/")]
    if not pieces:
        return base
    # Trailing slashes go, but never the scheme's own "//": "file:///" is the root, and
    # stripping it whole would leave "file:" (joined, "file:/data": a relative local path).
    m = _SCHEME.match(base)
    start = m.end() if m else 0
    head = base[:start] + base[start:].rstrip("/")
    return "/".join([head, *pieces]) if head else "/" + "/".join(pieces)


def parent(uri: str) -> str:
    """The folder or prefix holding ``uri`` (``"."`` for a bare local file name)."""
    m = _SCHEME.match(uri)
    start = m.end() if m else 0
    head, sep, _ = uri[start:].rstrip("/").rpartition("/")
    if not sep:
        # A bare name's folder is "."; "s3://b" is its own root; "file:///" the file system's.
        if not m:
            return "."
        return "file:///" if m.group(1) == "file" else uri[:start]
    return uri[:start] + (head or "/")


def resolve(ref: str, base: str) -> str:
    """``ref`` as written in a file that lives in folder ``base`` (e.g. a manifest's image_uri).

    ``s3://`` URIs, ``file://`` URIs and absolute local paths stand as they are; a relative path is
    joined onto ``base``. Every job that reads a manifest resolves its URIs with this one
    function, so the strings keeper embed records are the strings train-head and evaluate join on.
    """
    ref = ref.strip()
    if is_s3(ref) or ref.startswith(("/", "file://")) or _SCHEME.match(ref):
        return ref
    if base in ("", "."):
        return ref
    if is_s3(base):
        # S3 keys are literal: "m/../i/a.jpg" and "i//a.jpg" are not "i/a.jpg" there, while the
        # same manifest on a local disk reaches i/a.jpg through the OS. Resolve ".", ".." and
        # empty segments here so a manifest means the same images wherever it lives.
        parts = ref.split("/")
        if "." in parts or ".." in parts or "" in parts:
            bucket, key = split_s3(base)
            segs = [s for s in key.split("/") if s]
            for part in parts:
                if part == "..":
                    if not segs:  # above the bucket: left as written (it names no object)
                        return join(base, ref.removeprefix("./"))
                    segs.pop()
                elif part not in ("", "."):
                    segs.append(part)
            return join(f"s3://{bucket}", *segs)
    return join(base, ref.removeprefix("./"))


def same_key(uri: str) -> str:
    """What two image URIs are compared by: local paths absolute and normalised, others as given.

    ``corpus/a.jpg``, ``./corpus/a.jpg``, ``file:///abs/corpus/a.jpg`` and ``/abs/corpus/a.jpg``
    name one file; every join and overlap check between tables keeper wrote (embeddings, a
    training split, a manifest) compares through this, so a manifest named another way still
    matches the table embedded from it.
    """
    if uri.startswith("/") and "/." not in uri and "//" not in uri and not uri.endswith("/"):
        return uri  # absolute and already normal (no ., .., // or trailing /): as normpath gives
    if is_s3(uri) or (_SCHEME.match(uri) and not uri.startswith("file://")):
        return uri
    return os.path.normpath(os.path.abspath(uri.removeprefix("file://")))


def _local_path(uri: str) -> Path:
    if not uri:
        raise StorageError(uri, "empty path")
    m = _SCHEME.match(uri)
    if m and m.group(1) != "file":
        raise StorageError(uri, f"unsupported scheme {m.group(1)!r} (use a local path or s3://)")
    path = uri.removeprefix("file://")
    if "\x00" in path:
        raise StorageError(uri, "a file name cannot hold a NUL character")
    try:  # a name listed from disk round-trips (surrogate escapes); a lone surrogate cannot
        os.fsencode(path)
    except UnicodeEncodeError as e:
        raise StorageError(uri, f"not a file name this system can store ({e.reason})") from None
    return Path(path)


def _local_file(uri: str) -> Path:
    """The local path of a file: as :func:`_local_path`, and a name ending in ``/``, ``.`` or
    ``..`` is refused, as on S3 (pathlib would drop the slash and name the file ``f`` for
    ``f/``; a write over ``..`` failed with EBUSY, reported as worth a retry)."""
    if uri.endswith(("/", os.sep)) or os.path.basename(uri) in (".", ".."):
        raise StorageError(uri, "names a folder, not a file")
    return _local_path(uri)


def _s3_object(uri: str) -> tuple[str, str]:
    bucket, key = split_s3(uri)
    if not key or key.endswith("/"):
        raise StorageError(uri, "names a bucket or prefix, not an object")
    return bucket, key


@functools.cache
def _mime_types() -> mimetypes.MimeTypes:
    # Python's own table only: mimetypes.guess_type also reads /etc/mime.types, which differs
    # from machine to machine (and it is read on first use, not at import).
    return mimetypes.MimeTypes()


def content_type(uri: str) -> str:
    """The Content-Type an object written at ``uri`` is stored with, from its name's suffix.

    keeper's own outputs by an explicit table (``.html`` -> ``text/html; charset=utf-8``,
    ``.csv``, ``.json``, ``.parquet``, ``.jpg``/``.png``/``.webp``, ``.xmp``), any other suffix by
    Python's ``mimetypes`` table (without the system's), and ``application/octet-stream`` where
    neither knows it or the name says it is compressed (``x.json.gz`` is not JSON to a browser).
    """
    name = uri.rsplit("/", 1)[-1].lower()
    suffix = name[name.rfind(".") :] if "." in name else ""
    if suffix in _CONTENT_TYPES:
        return _CONTENT_TYPES[suffix]
    guessed, encoding = _mime_types().guess_type(name)
    return guessed if guessed and encoding is None else _BINARY


def valid_utf8(text: str) -> bool:
    r"""Whether ``text`` can be written as UTF-8 (Parquet, CSV, JSON and XML hold nothing else).

    False for a local name listed from bytes that are not UTF-8 (a Latin-1 ``caf\xe9.jpg`` from
    an old archive): Python lists it with surrogate escapes (``'caf\udce9.jpg'``), which open
    the file but cannot be encoded. S3 keys are always UTF-8.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def utf8_path(v: str) -> str:
    """A config's folder or URI, refused when it is not valid UTF-8 (a run's summary, tables and
    sheet name it, and none can hold it): a bad config fails before any work."""
    if not valid_utf8(v):
        raise ValueError(
            f"{escape_name(v)} is not valid UTF-8 (bytes that are not UTF-8 shown as "
            "\\xNN): rename it (e.g. convmv -f latin1 -t utf8 --notest PATH, for a Latin-1 name)"
        )
    return v


def escape_name(text: str) -> str:
    r"""``text`` with the bytes that are not UTF-8 written as ``\xNN`` (``caf\xe9.jpg``).

    UTF-8 safe, for records and messages about a file :func:`valid_utf8` refuses; it names no
    file (it is not a path to open). Text that is valid UTF-8 comes back as it is.
    """
    if valid_utf8(text):
        return text
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no file name decodes to ('\ud800')
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


# ---------------------------------------------------------------------------------------------
# Client and errors


def s3_client() -> Any:
    """The S3 client for the current environment, cached per process.

    The endpoint is ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` when set (passed explicitly,
    so it also works where botocore's own reading of those variables is switched off). Retries:
    botocore ``standard`` mode (or ``AWS_RETRY_MODE``), ``AWS_MAX_ATTEMPTS`` total attempts
    (default 5), connect/read timeouts 5 s / 60 s unless ``KEEPER_S3_*_TIMEOUT`` say otherwise.

    Returns:
        A botocore S3 client. Thread-safe, so threads of one process share it (and its pool).

    Raises:
        ConfigError: a malformed ``AWS_MAX_ATTEMPTS`` or ``KEEPER_S3_*_TIMEOUT`` value, an
            ``AWS_PROFILE`` no config file defines, a malformed ``AWS_REGION`` /
            ``AWS_RETRY_MODE`` or endpoint URL.
    """
    env = os.environ
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    try:
        max_attempts = int(env.get("AWS_MAX_ATTEMPTS") or _DEFAULT_MAX_ATTEMPTS)
        connect_s = float(env.get("KEEPER_S3_CONNECT_TIMEOUT") or _DEFAULT_CONNECT_TIMEOUT_S)
        read_s = float(env.get("KEEPER_S3_READ_TIMEOUT") or _DEFAULT_READ_TIMEOUT_S)
    except ValueError as e:
        raise ConfigError(f"bad S3 setting in the environment: {e}") from e
    if max_attempts < 1:
        raise ConfigError(f"AWS_MAX_ATTEMPTS must be >= 1, got {max_attempts}")
    # The pid is in the key because a client is not fork-safe: a forked child (a DataLoader
    # worker, a multiprocessing pool) inherits the parent's pooled sockets, and two processes
    # reading one TLS/HTTP connection corrupt each other's responses. A new pid gets a new client.
    # The credential/region variables are in the key so a changed environment is not served by a
    # client built for the old one.
    try:
        return _cached_client(
            endpoint,
            env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
            env.get("AWS_PROFILE"),
            env.get("AWS_ACCESS_KEY_ID"),
            env.get("AWS_RETRY_MODE") or "standard",
            max_attempts,
            connect_s,
            read_s,
            os.getpid(),
        )
    # A setting no retry will fix. botocore raises these (and a bare ValueError for an endpoint
    # without a scheme) while making the client, before any request names a URI.
    except (ProfileNotFound, InvalidRegionError, InvalidRetryModeError, InvalidConfigError) as e:
        raise ConfigError(f"bad AWS setting in the environment: {e}") from e
    except ValueError as e:
        raise ConfigError(f"bad S3 endpoint in the environment ({endpoint!r}): {e}") from e


def _client(uri: str) -> Any:
    """:func:`s3_client`, with any other botocore failure to make it (a credential_process that
    fails) raised as the StorageError every other failure on ``uri`` is."""
    with _s3_errors(uri):
        return s3_client()


@functools.lru_cache(maxsize=16)
def _cached_client(
    endpoint: str | None,
    region: str | None,
    profile: str | None,
    access_key_id: str | None,
    retry_mode: str,
    max_attempts: int,
    connect_s: float,
    read_s: float,
    pid: int,
) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"mode": retry_mode, "total_max_attempts": max_attempts},
        connect_timeout=connect_s,
        read_timeout=read_s,
        # Threads share the client; the default pool of 10 would make an 16-thread reader queue.
        max_pool_connections=32,
        # Path style for custom endpoints: MinIO/Ceph/moto behind a plain hostname have no
        # wildcard DNS for bucket.host, which virtual-host addressing needs.
        s3={"addressing_style": "path"} if endpoint else None,
        # botocore >= 1.36 adds CRC checksums to every upload and asks for them on reads, which
        # S3-compatible stores that predate them (older MinIO, Ceph RGW) refuse: with a custom
        # endpoint, only where an operation requires one (S3 itself gets the new default).
        request_checksum_calculation="when_required" if endpoint else "when_supported",
        response_checksum_validation="when_required" if endpoint else "when_supported",
    )
    # A Session per client: boto3's default session is not safe to create clients from threads.
    session = boto3.session.Session(profile_name=profile, region_name=region)
    return session.client("s3", endpoint_url=endpoint, config=config)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        code, msg = str(err.get("Code", "")), str(err.get("Message", ""))
        if code in _NOT_FOUND:
            return "no such object"
        if code == "NoSuchBucket":
            return "bucket does not exist"
        if code in _DENIED:
            return f"access denied ({code})"
        if code in {"PreconditionFailed", "412"}:
            return "object changed while it was being read; try again"
        return f"{code}: {msg}" if msg else code
    if isinstance(exc, BotoConnectionError):  # refused, DNS failure, connect timeout, proxy
        return f"endpoint unreachable: {exc}"
    if isinstance(exc, NoCredentialsError):
        return "no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    return f"{type(exc).__name__}: {exc}"


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _retryable(exc: BaseException) -> bool:
    """Whether an S3 failure may go away by itself: all but a missing object or bucket and a
    refusal of the request itself (``_PERMANENT``)."""
    if isinstance(exc, ClientError):
        code = _error_code(exc)
        return code not in _NOT_FOUND | _PERMANENT and code != "NoSuchBucket"
    return True  # connection errors, timeouts, missing credentials: the next run may succeed


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except (ClientError, BotoCoreError) as e:
        raise StorageError(uri, _describe(e), retryable=_retryable(e)) from e


@contextlib.contextmanager
def _local_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as e:
        raise StorageError(uri, f"no such file or directory: {e.filename or uri}") from e
    except IsADirectoryError as e:
        raise StorageError(uri, "is a directory, not a file") from e
    except PermissionError as e:
        raise StorageError(uri, f"permission denied: {e.filename or uri}", retryable=True) from e
    except (NotADirectoryError, FileExistsError) as e:  # a file where a folder should be
        raise StorageError(uri, f"not a directory: {e.filename or uri}") from e
    except OSError as e:  # EIO, a stale NFS handle, a full disk: worth another run
        if e.errno in (errno.ENAMETOOLONG, errno.ELOOP):  # the same next time
            raise StorageError(uri, f"{type(e).__name__}: {e}") from e
        raise StorageError(uri, f"{type(e).__name__}: {e}", retryable=True) from e


def with_retries(
    fn: Callable[[], T],
    *,
    attempts: int = 5,
    base_delay: float = 0.2,
    max_delay: float = 5.0,
    retry_on: tuple[type[BaseException], ...] = TRANSIENT_ERRORS,
) -> T:
    """Call ``fn`` until it succeeds, retrying ``retry_on`` errors with jittered backoff.

    For failures botocore's own retry does not cover (a truncated or reset streaming body): wrap
    the whole request-and-read so a retry re-issues the request. The delay before retry ``i``
    (0-based) is ``min(max_delay, base_delay * 2**i)`` scaled by a random factor in [0.5, 1], so
    many workers hitting one hiccup do not retry in lockstep.

    Args:
        fn: the call to make, without arguments.
        attempts: total calls, at least 1.
        base_delay: seconds before the first retry.
        max_delay: cap on any single delay.
        retry_on: exception types worth another try; anything else propagates at once.

    Returns:
        What ``fn`` returned.

    Raises:
        The last exception once ``attempts`` calls have failed.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    for i in range(attempts):
        try:
            return fn()
        except retry_on:
            if i == attempts - 1:
                raise
            time.sleep(min(max_delay, base_delay * 2**i) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def _retrying(uri: str, fn: Callable[[], T]) -> T:
    try:
        return with_retries(fn)
    except StorageError:
        raise
    except (*TRANSIENT_ERRORS, BotoCoreError, OSError) as e:
        raise StorageError(uri, f"transfer failed: {_describe(e)}", retryable=True) from e


# ---------------------------------------------------------------------------------------------
# Bytes


_TMP_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789_"
#: The temporary files ``_atomic_write`` makes (and ``tempfile.mkstemp`` made before it):
#: ".<name>.<8 random>.tmp". A writer killed mid-write leaves one; listings skip them.
_TMP_NAME = re.compile(r"^\.(.*)\.[a-z0-9_]{8}\.tmp$", re.DOTALL)
_NAME_MAX = 255  # bytes in one path component on every file system keeper writes to


def _temp_stem(name: str) -> str:
    """What of ``name`` a temporary file beside it is named after: cut so that the temporary
    name fits in ``_NAME_MAX`` bytes."""
    return name.encode("utf-8", "surrogateescape")[: _NAME_MAX - 14].decode("utf-8", "ignore")


def remove_stale_temps(paths: Sequence[str], *, older_than_s: float) -> int:
    """Remove the temporary files that writes of the local files ``paths`` (by
    :func:`write_bytes`, :func:`replace_file`) left when killed before their rename, once they
    are older than ``older_than_s``; each folder is listed once. ``s3://`` paths are skipped (an
    S3 write leaves no temporary object). Returns how many were removed.

    A file cannot be removed (gone meanwhile, not ours) is logged, not raised.
    """
    by_folder: dict[str, set[str]] = {}
    for uri in paths:
        if not is_s3(uri):
            folder, name = os.path.split(uri.removeprefix("file://"))
            by_folder.setdefault(folder or ".", set()).add(_temp_stem(name))
    removed, now = 0, time.time()
    for folder, stems in by_folder.items():
        try:
            with os.scandir(folder) as entries:
                found = [x for x in entries if (m := _TMP_NAME.match(x.name)) and m[1] in stems]
        except FileNotFoundError:
            continue  # a folder not written yet (a first mirror)
        except OSError as e:
            log.warning("temporary files in %s not cleaned up: %s", folder, e)
            continue
        for entry in found:
            try:
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and now - st.st_mtime > older_than_s:
                    os.unlink(entry.path)
                    removed += 1
            except OSError as e:  # gone meanwhile, or not ours to remove
                log.warning("temporary file %s not removed: %s", entry.path, e)
    return removed


def _open_temp(folder: Path, name: str) -> tuple[int, str]:
    """A new, exclusively created temporary file beside ``name`` in ``folder``: (fd, path).

    Created with mode 0o666 less the umask, as ``open()`` would make the target (mkstemp makes
    0o600: every file keeper wrote would be unreadable to the group, e.g. the server's user).
    The target's name is cut so that the temporary one fits in ``_NAME_MAX`` bytes.
    """
    short = _temp_stem(name)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        tmp = folder / f".{short}.{''.join(random.choices(_TMP_CHARS, k=8))}.tmp"
        try:
            return os.open(tmp, flags, 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(folder))


def _atomic_write(
    path: Path,
    write: Callable[[IO[bytes]], object],
    *,
    durable: bool = True,
    check: Callable[[str], None] | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Same folder as the target so os.replace is a rename, never a cross-device copy; the
    # ".tmp" suffix keeps half-written files out of suffix-filtered listings, and list_files
    # skips them by name.
    fd, tmp = _open_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if durable:
                os.fsync(f.fileno())  # else a crash after the rename can leave an empty file
        if check is not None:
            check(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _read_at_most(body: Any, n: int, *, chunk: int | None = None) -> bytes:
    """Up to ``n`` bytes of a streaming body, stopping at ``n`` (the rest is never read).

    Reading on to an empty chunk at the end lets botocore check the body against its
    Content-Length (a truncated body raises, for ``with_retries``).
    """
    chunks: list[bytes] = []
    got = 0
    while got < n:
        part: bytes = body.read(n - got if chunk is None else min(n - got, chunk))
        if not part:
            break
        chunks.append(part)
        got += len(part)
    return b"".join(chunks)


def _total_size(resp: dict[str, Any]) -> int | None:
    """The whole object's size from a GET's response: ``Content-Range`` "bytes a-b/total"."""
    rng = resp.get("ContentRange")
    if rng:
        total = str(rng).rpartition("/")[2]
        return int(total) if total.isdigit() else None
    length = resp.get("ContentLength")  # no range in the answer: the whole object came
    return int(length) if length is not None else None


def _read_capped(uri: str, max_bytes: int) -> bytes:
    if not is_s3(uri):
        with _local_errors(uri), _local_file(uri).open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            # In chunks: one read(max_bytes + 1) allocates that much up front, whatever the file
            # holds (a generous cap of tens of GB is a MemoryError on every small file).
            data = _read_at_most(f, max_bytes + 1, chunk=max(size + 1, _CHUNK))
        if len(data) > max_bytes:
            raise TooLargeError(uri, max_bytes, size if size > max_bytes else None)
        return data
    bucket, key = _s3_object(uri)
    client = _client(uri)

    def fetch() -> tuple[bytes, int | None]:
        with _s3_errors(uri):
            try:
                # One byte past the cap, so "over the cap" shows in what comes back.
                resp = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{max_bytes}")
            except ClientError as e:  # only an empty object has no byte 0
                if str(e.response.get("Error", {}).get("Code", "")) in {"InvalidRange", "416"}:
                    return b"", 0
                raise
        with contextlib.closing(resp["Body"]):
            # At most max_bytes + 1 even from a store that ignores the range.
            data = _read_at_most(resp["Body"], max_bytes + 1)
        return data, _total_size(resp)

    data, total = _retrying(uri, fetch)
    if len(data) > max_bytes:
        known = total is not None and total > max_bytes
        raise TooLargeError(uri, max_bytes, total if known else None)
    return data


def read_bytes(uri: str, *, max_bytes: int | None = None) -> bytes:
    """Read a whole file or object, or refuse one larger than ``max_bytes``.

    With ``max_bytes``, one request reads at most ``max_bytes + 1`` bytes (on S3 a ranged GET
    of bytes ``0..max_bytes``; locally a bounded read), so an object replaced by a larger one
    after a size check (``object_info``) is still never read whole: check and read are one step.
    An object of exactly ``max_bytes`` bytes is read whole.

    Args:
        uri: a local path or ``s3://`` URI.
        max_bytes: the most bytes to accept (>= 0); None reads whatever is there.

    Raises:
        ValueError: a negative ``max_bytes``.
        TooLargeError: (a StorageError) more than ``max_bytes`` bytes are there.
        StorageError: missing file/object/bucket, access denied, endpoint unreachable, or the
            body read failed on every retry.
    """
    if max_bytes is not None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        return _read_capped(uri, max_bytes)
    if not is_s3(uri):
        with _local_errors(uri):
            return _local_file(uri).read_bytes()
    bucket, key = _s3_object(uri)
    client = _client(uri)

    def fetch() -> bytes:
        with _s3_errors(uri):  # request errors: botocore already retried them
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
        with contextlib.closing(body):  # body errors propagate to with_retries
            data: bytes = body.read()
        return data

    return _retrying(uri, fetch)


def read_if_exists(uri: str) -> bytes | None:
    """A whole file or object, or None where there is none: one request on S3 (a GET whose
    "no such key" answer means absent), where ``exists`` then ``read_bytes`` is two.

    Raises:
        StorageError: as ``read_bytes`` for everything but an absent file or object (a missing
            bucket, access denied: a bucket policy without ``s3:ListBucket`` answers a missing
            key with access denied, which stays an error, as ``exists`` would raise it).
    """
    if not is_s3(uri):
        try:
            with _local_errors(uri):
                return _local_file(uri).read_bytes()
        except StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None
            raise
    bucket, key = _s3_object(uri)
    client = _client(uri)

    def fetch() -> bytes | None:
        try:
            with _s3_errors(uri):
                body = client.get_object(Bucket=bucket, Key=key)["Body"]
        except StorageError as e:
            cause = e.__cause__
            if isinstance(cause, ClientError) and _error_code(cause) in _NOT_FOUND:
                return None
            raise
        with contextlib.closing(body):
            data: bytes = body.read()
        return data

    return _retrying(uri, fetch)


def read_head(uri: str, n: int = 64) -> bytes:
    """The first ``n`` bytes of a file or object (a ranged GET on S3): enough to sniff a format.

    Raises:
        StorageError: as ``read_bytes``.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not is_s3(uri):
        with _local_errors(uri), _local_file(uri).open("rb") as f:
            return f.read(n)
    bucket, key = _s3_object(uri)
    client = _client(uri)

    def fetch() -> bytes:
        with _s3_errors(uri):
            try:
                body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{n - 1}")["Body"]
            except ClientError as e:  # only an empty object has no byte 0: its head is b""
                if _error_code(e) in {"InvalidRange", "416"}:
                    return b""
                raise
        with contextlib.closing(body):
            # At most n even from a store that ignores the range (it sends the whole object).
            return _read_at_most(body, n)

    return _retrying(uri, fetch)


def read_range(uri: str, offset: int, size: int) -> bytes:
    """Exactly ``size`` bytes of a file or object from byte ``offset`` (a ranged GET on S3).

    For reading one member out of a larger file (an image inside a tar shard) without the rest.

    Raises:
        ValueError: a negative ``offset`` or ``size``.
        StorageError: as ``read_bytes``.
        DataError: the file or object ends before ``offset + size`` (it is shorter than whatever
            told the caller where to read: changed or truncated since).
    """
    if offset < 0 or size < 0:
        raise ValueError(f"offset and size must be >= 0, got {offset} and {size}")
    if size == 0:
        return b""  # S3 has no empty range ("bytes=a-(a-1)" is malformed)

    def short(got: int) -> DataError:
        why = "the file ends before" if got < size else "the store ignored the range"
        return DataError(f"read {got} of {size} bytes at offset {offset} ({why})", source=uri)

    if not is_s3(uri):
        with _local_errors(uri), _local_file(uri).open("rb") as f:
            f.seek(offset)
            data = f.read(size)
        if len(data) != size:
            raise short(len(data))
        return data
    bucket, key = _s3_object(uri)
    client = _client(uri)
    last = offset + size - 1

    def fetch() -> bytes:
        with _s3_errors(uri):
            try:
                body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{last}")
            except ClientError as e:  # a range starting past the end: 416, not retryable
                if _error_code(e) in {"InvalidRange", "416"}:
                    raise short(0) from e
                raise
        with contextlib.closing(body["Body"]):
            # One byte past the range, so a store that ignores it shows, without reading the
            # whole object (a many-GB tar shard) to find out.
            return _read_at_most(body["Body"], size + 1)

    data = _retrying(uri, fetch)
    if len(data) != size:
        raise short(len(data))
    return data


def delete(uri: str) -> None:
    """Remove a file or object; a missing one is not an error (deletes are idempotent).

    Raises:
        StorageError: the delete failed for another reason.
    """
    if not is_s3(uri):
        # A name under a file (NotADirectoryError): no such file can exist.
        with _local_errors(uri), contextlib.suppress(NotADirectoryError):
            _local_file(uri).unlink(missing_ok=True)
        return
    bucket, key = _s3_object(uri)
    with _s3_errors(uri):
        s3_client().delete_object(Bucket=bucket, Key=key)


def write_bytes(uri: str, data: bytes, *, durable: bool = True) -> str | None:
    """Write ``data`` to a file or object, replacing it; on S3 the new object's ETag (without
    quotes, as :func:`object_info` gives it), locally None.

    Local writes are atomic (a temporary file in the same folder, then ``os.replace``) and
    create missing parent folders. S3 puts are atomic by nature, and store the
    :func:`content_type` of the key's name (browsers show a contact sheet written to S3).

    Args:
        uri: a local path or ``s3://`` URI.
        data: the bytes.
        durable: fsync a local file before the rename (default). False for files that can be
            made again (thumbnails): a killed process still leaves the old file or the whole
            new one, only a machine crash can leave an empty one; the fsync is ~15x the write.

    Raises:
        StorageError: the write failed (names the cause).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"write_bytes({uri!r}) needs bytes, got {type(data).__name__}")
    if not is_s3(uri):
        with _local_errors(uri):
            _atomic_write(_local_file(uri), lambda f: f.write(data), durable=durable)
        return None
    bucket, key = _s3_object(uri)
    with _s3_errors(uri):
        put = s3_client().put_object(
            Bucket=bucket, Key=key, Body=bytes(data), ContentType=content_type(key)
        )
    return str(put.get("ETag", "")).strip('"') or None


def write_new(uri: str, data: bytes) -> str | None:
    """Write ``data`` at ``uri`` only where nothing is there yet; the version tag written, or
    None where a file or object already was. The tag is what :func:`replace_if_unchanged`
    takes: on S3 the object's ETag, locally the sha256 of the bytes (not :func:`object_info`'s
    local tag, which two writes of one size within a clock tick can share).

    Of several writers racing for one name, exactly one gets a tag. Locally the bytes go to a
    temporary file, fsynced, then hard-linked to the name (``link`` fails where the name exists,
    and a reader never sees part of the file); on a file system without hard links (exFAT and
    FAT drives, many SMB shares: ``link`` fails with EPERM or EOPNOTSUPP) the name is created
    with ``O_EXCL`` and written, so a reader may see it empty or part-written for a moment. On
    S3 a PUT with ``If-None-Match: *`` (AWS since 2024, MinIO, moto; an S3-compatible store that
    ignores the header overwrites instead, which :mod:`keeper_core.run_lock` checks for).

    Raises:
        StorageError: the write failed for another reason.
    """
    if not is_s3(uri):
        path = _local_file(uri)
        with _local_errors(uri):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = _open_temp(path.parent, path.name)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)
                except FileExistsError:
                    return None
                except OSError as e:
                    if e.errno not in _NO_HARD_LINKS:
                        raise
                    if not _create_exclusive(path, data):
                        return None
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return hashlib.sha256(data).hexdigest()
    bucket, key = _s3_object(uri)
    try:
        with _s3_errors(uri):
            resp = s3_client().put_object(
                Bucket=bucket, Key=key, Body=data, IfNoneMatch="*", ContentType=content_type(key)
            )
    except StorageError as e:
        if _precondition_failed(e):
            return None
        raise
    return str(resp["ETag"]).strip('"')


#: ``link(2)``'s answers on a file system that has no hard links (Linux's exfat and vfat: EPERM;
#: macOS's msdos and exfat, SMB shares: EOPNOTSUPP / ENOTSUP)
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` with ``O_EXCL`` and write ``data`` (fsynced); False where it was there."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def replace_if_unchanged(uri: str, data: bytes, etag: str) -> str | None:
    """Replace the file or object at ``uri`` by ``data`` only while it is still the version
    ``etag`` (a tag :func:`write_new` or this function gave; on S3 also :func:`object_info`'s);
    the new tag, or None where it changed or is gone.

    On S3 a PUT with ``If-Match`` (one of several writers holding the same tag wins). Locally the
    bytes are compared, the new file written and fsynced beside it, the bytes compared again and
    only then renamed over it: a change that lands in the microseconds between the second
    compare and the rename is still written over (the fsync, milliseconds on a busy disk, is no
    longer inside that window), so a caller that must be the only winner there arranges that
    itself (:mod:`keeper_core.run_lock` takes a stale lock over by a rename).

    Raises:
        StorageError: the write failed for another reason.
    """
    if not is_s3(uri):

        def unchanged() -> bool:
            now = read_if_exists(uri)
            return now is not None and hashlib.sha256(now).hexdigest() == etag

        def still_unchanged(_tmp: str) -> None:
            if not unchanged():
                raise _Changed

        if not unchanged():
            return None
        try:
            replace_file(uri, data, check=still_unchanged)
        except _Changed:
            return None
        return hashlib.sha256(data).hexdigest()
    bucket, key = _s3_object(uri)
    try:
        with _s3_errors(uri):
            resp = s3_client().put_object(
                Bucket=bucket,
                Key=key,
                Body=data,
                IfMatch=f'"{etag}"',
                ContentType=content_type(key),
            )
    except StorageError as e:
        if _precondition_failed(e) or e.cause == "no such object":
            return None
        raise
    return str(resp["ETag"]).strip('"')


class _Changed(Exception):
    """:func:`replace_if_unchanged`'s second compare failed: the file changed meanwhile."""


def conditional_write_refused(e: StorageError) -> bool:
    """Whether an S3 store refused a conditional PUT as a feature it lacks (``NotImplemented``,
    501), not as a failed condition: a store without ``If-None-Match`` / ``If-Match``."""
    cause = e.__cause__
    return isinstance(cause, ClientError) and (
        _error_code(cause) in {"NotImplemented", "501"}
        or cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 501
    )


def _precondition_failed(e: StorageError) -> bool:
    cause = e.__cause__
    # 409 ConditionalRequestConflict: another conditional write to the key won the race
    return isinstance(cause, ClientError) and _error_code(cause) in {
        "PreconditionFailed",
        "412",
        "ConditionalRequestConflict",
    }


def replace_file(path: str, data: bytes, *, check: Callable[[str], None]) -> Stamp:
    """Replace the local file ``path`` by ``data``, atomically, once ``check`` has passed.

    ``data`` goes to a new temporary file in ``path``'s folder (named as :func:`write_bytes`
    names its own, so listings skip it) and is fsynced; then ``check(temporary path)`` runs: it
    may read the file back, give it a mode, or raise to leave ``path`` as it was (the temporary
    file is removed). Only then ``os.replace`` renames it over ``path``: whatever happens,
    ``path`` is the old file or the new one, whole.

    Returns:
        The new file's stamp, taken just before the rename (which keeps it): what a listing
        shows until another program changes the file.

    Raises:
        StorageError: the write or the rename failed (``path`` is left as it was).
        Whatever ``check`` raises.
    """
    stamp: list[Stamp] = []

    def checked(tmp: str) -> None:
        check(tmp)
        st = os.stat(tmp)
        stamp.append(Stamp(st.st_size, st.st_mtime_ns))

    with _local_errors(path):
        _atomic_write(_local_file(path), lambda f: f.write(data), check=checked)
    return stamp[0]


#: How long a bucket seen to exist is taken to still exist: a missing object's 404 is then not
#: followed by a HEAD of its bucket (a run's first export into a bucket asks once, not per keeper).
_BUCKET_SEEN_S = 60.0
_buckets_seen: dict[tuple[str, str], float] = {}  # (endpoint, bucket) -> monotonic time


def _head(uri: str) -> dict[str, Any] | None:
    """HEAD an object: its response, or None when the object (not the bucket) is missing."""
    bucket, key = _s3_object(uri)
    client = _client(uri)
    seen = (str(client.meta.endpoint_url), bucket)
    try:
        with _s3_errors(uri):
            head = dict(client.head_object(Bucket=bucket, Key=key))
        _buckets_seen[seen] = time.monotonic()
        return head
    except StorageError as e:
        if e.cause != "no such object":
            raise
    if time.monotonic() - _buckets_seen.get(seen, -math.inf) < _BUCKET_SEEN_S:
        return None
    # A HEAD has no error body, so a missing bucket also reads "404": ask the bucket to tell.
    try:
        with _s3_errors(uri):
            client.head_bucket(Bucket=bucket)
    except StorageError as e:
        if e.cause == "no such object":
            _buckets_seen.pop(seen, None)
            raise StorageError(uri, "bucket does not exist") from e.__cause__
        raise
    _buckets_seen[seen] = time.monotonic()
    return None


def exists(uri: str) -> bool:
    """True if a file, folder, object or non-empty ``s3://`` prefix exists at ``uri``.

    Raises:
        StorageError: for S3, when the bucket is missing or unreachable (that is a setup error,
            not an absent object); locally, when a folder on the way cannot be searched.
    """
    if not is_s3(uri):
        with _local_errors(uri):
            path = _local_path(uri)
            return path.is_dir() if uri.endswith(("/", os.sep)) else path.exists()
    bucket, key = split_s3(uri)
    if key and not key.endswith("/") and _head(uri) is not None:
        return True
    prefix = key.rstrip("/") + "/" if key else ""
    with _s3_errors(uri):
        resp = s3_client().list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    return int(resp.get("KeyCount", 0)) > 0


def object_info(uri: str) -> ObjectInfo:
    """Size and version tag of a file or object.

    For S3 the tag is the object's ETag (quotes stripped). For a local file it is the sha256 of
    its mtime (ns) and size: cheap, and it changes whenever the file is rewritten.

    Raises:
        StorageError: missing file/object, or a folder.
    """
    if not is_s3(uri):
        with _local_errors(uri):
            path = _local_file(uri)
            st = path.stat()
            if path.is_dir():
                raise StorageError(uri, "is a directory, not a file")
        tag = hashlib.sha256(f"{st.st_mtime_ns}:{st.st_size}".encode()).hexdigest()
        age = time.time() - st.st_mtime
        return ObjectInfo(size=st.st_size, etag=tag, mtime=st.st_mtime, age_s=age)
    info = _s3_info(uri)
    if info is None:
        raise StorageError(uri, "no such object")
    return info


def object_info_if_exists(uri: str) -> ObjectInfo | None:
    """:func:`object_info`, or None where there is no such file or object (on S3 one HEAD, and
    where it is missing a HEAD of the bucket, to tell a missing bucket, which raises, unless the
    bucket was seen in the last minute: ``_head``).

    Raises:
        StorageError: a folder, a missing bucket, or another failure.
    """
    if is_s3(uri):
        return _s3_info(uri)
    try:
        return object_info(uri)
    except StorageError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return None
        raise


def _s3_info(uri: str) -> ObjectInfo | None:
    head = _head(uri)
    if head is None:
        return None
    modified = head.get("LastModified")
    mtime = modified.timestamp() if modified is not None else None
    return ObjectInfo(
        size=int(head["ContentLength"]),
        etag=str(head["ETag"]).strip('"'),
        mtime=mtime,
        age_s=_server_age(head, mtime),
    )


def _server_age(head: dict[str, Any], mtime: float | None) -> float | None:
    """An object's age by the S3 server's clock: its response's ``Date`` less ``mtime`` (both
    whole seconds, from the one clock); None where the response has no readable date."""
    date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if mtime is None or not isinstance(date, str):
        return None
    try:
        now = email.utils.parsedate_to_datetime(date).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, now - mtime)


# ---------------------------------------------------------------------------------------------
# Listings and Parquet


class Stamp(NamedTuple):
    """What a listing says of one file without reading it: its size and modification time.

    A file whose stamp is unchanged is taken as unchanged (what rsync and make assume); a
    changed stamp says only that it may have changed (``touch``, a copy, a metadata write).
    """

    size: int
    mtime_ns: int  # local: st_mtime_ns; S3: LastModified (whole seconds), in nanoseconds


def list_files(
    uri: str, *, suffixes: Iterable[str] | None = None, page_size: int = 1000
) -> list[str]:
    """Every file under a folder or ``s3://`` prefix, recursively, as sorted full URIs.

    The prefix is taken as a folder (``s3://b/data`` lists ``data/...``, never ``data2/...``).
    S3 "folder marker" keys ending in ``/`` are skipped, and so are the temporary files of local
    writes not finished (``.<name>.<8 chars>.tmp``); local symlinked folders are followed (not
    back into a folder holding them). A local folder that does not exist, or one under it that
    cannot be read, is an error; an S3 prefix with no keys is simply empty (S3 has no folders to
    be missing). A local name that is not valid UTF-8 is listed as Python decodes it, with
    surrogate escapes: it opens, but no table, CSV or JSON can hold it (:func:`valid_utf8`;
    callers record it by :func:`escape_name`).

    Args:
        uri: a local folder or an ``s3://bucket[/prefix]``.
        suffixes: keep only names ending in one of these, case-insensitively (``[".jpg"]``).
        page_size: keys per S3 list request (1..1000); small values are for tests.

    Raises:
        StorageError: missing local folder, missing bucket, access denied, unreachable endpoint.
    """
    return [u for u, _ in _listing(uri, suffixes, page_size, stamps=False)]


def list_stamped(
    uri: str, *, suffixes: Iterable[str] | None = None, page_size: int = 1000
) -> list[tuple[str, Stamp]]:
    """:func:`list_files`, each file with its :class:`Stamp` (S3: from the listing itself;
    local: one ``stat`` a file, through a symlink to what it names)."""
    # Every entry has one: a file that vanished before its stat is left out of the listing.
    return _listing(uri, suffixes, page_size, stamps=True)  # type: ignore[return-value]


def _listing(
    uri: str, suffixes: Iterable[str] | None, page_size: int, *, stamps: bool
) -> list[tuple[str, Stamp | None]]:
    if not 1 <= page_size <= 1000:
        raise ValueError(f"page_size must be in 1..1000, got {page_size}")
    ends = tuple(s.lower() for s in suffixes) if suffixes is not None else None

    def keep(name: str) -> bool:
        return ends is None or name.lower().endswith(ends)

    if not is_s3(uri):
        root = _local_path(uri)
        with _local_errors(uri):
            if not root.is_dir():
                what = "not a directory" if root.exists() else "no such directory"
                raise StorageError(uri, what)
            rels = _local_files(root, stamps=stamps)
        return sorted(((join(uri, r), st) for r, st in rels if keep(r)), key=lambda e: e[0])
    bucket, key = split_s3(uri)
    prefix = key.rstrip("/") + "/" if key else ""
    out: list[tuple[str, Stamp | None]] = []
    with _s3_errors(uri):
        pages = s3_client().get_paginator("list_objects_v2")
        for page in pages.paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        ):
            for obj in page.get("Contents", []):
                k = str(obj["Key"])
                if not k.endswith("/") and keep(k):
                    st = None
                    if stamps:
                        ns = int(obj["LastModified"].timestamp()) * 1_000_000_000
                        st = Stamp(int(obj["Size"]), ns)
                    out.append((f"s3://{bucket}/{k}", st))
    return sorted(out, key=lambda e: e[0])


def _local_files(root: Path, *, stamps: bool = False) -> list[tuple[str, Stamp | None]]:
    """Every file under ``root`` as a relative posix path (with its stamp, when ``stamps``),
    through symlinked folders too.

    A symlinked folder is listed like any other (``corpus/batch1 -> /mnt/nfs/batch1``: its
    files are under the folder as far as the caller can see, and a symlinked file always was
    listed), except one leading back to a folder it is inside (a loop). A link that leads to
    itself is skipped, as a dangling one is: neither names a file. The temporary files of
    unfinished or killed writes (``_TMP_NAME``) are not data and are skipped. Errors (an
    unreadable folder) raise instead of shrinking the listing silently.
    """
    out: list[tuple[str, Stamp | None]] = []
    st = root.stat()
    stack: list[tuple[str, str, frozenset[tuple[int, int]]]] = [
        (str(root), "", frozenset({(st.st_dev, st.st_ino)}))
    ]
    while stack:
        folder, rel, above = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if _link_loop(entry):  # a link to itself: as a dangling link, no file
                    continue
                if entry.is_dir():  # follows a symlink
                    est = entry.stat()
                    ident = (est.st_dev, est.st_ino)
                    if ident not in above:
                        stack.append((entry.path, f"{rel}{entry.name}/", above | {ident}))
                elif entry.is_file() and not _TMP_NAME.match(entry.name):
                    if not stamps:
                        out.append((rel + entry.name, None))
                        continue
                    try:
                        fst = entry.stat()
                    except FileNotFoundError:  # deleted since the folder was read: not there
                        continue
                    out.append((rel + entry.name, Stamp(fst.st_size, fst.st_mtime_ns)))
    return out


def _link_loop(entry: os.DirEntry[str]) -> bool:
    """A symlink that leads to itself (``x -> x``, or through others back): following it fails
    with ELOOP, where a dangling link is simply neither a file nor a folder."""
    try:
        entry.is_dir()
    except OSError as e:
        if e.errno == errno.ELOOP:
            return True
        raise
    return False


def _parquet_parts(uri: str) -> list[str]:
    if not is_s3(uri):
        path = _local_path(uri)
        with _local_errors(uri):
            if path.is_file():
                return [uri]
            if not path.exists():
                raise StorageError(uri, "no such file or directory")
    elif not uri.endswith("/") and split_s3(uri)[1] and _head(uri) is not None:
        return [uri]
    parts = list_files(uri, suffixes=[".parquet"])
    if not parts:
        raise StorageError(uri, "no such object, and no *.parquet files under it")
    return parts


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file, or every ``*.parquet`` under a folder/prefix, as one table.

    Part files are concatenated in sorted-name order (``part-00000`` first). A column some parts
    lack reads as null there (a table written before the column existed still reads, beside newer
    parts); a column whose type differs between parts is an error. Hive-style partition folders
    are not turned back into columns.

    Args:
        uri: a ``.parquet`` file/object, or a folder/prefix holding them.
        columns: read only these columns (all when None).

    Raises:
        StorageError: nothing readable at ``uri``.
        DataError: a part is not valid Parquet, lacks a requested column, or the parts' schemas
            differ (names the file).
    """
    tables = []
    for part in _parquet_parts(uri):
        try:
            tables.append(pq.read_table(pa.BufferReader(read_bytes(part)), columns=columns))
        except (pa.ArrowException, KeyError) as e:
            raise DataError(f"cannot read Parquet: {e}", source=part) from e
    try:
        return pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise DataError(f"Parquet parts have different schemas: {e}", source=uri) from e


def write_parquet(table: pa.Table, uri: str) -> None:
    """Write ``table`` as one Parquet file or object (local writes atomic, parents made).

    Raises:
        StorageError: the write failed.
    """
    if not isinstance(table, pa.Table):
        raise TypeError(f"write_parquet({uri!r}) needs a pyarrow.Table, got {type(table).__name__}")
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(uri, sink.getvalue().to_pybytes())


#: Linux file system types on a local device or in memory: per-file work there takes tens of
#: microseconds, and threads only take turns at the GIL (writing 5,000 new sidecars took 0.6-1.0 s
#: on one thread and 1.2-1.3 s on 2 to 16; reading them back 1.0-1.2 s and 1.6-2.2 s). Any other
#: type (nfs, cifs, fuse.*, 9p, ceph, virtiofs, ...) counts as remote, where each request waits
#: on a network and threads overlap the waits.
LOCAL_FILESYSTEMS = frozenset(
    {
        "ext2", "ext3", "ext4", "xfs", "btrfs", "bcachefs", "zfs", "f2fs", "jfs", "reiserfs",
        "nilfs2", "tmpfs", "ramfs", "overlay", "vfat", "exfat", "ntfs", "ntfs3", "hfsplus",
        "squashfs", "erofs", "iso9660", "udf",
    }
)  # fmt: skip
_MOUNTINFO = "/proc/self/mountinfo"
_OCTAL = re.compile(r"\\([0-7]{3})")


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """``(mount point, file system type)`` of each line of ``/proc/self/mountinfo``, the longest
    mount point first (octal escapes in a mount point, ``\\040`` for a space, decoded)."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) <= sep + 1:
            continue
        point = _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        mounts.append((point, fields[sep + 1]))
    return sorted(mounts, key=lambda m: len(m[0]), reverse=True)


def io_threads_for(
    uris: Iterable[str], threads: int, *, fsync: bool = False, mountinfo: str | None = None
) -> int:
    """How many threads to give per-file I/O on ``uris``: ``threads`` where any of them is on S3
    or on a file system not in :data:`LOCAL_FILESYSTEMS` (or where the mounts cannot be read:
    not Linux), or where each file is fsynced (``fsync``: a wait on the device that threads
    overlap; 2,000 small fsynced writes here took 0.57-0.62 s on one thread, 0.48 on 4), else 1.

    Each distinct folder is resolved once (symlinks followed as far as they exist), so a
    million files in a few folders cost a few lookups. ``mountinfo``: the text to read instead
    of ``/proc/self/mountinfo`` (tests).
    """
    if threads <= 1:
        return max(threads, 1)
    if fsync:
        return threads
    folders = set()
    for uri in uris:
        if is_s3(uri):
            return threads
        folders.add(os.path.dirname(str(_local_path(uri))) or ".")
    if not folders:
        return 1
    if mountinfo is None:
        try:
            mountinfo = Path(_MOUNTINFO).read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            return threads
    mounts = parse_mountinfo(mountinfo)
    for folder in folders:
        real = os.path.realpath(folder)
        fstype = next(
            (t for point, t in mounts if real == point or real.startswith(point.rstrip("/") + "/")),
            None,
        )
        if fstype not in LOCAL_FILESYSTEMS:
            return threads
    return 1


def map_in_threads(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``fn(item)`` for each item, in the items' order, run on up to ``threads`` threads.

    For per-item I/O (a sidecar's 2-3 requests, tens of ms each on S3). At most ``4 * threads``
    items are in flight (a million photos never become a million futures), taken from ``items``
    as results are yielded. ``fn`` must not mutate shared state: the caller folds the results in,
    in order, in its own thread. An exception ``fn`` raises is raised here at that item's turn,
    as a loop would raise it (later items already in flight are finished or cancelled first).
    ``threads=1`` is a plain loop in this thread.

    boto3 clients are thread-safe and :func:`s3_client` is safe to call from threads: its
    ``_cached_client`` is an ``lru_cache`` (thread-safe; two threads' first calls may each make a
    client, one of which is cached) with a Session of its own per client, and a pool of 32
    connections.
    """
    if threads <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="keeper-io") as pool:
        ahead: deque[Future[R]] = deque()
        try:
            for item in items:
                ahead.append(pool.submit(fn, item))
                if len(ahead) >= 4 * threads:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            for f in ahead:  # an exception, or a caller that stopped: start nothing more
                f.cancel()


# ---------------------------------------------------------------------------------------------
# Download cache


def _default_cache_dir() -> Path:
    root = os.environ.get("KEEPER_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "keeper") / "s3"


def _cache_name(key: str) -> str:
    """The cached file's name: the key's last segment where a file can be named so ("." and
    ".." cannot; a segment of S3's up-to-1024 bytes can be too long), keeping its suffix."""
    name = key.rsplit("/", 1)[-1]
    if name in (".", ".."):
        return "object"
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) <= 200:
        return name
    suffix = Path(name).suffix
    if len(suffix.encode("utf-8", "surrogateescape")) > 20:
        suffix = ""
    return raw[:100].decode("utf-8", "ignore") + "-" + hashlib.sha256(raw).hexdigest()[:16] + suffix


def download_cached(uri: str, *, cache_dir: str | Path | None = None) -> Path:
    """A local file holding ``uri``'s content, downloading an S3 object once per version.

    S3 objects land in ``<cache_dir>/<bucket>/<sha256(key)[:20]>/<etag>/<basename>``: a later call
    costs one HEAD and reuses the file while the ETag is unchanged; a changed object gets a new
    entry (old entries are left for whoever still has them open). Downloads go to a temporary
    file and are renamed into place, with ``If-Match`` so the bytes are the version the ETag
    names, so concurrent callers and crashes never expose a partial file. Local paths are
    returned as they are, after checking they exist.

    Args:
        uri: a local path or ``s3://bucket/key``.
        cache_dir: cache root; default ``$KEEPER_CACHE_DIR/s3`` or ``~/.cache/keeper/s3``.

    Raises:
        StorageError: missing file/object/bucket, or the download failed on every retry.
    """
    if not is_s3(uri):
        path = _local_path(uri)
        with _local_errors(uri):
            if not path.exists():
                raise StorageError(uri, "no such file or directory")
        return path
    bucket, key = _s3_object(uri)
    info = object_info(uri)
    root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    version = re.sub(r"[^A-Za-z0-9-]", "_", info.etag) or "no-etag"
    key_hash = hashlib.sha256(key.encode()).hexdigest()[:20]
    dest = root / bucket / key_hash / version / _cache_name(key)
    if dest.is_file() and dest.stat().st_size == info.size:
        return dest
    client = _client(uri)

    def fetch() -> None:
        with _s3_errors(uri):
            body = client.get_object(Bucket=bucket, Key=key, IfMatch=f'"{info.etag}"')["Body"]

        def copy(f: IO[bytes]) -> None:
            with contextlib.closing(body):
                for chunk in body.iter_chunks(_CHUNK):
                    f.write(chunk)

        _atomic_write(dest, copy)

    _retrying(uri, fetch)
    return dest
