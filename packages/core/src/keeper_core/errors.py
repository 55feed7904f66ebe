"""One family of errors for everything keeper refuses.

Every error says what was wrong and where (spec, file, row, field), so a caller that processes
many items can record the reason and go on. Subclasses carry machine-readable fields
(``reason``, ``rows``...) beside the human message.
"""

from __future__ import annotations


class KeeperError(Exception):
    """Base class of every error keeper raises on purpose."""


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
