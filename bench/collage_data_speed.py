"""How fast the CIFAR-10 collage set is produced: target, 7 x 1,500 collages in well under a minute.

Times, in one run on this machine: planning the collages (listing the photos, drawing the
layout), painting every canvas, and, side by side, decoding the same photos without composing
them (the floor painting cannot beat). Prints seconds, per-item cost and ratios.

    .venv/bin/python bench/collage_data_speed.py [--per-class 1500] [--split train]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from model.data import CollageDataset, ensure_cifar10, load_image

BUDGET_S = 60.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=1500)
    parser.add_argument("--split", choices=("train", "test"), default="train")
    args = parser.parse_args()

    root = ensure_cifar10()
    start = time.perf_counter()
    dataset = CollageDataset(root, args.split, args.per_class)
    planned = time.perf_counter() - start

    start = time.perf_counter()
    for index in range(len(dataset)):
        dataset.canvas(index)
    painted = time.perf_counter() - start

    start = time.perf_counter()
    for sources in dataset.cell_sources:
        for path in sources:
            load_image(path)
    decoded = time.perf_counter() - start

    total = planned + painted
    print(
        f"machine: {platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, "
        f"{os.getloadavg()[0]:.1f} load; Python {platform.python_version()}"
    )
    print(
        f"{len(dataset)} {args.split} collages ({args.per_class} per class x "
        f"{len(dataset.classes)} classes, grid {dataset.grid}, single process)"
    )
    print(f"plan (list photos, draw layout): {planned:6.2f} s")
    print(
        f"paint every canvas:              {painted:6.2f} s  "
        f"({1e3 * painted / len(dataset):.2f} ms per collage)"
    )
    print(
        f"decode the same photos only:     {decoded:6.2f} s  (paint / decode = "
        f"{painted / decoded:.2f})"
    )
    print(f"plan + paint: {total:.2f} s = {total / BUDGET_S:.2f} x the {BUDGET_S:.0f} s budget")


if __name__ == "__main__":
    main()
