"""Generic readers for a user's own data: one folder per class, or a ``path,label`` CSV list."""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from model.data.base import LabeledImageDataset, index_classes
from model.image_files import IMAGE_EXTENSIONS, is_image_name

__all__ = ["CsvListDataset", "ImageFolderDataset", "list_images"]

_HEADER_PATHS = {"path", "image", "file", "filename", "filepath", "image_path"}
_HEADER_LABELS = {"label", "class", "class_name", "category"}


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder`` (any depth, extension case ignored), in sorted order.

    ``os.walk`` classifies entries from the directory listing itself, with no ``stat`` per file,
    which matters for folders of tens of thousands of images.
    """
    found: list[Path] = []
    for directory, _, files in os.walk(folder):
        base = Path(directory)
        found.extend(base / name for name in files if is_image_name(name))
    return sorted(found)


def _is_header(cells: list[str]) -> bool:
    return (
        len(cells) == 2 and cells[0].lower() in _HEADER_PATHS and cells[1].lower() in _HEADER_LABELS
    )


class ImageFolderDataset(LabeledImageDataset):
    """``root/<class>/**/<image>``: every sub-folder (not hidden) is a class, images at any depth.

    ``classes`` picks (and orders) the class folders to use; by default all, sorted by name.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder root {root} does not exist or is not a folder")
        if classes is None:
            classes = sorted(
                entry.name
                for entry in root.iterdir()
                if entry.is_dir() and not entry.name.startswith(".")  # .git, .ipynb_checkpoints
            )
            if not classes:
                raise ValueError(f"image folder root {root} has no class sub-folders")
        else:
            classes = list(classes)
            absent = [name for name in classes if not (root / name).is_dir()]
            if absent:
                raise FileNotFoundError(f"class folder(s) {absent} not found under {root}")
        samples: list[tuple[Path, int]] = []
        empty: list[str] = []
        for label, name in enumerate(classes):
            images = list_images(root / name)
            if not images:
                empty.append(name)
            samples.extend((path, label) for path in images)
        if empty:
            extensions = " ".join(IMAGE_EXTENSIONS)
            raise ValueError(f"class folder(s) {empty} under {root} hold no images ({extensions})")
        super().__init__(samples, classes, transform)
        self.root = root


class CsvListDataset(LabeledImageDataset):
    """Rows ``path,label``; labels are any strings, indexed in sorted order.

    A first row naming the columns (e.g. ``path,label``, ``image,class``, ``filename,category``)
    is skipped as a header.

    Relative paths resolve against ``root``, or the CSV file's folder when ``root`` is None.
    Integer-like labels sort numerically ("2" before "10"). Malformed rows and missing files raise
    an error naming the CSV line.
    """

    def __init__(
        self,
        csv_path: str | Path,
        root: str | Path | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        csv_path = Path(csv_path)
        if not csv_path.is_file():
            raise FileNotFoundError(f"CSV list {csv_path} does not exist")
        base = Path(root) if root is not None else csv_path.parent
        records: list[tuple[Path, str]] = []
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            for row in reader:
                where = f"{csv_path} line {reader.line_num}"
                cells = [cell.strip() for cell in row]
                if not any(cells):
                    continue
                if not records and _is_header(cells):
                    continue
                if len(cells) != 2 or not cells[0] or not cells[1]:
                    raise ValueError(f"{where}: expected 'path,label', got {row!r}")
                path = base / cells[0]
                if not path.is_file():
                    raise FileNotFoundError(f"{where}: image file {path} does not exist")
                records.append((path, cells[1]))
        if not records:
            raise ValueError(f"CSV list {csv_path} has no rows")
        samples, classes, _ = index_classes(records)
        super().__init__(samples, classes, transform)
        self.root = base
