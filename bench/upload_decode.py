"""What the service does with an upload before the model: decode, crop, tensor (request thread).

For a 12 MP and a 2 MP photo-like JPEG and a 256 px PNG, side by side in one run:

- the service's path: ``decode_image(..., min_side=resize_size)`` (a JPEG decodes at the
  smallest DCT scale that keeps the network's resize size, as the indexer decodes files), then
  ``eval_crop`` and ``to_uint8_tensor`` (normalisation happens later, batched, on the device);
- a full-resolution decode followed by the float ``eval_transform`` on the request thread, which
  is what the service did before 2026-11-27.

It also prints the largest difference between the service's network input and the indexer's
(``index.images.decode_image`` + ``eval_transform``) for the same bytes: it must be 0.

    .venv/bin/python bench/upload_decode.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.service.images import decode_image
from index.images import decode_image as indexer_decode
from model.config import Preprocessing
from model.transforms import Normalise, eval_crop, eval_transform, to_uint8_tensor

LIMITS = {"max_bytes": 1 << 30, "max_pixels": 1 << 30}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    preprocessing = Preprocessing()
    crop, full, normalise = (
        eval_crop(preprocessing),
        eval_transform(preprocessing),
        Normalise(preprocessing),
    )
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

        def service(data: bytes = data, kind: str = kind) -> torch.Tensor:
            decoded = decode_image(
                data, content_type=kind, min_side=preprocessing.resize_size, **LIMITS
            )
            return to_uint8_tensor(crop(decoded.image))

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


if __name__ == "__main__":
    main()
