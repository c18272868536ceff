"""Micro-batching: concurrent requests share one forward pass on a single worker thread.

Requests ``submit`` an item and await its result. One asyncio task collects items from a
queue into batches of at most ``max_batch_size`` and runs ``process`` on a dedicated thread
(one per model and device), so inference never blocks the event loop and the model is never
entered by two threads at once. A lone request is dispatched at once; only when the previous
batch held more than one item (the server is under concurrent load) does the collector wait
up to ``max_wait_ms`` for stragglers to fill the batch. Work that is not a batch of items
(explanations, region re-pooling) goes to the same thread through ``run``, between batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Generic, TypeVar

__all__ = ["BatcherClosed", "MicroBatcher"]

T = TypeVar("T")
R = TypeVar("R")
V = TypeVar("V")


class BatcherClosed(RuntimeError):
    """The batcher is not running (not started yet, or shutting down)."""


class MicroBatcher(Generic[T, R]):
    """Group concurrent ``submit`` calls into calls of ``process(items) -> results``."""

    def __init__(
        self,
        process: Callable[[Sequence[T]], Sequence[R]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        name: str = "model",
        on_batch: Callable[[int, float], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self._process = process
        self.max_batch_size = max_batch_size
        self.max_wait_s = max(max_wait_ms, 0.0) / 1000.0
        self._name = name
        self._on_batch = on_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._task: asyncio.Task[None] | None = None
        self._last_batch_size = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Start the collector on the running loop and the worker thread."""
        if self.running:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"gsp-{self._name}")
        self._task = asyncio.get_running_loop().create_task(self._collect())

    async def stop(self) -> None:
        """Stop collecting; queued requests fail with :class:`BatcherClosed`."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue is not None:
            while not self._queue.empty():
                _, future = self._queue.get_nowait()
                if not future.done():
                    future.set_exception(BatcherClosed("the service is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, item: T) -> R:
        """Queue one item and wait for its result (exceptions of ``process`` propagate)."""
        if not self.running or self._queue is None:
            raise BatcherClosed("the inference worker is not running")
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def run(self, function: Callable[[], V]) -> V:
        """``function()`` on the worker thread, between two batches, so that it is never
        entered beside ``process`` (exceptions propagate)."""
        if not self.running or self._executor is None:
            raise BatcherClosed("the inference worker is not running")
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    async def _gather_batch(self) -> list[tuple[T, asyncio.Future[R]]]:
        assert self._queue is not None
        batch = [await self._queue.get()]
        while len(batch) < self.max_batch_size and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        under_load = self._last_batch_size > 1
        if under_load and self.max_wait_s > 0 and len(batch) < self.max_batch_size:
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
        return batch

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather_batch()
            live = [(item, future) for item, future in batch if not future.cancelled()]
            self._last_batch_size = len(live)
            if not live:
                continue
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(
                    self._executor, self._process, [item for item, _ in live]
                )
                if len(results) != len(live):
                    raise RuntimeError(
                        f"batch function returned {len(results)} results for {len(live)} items"
                    )
            except asyncio.CancelledError:
                for _, future in live:
                    if not future.done():
                        future.set_exception(BatcherClosed("the service is shutting down"))
                raise
            except Exception as error:
                for _, future in live:
                    if not future.done():
                        future.set_exception(error)
                continue
            finally:
                if self._on_batch is not None:
                    self._on_batch(len(live), time.perf_counter() - started)
            for (_, future), result in zip(live, results, strict=True):
                if not future.done():
                    future.set_result(result)
