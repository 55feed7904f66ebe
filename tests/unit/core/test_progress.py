"""keeper_core.progress: a line every few seconds of a long loop, none for a short one."""

from __future__ import annotations

import logging

import pytest

from keeper_core.progress import Progress, format_seconds

log = logging.getLogger("keeper.test_progress")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_line_every_ten_seconds_with_rate_and_time_left(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = Progress("sidecars", 1600, log, clock=clock)
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(1600):
            clock.now += 0.03125  # 32 a second (exact in binary): 50 s in all
            progress.step()
        progress.done()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5  # at 10, 20, 30 and 40 s, and the closing line
    assert lines[0] == "sidecars: 320 of 1,600 (20 %), 32/s, about 40 s left"
    assert lines[3] == "sidecars: 1,280 of 1,600 (80 %), 32/s, about 10 s left"
    assert lines[-1] == "sidecars: 1,600 done in 50 s"


def test_a_loop_shorter_than_the_interval_says_nothing(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    progress = Progress("keepers exported", 50, log, clock=clock)
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(50):
            clock.now += 0.1
            progress.step()
        progress.done()
    assert caplog.records == []


def test_no_line_at_the_last_step_and_slow_rates_keep_a_decimal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    progress = Progress("JPEGs written into", 3, log, every=1.0, clock=clock)
    with caplog.at_level(logging.INFO, logger=log.name):
        for _ in range(3):
            clock.now += 4.0
            progress.step()
    assert [r.getMessage() for r in caplog.records] == [
        "JPEGs written into: 1 of 3 (33 %), 0.2/s, about 8 s left",
        "JPEGs written into: 2 of 3 (66 %), 0.2/s, about 4 s left",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (12.4, "12 s"), (59.6, "1 min 00 s"), (259, "4 min 19 s"), (3720, "1 h 02 min")],
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text
