"""Object regions of a user's own images, read from a CSV, as feature-map masks: what the
object-weight share (how much of its pooling weight a network puts on the object) needs outside
the collage benchmark, whose object cells are known by construction.

The CSV has a header naming its columns: ``path,x0,y0,x1,y1`` (fractions of the image's width
and height) or ``path,left,top,right,bottom`` (pixels).  Paths are relative to the CSV's folder
or absolute; several rows for one image mark the union of their boxes.  Images without a row
are left out of the share.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from model.config import Preprocessing
from model.evaluate import MaskSource
from model.explain import ExplainError, rectangles_to_mask

__all__ = ["ObjectRegions", "read_object_regions", "region_mask_source"]

_FRACTION_COLUMNS = ("x0", "y0", "x1", "y1")
_PIXEL_COLUMNS = ("left", "top", "right", "bottom")

Box = tuple[float, float, float, float]


class ObjectRegions:
    """Boxes per image file (resolved path), in fractions or ``pixels``."""

    def __init__(self, boxes: dict[Path, list[Box]], pixels: bool, source: Path) -> None:
        self.boxes = boxes
        self.pixels = pixels
        self.source = source


def read_object_regions(csv_path: str | Path) -> ObjectRegions:
    """Read an object-region CSV (see the module docstring); errors name the line."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"object-region CSV {csv_path} does not exist")
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    header = tuple(cell.strip().lower() for cell in rows[0]) if rows else ()
    if header[1:] not in (_FRACTION_COLUMNS, _PIXEL_COLUMNS) or header[:1] != ("path",):
        raise ValueError(
            f"{csv_path}: the first row must name the columns path,x0,y0,x1,y1 (fractions) or "
            f"path,left,top,right,bottom (pixels), got {','.join(header)!r}"
        )
    boxes: dict[Path, list[Box]] = {}
    for number, row in enumerate(rows[1:], start=2):
        cells = [cell.strip() for cell in row]
        if not any(cells):
            continue
        try:
            if len(cells) != 5:
                raise ValueError(f"expected 5 columns, got {len(cells)}")
            x0, y0, x1, y1 = (float(value) for value in cells[1:])
        except ValueError as error:
            raise ValueError(f"{csv_path} line {number}: {error}") from None
        path = Path(cells[0])
        path = (path if path.is_absolute() else csv_path.parent / path).resolve()
        boxes.setdefault(path, []).append((x0, y0, x1, y1))
    if not boxes:
        raise ValueError(f"{csv_path} marks no object region")
    return ObjectRegions(boxes, header[1:] == _PIXEL_COLUMNS, csv_path)


def region_mask_source(
    paths: Sequence[Path], regions: ObjectRegions, preprocessing: Preprocessing
) -> MaskSource:
    """Masks for :class:`~model.evaluate.EvalInputs`: each image's object coverage of the
    feature map (under the eval crop), over the whole map; empty for images without a row."""
    resolved = [Path(path).resolve() for path in paths]
    if not any(path in regions.boxes for path in resolved):
        raise ValueError(
            f"{regions.source} names none of the {len(resolved)} evaluated images "
            "(paths are relative to the CSV's folder)"
        )

    def masks(map_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        objects = torch.zeros(len(resolved), *map_size, dtype=torch.float64)
        area = torch.zeros_like(objects)
        for index, path in enumerate(resolved):
            if path not in regions.boxes:
                continue
            with Image.open(path) as image:
                size = image.size
            try:
                coverage = rectangles_to_mask(
                    regions.boxes[path], size, map_size, preprocessing, pixels=regions.pixels
                )
            except ExplainError as error:
                raise ValueError(f"{regions.source}: {path.name}: {error}") from None
            objects[index] = coverage.double()
            area[index] = 1.0
        return objects, area

    return masks
