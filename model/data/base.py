"""The item format every data set shares: ``(image, label)`` items, ``.samples``, ``.classes``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image
from torch.utils.data import Dataset

from model.transforms import to_rgb

__all__ = [
    "IndexedClasses",
    "LabeledImageDataset",
    "index_classes",
    "load_image",
    "require_files",
]


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` to an upright 8-bit RGB image; the error names the file."""
    try:
        with Image.open(path) as image:
            return to_rgb(image)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"cannot read image {path}: {error}") from error


def require_files(paths: Iterable[Path], source: str) -> None:
    """Fail early, naming ``source`` and the first few absent files, rather than mid-epoch."""
    missing = [path for path in paths if not path.is_file()]
    if missing:
        shown = ", ".join(str(path) for path in missing[:3])
        raise FileNotFoundError(f"{source}: {len(missing)} image file(s) missing, e.g. {shown}")


def _class_sort_key(key: Hashable) -> tuple[int, Any]:
    """Integers (and integer strings) in numeric order, before any other names in text order."""
    if isinstance(key, int):
        return (0, key)
    text = str(key)
    return (0, int(text)) if text.isdigit() else (1, text)


class IndexedClasses(NamedTuple):
    samples: list[tuple[Path, int]]
    classes: list[str]
    keys: list[Hashable]


def index_classes(
    records: Sequence[tuple[Path, Hashable]],
    names: Mapping[Hashable, str] | None = None,
) -> IndexedClasses:
    """Turn ``(path, class key)`` records into ``(path, index)`` samples, class names and keys.

    Keys are sorted (numerically where they are integers) so labels do not depend on file order;
    ``names`` maps keys to display names (default: the key itself).
    """
    keys = sorted({key for _, key in records}, key=_class_sort_key)
    index = {key: i for i, key in enumerate(keys)}
    classes = [names[key] if names is not None and key in names else str(key) for key in keys]
    return IndexedClasses([(path, index[key]) for path, key in records], classes, keys)


class LabeledImageDataset(Dataset):
    """``(image, label)`` items read from ``samples``; ``transform`` maps the RGB PIL image."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.samples: list[tuple[Path, int]] = [
            (path if isinstance(path, Path) else Path(path), int(label)) for path, label in samples
        ]
        self.classes: list[str] = list(classes)
        self.transform = transform
        bad = [label for _, label in self.samples if not 0 <= label < len(self.classes)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))[:5]} outside 0..{len(self.classes) - 1}")

    @property
    def targets(self) -> list[int]:
        """The label of every item, in order (what samplers need, without decoding images)."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = load_image(path)
        return (self.transform(image) if self.transform is not None else image), label

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {len(self.classes)} classes)"
