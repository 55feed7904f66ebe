"""keeper_core.torch_thread: every call on one thread, in order; errors reach the caller."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from keeper_core.torch_thread import TorchThread


def test_sync_and_async_calls_share_one_thread_that_is_not_the_callers() -> None:
    t = TorchThread("test")
    try:
        seen = {t.call(threading.get_ident) for _ in range(3)}

        async def many() -> set[int]:
            ids = await asyncio.gather(*(t.run(threading.get_ident) for _ in range(5)))
            return set(ids)

        seen |= asyncio.run(many())
        assert len(seen) == 1
        assert seen != {threading.get_ident()}
        assert t.ident in seen
        # torch's thread count set on the thread is what torch work there sees.
        t.call(torch.set_num_threads, 1)
        assert t.call(torch.get_num_threads) == 1
    finally:
        t.close()


def test_calls_run_in_order_one_at_a_time() -> None:
    t = TorchThread("test")
    order: list[int] = []
    inside = threading.Lock()

    def step(i: int) -> None:
        assert inside.acquire(blocking=False), "two calls overlapped"
        order.append(i)
        inside.release()

    async def submit() -> None:
        await asyncio.gather(*(t.run(step, i) for i in range(20)))

    try:
        asyncio.run(submit())
        assert order == list(range(20))
    finally:
        t.close()


def test_errors_reach_the_caller_and_the_thread_goes_on() -> None:
    t = TorchThread("test")

    def boom() -> None:
        raise ValueError("bad batch")

    try:
        with pytest.raises(ValueError, match="bad batch"):
            t.call(boom)
        with pytest.raises(ValueError, match="bad batch"):
            asyncio.run(t.run(boom))
        assert t.call(lambda: 2 + 2) == 4
        with pytest.raises(RuntimeError, match="its own thread"):
            t.call(lambda: t.call(lambda: 1))
    finally:
        t.close()


def test_pinned_thread_counts_survive_another_threads_setting() -> None:
    """A forward thread at 2 and a loader at 1, the loader set last: each keeps its own. With
    plain torch.set_num_threads the forward thread's first parallel op ran at the loader's 1."""
    import torch

    from keeper_core.torch_thread import pin_torch_threads

    forward, loader = TorchThread("fwd"), TorchThread("load")
    try:
        forward.call(pin_torch_threads, 2)

        def load() -> int:
            pin_torch_threads(1)
            torch.nn.Linear(512, 512)(torch.ones(64, 512))  # a load's parallel ops
            return torch.get_num_threads()

        assert loader.call(load) == 1
        after = forward.call(lambda: (torch.ones(1 << 20).mul_(2), torch.get_num_threads())[1])
        assert after == 2
    finally:
        forward.close()
        loader.close()
