"""The bounded thread pool for a request's CPU-heavy image steps.

Decoding uploads, cropping them for the network, drawing thumbnails, heatmaps and explanations
run here, never on the event loop. Starlette's ``run_in_threadpool`` would admit 40 such tasks
at once whatever the machine: a burst of large uploads would then decode 40 images side by side
(each up to ``max_pixels`` x 3 bytes) on a few cores. Here at most ``size`` run and the others
wait their turn in order: 32 concurrent 12 MP PNG uploads took the same time with a twelfth of
the memory on a 2-core box (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["CpuWorkers"]

P = ParamSpec("P")
T = TypeVar("T")


class CpuWorkers:
    """At most ``size`` image tasks at a time, on threads named ``gsp-cpu-*``."""

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"a worker pool needs at least one thread, got {size}")
        self.size = size
        self._executor = ThreadPoolExecutor(max_workers=size, thread_name_prefix="gsp-cpu")

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function(*args, **kwargs)`` on a worker thread; its exceptions propagate."""
        call = functools.partial(function, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """Finish the running tasks and drop the queued ones (the service is stopping)."""
        self._executor.shutdown(wait=True, cancel_futures=True)
