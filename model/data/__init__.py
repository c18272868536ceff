"""Data: readers for folders, CSV lists and the metric-learning benchmarks, the CIFAR-10 collage
benchmark, the data specs that name them in configs, and m-per-class batch sampling. Every data
set yields ``(image, label)`` and exposes ``.samples`` (path, label), ``.classes`` and
``.targets``."""

from model.data.base import LabeledImageDataset, load_image
from model.data.benchmarks import BENCHMARK_SPLITS, BenchmarkDataset, load_benchmark
from model.data.cifar import CIFAR10_CLASSES, ensure_cifar10
from model.data.collage import (
    DEFAULT_NUISANCE_CLASSES,
    DEFAULT_TARGET_CLASSES,
    CollageDataset,
    collage_masks,
    target_cell_mask,
)
from model.data.folder import CsvListDataset, ImageFolderDataset, list_images
from model.data.holdout import (
    HOLDOUT_KINDS,
    HeldOutPart,
    carve_specs,
    check_disjoint,
    held_out_part,
)
from model.data.registry import (
    DATA_KINDS,
    data_kind,
    dataset_identity,
    default_split,
    open_dataset,
)
from model.data.sampling import MPerClassBatchSampler

__all__ = [
    "BENCHMARK_SPLITS",
    "CIFAR10_CLASSES",
    "DATA_KINDS",
    "DEFAULT_NUISANCE_CLASSES",
    "DEFAULT_TARGET_CLASSES",
    "HOLDOUT_KINDS",
    "BenchmarkDataset",
    "CollageDataset",
    "CsvListDataset",
    "HeldOutPart",
    "ImageFolderDataset",
    "LabeledImageDataset",
    "MPerClassBatchSampler",
    "carve_specs",
    "check_disjoint",
    "collage_masks",
    "data_kind",
    "dataset_identity",
    "default_split",
    "ensure_cifar10",
    "held_out_part",
    "list_images",
    "load_benchmark",
    "load_image",
    "open_dataset",
    "target_cell_mask",
]
