"""Data specs: the one-key mappings (``folder: DIR``, ``cub: DIR``, ``collage: ...``) that
training configs and ``gsp eval --data`` use to name a data set, turned into data sets.

A spec names exactly one reader; ``split`` picks a split, otherwise training uses ``train`` and
evaluation ``test`` (In-Shop: ``query`` against ``gallery``; folders and CSV lists: ``all``).
A ``holdout`` entry (written by :func:`~model.data.holdout.carve_specs`) keeps one part of the
split: the training part, or the validation part carved from it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

from model.data.base import LabeledImageDataset
from model.data.benchmarks import load_benchmark
from model.data.cifar import ensure_cifar10
from model.data.collage import CollageDataset
from model.data.folder import CsvListDataset, ImageFolderDataset
from model.data.holdout import held_out_part

__all__ = ["DATA_KINDS", "data_kind", "dataset_identity", "default_split", "open_dataset"]

_BENCHMARKS = {"cub": "cub200", "cars": "cars196", "sop": "sop", "inshop": "inshop"}
DATA_KINDS: tuple[str, ...] = ("folder", "csv", *_BENCHMARKS, "collage")
_COLLAGE_OPTIONS = {"per_class", "grid", "seed", "cell_size", "target_classes", "nuisance_classes"}


def data_kind(spec: dict[str, Any]) -> str:
    """The one reader a data spec names (``folder``, ``csv``, ``cub``, ..., ``collage``)."""
    kinds = [kind for kind in DATA_KINDS if kind in spec]
    if len(kinds) != 1:
        raise ValueError(f"a data spec names exactly one of {list(DATA_KINDS)}, got {spec!r}")
    return kinds[0]


def default_split(spec: dict[str, Any], training: bool) -> list[str]:
    """The splits a spec stands for: train, or test (In-Shop: query and gallery)."""
    if "split" in spec:
        return [str(spec["split"])]
    kind = data_kind(spec)
    if kind in {"folder", "csv"}:
        return ["all"]
    if training:
        return ["train"]
    return ["query", "gallery"] if kind == "inshop" else ["test"]


def open_dataset(
    spec: dict[str, Any], split: str, transform: Callable | None
) -> LabeledImageDataset:
    """The data set a spec names, for one split, with ``transform`` applied to each image."""
    if "holdout" in spec:
        whole = {key: value for key, value in spec.items() if key != "holdout"}
        return held_out_part(open_dataset(whole, split, transform), spec["holdout"])
    kind = data_kind(spec)
    if kind == "folder":
        return ImageFolderDataset(spec["folder"], transform=transform)
    if kind == "csv":
        return CsvListDataset(spec["csv"], root=spec.get("root"), transform=transform)
    if kind in _BENCHMARKS:
        return load_benchmark(_BENCHMARKS[kind], spec[kind], split, transform)
    options = {key: value for key, value in spec.items() if key in _COLLAGE_OPTIONS}
    unknown = set(spec) - _COLLAGE_OPTIONS - {"collage", "split"}
    if unknown:
        raise ValueError(
            f"unknown collage options {sorted(unknown)}; known {sorted(_COLLAGE_OPTIONS)}"
        )
    if "per_class" not in options:
        raise ValueError("a collage spec needs per_class (collages per target class)")
    root = ensure_cifar10(spec["collage"] or None)
    return CollageDataset(root, split, transform=transform, **options)


def dataset_identity(
    spec: dict[str, Any], split: str, dataset: LabeledImageDataset | None = None
) -> dict[str, Any]:
    """What identifies a split's content (for cache keys): the spec, the split, the files.

    ``dataset`` is the split already opened (any transform), to save opening it again.
    """
    dataset = open_dataset(spec, split, None) if dataset is None else dataset
    samples = getattr(dataset, "samples", [])
    listing = json.dumps([[str(path), label] for path, label in samples])
    extra = json.dumps([list(map(str, c)) for c in getattr(dataset, "cell_sources", [])])
    digest = hashlib.sha256((listing + extra).encode()).hexdigest()
    return {"spec": spec, "split": split, "size": len(dataset), "content": digest}
