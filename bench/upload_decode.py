"""What the service does with an upload before the model: decode, crop, tensor (request thread).

For a 12 MP and a 2 MP photo-like JPEG and a 256 px PNG, side by side in one run:

- the service's path: ``decode_image(..., min_side=resize_size)`` (a JPEG decodes at the
  smallest DCT scale that keeps the network's resize size, as the indexer decodes files), then
  ``eval_crop`` and ``to_uint8_tensor`` (normalisation happens later, batched, on the device);
- a full-resolution decode followed by the float ``eval_transform`` on the request thread, which
  is what the service did before 2026-11-27.

It also prints the largest difference between the service's network input and the indexer's
(``index.images.decode_image`` + ``eval_transform``) for the same bytes: it must be 0.

Then, from an event loop as the service runs it (uvloop where installed), the hand-off of that
work to a thread: Starlette's ``run_in_threadpool`` (what the service used before 2026-11-27)
against the service's own pool (``CpuWorkers``, one thread per usable CPU): the hand-off
alone, and a burst of concurrent 12 MP PNG uploads (PNG has no reduced-scale decode, so each
is decoded whole) with its wall time and peak resident memory, each burst in a fresh process.

Last, the cost of the strict JPEG check that uploads get (a libjpeg-turbo pass at 1/8 scale
that refuses corrupt data, which Pillow decodes past) against the lenient decode that gallery
files get, for a 12 MP and a 48 MP photo (``--strict-only`` runs this part alone).

    .venv/bin/python bench/upload_decode.py [--repeats 15] [--burst 32] [--strict-only]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starlette.concurrency import run_in_threadpool

from app.service.images import decode_image
from app.service.workers import CpuWorkers
from index.images import decode_image as indexer_decode
from model.config import Preprocessing
from model.hardware import usable_cpus
from model.transforms import Normalise, eval_crop, eval_transform, to_uint8_tensor

LIMITS = {"max_bytes": 1 << 30, "max_pixels": 1 << 30}
T = TypeVar("T")
PREPROCESSING = Preprocessing()  # the default network input: 224 px crops of a 256 px resize
CROP = eval_crop(PREPROCESSING)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour fields with some texture: JPEG statistics closer to a photo than noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 10, width // 10, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    return image.filter(ImageFilter.GaussianBlur(2))


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def median_ms(work: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000.0)
    return statistics.median(times)


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """The highest resident size above the start, sampled every millisecond meanwhile."""

    def __enter__(self) -> PeakMemory:
        self.start = self.peak = resident_bytes()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample)
        self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join()

    @property
    def above_start_mib(self) -> float:
        return (self.peak - self.start) / 2**20


def service_path(data: bytes, kind: str) -> torch.Tensor:
    """What the service's request thread does with an upload."""
    decoded = decode_image(data, content_type=kind, min_side=PREPROCESSING.resize_size, **LIMITS)
    return to_uint8_tensor(CROP(decoded.image))


def run_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where installed, as uvicorn serves the service."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def pools(workers: CpuWorkers) -> dict[str, Callable]:
    return {
        "run_in_threadpool (40 threads)": run_in_threadpool,
        f"CpuWorkers ({workers.size} threads)": workers.run,
    }


async def hand_off_ms() -> dict[str, float]:
    """The hand-off alone (a no-op task, one at a time) for each pool: best of three medians,
    measured alternately."""
    workers = CpuWorkers(usable_cpus())
    medians: dict[str, list[float]] = {}
    for _ in range(3):
        for name, run in pools(workers).items():
            times = []
            for _ in range(1000):
                started = time.perf_counter()
                await run(int)
                times.append((time.perf_counter() - started) * 1000.0)
            medians.setdefault(name, []).append(statistics.median(times))
    workers.close()
    return {name: min(values) for name, values in medians.items()}


