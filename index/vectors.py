"""The faiss inner-product index behind a gallery: type choice by size, training, filtered search.

Two types share one contract (int64 ids, scores are inner products of L2-normalised vectors):

* ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact; the default below ``large_threshold`` items.
* ``ivf``: ``IndexIVFFlat`` with ``nlist`` ≈ 4·√n lists, trained on a sample of the stored
  exact embeddings. On clustered 512-d embeddings it keeps recall@10 ≥ 0.95 at a small
  ``nprobe`` (see docs/benchmarks.md, "Galleries"); full vectors are kept, so no re-rank stage
  is needed and removals are exact.

When faiss's GPU build sees a GPU, unfiltered searches run on a GPU copy of the index that is
refreshed after writes; the CPU index stays the master that is saved and filtered.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np

__all__ = [
    "INDEX_TYPES",
    "IVF_MIN_ITEMS",
    "LARGE_THRESHOLD",
    "VectorIndex",
    "ivf_params",
    "resolve_index_type",
]

INDEX_TYPES = ("auto", "flat", "ivf")
LARGE_THRESHOLD = 100_000
IVF_MIN_ITEMS = 1_000
# An IVF index is retrained when the gallery has grown this many times past its training size,
# so the number of lists keeps pace with the data.
RETRAIN_GROWTH = 4
_POINTS_PER_LIST = 39
_TRAIN_POINTS_PER_LIST = 48
# k-means iterations for the coarse quantiser; faiss's 25 triples 1M-item training for no recall.
_TRAIN_ITERATIONS = 10
_GPU_MAX_K = 2048


def resolve_index_type(requested: str, count: int, large_threshold: int = LARGE_THRESHOLD) -> str:
    """The concrete type for ``count`` items: ``flat`` until IVF is requested or pays off."""
    if requested not in INDEX_TYPES:
        raise ValueError(f"unknown index type {requested!r}; choose one of {INDEX_TYPES}")
    if requested == "flat":
        return "flat"
    threshold = IVF_MIN_ITEMS if requested == "ivf" else max(large_threshold, IVF_MIN_ITEMS)
    return "ivf" if count >= threshold else "flat"


def ivf_params(count: int) -> dict[str, Any]:
    """``nlist``: the power of two at or below 4·√n with ≥ 39 training points per list."""
    target = min(4 * math.sqrt(count), count / _POINTS_PER_LIST)
    nlist = 2 ** max(0, math.floor(math.log2(max(target, 1))))
    nprobe = min(nlist, max(8, nlist // 256))
    return {"nlist": nlist, "nprobe": nprobe, "trained_on": count}


def _gpu_resources() -> Any | None:
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources"):
        return faiss.StandardGpuResources()
    return None


def _numpy_search(index, queries: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
    """``index.search`` with search parameters, even after ``faiss.contrib.torch_utils``.

    pytorch-metric-learning imports that module, which replaces ``Index.search`` process-wide
    by a wrapper without ``params``; it keeps faiss's own numpy method as ``search_numpy``.
    """
    search = getattr(index, "search_numpy", index.search)
    return search(queries, k, params=params)


class VectorIndex:
    """A faiss index of one type with add/remove/search by int64 id."""

    def __init__(self, index: faiss.Index, index_type: str, params: dict[str, Any]) -> None:
        self.index = index
        self.index_type = index_type
        self.params = dict(params)
        self._gpu_resources = _gpu_resources()
        self._gpu_index: faiss.Index | None = None
        if index_type == "ivf":
            faiss.extract_index_ivf(index).nprobe = int(self.params["nprobe"])

    @classmethod
    def flat(cls, dim: int) -> VectorIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "flat", {})

    @classmethod
    def trained_ivf(
        cls, dim: int, count: int, sample: np.ndarray, params: dict[str, Any] | None = None
    ) -> VectorIndex:
        """An empty IVF index whose coarse quantiser is trained on ``sample``."""
        params = params or ivf_params(count)
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, int(params["nlist"]), faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = _TRAIN_ITERATIONS
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        return cls(index, "ivf", params)

    @staticmethod
    def training_size(count: int) -> int:
        """How many stored vectors to sample for training an IVF index over ``count`` items."""
        return min(count, ivf_params(count)["nlist"] * _TRAIN_POINTS_PER_LIST)

    @classmethod
    def build(
        cls,
        index_type: str,
        dim: int,
        count: int,
        sample: np.ndarray | None,
        blocks: Iterator[tuple[np.ndarray, np.ndarray]],
    ) -> VectorIndex:
        """A new index of ``index_type`` filled from streamed ``(ids, vectors)`` blocks."""
        if index_type == "flat":
            built = cls.flat(dim)
        else:
            if sample is None:
                raise ValueError("an IVF index needs a training sample")
            built = cls.trained_ivf(dim, count, sample)
        for ids, vectors in blocks:
            built.add(ids, vectors)
        return built

    @classmethod
    def read(cls, path: Path, index_type: str, params: dict[str, Any]) -> VectorIndex:
        return cls(faiss.read_index(str(path)), index_type, params)

    def write(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @property
    def on_gpu(self) -> bool:
        """Whether unfiltered searches run on a GPU copy of the index."""
        return self._gpu_resources is not None

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(
                np.ascontiguousarray(vectors, dtype=np.float32), np.asarray(ids, dtype=np.int64)
            )
            self._gpu_index = None

    def remove(self, ids: np.ndarray) -> int:
        if not len(ids):
            return 0
        self._gpu_index = None
        return int(self.index.remove_ids(faiss.IDSelectorBatch(np.asarray(ids, dtype=np.int64))))

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, ids)``, ``-1`` ids where fewer exist; ``allowed`` restricts ids.

        A filtered IVF search widens ``nprobe`` until every query has ``min(k, len(allowed))``
        results, so a rare label still gets its full ``k``.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if allowed is None:
            return self._searchable(k).search(queries, k)
        selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
        if self.index_type == "flat":
            return _numpy_search(self.index, queries, k, faiss.SearchParameters(sel=selector))
        wanted = min(k, len(allowed))
        nlist = int(self.params["nlist"])
        nprobe = int(self.params["nprobe"])
        while True:
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
            scores, ids = _numpy_search(self.index, queries, k, params)
            if nprobe >= nlist or (ids >= 0).sum(axis=1).min() >= wanted:
                return scores, ids
            nprobe = min(nlist, nprobe * 4)

    def _searchable(self, k: int) -> faiss.Index:
        """The GPU copy when there is a GPU and ``k`` is within its limit, else the CPU index."""
        if self._gpu_resources is None or k > _GPU_MAX_K:
            return self.index
        if self._gpu_index is None:
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index)
            if self.index_type == "ivf":
                faiss.GpuParameterSpace().set_index_parameter(
                    self._gpu_index, "nprobe", int(self.params["nprobe"])
                )
        return self._gpu_index
