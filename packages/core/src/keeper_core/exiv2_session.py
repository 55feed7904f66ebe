"""The one way keeper reaches libexiv2 (through pyexiv2): a process-wide lock and a log level.

exiv2 keeps its state per process, not per call: the log level, the buffer in which pyexiv2
collects error messages (an error becomes a Python exception only if it was logged, so the
level decides between an exception and a silently empty result), and the XMP namespace
registry. keeper's two users want opposite levels:

- :mod:`keeper_core.capture` reads EXIF **muted**: at the error level one bad maker-note entry
  raises and loses every tag of the file.
- :mod:`keeper_core.handback` parses and writes XMP at the **error** level: muted, exiv2 reads
  a packet it cannot parse as empty, and a merge could then write a packet back without
  keeper's rating, or without what the person had written.

Each used to set its level on its own (handback once per process, capture at every read and
never back), so after one capture read every later XMP merge in the process ran muted. Every
keeper call into exiv2 now goes through :func:`exiv2`, which holds the lock for the whole call
and sets the level the call needs (restoring the one before on exit), so calls on other
threads can neither change the level under it nor interleave with its namespace bindings.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Literal

#: pyexiv2's levels: 3 logs (and so raises for) errors only, 4 logs nothing.
Level = Literal["error", "mute"]
_LEVELS: dict[Level, int] = {"error": 3, "mute": 4}

# Re-entrant: a call that holds it may call another keeper function that takes it.
_LOCK = threading.RLock()
_level: Level | None = None  # the level last set through exiv2(), guarded by _LOCK


@functools.cache
def _pyexiv2() -> ModuleType:
    import pyexiv2  # here: a process that never reads metadata need not load libexiv2

    return pyexiv2


@contextmanager
def exiv2(level: Level) -> Iterator[ModuleType]:
    """pyexiv2, for this thread alone and at ``level`` until the block ends.

    Args:
        level: "error" (exiv2's errors raise; warnings stay quiet) or "mute" (nothing raises;
            what exiv2 cannot read reads as empty, which the caller must expect).
    """
    global _level
    with _LOCK:
        pyexiv2 = _pyexiv2()
        before = _level
        _set(pyexiv2, level)
        try:
            yield pyexiv2
        finally:
            if before is not None and before != _level:
                _set(pyexiv2, before)


def _set(pyexiv2: ModuleType, level: Level) -> None:
    global _level
    pyexiv2.set_log_level(_LEVELS[level])
    _level = level