def burst(pool: int, data: bytes, count: int) -> tuple[str, float, float]:
    """``count`` decodes of ``data`` at once on pool number ``pool``: its name, the wall
    seconds and the peak resident MiB above the start (run in a fresh process, so that no
    memory an earlier burst left to the allocator hides this one's)."""

    async def run_all() -> tuple[str, float, float]:
        workers = CpuWorkers(usable_cpus())
        name, run = list(pools(workers).items())[pool]
        with PeakMemory() as memory:
            started = time.perf_counter()
            await asyncio.gather(*(run(service_path, data, "image/png") for _ in range(count)))
            seconds = time.perf_counter() - started
        workers.close()
        return name, seconds, memory.above_start_mib

    return run_loop(run_all())


def strict_check_cost(repeats: int) -> None:
    """Uploads' strict decode against gallery files' lenient one, alternated, best of three
    medians each."""
    print("strict JPEG check: decode_image(strict=True), uploads, vs strict=False, gallery files")
    print(f"{'upload':>11} {'KiB':>6} {'strict ms':>10} {'lenient ms':>11} {'ratio':>6}")
    for name, size in (("12 MP JPEG", (4000, 3000)), ("48 MP JPEG", (8064, 6048))):
        data = encoded(photo(*size), "JPEG")
        runs: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(3):
            for strict in (True, False):
                decode = functools.partial(
                    decode_image,
                    data,
                    content_type="image/jpeg",
                    min_side=PREPROCESSING.resize_size,
                    strict=strict,
                    **LIMITS,
                )
                runs[strict].append(median_ms(decode, repeats))
        strict_ms, lenient_ms = min(runs[True]), min(runs[False])
        print(
            f"{name:>11} {len(data) // 1024:>6} {strict_ms:>10.2f} {lenient_ms:>11.2f} "
            f"{strict_ms / lenient_ms:>5.2f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--burst", type=int, default=32, help="concurrent uploads (0: skip)")
    parser.add_argument("--strict-only", action="store_true", help="only the strict check")
    args = parser.parse_args()
    if args.strict_only:
        strict_check_cost(args.repeats)
        return
    preprocessing = PREPROCESSING
    full, normalise = eval_transform(preprocessing), Normalise(preprocessing)
    uploads = {
        "12 MP JPEG": encoded(photo(4000, 3000), "JPEG"),
        "2 MP JPEG": encoded(photo(1600, 1200), "JPEG"),
        "256 px PNG": encoded(photo(256, 256), "PNG"),
    }
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); network input {preprocessing.image_size} px, "
        f"resize {preprocessing.resize_size} px"
    )
    print(
        f"{'upload':>11} {'KiB':>6} {'service ms':>11} {'full+float ms':>14} {'ratio':>6} "
        f"{'vs indexer':>11}"
    )

    for name, data in uploads.items():
        kind = "image/jpeg" if "JPEG" in name else "image/png"
        service = functools.partial(service_path, data, kind)

        def full_float(data: bytes = data, kind: str = kind) -> torch.Tensor:
            return full(decode_image(data, content_type=kind, **LIMITS).image)

        # Alternate the two, best of three medians each, so that load changes favour neither.
        ours, theirs = [], []
        for _ in range(3):
            ours.append(median_ms(service, args.repeats))
            theirs.append(median_ms(full_float, args.repeats))
        indexed = full(indexer_decode(data, preprocessing.resize_size))
        difference = (normalise(service()[None])[0] - indexed).abs().max().item()
        print(
            f"{name:>11} {len(data) // 1024:>6} {min(ours):>11.2f} {min(theirs):>14.2f} "
            f"{min(theirs) / min(ours):>5.1f}x {difference:>11.2g}"
        )
    if args.burst:
        print("\nhand-off of a no-op task from the event loop and back (median ms)")
        for name, ms in run_loop(hand_off_ms()).items():
            print(f"  {name:>32}: {ms:.3f}")
        print(f"{args.burst} concurrent 12 MP PNG uploads (wall s, peak resident MiB above start)")
        upload = encoded(photo(4000, 3000), "PNG")
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as fresh:
            for pool in (0, 1, 0, 1):
                name, seconds, mib = fresh.apply(burst, (pool, upload, args.burst))
                print(f"  {name:>32}: {seconds:6.2f} s, {mib:7.1f} MiB")
    print()
    strict_check_cost(args.repeats)


if __name__ == "__main__":
    main()
