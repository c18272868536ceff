"""The standard metric-learning benchmarks, read in their published layouts with the literature's
class-disjoint splits (Oh Song et al., 2016): training classes and test classes never overlap.

=========  ==========================================  =========================================
name       layout under ``root``                       splits
=========  ==========================================  =========================================
cub200     ``CUB_200_2011/{images.txt,                 train: class ids 1-100, test: 101-200
           image_class_labels.txt,classes.txt,images/}``
           (``root`` may also be ``CUB_200_2011``)
cars196    ``cars_annos.mat`` + ``car_ims/``, or the   train: class ids 1-98, test: 99-196
           devkit (``devkit/cars_meta.mat``,
           ``devkit/cars_train_annos.mat``,
           ``cars_test_annos_withlabels.mat``,
           ``cars_train/``, ``cars_test/``)
sop        ``Ebay_train.txt``, ``Ebay_test.txt``       train: Ebay_train (11,318 classes),
           (image_id class_id super_class_id path)     test: Ebay_test (11,316 classes)
inshop     ``list_eval_partition.txt`` (or             train; query and gallery share one class
           ``Eval/``) + ``img/`` (or ``Img/img/``)     index (the item id) for retrieval
=========  ==========================================  =========================================

Labels are contiguous within a split (0..n-1), ordered by the original class id; ``class_ids``
keeps the original ids.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.data.base import LabeledImageDataset, index_classes, require_files

__all__ = ["BENCHMARK_SPLITS", "BenchmarkDataset", "load_benchmark"]

BENCHMARK_SPLITS: dict[str, tuple[str, ...]] = {
    "cub200": ("train", "test"),
    "cars196": ("train", "test"),
    "sop": ("train", "test"),
    "inshop": ("train", "query", "gallery"),
}
_ALIASES = {
    "cub": "cub200",
    "cub2002011": "cub200",
    "cars": "cars196",
    "stanfordonlineproducts": "sop",
}

CUB_TRAIN_CLASSES = 100  # class ids 1..100 train, 101..200 test
CARS_TRAIN_CLASSES = 98  # class ids 1..98 train, 99..196 test

Record = tuple[Path, Hashable]


class BenchmarkDataset(LabeledImageDataset):
    """One split of a benchmark; ``class_ids[label]`` is the original id of class ``label``."""

    def __init__(
        self,
        benchmark: str,
        split: str,
        records: Sequence[Record],
        names: Mapping[Hashable, str] | None,
        transform: Callable[[Image.Image], Any] | None,
        label_space: Sequence[Record] | None = None,
    ) -> None:
        """``label_space`` (default ``records``) fixes the class index, so splits that are compared
        against each other (In-Shop query and gallery) give one item the same label."""
        if not records:
            raise ValueError(f"{benchmark} {split}: the annotation files list no images")
        indexed = index_classes(label_space if label_space is not None else records, names)
        label_of = {key: label for label, key in enumerate(indexed.keys)}
        require_files((path for path, _ in records), f"{benchmark} {split}")
        super().__init__(
            [(path, label_of[key]) for path, key in records], indexed.classes, transform
        )
        self.benchmark = benchmark
        self.split = split
        self.class_ids: list[Hashable] = list(indexed.keys)


def _read_rows(path: Path, columns: int, header: str | None = None) -> list[list[str]]:
    """Whitespace-separated rows with exactly ``columns`` fields; errors name the line.

    A first line holding a single number (In-Shop's row count) is checked against the rows read.
    """
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    rows: list[list[str]] = []
    declared: int | None = None
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields or (header is not None and fields[0] == header):
                continue
            if number == 1 and len(fields) == 1 and fields[0].isdigit():
                declared = int(fields[0])
                continue
            if len(fields) != columns:
                raise ValueError(f"{path} line {number}: expected {columns} fields, got {line!r}")
            rows.append(fields)
    if declared is not None and declared != len(rows):
        raise ValueError(f"{path} declares {declared} rows but lists {len(rows)}; is it truncated?")
    return rows


def _as_int(value: str, path: Path) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{path}: expected an integer id, got {value!r}") from None


# --- CUB-200-2011 -----------------------------------------------------------------------------


def _cub(root: Path, split: str) -> tuple[list[Record], dict[Hashable, str]]:
    base = root / "CUB_200_2011" if (root / "CUB_200_2011").is_dir() else root
    labels_file = base / "image_class_labels.txt"
    label_of = {
        image_id: _as_int(class_id, labels_file)
        for image_id, class_id in _read_rows(labels_file, 2)
    }
    names: dict[Hashable, str] = {}
    if (base / "classes.txt").is_file():
        names = {
            _as_int(i, base / "classes.txt"): n for i, n in _read_rows(base / "classes.txt", 2)
        }
    records: list[Record] = []
    for image_id, relative in _read_rows(base / "images.txt", 2):
        if image_id not in label_of:
            raise ValueError(f"{labels_file}: no class for image id {image_id} ({relative})")
        class_id = label_of[image_id]
        if (class_id <= CUB_TRAIN_CLASSES) == (split == "train"):
            records.append((base / "images" / relative, class_id))
    return records, names


# --- Cars196 ------------------------------------------------------------------------------------


def _mat_structs(path: Path, key: str) -> np.ndarray:
    """A MATLAB struct array as a 1-d numpy record array (scipy squeezes 1-element arrays)."""
    from scipy.io import loadmat  # only the Cars reader needs scipy

    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} does not exist")
    content = loadmat(path, squeeze_me=True)
    if key not in content:
        raise ValueError(f"{path} has no {key!r} variable (found {sorted(content)})")
    return np.atleast_1d(content[key])


def _mat_field(structs: np.ndarray, field: str, path: Path) -> list[Any]:
    if structs.dtype.names is None or field not in structs.dtype.names:
        raise ValueError(f"{path}: annotations lack the {field!r} field")
    return [value.item() if isinstance(value, np.ndarray) else value for value in structs[field]]


def _cars_names(path: Path) -> dict[Hashable, str]:
    names = _mat_structs(path, "class_names")
    return {class_id: str(name) for class_id, name in enumerate(names, start=1)}


def _cars_records(annotations: Path, path_field: str, image_dir: Path) -> list[tuple[Path, int]]:
    structs = _mat_structs(annotations, "annotations")
    paths = _mat_field(structs, path_field, annotations)
    classes = _mat_field(structs, "class", annotations)
    return [(image_dir / str(p), int(c)) for p, c in zip(paths, classes, strict=True)]


def _cars(root: Path, split: str) -> tuple[list[Record], dict[Hashable, str]]:
    if (root / "cars_annos.mat").is_file():
        annotations = root / "cars_annos.mat"
        records = _cars_records(annotations, "relative_im_path", root)
        names = _cars_names(annotations)
    else:
        devkit = root / "devkit"
        labelled_test = [root, devkit]  # the test labels were released apart from the devkit
        found = [d / "cars_test_annos_withlabels.mat" for d in labelled_test]
        test_labels = next((path for path in found if path.is_file()), None)
        if not (devkit / "cars_train_annos.mat").is_file() or test_labels is None:
            raise FileNotFoundError(
                f"{root}: neither cars_annos.mat nor the devkit layout (devkit/cars_meta.mat, "
                "devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat) was found"
            )
        records = _cars_records(devkit / "cars_train_annos.mat", "fname", root / "cars_train")
        records += _cars_records(test_labels, "fname", root / "cars_test")
        names = _cars_names(devkit / "cars_meta.mat")
    keep: list[Record] = [
        (p, c) for p, c in records if (c <= CARS_TRAIN_CLASSES) == (split == "train")
    ]
    return keep, names


# --- Stanford Online Products -----------------------------------------------------------------


def _sop(root: Path, split: str) -> tuple[list[Record], None]:
    listing = root / ("Ebay_train.txt" if split == "train" else "Ebay_test.txt")
    rows = _read_rows(listing, 4, header="image_id")
    return [(root / path, _as_int(class_id, listing)) for _, class_id, _, path in rows], None


# --- In-Shop Clothes Retrieval ----------------------------------------------------------------


def _inshop(root: Path, split: str) -> tuple[list[Record], list[Record]]:
    """The split's records, and the records that fix its label space (query + gallery together)."""
    candidates = (root / "list_eval_partition.txt", root / "Eval" / "list_eval_partition.txt")
    listing = next((p for p in candidates if p.is_file()), candidates[0])
    rows = _read_rows(listing, 3, header="image_name")
    if not rows:
        raise ValueError(f"{listing} lists no images")
    unknown = {status for _, _, status in rows} - set(BENCHMARK_SPLITS["inshop"])
    if unknown:
        raise ValueError(f"{listing}: unknown evaluation status(es) {sorted(unknown)}")
    # Images are listed as img/...; accept them under root or under the official Img/ folder.
    base = next((b for b in (root, root / "Img") if (b / rows[0][0]).is_file()), root)
    evaluation = {"query", "gallery"}
    space: list[Record] = [
        (base / path, item)
        for path, item, status in rows
        if (status in evaluation) == (split in evaluation)
    ]
    records: list[Record] = [(base / path, item) for path, item, status in rows if status == split]
    return records, space


def load_benchmark(
    name: str,
    root: str | Path,
    split: str,
    transform: Callable[[Image.Image], Any] | None = None,
) -> BenchmarkDataset:
    """Read ``split`` of benchmark ``name`` (see the module table) from its published layout."""
    key = name.lower().replace("-", "").replace("_", "")
    key = _ALIASES.get(key, key)
    if key not in BENCHMARK_SPLITS:
        raise ValueError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARK_SPLITS)}")
    if split not in BENCHMARK_SPLITS[key]:
        raise ValueError(f"{key} has splits {BENCHMARK_SPLITS[key]}, not {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{key} root {root} does not exist or is not a folder")
    if key == "inshop":
        records, space = _inshop(root, split)
        return BenchmarkDataset(key, split, records, None, transform, label_space=space)
    reader = {"cub200": _cub, "cars196": _cars, "sop": _sop}[key]
    records, names = reader(root, split)
    return BenchmarkDataset(key, split, records, names, transform)
