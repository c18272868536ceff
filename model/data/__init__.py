"""Data: readers for folders, CSV lists and the metric-learning benchmarks, the CIFAR-10 collage
benchmark, and m-per-class batch sampling. Every data set yields ``(image, label)`` and exposes
``.samples`` (path, label), ``.classes`` and ``.targets``."""

from model.data.base import LabeledImageDataset, load_image
from model.data.benchmarks import BENCHMARK_SPLITS, BenchmarkDataset, load_benchmark
from model.data.cifar import CIFAR10_CLASSES, ensure_cifar10
from model.data.collage import (
    DEFAULT_NUISANCE_CLASSES,
    DEFAULT_TARGET_CLASSES,
    CollageDataset,
    target_cell_mask,
)
from model.data.folder import CsvListDataset, ImageFolderDataset, list_images
from model.data.sampling import MPerClassBatchSampler

__all__ = [
    "BENCHMARK_SPLITS",
    "CIFAR10_CLASSES",
    "DEFAULT_NUISANCE_CLASSES",
    "DEFAULT_TARGET_CLASSES",
    "BenchmarkDataset",
    "CollageDataset",
    "CsvListDataset",
    "ImageFolderDataset",
    "LabeledImageDataset",
    "MPerClassBatchSampler",
    "ensure_cifar10",
    "list_images",
    "load_benchmark",
    "load_image",
    "target_cell_mask",
]
