"""Continuous batching for one model: a batch is formed when the model is free, not on a timer.

``@serve.batch`` (Ray 2.60) cuts a batch ``batch_wait_timeout_s`` after its first call whether or
not the model is busy, and queues the cut batches behind the running one: under load an encoder
ran batches of ~3 images from the last 50 ms while calls waited seconds behind them (measured with
``benchmarks/serve.py --breakdown``: 3.25 images a forward at concurrency 32, batch limit 16). Here
calls wait in one queue and the next batch takes everything waiting (up to ``max_images``, in
arrival order) at the moment the previous forward ends, so a loaded replica runs full batches.

- A call that finds the model idle and nobody queued runs at once: nothing it could wait for is
  here, so a lone client never pays a batch wait.
- A batch formed right after a forward that is not full waits up to ``wait_s`` for more calls
  (load is evidently here); 0 takes what is there.
- A call larger than ``max_images`` is split into chunks that batch like separate calls.
- Forwards never overlap; a forward that raises fails every call in its batch, and the next
  batch runs. A caller that went away (cancelled) is dropped before its batch runs.

Items are rows of a numpy array (the encoder's pixels) or of a list (the VLM's (image, query)
pairs): a batch is their concatenation, and the forward returns one output row per input row.

No Ray here: each replica (ClipEncoder, VlmJudge) owns one ``ContinuousBatcher`` on its event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: A call's rows: a numpy array (N, ...) or a list of N items.
Rows = Any


def join(parts: Sequence[Rows]) -> Rows:
    """Rows of several calls (or outputs) end to end, keeping their kind."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate(parts)
    return [row for part in parts for row in part]


def split(rows: Rows, sizes: Sequence[int]) -> list[Rows]:
    """``rows`` cut into consecutive parts of ``sizes`` rows."""
    out, start = [], 0
    for n in sizes:
        out.append(rows[start : start + n])
        start += n
    return out


@dataclass
class _Call:
    items: Rows
    future: asyncio.Future[Rows]


@dataclass
class BatchStats:
    """Counters since start: calls (chunks count as calls), those that found the model idle,
    forwards, images and the seconds the forwards took."""

    calls: int = 0
    unbatched_calls: int = 0
    forwards: int = 0
    images: int = 0
    forward_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "calls": self.calls,
            "unbatched_calls": self.unbatched_calls,
            "forwards": self.forwards,
            "images": self.images,
            "forward_s": self.forward_s,
        }


class ContinuousBatcher:
    """``await batcher.submit(items)`` -> the forward's rows for ``items`` (same order).

    Args:
        forward: runs the model on a batch, (N, ...) -> (N, ...); awaited one at a time.
        max_images: the most rows in one forward (>= 1).
        wait_s: how long a batch formed under load waits to fill (0: not at all).
    """

    def __init__(
        self,
        forward: Callable[[Rows], Awaitable[Rows]],
        max_images: int,
        wait_s: float = 0.0,
    ) -> None:
        self.forward = forward
        self.max_images, self.wait_s = 1, 0.0
        self.configure(max_images, wait_s)
        self.stats = BatchStats()
        self._queue: deque[_Call] = deque()
        self._arrived: asyncio.Event | None = None  # made on the event loop that submits
        self._worker: asyncio.Task[None] | None = None
        self._busy = False

    def configure(self, max_images: int | None = None, wait_s: float | None = None) -> None:
        """Change the batch limit and the fill wait in place (the next batch uses them); both are
        checked before either changes.

        Raises:
            ValueError: ``max_images`` below 1 or a negative ``wait_s``.
        """
        if max_images is not None and max_images < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_images}")
        if wait_s is not None and wait_s < 0:
            raise ValueError(f"batch_wait_timeout_s must be >= 0, got {wait_s}")
        if max_images is not None:
            self.max_images = int(max_images)
        if wait_s is not None:
            self.wait_s = float(wait_s)

    def apply_user_config(self, name: str, user_config: dict[str, Any]) -> int | None:
        """A deployment's ``user_config`` ``{"max_batch_size": N, "batch_wait_timeout_s": T}``
        (both optional) applied in place; returns the new batch size, or None if not given.

        Raises:
            ValueError: an unknown key or a value ``configure`` refuses (nothing changes, and
                Serve keeps the old config).
        """
        unknown = set(user_config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ValueError(f"{name} user_config: unknown keys {sorted(unknown)}")
        n = user_config.get("max_batch_size")
        wait = user_config.get("batch_wait_timeout_s")
        n = None if n is None else int(n)
        self.configure(n, None if wait is None else float(wait))
        return n

    async def submit(self, items: Rows) -> Rows:
        """Queue ``items`` (N rows) and return their N output rows once their batch has run."""
        n = self.max_images
        if len(items) > n:
            parts = await asyncio.gather(
                *(self.submit(items[i : i + n]) for i in range(0, len(items), n))
            )
            return join(parts)
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        self.stats.calls += 1
        if not self._busy and not self._queue:
            self.stats.unbatched_calls += 1
        call = _Call(items, loop.create_future())
        self._queue.append(call)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._run())
        return await call.future

    def _take(self, room: int) -> list[_Call]:
        """Calls from the head of the queue while they fit in ``room`` rows (order kept; callers
        that went away are dropped)."""
        taken: list[_Call] = []
        while self._queue:
            call = self._queue[0]
            if call.future.done():  # cancelled by its caller
                self._queue.popleft()
                continue
            if len(call.items) > room:
                break
            taken.append(self._queue.popleft())
            room -= len(call.items)
        return taken

    async def _fill(self, batch: list[_Call]) -> list[_Call]:
        """Under load: wait up to ``wait_s`` for calls that complete ``batch``."""
        assert self._arrived is not None
        deadline = time.monotonic() + self.wait_s
        while (room := self.max_images - sum(len(c.items) for c in batch)) > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if not self._queue:
                self._arrived.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), left)
            more = self._take(room)
            if not more and self._queue:  # the next call does not fit: as full as it gets
                break
            batch.extend(more)
        return [c for c in batch if not c.future.done()]

    async def _run(self) -> None:
        assert self._arrived is not None
        under_load = False
        while True:
            if not self._queue:
                under_load = False
                self._arrived.clear()
                await self._arrived.wait()
            batch = self._take(self.max_images)
            if batch and under_load and self.wait_s > 0:
                batch = await self._fill(batch)
            if not batch:
                continue
            self._busy = True
            try:
                await self._run_batch(batch)
            finally:
                self._busy = False
            under_load = bool(self._queue)

    async def _run_batch(self, batch: list[_Call]) -> None:
        sizes = [len(c.items) for c in batch]
        t0 = time.perf_counter()
        try:
            out = await self.forward(join([c.items for c in batch]))
            if len(out) != sum(sizes):
                raise RuntimeError(f"forward returned {len(out)} rows for {sum(sizes)} inputs")
        except Exception as e:  # every caller of this batch gets the error; the loop goes on
            for c in batch:
                if not c.future.done():
                    c.future.set_exception(e)
            return
        finally:
            self.stats.forward_s += time.perf_counter() - t0
        self.stats.forwards += 1
        self.stats.images += sum(sizes)
        for c, rows in zip(batch, split(out, sizes), strict=True):
            if not c.future.done():
                c.future.set_result(rows)
