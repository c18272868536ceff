"""The faiss inner-product index behind a gallery: type choice by size, training, filtered search.

Four types share one contract (int64 ids; scores are inner products of L2-normalised vectors):

* ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact; the default below ``large_threshold`` items.
  Keeps every full vector in RAM (4·d + 8 bytes per item).
* ``ivf_sq8``: ``IndexIVFScalarQuantizer`` — the default for large galleries up to
  ``compact_threshold`` items. ``nlist`` ≈ 8·√n lists, residuals stored as 8-bit scalars
  (d + 8 bytes per item: 520 at 512-d, a quarter of ``flat``). Scanning the visited lists is
  fast and its scores are within about 1e-3 of the exact cosines, so no re-rank is needed; on 1M
  clustered 512-d vectors it is the fastest of these types at recall@10 ≈ 0.95
  (docs/benchmarks.md, "Galleries").
* ``ivf``: ``IndexIVFPQ`` — the default from ``compact_threshold`` items on, when RAM is what
  runs out. ``nlist`` ≈ 4·√n lists and a product quantiser of ``m`` ≈ d/4 sub-quantisers of 8
  bits on the residuals. An item costs ``m`` + 8 bytes of RAM (136 at 512-d), so a few hundred
  million items fit one machine. Its scores are coarse: the gallery asks it for ``rerank``·k
  candidates and re-scores them with the exact embeddings from its database
  (:attr:`VectorIndex.approximate`), which costs throughput.
* ``ivf_flat``: ``IndexIVFFlat`` with full vectors (4·d + 8 bytes per item); exact scores.

Every IVF type is trained on a sample of the stored exact embeddings.

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
    "COMPACT_THRESHOLD",
    "INDEX_TYPES",
    "IVF_MIN_ITEMS",
    "IVF_TYPES",
    "LARGE_THRESHOLD",
    "RERANK",
    "VectorIndex",
    "ivf_params",
    "pq_subquantizers",
    "resolve_index_type",
]

IVF_TYPES = ("ivf_sq8", "ivf", "ivf_flat")
INDEX_TYPES = ("auto", "flat", *IVF_TYPES)
LARGE_THRESHOLD = 100_000
# From here on ``auto`` trades throughput for RAM: IVF-PQ's 136 B/item (512-d) instead of 520.
COMPACT_THRESHOLD = 20_000_000
IVF_MIN_ITEMS = 1_000
# Candidates per wanted result that an ``ivf`` (PQ) search re-scores exactly.
RERANK = 8
# An IVF index is retrained when the gallery has grown this many times past its training size,
# so the number of lists keeps pace with the data.
RETRAIN_GROWTH = 4
_POINTS_PER_LIST = 39
_TRAIN_POINTS_PER_LIST = 48
# k-means iterations for the coarse quantiser; faiss's 25 triples 1M-item training for no recall.
_TRAIN_ITERATIONS = 10
_PQ_BITS = 8
# Items an ``ivf_sq8`` search scans at its default ``nprobe``.
_SQ8_SCANNED = 8_000
_DIMS_PER_SUBQUANTIZER = 4
_ID_BYTES = 8
_GPU_MAX_K = 2048


def resolve_index_type(
    requested: str,
    count: int,
    large_threshold: int = LARGE_THRESHOLD,
    compact_threshold: int = COMPACT_THRESHOLD,
) -> str:
    """The concrete type for ``count`` items: ``flat`` until IVF is requested or pays off;
    ``auto`` then picks ``ivf_sq8``, and ``ivf`` (PQ) from ``compact_threshold`` items on."""
    if requested not in INDEX_TYPES:
        raise ValueError(f"unknown index type {requested!r}; choose one of {INDEX_TYPES}")
    if requested == "flat":
        return "flat"
    if requested == "auto":
        if count < max(large_threshold, IVF_MIN_ITEMS):
            return "flat"
        return "ivf" if count >= compact_threshold else "ivf_sq8"
    return requested if count >= IVF_MIN_ITEMS else "flat"


def pq_subquantizers(dim: int) -> int:
    """``m``: the largest divisor of ``dim`` at or below ``dim / 4`` (128 for 512-d).

    On 1M clustered 512-d vectors, 64 sub-quantisers capped recall@10 below 0.95 even with
    16·k re-ranked candidates; 128 reach it with 8·k (docs/benchmarks.md, "Galleries").
    """
    limit = max(1, dim // _DIMS_PER_SUBQUANTIZER)
    return max(m for m in range(1, limit + 1) if dim % m == 0)


def _list_count(count: int, index_type: str) -> int:
    """``nlist``: the power of two at or below 4·√n (8·√n for ``ivf_sq8``), ≥ 39 points a list."""
    lists_per_root = 8 if index_type == "ivf_sq8" else 4
    target = min(lists_per_root * math.sqrt(count), count / _POINTS_PER_LIST)
    return 2 ** max(0, math.floor(math.log2(max(target, 1))))


def ivf_params(count: int, index_type: str = "ivf", dim: int | None = None) -> dict[str, Any]:
    """``nlist``: the power of two at or below 4·√n (8·√n for ``ivf_sq8``) with ≥ 39 training
    points per list; for ``ivf`` also the product quantiser's ``m`` (needs ``dim``) and ``nbits``.

    ``ivf_sq8`` visits enough lists to scan about 8,000 items (33 of 4,096 at 1M), at least 16:
    on the hard 1M benchmark set, 2,048 lists at ``nprobe`` 16 and 8,192 at 64 sit on the same
    recall/speed curve, and a fixed share of the lists loses recall on smaller galleries.
    """
    nlist = _list_count(count, index_type)
    if index_type == "ivf_sq8":
        nprobe = min(nlist, max(16, math.ceil(_SQ8_SCANNED * nlist / max(count, 1))))
        return {"nlist": nlist, "nprobe": nprobe, "trained_on": count}
    if index_type == "ivf":
        if dim is None:
            raise ValueError("an ivf (PQ) index needs the embedding dimension")
        nprobe = min(nlist, max(16, nlist // 64))
        return {
            "nlist": nlist,
            "nprobe": nprobe,
            "m": pq_subquantizers(dim),
            "nbits": _PQ_BITS,
            "trained_on": count,
        }
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


def _type_of(index: faiss.Index) -> str:
    """The gallery type a loaded faiss index is (galleries saved before ``ivf`` meant PQ held
    an ``IndexIVFFlat`` under the name ``ivf``)."""
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        return "ivf_sq8"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivf"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf_flat"
    return "flat"


class VectorIndex:
    """A faiss index of one type with add/remove/search by int64 id."""

    def __init__(self, index: faiss.Index, index_type: str, params: dict[str, Any]) -> None:
        self.index = index
        self.index_type = index_type
        self.params = dict(params)
        self._gpu_resources = _gpu_resources()
        self._gpu_index: faiss.Index | None = None
        if index_type in IVF_TYPES:
            faiss.extract_index_ivf(index).nprobe = int(self.params["nprobe"])

    @classmethod
    def flat(cls, dim: int) -> VectorIndex:
        return cls(faiss.IndexIDMap2(faiss.IndexFlatIP(dim)), "flat", {})

    @classmethod
    def trained_ivf(
        cls,
        dim: int,
        count: int,
        sample: np.ndarray,
        params: dict[str, Any] | None = None,
        index_type: str = "ivf",
    ) -> VectorIndex:
        """An empty IVF index of ``index_type`` whose quantisers are trained on ``sample``."""
        if index_type not in IVF_TYPES:
            raise ValueError(f"not an IVF type: {index_type!r}")
        params = params or ivf_params(count, index_type, dim)
        quantizer = faiss.IndexFlatIP(dim)
        nlist = int(params["nlist"])
        if index_type == "ivf":
            index = faiss.IndexIVFPQ(
                quantizer,
                dim,
                nlist,
                int(params["m"]),
                int(params["nbits"]),
                faiss.METRIC_INNER_PRODUCT,
            )
            # Small galleries train the 256 codes per sub-quantiser on fewer points than faiss's
            # advice; the exact re-rank absorbs the coarser codes, so silence the warning.
            index.pq.cp.min_points_per_centroid = 1
        elif index_type == "ivf_sq8":
            index = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = _TRAIN_ITERATIONS
        index.cp.min_points_per_centroid = 1
        index.train(np.ascontiguousarray(sample, dtype=np.float32))
        return cls(index, index_type, params)

    @staticmethod
    def training_size(count: int, index_type: str) -> int:
        """How many stored vectors to sample for training an IVF index over ``count`` items."""
        return min(count, _list_count(count, index_type) * _TRAIN_POINTS_PER_LIST)

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
            built = cls.trained_ivf(dim, count, sample, index_type=index_type)
        for ids, vectors in blocks:
            built.add(ids, vectors)
        return built

    @classmethod
    def read(cls, path: Path, params: dict[str, Any]) -> VectorIndex:
        """Load a saved index; its type comes from the file, not from what the caller expects."""
        index = faiss.read_index(str(path))
        return cls(index, _type_of(index), params)

    def write(self, path: Path) -> None:
        faiss.write_index(self.index, str(path))

    @property
    def on_gpu(self) -> bool:
        """Whether unfiltered searches run on a GPU copy of the index."""
        return self._gpu_resources is not None

    @property
    def approximate(self) -> bool:
        """Whether scores are approximate (PQ codes), so results need an exact re-rank."""
        return self.index_type == "ivf"

    @property
    def bytes_per_item(self) -> int:
        """RAM one item costs in the index: its stored code or vector plus its 8-byte id.

        Fixed costs (coarse centroids, codebooks) and, for ``flat``, the id map's hash table
        come on top.
        """
        if self.index_type in IVF_TYPES:
            return int(faiss.extract_index_ivf(self.index).code_size) + _ID_BYTES
        return 4 * int(self.index.d) + _ID_BYTES

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def set_nprobe(self, nprobe: int) -> None:
        """How many lists an IVF search visits (more: higher recall, slower)."""
        if self.index_type not in IVF_TYPES:
            raise ValueError(f"nprobe applies to IVF indexes, this one is {self.index_type!r}")
        if nprobe <= 0:
            raise ValueError(f"nprobe must be positive, got {nprobe}")
        self.params["nprobe"] = int(nprobe)
        faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
        self._gpu_index = None

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
            options = faiss.GpuClonerOptions()
            # 64 sub-quantisers' lookup tables exceed a block's shared memory in float32.
            options.useFloat16LookupTables = self.index_type == "ivf"
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index, options)
            if self.index_type in IVF_TYPES:
                faiss.GpuParameterSpace().set_index_parameter(
                    self._gpu_index, "nprobe", int(self.params["nprobe"])
                )
        return self._gpu_index
