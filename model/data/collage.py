"""The CIFAR-10 collage benchmark: one class-bearing photo among nuisance photos on a grid.

Carries the paper's CIFAR-collage protocol over to CIFAR-10. Each item is a square canvas of
``grid x grid`` cells of ``cell_size`` pixels; one cell, at a random position, holds a photo of a
target class (the label), every other cell a photo of a nuisance class. A pooling that finds the
informative cell should put its weight there; :func:`target_cell_mask` says which feature-map
locations that cell covers (:func:`collage_masks`: for every collage of a data set), for the
"target-cell mass share" metric.

Collages are planned up front (which photo goes where, from a seeded generator) and painted
lazily in ``__getitem__``: planning 7 x 1,500 collages takes well under a second, painting one
decodes ``grid**2`` tiny JPEGs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from model.data.base import LabeledImageDataset, load_image
from model.data.folder import ImageFolderDataset

__all__ = [
    "DEFAULT_NUISANCE_CLASSES",
    "DEFAULT_TARGET_CLASSES",
    "CollageDataset",
    "collage_masks",
    "target_cell_mask",
]

DEFAULT_TARGET_CLASSES = ("airplane", "automobile", "bird", "cat", "dog", "ship", "truck")
DEFAULT_NUISANCE_CLASSES = ("deer", "frog", "horse")
# Each split's plan comes from its own random stream; "val" collages are made of train photos.
_SPLIT_STREAM = {"train": 0, "test": 1, "val": 2}


def _draw_without_replacement(rng: np.random.Generator, size: int, count: int) -> np.ndarray:
    """``count`` indices into ``size`` items, each used once before any is reused."""
    rounds = -(-count // size)
    return np.concatenate([rng.permutation(size) for _ in range(rounds)])[:count]


def _held_out_picks(by_label: list[list[Path]], per_class: int, seed: int) -> list[np.ndarray]:
    """Validation target photos: the end of the permutation whose start the train plan uses.

    Replays the train plan's stream (one permutation per target class while ``per_class`` fits
    in a class, as :func:`_draw_without_replacement` draws it) and takes it from the other end.
    """
    plan = np.random.default_rng([seed, _SPLIT_STREAM["train"]])
    picks = []
    for paths in by_label:
        if per_class > len(paths):
            raise ValueError(
                f"a val split needs per_class <= the photos of a class ({len(paths)}), "
                f"got {per_class}"
            )
        picks.append(plan.permutation(len(paths))[::-1][:per_class])
    return picks


class CollageDataset(LabeledImageDataset):
    """``per_class`` collages for each target class, from the ``split`` photos of ``cifar_root``.

    ``cifar_root`` is the folder :func:`~model.data.cifar.ensure_cifar10` returns (holding
    ``train/`` and ``test/``); train collages use only train photos, test collages only test
    photos. ``val`` collages, for choosing settings without looking at the test split, use train
    photos too, but never a target photo of the train collages with the same ``seed``: train
    takes each class's target photos from the start of one seeded permutation, val from its end,
    so the two are disjoint while together they need no more photos than a class has (5,000 in
    CIFAR-10). Nuisance photos may recur. Items are ordered by target class; the label is the
    index into ``target_classes``.

    Bookkeeping, one entry per item: ``samples[i]`` is ``(target photo path, label)``,
    ``target_cells[i]`` the ``(row, col)`` of the class-bearing cell, ``cell_sources[i]`` the
    photo of every cell in row-major order. The same ``seed`` gives the same collages.
    """

    def __init__(
        self,
        cifar_root: str | Path,
        split: str,
        per_class: int,
        grid: int = 2,
        cell_size: int = 32,
        seed: int = 0,
        target_classes: Sequence[str] = DEFAULT_TARGET_CLASSES,
        nuisance_classes: Sequence[str] = DEFAULT_NUISANCE_CLASSES,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if split not in _SPLIT_STREAM:
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {per_class}")
        if grid < 2:
            raise ValueError(f"grid must be >= 2 (one target cell plus nuisance cells), got {grid}")
        if cell_size < 1:
            raise ValueError(f"cell_size must be >= 1, got {cell_size}")
        targets, nuisances = list(target_classes), list(nuisance_classes)
        if not targets or not nuisances:
            raise ValueError("target_classes and nuisance_classes must both be non-empty")
        overlap = set(targets) & set(nuisances)
        if overlap or len(set(targets)) < len(targets) or len(set(nuisances)) < len(nuisances):
            raise ValueError(
                f"classes must be distinct and not both target and nuisance: {overlap}"
            )

        photo_split = "train" if split == "val" else split
        photos = ImageFolderDataset(Path(cifar_root) / photo_split, classes=[*targets, *nuisances])
        by_label: list[list[Path]] = [[] for _ in photos.classes]
        for path, label in photos.samples:
            by_label[label].append(path)
        nuisance_pool = [
            path for label in range(len(targets), len(by_label)) for path in by_label[label]
        ]

        rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
        cells = grid * grid
        samples: list[tuple[Path, int]] = []
        picks = (
            _held_out_picks(by_label[: len(targets)], per_class, seed)
            if split == "val"
            else [
                _draw_without_replacement(rng, len(paths), per_class)
                for paths in by_label[: len(targets)]
            ]
        )
        for label in range(len(targets)):
            samples.extend((by_label[label][i], label) for i in picks[label])
        positions = rng.integers(cells, size=len(samples))
        fillers = rng.integers(len(nuisance_pool), size=(len(samples), cells - 1))

        self.cell_sources: list[tuple[Path, ...]] = []
        for (target_path, _), position, filler in zip(samples, positions, fillers, strict=True):
            sources = [nuisance_pool[i] for i in filler]
            sources.insert(int(position), target_path)
            self.cell_sources.append(tuple(sources))
        self.target_cells: list[tuple[int, int]] = [divmod(int(p), grid) for p in positions]
        self.grid = grid
        self.cell_size = cell_size
        self.split = split
        self.nuisance_classes = nuisances
        super().__init__(samples, targets, transform)

    @property
    def image_size(self) -> int:
        """Side of the square canvas in pixels (``grid * cell_size``)."""
        return self.grid * self.cell_size

    def canvas(self, index: int) -> Image.Image:
        """Paint collage ``index`` as an RGB image (no transform)."""
        side = self.image_size
        canvas = Image.new("RGB", (side, side))
        for position, path in enumerate(self.cell_sources[index]):
            photo = load_image(path)
            if photo.size != (self.cell_size, self.cell_size):
                photo = photo.resize((self.cell_size, self.cell_size), Image.Resampling.BILINEAR)
            row, col = divmod(position, self.grid)
            canvas.paste(photo, (col * self.cell_size, row * self.cell_size))
        return canvas

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.canvas(index)
        label = self.samples[index][1]
        return (self.transform(image) if self.transform is not None else image), label


def target_cell_mask(
    target_cell: tuple[int, int],
    grid: int,
    map_size: int | tuple[int, int],
    crop_fraction: float = 1.0,
) -> torch.Tensor:
    """Boolean ``(h, w)`` mask of the feature-map locations that lie on ``target_cell``.

    A location belongs to a cell when its centre lies strictly inside that cell. Location
    ``(i, j)`` of an ``h x w`` map has its centre at ``((i + 0.5) / h, (j + 0.5) / w)`` of the
    network input. A centre exactly on a cell border belongs to no cell, so no cell wins ties.
    Cells need not get equally many locations: a 7 x 7 map on a 2 x 2 grid gives every cell
    3 x 3 (the middle row and column are left out), but on a 3 x 3 grid the corner cells get
    2 x 2, the edge cells 2 x 3 and the centre 3 x 3.  What uniform weights put on a target cell
    therefore depends on where it is; :func:`~model.evaluate.score` reports that uniform share
    per image (``uniform_mass_share``), the baseline for the target-cell mass share.

    ``crop_fraction`` is the side of the network input as a fraction of the resized canvas when it
    was centre-cropped (:attr:`~model.config.Preprocessing.crop_fraction` for
    :func:`~model.transforms.eval_transform`); 1.0 when the whole canvas was resized to the input.
    """
    row, col = target_cell
    h, w = (map_size, map_size) if isinstance(map_size, int) else map_size
    if not (0 <= row < grid and 0 <= col < grid):
        raise ValueError(f"target_cell {target_cell} is outside a {grid} x {grid} grid")
    if h < 1 or w < 1:
        raise ValueError(f"map_size must be positive, got {map_size}")
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}")

    def on_cell(size: int, index: int) -> torch.Tensor:
        centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        position = (0.5 + (centres - 0.5) * crop_fraction) * grid  # in cell units on the canvas
        on_border = (position - position.round()).abs() < 1e-9
        return (position.floor() == index) & ~on_border

    return on_cell(h, row)[:, None] & on_cell(w, col)[None, :]


def collage_masks(
    dataset: CollageDataset, map_size: tuple[int, int], crop_fraction: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-cell masks ``(N, h, w)`` of a collage data set and the union of all cells' masks."""
    grid = dataset.grid

    def mask(cell: tuple[int, int]) -> torch.Tensor:
        return target_cell_mask(cell, grid, map_size, crop_fraction)

    every = torch.zeros(map_size, dtype=torch.bool)
    for cell in range(grid * grid):
        every |= mask(divmod(cell, grid))
    target = torch.stack([mask(cell) for cell in dataset.target_cells])
    return target, every.expand_as(target)
