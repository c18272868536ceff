"""The image worker pool: bounded concurrency, results and errors in order, its own threads."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from app.service.settings import Settings
from app.service.workers import CpuWorkers
from model.hardware import usable_cpus


class Overlap:
    """A task that records how many copies of itself run at once, and on which threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.threads: set[str] = set()

    def __call__(self, value: int, scale: int = 1) -> int:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.add(threading.current_thread().name)
        time.sleep(0.02)  # long enough for every queued task to have been handed over
        with self.lock:
            self.running -= 1
        return value * scale


async def run_many(workers: CpuWorkers, task: Overlap, count: int) -> list[int]:
    try:
        return await asyncio.gather(*(workers.run(task, i, scale=3) for i in range(count)))
    finally:
        workers.close()


@pytest.mark.parametrize("size", [1, 3])
def test_at_most_size_tasks_run_at_once(size: int) -> None:
    task = Overlap()
    results = asyncio.run(run_many(CpuWorkers(size), task, 12))
    assert results == [i * 3 for i in range(12)]
    assert task.most == size
    assert all(name.startswith("gsp-cpu") for name in task.threads)
    assert threading.current_thread().name not in task.threads


def test_errors_reach_the_caller_and_the_pool_goes_on() -> None:
    def fails() -> None:
        raise ValueError("bad image")

    async def scenario() -> int:
        workers = CpuWorkers(1)
        try:
            with pytest.raises(ValueError, match="bad image"):
                await workers.run(fails)
            return await workers.run(sum, [1, 2, 3])
        finally:
            workers.close()

    assert asyncio.run(scenario()) == 6


def test_pool_size_is_checked_and_defaults_to_the_usable_cpus(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="at least one thread"):
        CpuWorkers(0)
    monkeypatch.delenv("GSP_CPU_WORKERS", raising=False)  # the default, not this shell's choice
    paths = {"checkpoint": tmp_path, "gallery": tmp_path, "_env_file": None}
    assert Settings(**paths).cpu_workers == usable_cpus() >= 1
    assert Settings(**paths, cpu_workers=2).cpu_workers == 2
