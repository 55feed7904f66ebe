"""A log line every few seconds for a long loop in a driver: done, of how many, rate, time left.

Ray Data shows its own progress bars; what a job does in its driver after the pipeline (writing a
million sidecars, copying forty thousand keepers to S3) would otherwise be minutes of silence::

    progress = Progress("sidecars", len(plans), log)
    for result in results:
        ...
        progress.step()
    progress.done()

logs ``sidecars: 120,000 of 1,000,000 (12 %), 3,400/s, about 4 min 19 s left`` at most every
``every`` seconds, nothing for a loop that ends sooner, and one closing line where it logged any.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float, *, tenths: bool = False) -> str:
    """``4 min 19 s``, ``1 h 02 min``; under a minute whole seconds (``12 s``), or with
    ``tenths`` as measured (``3.2 s``, the contact sheet's stage times)."""
    s = seconds if tenths else float(round(max(seconds, 0)))
    if s < 60:
        return f"{s:.1f} s" if tenths else f"{int(s)} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


class Progress:
    """Counts steps of a loop of ``total`` and logs how far it got every ``every`` seconds.

    Args:
        what: what is counted, as the line names it (``"sidecars"``).
        total: how many steps the loop makes.
        logger: where the lines go (INFO).
        every: seconds between lines; the first comes ``every`` seconds after the start.
        clock: seconds, monotonic (tests give their own).
    """

    def __init__(
        self,
        what: str,
        total: int,
        logger: logging.Logger,
        *,
        every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what, self.total, self.log, self.every, self.clock = what, total, logger, every, clock
        self.count = 0
        self.start = self.last = clock()
        self.logged = False

    def step(self, n: int = 1) -> None:
        """``n`` more steps done; a line if ``every`` seconds passed since the last."""
        self.count += n
        now = self.clock()
        if now - self.last >= self.every and self.count < self.total:
            self.last = now
            self.logged = True
            elapsed = now - self.start
            rate = self.count / elapsed if elapsed > 0 else 0.0
            left = (
                f", about {format_seconds((self.total - self.count) / rate)} left" if rate else ""
            )
            self.log.info(
                "%s: %s of %s (%d %%), %s/s%s",
                self.what,
                f"{self.count:,}",
                f"{self.total:,}",
                100 * self.count // max(self.total, 1),
                f"{rate:,.0f}" if rate >= 10 else f"{rate:.1f}",
                left,
            )

    def done(self) -> None:
        """The closing line, where the loop was long enough to log any."""
        if self.logged:
            self.log.info(
                "%s: %s done in %s",
                self.what,
                f"{self.count:,}",
                format_seconds(self.clock() - self.start),
            )
