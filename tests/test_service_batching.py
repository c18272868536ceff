"""The micro-batcher: groups concurrent submissions, keeps order, isolates failures."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence

import pytest

from app.service.batching import BatcherClosed, MicroBatcher


class Recorder:
    """A batch function that remembers its batches and the threads it ran on."""

    def __init__(self, delay: float = 0.02) -> None:
        self.batches: list[list[int]] = []
        self.threads: set[int] = set()
        self.delay = delay

    def __call__(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay)  # the model is busy; new requests pile up meanwhile
        return [item * 10 for item in items]


async def run_concurrently(batcher: MicroBatcher[int, int], count: int) -> list[int]:
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(i) for i in range(count)))
    finally:
        await batcher.stop()


def test_concurrent_requests_share_batches_and_one_thread() -> None:
    recorder = Recorder()
    batcher = MicroBatcher(recorder, max_batch_size=8, max_wait_ms=5)
    results = asyncio.run(run_concurrently(batcher, 30))
    assert results == [i * 10 for i in range(30)]
    assert max(len(batch) for batch in recorder.batches) == 8
    assert len(recorder.batches) < 30
    assert sorted(i for batch in recorder.batches for i in batch) == list(range(30))
    assert len(recorder.threads) == 1 and threading.get_ident() not in recorder.threads


def test_batch_size_one_runs_every_item_alone() -> None:
    recorder = Recorder(delay=0.0)
    results = asyncio.run(
        run_concurrently(MicroBatcher(recorder, max_batch_size=1, max_wait_ms=5), 6)
    )
    assert results == [i * 10 for i in range(6)]
    assert all(len(batch) == 1 for batch in recorder.batches)


def test_lone_request_is_not_delayed_by_max_wait() -> None:
    recorder = Recorder(delay=0.0)

    async def one() -> float:
        batcher = MicroBatcher(recorder, max_batch_size=8, max_wait_ms=500)
        batcher.start()
        started = time.perf_counter()
        await batcher.submit(1)
        elapsed = time.perf_counter() - started
        await batcher.stop()
        return elapsed

    assert asyncio.run(one()) < 0.25


def test_failures_reach_the_callers_and_the_worker_survives() -> None:
    def flaky(items: Sequence[int]) -> list[int]:
        if 13 in items:
            raise ValueError("unlucky")
        return list(items)

    async def scenario() -> int:
        batcher = MicroBatcher(flaky, max_batch_size=1, max_wait_ms=0)
        batcher.start()
        try:
            with pytest.raises(ValueError, match="unlucky"):
                await batcher.submit(13)
            return await batcher.submit(7)
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == 7


def test_submit_before_start_is_refused() -> None:
    async def scenario() -> None:
        await MicroBatcher(list, max_batch_size=2, max_wait_ms=0).submit(1)

    with pytest.raises(BatcherClosed):
        asyncio.run(scenario())


def test_event_loop_stays_responsive_during_inference() -> None:
    async def scenario() -> int:
        batcher = MicroBatcher(Recorder(delay=0.3), max_batch_size=4, max_wait_ms=0)
        batcher.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        await batcher.submit(1)
        task.cancel()
        await batcher.stop()
        return ticks

    assert asyncio.run(scenario()) >= 10


def test_run_uses_the_batch_thread_between_batches() -> None:
    """Work that is not a batch (explanations, region re-pooling) runs on the batches' thread,
    never beside a batch, and is refused when the batcher is not running."""
    recorder = Recorder(delay=0.05)
    busy = threading.Lock()  # held while a batch runs; run() must find it free

    def batch(items: Sequence[int]) -> list[int]:
        assert busy.acquire(blocking=False), "a batch ran beside run()"
        try:
            return recorder(items)
        finally:
            busy.release()

    def alone() -> int:
        assert busy.acquire(blocking=False), "run() ran beside a batch"
        busy.release()
        return threading.get_ident()

    async def scenario() -> tuple[list[int], list[int]]:
        batcher = MicroBatcher(batch, max_batch_size=2, max_wait_ms=0)
        with pytest.raises(BatcherClosed):
            await batcher.run(alone)
        batcher.start()
        try:
            submitted = [asyncio.ensure_future(batcher.submit(i)) for i in range(6)]
            alone_threads = await asyncio.gather(*(batcher.run(alone) for _ in range(3)))
            return await asyncio.gather(*submitted), alone_threads
        finally:
            await batcher.stop()

    results, alone_threads = asyncio.run(scenario())
    assert results == [i * 10 for i in range(6)]
    assert set(alone_threads) == recorder.threads and len(recorder.threads) == 1
    assert threading.get_ident() not in recorder.threads
