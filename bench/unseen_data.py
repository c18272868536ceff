"""The images of bench/unseen_protocols.py, and their frozen-backbone features, cached once.

Plans the instance-in-clutter collages (which photo, which clutter, which cell, from
``DATA_SEED``), paints them, and runs the frozen EfficientNet-Lite0 over them once; also the
clean training photos alone (the label-free teacher's input) and the real CIFAR-10 test photos of
the classes no head trains on (the demo check).  The result is stored as float16 safetensors at
``.cache/unseen/<protocol digest>.safetensors``: a changed protocol gets a new file.
"""

from __future__ import annotations

import csv
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_protocols as P

from model.data.cifar import CIFAR10_CLASSES

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = REPO / ".cache" / "unseen"
SPLITS = ("train", "val", "test")


def _photos(root: Path, folder: str, name: str) -> list[Path]:
    return sorted((root / folder / name).glob("*.jpg"))


def _folder(split: str) -> str:
    """CIFAR-10 folder of a split's photos: validation is carved from the training photos."""
    return "test" if split == "test" else "train"


def plan(root: Path) -> dict[str, dict[str, list]]:
    """Per split: each collage's ``cells`` (grid x grid paths, row-major), ``instance``,
    ``label``, ``position`` (the object's cell) and ``shuffle`` (the seed of its clutter's block
    shuffle; 0 and unused without ``shuffle_block``); for train also the distinct ``photos``."""
    p = P.current()
    rng = np.random.default_rng(p.data_seed)
    cells = p.grid * p.grid
    plans: dict[str, dict[str, list]] = {}
    for split in SPLITS:
        clutter_classes = p.clutter_classes or tuple(
            name for name in CIFAR10_CLASSES if name not in p.split_classes[split]
        )
        clutter = [q for name in clutter_classes for q in _photos(root, _folder(split), name)]
        record: dict[str, list] = {"cells": [], "instance": [], "label": [], "position": []}
        record["photos"], record["shuffle"] = [], []
        for label, name in enumerate(p.split_classes[split]):
            photos = _photos(root, _folder(split), name)
            chosen = rng.choice(len(photos), p.photos_per_class[split], replace=False)
            for index in chosen:
                instance = len(record["photos"])
                record["photos"].append(photos[index])
                for _ in range(p.copies):
                    position = int(rng.integers(cells))
                    sources = [clutter[i] for i in rng.choice(len(clutter), cells - 1)]
                    sources.insert(position, photos[index])
                    record["cells"].append(sources)
                    record["instance"].append(instance)
                    record["label"].append(label)
                    record["position"].append(position)
                    # no draw without shuffle_block: the first protocol's plan stays as it was
                    shuffle = int(rng.integers(2**31)) if p.shuffle_block else 0
                    record["shuffle"].append(shuffle)
        plans[split] = record
    return plans


def real_photos(root: Path) -> tuple[list[Path], list[int]]:
    """``REAL_PHOTOS_PER_CLASS`` CIFAR-10 test photos of every class no head trains on."""
    p = P.current()
    rng = np.random.default_rng([p.data_seed, 1])
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(p.real_photo_classes):
        photos = _photos(root, "test", name)
        paths += [photos[i] for i in rng.choice(len(photos), p.real_photos_per_class, False)]
        labels += [label] * p.real_photos_per_class
    return paths, labels


def shuffle_blocks(photo: Image.Image, block: int, rng: np.random.Generator) -> Image.Image:
    """``photo`` cut into ``block`` px squares, put back in a random order: its colours and
    textures without its shapes (background clutter, not an object)."""
    pixels = np.asarray(photo)
    rows, cols = pixels.shape[0] // block, pixels.shape[1] // block
    blocks = pixels.reshape(rows, block, cols, block, 3).swapaxes(1, 2).reshape(-1, block, block, 3)
    shuffled = blocks[rng.permutation(len(blocks))].reshape(rows, cols, block, block, 3)
    return Image.fromarray(shuffled.swapaxes(1, 2).reshape(pixels.shape))


def paint(sources: list[Path], position: int = -1, shuffle: int = 0) -> Image.Image:
    """A grid x grid collage of CIFAR-10 photos, row-major; with the protocol's
    ``shuffle_block``, every cell but the object's ``position`` is block-shuffled (seed
    ``shuffle``)."""
    p = P.current()
    rng = np.random.default_rng(shuffle)
    canvas = Image.new("RGB", (p.grid * p.cell, p.grid * p.cell))
    for cell, path in enumerate(sources):
        row, col = divmod(cell, p.grid)
        with Image.open(path) as opened:
            photo = opened.convert("RGB")
        if p.shuffle_block and cell != position:
            photo = shuffle_blocks(photo, p.shuffle_block, rng)
        canvas.paste(photo, (col * p.cell, row * p.cell))
    return canvas


