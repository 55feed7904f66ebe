"""One family of errors for everything keeper refuses.

Every error says what was wrong and where (spec, file, row, field), so a caller that processes
many items can record the reason and go on. Subclasses carry machine-readable fields
(``reason``, ``rows``...) beside the human message.
"""

from __future__ import annotations

import re
import struct
import zlib
from typing import Any


class KeeperError(Exception):
    """Base class of every error keeper raises on purpose.

    Every subclass pickles as itself, attributes included (a Ray task's error reaches the driver
    pickled): an exception pickles by calling its class with ``self.args``, which for one whose
    ``__init__`` formats several arguments into one message (``StorageError(uri, cause)``) is a
    TypeError on the other side.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore, (type(self), self.args, dict(self.__dict__)))


def _restore(cls: type[KeeperError], args: tuple[Any, ...], state: dict[str, Any]) -> KeeperError:
    """A KeeperError as it was pickled, without calling its ``__init__`` again."""
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class ConfigError(KeeperError, ValueError):
    """A configuration value is invalid (names the field)."""


class ModelLoadError(KeeperError):
    """A ModelSpec could not be loaded. Never followed by a silent fallback."""

    def __init__(self, spec: str, cause: str) -> None:
        self.spec = spec
        self.cause = cause
        super().__init__(f"cannot load model {spec!r}: {cause}")


class StorageError(KeeperError, OSError):
    """Reading or writing a local path or s3:// URI failed.

    Attributes:
        retryable: whether trying again later may succeed (a timeout, a throttled or failed
            request, an unreachable endpoint, missing credentials) or not (no such object, a
            directory where a file was expected, a malformed URI). Batch jobs record it, and
            the next run retries the retryable failures without being asked.
    """

    def __init__(self, uri: str, cause: str, *, retryable: bool = False) -> None:
        self.uri = uri
        self.cause = cause
        self.retryable = retryable
        super().__init__(f"{uri}: {cause}")


class BusyError(KeeperError):
    """Another run is writing the same output (it holds the folder's lock,
    :mod:`keeper_core.run_lock`); the message names it and how to go on."""


class DataError(KeeperError, ValueError):
    """Input data (a manifest, a table, an array) is malformed.

    Attributes:
        source: the file or object the data came from, if known.
        rows: offending row numbers (0-based, data rows) where they can be named.
    """

    def __init__(self, message: str, *, source: str | None = None, rows: list[int] | None = None):
        self.source = source
        self.rows = list(rows or [])
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{message}")


class ImageDecodeError(KeeperError, ValueError):
    """An image could not be decoded safely.

    Attributes:
        reason: machine-readable cause, one of ``DECODE_REASONS``.
        source: where the bytes came from (a URI), if known.
    """

    def __init__(self, reason: str, detail: str, *, source: str | None = None) -> None:
        if reason not in DECODE_REASONS:
            raise ValueError(f"unknown decode reason {reason!r}")
        self.reason = reason
        self.detail = detail
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{reason}: {detail}")


#: Every reason an ImageDecodeError may carry (stable strings: they land in error tables).
DECODE_REASONS = (
    "empty",  # zero bytes
    "not_image",  # bytes no decoder recognises
    "truncated",  # a recognised format that ends early or is corrupt
    "too_large",  # more bytes than the configured limit
    "too_many_pixels",  # declared width*height above the limit (decompression bomb)
    "too_many_scans",  # a JPEG with more scans than the limit (a bomb of decode time)
    "too_small",  # shortest side below the configured minimum
    "unsupported",  # a recognised image in a mode keeper cannot convert
)


# ---------------------------------------------------------------------------------------------
# Errors as a client may read them

#: What an error message that may reach a client must not carry: Ray's "(pid=.., ip=..)", IPv4
#: addresses (with a port), absolute file paths (not the "//bucket/key" of an s3:// URI), and
#: terminal colour codes (Ray colours its "ray::Deployment()" prefix).
_RAY_WHERE = re.compile(r"\s*\((?:pid|ip)=[^)]*\)")
_IPV4 = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?::\d+)?(?![\d.])")
# Not after "<": a closing tag (a tokenizer's ``</s>``) is no path.
_PATH = re.compile(r"(?<![\w:/.~<-])(?:~|\.{1,2})?/(?:[^\s/'\"(),;:]+/)*[^\s/'\"(),;:]+")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_MAX_MESSAGE = 200


def remote_cause(exc: BaseException) -> BaseException:
    """The error another process raised, out of Ray's wrapper; any other error as it is.

    A Ray Serve handle or task raises a remote error as ``RayTaskError`` (for a KeeperError, a
    ``RayTaskError(DataError)`` that is both), whose str() is the remote traceback: pid, node IP,
    file paths, source lines. Ray is not imported here: any wrapper whose ``cause`` attribute is
    an exception (as ``RayTaskError``'s is) is unwrapped, repeatedly (a deployment calling
    another nests them). keeper's own ``cause`` attributes are strings and stop the unwrapping.
    """
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        try:
            inner = getattr(exc, "cause", None)
        except Exception:  # a wrapper's __getattr__ may itself fail
            break
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def client_text(text: str) -> str:
    """One line of ``text`` for a client: its first non-empty line, without Ray's pid/IP, IP
    addresses, file paths and colour codes, cut to 200 characters."""
    text = _ANSI.sub("", text)
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    first = _PATH.sub("<path>", _IPV4.sub("<ip>", _RAY_WHERE.sub("", first)))
    return first if len(first) <= _MAX_MESSAGE else first[: _MAX_MESSAGE - 3] + "..."


def client_message(exc: BaseException) -> str:
    """The message of an error raised here or in another process, as a client may read it."""
    try:
        return client_text(str(remote_cause(exc)))
    except Exception:  # a broken __str__ must not turn a refusal into a 500
        return ""


def brief(exc: BaseException) -> str:
    """``Type: message`` of an error (Ray's wrapper unwrapped), as a client may read it; the
    whole error belongs in a log."""
    name = type(remote_cause(exc)).__name__
    message = client_message(exc)
    return f"{name}: {message}" if message else name


#: What PIL raises on malformed data inside a recognised format (a plugin's header parser or
#: decoder, an EXIF block). Anything else escaping PIL is a bug we want to see, not a bad image.
PIL_ERRORS: tuple[type[Exception], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    RuntimeError,  # the AVIF plugin's decode failures
    AttributeError,  # the AVIF plugin rewriting an EXIF whose tag has an unexpected type
    struct.error,
    zlib.error,
)
