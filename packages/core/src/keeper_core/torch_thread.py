"""``TorchThread``: one thread for all of a process's torch work (model load, warm-up, forwards).

PyTorch's Linux wheels parallelise CPU ops with GNU OpenMP, which keeps a team of worker threads
for every thread that starts a parallel region. A process that builds its model on one thread
and runs it on others (a Serve replica's constructor, then ``asyncio.to_thread``; a Ray actor
whose calls land on a pool of threads) keeps several teams, and its forwards run markedly
slower on a small machine. Measured on 2 cores, ViT-B-32 at 2 torch threads
(``benchmarks/torch_thread.py``, ``benchmarks/results/torch-thread-cpu.json``): a batch-1
forward took 69.8 ms when load and forwards shared one thread and 112.0 ms when the model was
loaded on another (batch 16: 572.5 against 660.6 ms).
``OMP_WAIT_POLICY=PASSIVE`` makes even the one-thread case take ~108 ms, which points at the
cause: with more OpenMP-managed threads than cores, libgomp stops spinning between parallel
regions, and every barrier then sleeps and wakes.

So a model owner creates one ``TorchThread`` and sends every torch call through it: ``call``
from synchronous code, ``run`` from an event loop. Calls run one at a time, in order.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TorchThread:
    """A single worker thread that runs the callables given to it, one at a time."""

    def __init__(self, name: str = "keeper-torch") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ident: int | None = None

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn(*args, **kwargs)`` on the thread and return its result (or raise its error).

        Raises:
            RuntimeError: called from the thread itself (it would wait for itself forever).
        """
        if threading.get_ident() == self._ident:
            raise RuntimeError("TorchThread.call from its own thread: call fn directly")
        return self._pool.submit(self._track, fn, args, kwargs).result()

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call`` for a coroutine: the event loop keeps running while ``fn`` does."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool, functools.partial(self._track, fn, args, kwargs)
        )

    def _track(self, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]) -> T:
        self._ident = threading.get_ident()
        return fn(*args, **kwargs)

    @property
    def ident(self) -> int | None:
        """The thread's id once it has run something (``threading.get_ident()`` there)."""
        return self._ident

    def close(self) -> None:
        """Let the thread end once its queued calls are done."""
        self._pool.shutdown(wait=False)


def pin_torch_threads(n: int) -> None:
    """Give the calling thread ``n`` torch (OpenMP) threads, for good.

    ``torch.set_num_threads`` sets the calling thread's count and a process-wide one. A thread's
    first parallel op then re-applies the process-wide count to it, so a count set on one thread
    is lost if another thread set a different one before that first op (measured: a forward
    thread set to 2, a loader thread set to 1, and the forward thread's first op ran at 1).
    Running one parallel op between two sets makes this thread's count stick.
    """
    import torch

    torch.set_num_threads(n)
    torch.ones(1 << 16).add_(1)  # over the grain size: a parallel region, the lazy init
    torch.set_num_threads(n)