def _extract(
    images: list[Callable[[], Image.Image]], size: int, desc: str, batch: int = 32
) -> Tensor:
    """Frozen backbone feature maps ``(N, C, h, w)`` float16 of lazily drawn images."""
    from model.backbones import build_backbone, default_preprocessing
    from model.transforms import Normalise, eval_crop, to_uint8_tensor

    preprocessing = dataclasses.replace(
        default_preprocessing(P.current().backbone), image_size=size, resize_size=size
    )
    crop, normalise = eval_crop(preprocessing), Normalise(preprocessing)
    backbone = build_backbone(P.current().backbone, True).eval()
    out = []
    began = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(images), batch):
            pixels = torch.stack(
                [to_uint8_tensor(crop(draw())) for draw in images[start : start + batch]]
            )
            out.append(backbone(normalise(pixels)).half())
            done = start + pixels.shape[0]
            rate = done / (time.perf_counter() - began)
            print(f"\r{desc}: {done}/{len(images)} ({rate:.1f} img/s)", end="", flush=True)
    print(flush=True)
    return torch.cat(out)


def _photo_loader(path: Path) -> Callable[[], Image.Image]:
    return lambda: Image.open(path).convert("RGB")


def _collage_loader(sources: list[Path], position: int, shuffle: int) -> Callable[[], Image.Image]:
    return lambda: paint(sources, position, shuffle)


def build() -> dict[str, Tensor]:
    """Every tensor the benchmark needs (see :func:`load`)."""
    from model.data.cifar import ensure_cifar10

    root = ensure_cifar10()
    p = P.current()
    tensors: dict[str, Tensor] = {}
    for split, record in plan(root).items():
        loaders = [
            _collage_loader(*drawn)
            for drawn in zip(record["cells"], record["position"], record["shuffle"], strict=True)
        ]
        tensors[f"{split}_maps"] = _extract(loaders, p.input_size, f"{split} collages")
        for key in ("instance", "label", "position"):
            tensors[f"{split}_{key}"] = torch.tensor(record[key])
        if split == "train":
            clean = _extract(
                [_photo_loader(p) for p in record["photos"]], p.input_size, "clean train photos"
            )
            tensors["train_clean"] = clean.float().mean(dim=(2, 3))
    paths, labels = real_photos(root)
    tensors["real_maps"] = _extract(
        [_photo_loader(p) for p in paths], p.real_photo_input_size, "real test photos"
    )
    tensors["real_label"] = torch.tensor(labels)
    return tensors


def load() -> dict[str, Tensor]:
    """The cached tensors of the protocol in use, built first if absent.

    ``<split>_maps`` ``(N, C, h, w)`` float16, ``<split>_instance`` / ``_label`` /
    ``_position`` ``(N,)`` for split in train, val, test; ``train_clean`` ``(photos, C)`` the
    average-pooled features of each training photo alone; ``real_maps`` / ``real_label``.
    """
    path = CACHE_DIR / f"{P.current().digest()}.safetensors"
    if not path.is_file():
        began = time.perf_counter()
        tensors = build()
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(partial))
        partial.rename(path)
        print(f"features cached at {path} in {(time.perf_counter() - began) / 60:.1f} min")
    return load_file(str(path))


def export(folder: Path) -> None:
    """The protocol's collages as PNG files and ``path,label`` lists that ``gsp train`` reads
    (``csv:`` specs; label: the object photo, so the copies of one photo share it):
    ``train.csv``, ``val.csv``, ``test.csv``, and ``clean.csv``, the training photos alone."""
    import shutil

    from model.data.cifar import ensure_cifar10

    for split, record in plan(ensure_cifar10()).items():
        (folder / split).mkdir(parents=True, exist_ok=True)
        rows = []
        drawn = zip(
            record["cells"], record["position"], record["shuffle"], record["instance"], strict=True
        )
        for index, (cells, position, shuffle, instance) in enumerate(drawn):
            name = f"{split}/{index:05d}.png"
            paint(cells, position, shuffle).save(folder / name)
            rows.append((name, f"{split}-{instance:04d}"))
        if split == "train":
            (folder / "clean").mkdir(exist_ok=True)
            clean = []
            for instance, photo in enumerate(record["photos"]):
                name = f"clean/{instance:04d}{photo.suffix}"
                shutil.copyfile(photo, folder / name)
                clean.append((name, f"train-{instance:04d}"))
            _write_rows(folder / "clean.csv", clean)
        _write_rows(folder / f"{split}.csv", rows)
        print(f"{split}: {len(rows)} collages in {folder / split}", flush=True)


def _write_rows(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label"))
        writer.writerows(rows)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("protocol", nargs="?", choices=sorted(P.PROTOCOLS), default=P.DEFAULT)
    parser.add_argument(
        "--export", type=Path, metavar="DIR", help="instead: write the collages for gsp train"
    )
    args = parser.parse_args()
    P.use(args.protocol)
    torch.set_num_threads(2)
    if args.export is not None:
        export(args.export)
    else:
        for name, tensor in load().items():
            print(name, tuple(tensor.shape), tensor.dtype)
