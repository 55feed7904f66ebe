"""keeper_serve.batcher.ContinuousBatcher: batches form when the model is free, on one event loop."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from keeper_serve.batcher import ContinuousBatcher


class Model:
    """A forward that doubles its input, records batch sizes and can be held until released."""

    def __init__(self, fail_on: int | None = None) -> None:
        self.sizes: list[int] = []
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.fail_on = fail_on

    async def forward(self, x: np.ndarray) -> np.ndarray:
        self.sizes.append(len(x))
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_on is not None and self.fail_on in x[:, 0]:
            raise ValueError("bad row")
        return x * 2


def rows(*values: int) -> np.ndarray:
    return np.array([[v, v] for v in values], dtype=np.int64)


async def hold_first_forward(model: Model, b: ContinuousBatcher) -> asyncio.Task[np.ndarray]:
    """Start a lone call and return once its forward is running (and held)."""
    model.gate = asyncio.Event()
    first = asyncio.ensure_future(b.submit(rows(0)))
    await asyncio.wait_for(model.started.wait(), 5)
    return first


def test_a_lone_call_runs_at_once_whatever_the_wait() -> None:
    async def main() -> None:
        model = Model()
        b = ContinuousBatcher(model.forward, max_images=16, wait_s=30.0)
        out = await asyncio.wait_for(b.submit(rows(3)), 5)  # no 30 s wait for company
        np.testing.assert_array_equal(out, rows(6))
        assert b.stats.as_dict() == {
            "calls": 1, "unbatched_calls": 1, "forwards": 1, "images": 1,
            "forward_s": pytest.approx(b.stats.forward_s),
        }  # fmt: skip

    asyncio.run(main())


def test_calls_waiting_during_a_forward_form_the_next_batch_in_order() -> None:
    async def main() -> None:
        model = Model()
        b = ContinuousBatcher(model.forward, max_images=8, wait_s=0.0)
        first = await hold_first_forward(model, b)
        waiting = [asyncio.ensure_future(b.submit(rows(i))) for i in range(1, 21)]
        await asyncio.sleep(0)  # every call queued
        assert model.sizes == [1]  # none of them cut a batch while the model was busy
        assert model.gate is not None
        model.gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), 5)
        assert model.sizes == [1, 8, 8, 4]
        for i, out in enumerate(results):
            np.testing.assert_array_equal(out, rows(2 * i))  # each caller its own rows
        assert b.stats.calls == 21
        assert b.stats.unbatched_calls == 1
        assert b.stats.forwards == 4
        assert b.stats.images == 21

    asyncio.run(main())


def test_a_call_larger_than_a_batch_is_split_and_reassembled() -> None:
    async def main() -> None:
        model = Model()
        b = ContinuousBatcher(model.forward, max_images=8)
        x = rows(*range(20))
        np.testing.assert_array_equal(await b.submit(x), x * 2)
        assert sorted(model.sizes) == [4, 8, 8]
        assert b.stats.images == 20

    asyncio.run(main())


def test_a_failing_forward_fails_its_batch_only() -> None:
    async def main() -> None:
        model = Model(fail_on=7)
        b = ContinuousBatcher(model.forward, max_images=2)
        first = await hold_first_forward(model, b)
        bad = [asyncio.ensure_future(b.submit(rows(v))) for v in (6, 7)]  # one batch of two
        good = asyncio.ensure_future(b.submit(rows(9)))  # the next batch
        await asyncio.sleep(0)
        assert model.gate is not None
        model.gate.set()
        np.testing.assert_array_equal(await first, rows(0))
        for task in bad:
            with pytest.raises(ValueError, match="bad row"):
                await task
        np.testing.assert_array_equal(await asyncio.wait_for(good, 5), rows(18))
        assert model.sizes == [1, 2, 1]
        assert b.stats.forwards == 2  # the failed forward is not counted as done
        # and the loop still serves
        np.testing.assert_array_equal(await asyncio.wait_for(b.submit(rows(1)), 5), rows(2))

    asyncio.run(main())


def test_a_caller_that_went_away_is_dropped_before_its_batch() -> None:
    async def main() -> None:
        model = Model()
        b = ContinuousBatcher(model.forward, max_images=16)
        first = await hold_first_forward(model, b)
        gone = asyncio.ensure_future(b.submit(rows(5)))
        stay = asyncio.ensure_future(b.submit(rows(6)))
        await asyncio.sleep(0)
        gone.cancel()
        assert model.gate is not None
        model.gate.set()
        await first
        np.testing.assert_array_equal(await asyncio.wait_for(stay, 5), rows(12))
        assert model.sizes == [1, 1]  # the cancelled call never reached the model
        with pytest.raises(asyncio.CancelledError):
            await gone

    asyncio.run(main())


def test_under_load_a_short_batch_waits_to_fill() -> None:
    async def main() -> None:
        model = Model()
        b = ContinuousBatcher(model.forward, max_images=5, wait_s=2.0)
        first = await hold_first_forward(model, b)
        early = [asyncio.ensure_future(b.submit(rows(i))) for i in (1, 2)]
        await asyncio.sleep(0)
        assert model.gate is not None
        model.gate.set()
        await first
        await asyncio.sleep(0.05)  # the short batch of two is now waiting for company
        late = [asyncio.ensure_future(b.submit(rows(i))) for i in (3, 4, 5)]
        out = await asyncio.wait_for(asyncio.gather(*early, *late), 5)  # full: no 2 s wait
        assert model.sizes == [1, 5]
        for i, o in enumerate(out, start=1):
            np.testing.assert_array_equal(o, rows(2 * i))

    asyncio.run(main())


def test_configure_checks_and_applies() -> None:
    async def main() -> None:
        model = Model()
        b = ContinuousBatcher(model.forward, max_images=4)
        with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
            b.configure(max_images=0)
        with pytest.raises(ValueError, match="batch_wait_timeout_s must be >= 0"):
            b.configure(wait_s=-1)
        b.configure(max_images=2)
        await b.submit(rows(1, 2, 3))
        assert sorted(model.sizes) == [1, 2]

    asyncio.run(main())


def test_bad_limits_at_construction() -> None:
    async def forward(x: np.ndarray) -> np.ndarray:
        return x

    with pytest.raises(ValueError, match="max_batch_size"):
        ContinuousBatcher(forward, max_images=0)


def test_list_rows_batch_like_arrays() -> None:
    """The VLM's calls are lists of (image, query) pairs; its forward returns one float each."""

    async def main() -> None:
        sizes: list[int] = []
        gate = asyncio.Event()

        async def judge(pairs: list[tuple[str, str]]) -> list[float]:
            sizes.append(len(pairs))
            await gate.wait()
            return [float(len(im) + len(q)) for im, q in pairs]

        b = ContinuousBatcher(judge, max_images=4)
        first = asyncio.ensure_future(b.submit([("a", "q")]))
        await asyncio.sleep(0)
        big = asyncio.ensure_future(b.submit([("bb", "q"), ("ccc", "q"), ("d", "qq")]))
        small = asyncio.ensure_future(b.submit([("eeeee", "")]))
        await asyncio.sleep(0)
        gate.set()
        assert await first == [2.0]
        assert await asyncio.wait_for(big, 5) == [3.0, 4.0, 3.0]
        assert await asyncio.wait_for(small, 5) == [5.0]
        assert sizes == [1, 4]  # both waiting calls in one forward, each given its own rows
        assert await b.submit([(str(i), "") for i in range(6)]) == [1.0] * 6  # split 4 + 2

    asyncio.run(main())


def test_user_config_is_checked_whole_before_anything_changes() -> None:
    async def forward(x: np.ndarray) -> np.ndarray:
        return x

    b = ContinuousBatcher(forward, max_images=16, wait_s=0.05)
    with pytest.raises(ValueError, match=r"ClipEncoder user_config: unknown keys \['batch'\]"):
        b.apply_user_config("ClipEncoder", {"batch": 4})
    with pytest.raises(ValueError, match="batch_wait_timeout_s must be >= 0"):
        b.apply_user_config("ClipEncoder", {"max_batch_size": 4, "batch_wait_timeout_s": -1})
    assert (b.max_images, b.wait_s) == (16, 0.05)  # the refused config changed nothing
    assert b.apply_user_config("ClipEncoder", {"max_batch_size": "8"}) == 8
    assert b.apply_user_config("ClipEncoder", {"batch_wait_timeout_s": 0}) is None
    assert (b.max_images, b.wait_s) == (8, 0.0)
