"""Metric-learning batches: ``batch_size / m`` classes with ``m`` images each, reproducibly."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common
from torch.utils.data import Sampler

__all__ = ["MPerClassBatchSampler", "check_batch_composition"]


def check_batch_composition(labels: Sequence[int] | np.ndarray, m: int, batch_size: int) -> None:
    """Fail, saying what to change, when ``labels`` cannot fill batches of ``batch_size`` with
    ``m`` images of each of ``batch_size / m`` distinct classes."""
    if m < 1 or batch_size < 1 or batch_size % m:
        raise ValueError(
            f"data.batch_size ({batch_size}) must be a positive multiple of data.m_per_class ({m})"
        )
    num_classes = len(np.unique(np.asarray(labels)))
    needed = batch_size // m
    if num_classes < needed:
        raise ValueError(
            f"data.batch_size {batch_size} with data.m_per_class {m} needs {needed} classes per "
            f"batch, but the training split has {num_classes}: set data.batch_size to a "
            f"multiple of {m} no larger than {num_classes * m}, or lower data.m_per_class"
        )


class MPerClassBatchSampler(Sampler[list[int]]):
    """Batch sampler (``DataLoader(batch_sampler=...)``) over pytorch-metric-learning's
    :class:`MPerClassSampler`: every batch has ``batch_size`` indices, ``batch_size // m`` distinct
    classes with ``m`` indices each (drawn with replacement only when a class has fewer than
    ``m`` images).

    The library draws from a process-wide NumPy generator; this wrapper swaps in one seeded by
    ``(seed, epoch)`` for each pass, so runs are reproducible and epochs differ. The epoch
    advances after every pass; :meth:`set_epoch` sets it (e.g. when resuming).
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        m: int,
        batch_size: int,
        batches_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError("labels must be a non-empty 1-d sequence of class indices")
        check_batch_composition(labels, m, batch_size)
        if batches_per_epoch is None:
            batches_per_epoch = max(1, len(labels) // batch_size)
        if batches_per_epoch < 1:
            raise ValueError(f"batches_per_epoch must be >= 1, got {batches_per_epoch}")
        self.batch_size = batch_size
        self.m = m
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self.epoch = 0
        self._sampler = MPerClassSampler(
            labels, m, batch_size=batch_size, length_before_new_iter=batches_per_epoch * batch_size
        )
        self._class_order = list(self._sampler.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __iter__(self) -> Iterator[list[int]]:
        # The library shuffles its class list in place; restart from the same order every pass.
        self._sampler.labels = list(self._class_order)
        state = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)
        shared = pml_common.NUMPY_RANDOM
        pml_common.NUMPY_RANDOM = np.random.RandomState(state)
        try:
            indices = [int(i) for i in self._sampler]  # the library builds the whole pass eagerly
        finally:
            pml_common.NUMPY_RANDOM = shared
        self.epoch += 1
        for start in range(0, len(indices), self.batch_size):
            yield indices[start : start + self.batch_size]
