"""The faiss inner-product index behind a gallery: type choice by size, training, filtered search.

Five types share one contract (int64 ids; scores are inner products of L2-normalised vectors):

* ``flat``: ``IndexIDMap2(IndexFlatIP)``, exact; the default below ``large_threshold`` items.
  Keeps every full vector in RAM (4·d + 8 bytes per item).
* ``ivf_fastscan``: ``IndexRefine(IndexIVFPQFastScan, IndexScalarQuantizer)`` — the default for
  large galleries up to ``compact_threshold`` items on a CPU. ``nlist`` ≈ 8·√n lists; each item
  has a 4-bit product code of d/2 sub-quantisers, which SIMD lookup tables scan several times
  faster per item than 8-bit scalars, and an 8-bit scalar code (in item order) that re-scores the
  ``refine``·k best candidates to within about 1e-3 of the exact cosine. d/4 + d + 16 bytes
  per item (656 at 512-d, a third of ``flat``). On 1M clustered 512-d vectors it answers at
  recall@10 0.96-0.97 about 30x faster than exact search, 1.6-1.8x ``ivf_sq8``'s queries/s
  at about the same recall (docs/benchmarks.md, "Galleries"). The product codes carry row
  numbers, mapped to ids by a row table; removed rows stay in the scalar codes until more than
  half of the rows are dead, when the gallery rebuilds the index.
* ``ivf_sq8``: ``IndexIVFScalarQuantizer`` — the large-gallery default when faiss's GPU build
  sees a GPU (faiss has no GPU fast-scan). ``nlist`` ≈ 8·√n lists, residuals stored as 8-bit
  scalars (d + 8 bytes per item: 520 at 512-d); scores within about 1e-3 of the exact cosines.
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
    "DEAD_ROWS_REBUILD",
    "INDEX_TYPES",
    "IVF_MIN_ITEMS",
    "IVF_TYPES",
    "LARGE_THRESHOLD",
    "REFINE",
    "RERANK",
    "VectorIndex",
    "faiss_gpu_available",
    "ivf_params",
    "pq_subquantizers",
    "resolve_index_type",
]

IVF_TYPES = ("ivf_fastscan", "ivf_sq8", "ivf", "ivf_flat")
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
# Items an ``ivf_sq8`` / ``ivf_fastscan`` search scans at its default ``nprobe``.
_SQ8_SCANNED = 8_000
_FASTSCAN_SCANNED = 16_000
# ``ivf_fastscan``: candidates per wanted result re-scored with the 8-bit codes, and the share
# of dead (removed) rows at which the gallery rebuilds the index.
REFINE = 32
DEAD_ROWS_REBUILD = 0.5
_FASTSCAN_BITS = 4
_DIMS_PER_SUBQUANTIZER = 4
_ID_BYTES = 8
_GPU_MAX_K = 2048


def faiss_gpu_available() -> bool:
    """Whether faiss's GPU build is installed and sees a GPU."""
    return faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")


def resolve_index_type(
    requested: str,
    count: int,
    large_threshold: int = LARGE_THRESHOLD,
    compact_threshold: int = COMPACT_THRESHOLD,
    gpu: bool | None = None,
) -> str:
    """The concrete type for ``count`` items: ``flat`` until IVF is requested or pays off;
    ``auto`` then picks ``ivf_fastscan`` (``ivf_sq8`` where faiss searches on a GPU, ``gpu``
    defaults to what faiss sees), and ``ivf`` (PQ) from ``compact_threshold`` items on."""
    if requested not in INDEX_TYPES:
        raise ValueError(f"unknown index type {requested!r}; choose one of {INDEX_TYPES}")
    if requested == "flat":
        return "flat"
    if requested == "auto":
        if count < max(large_threshold, IVF_MIN_ITEMS):
            return "flat"
        if count >= compact_threshold:
            return "ivf"
        on_gpu = faiss_gpu_available() if gpu is None else gpu
        return "ivf_sq8" if on_gpu else "ivf_fastscan"
    return requested if count >= IVF_MIN_ITEMS else "flat"


def pq_subquantizers(dim: int, dims_per_subquantizer: int = _DIMS_PER_SUBQUANTIZER) -> int:
    """``m``: the largest divisor of ``dim`` at or below ``dim / dims_per_subquantizer``
    (128 for 512-d at the default 4, 256 at ``ivf_fastscan``'s 2).

    On 1M clustered 512-d vectors, 64 sub-quantisers capped recall@10 below 0.95 even with
    16·k re-ranked candidates; 128 reach it with 8·k (docs/benchmarks.md, "Galleries").
    """
    limit = max(1, dim // dims_per_subquantizer)
    return max(m for m in range(1, limit + 1) if dim % m == 0)


def _list_count(count: int, index_type: str) -> int:
    """``nlist``: the power of two at or below 4·√n (8·√n for ``ivf_sq8`` and
    ``ivf_fastscan``), ≥ 39 points a list."""
    lists_per_root = 8 if index_type in ("ivf_sq8", "ivf_fastscan") else 4
    target = min(lists_per_root * math.sqrt(count), count / _POINTS_PER_LIST)
    return 2 ** max(0, math.floor(math.log2(max(target, 1))))


def _probes_to_scan(scanned: int, nlist: int, count: int) -> int:
    return min(nlist, max(16, math.ceil(scanned * nlist / max(count, 1))))


def ivf_params(count: int, index_type: str = "ivf", dim: int | None = None) -> dict[str, Any]:
    """``nlist``: the power of two at or below 4·√n (8·√n for ``ivf_sq8`` and ``ivf_fastscan``)
    with ≥ 39 training points per list; for the product-code types also the quantiser's ``m``
    (needs ``dim``) and ``nbits``, and for ``ivf_fastscan`` its ``refine`` factor.

    ``ivf_sq8`` visits enough lists to scan about 8,000 items (33 of 4,096 at 1M), at least 16:
    on the hard 1M benchmark set, 2,048 lists at ``nprobe`` 16 and 8,192 at 64 sit on the same
    recall/speed curve, and a fixed share of the lists loses recall on smaller galleries.
    ``ivf_fastscan`` scans about 16,000 (its codes are cheaper) and re-scores 32·k of them.
    """
    nlist = _list_count(count, index_type)
    if index_type == "ivf_sq8":
        nprobe = _probes_to_scan(_SQ8_SCANNED, nlist, count)
        return {"nlist": nlist, "nprobe": nprobe, "trained_on": count}
    if index_type not in ("ivf", "ivf_fastscan"):
        nprobe = min(nlist, max(8, nlist // 256))
        return {"nlist": nlist, "nprobe": nprobe, "trained_on": count}
    if dim is None:
        raise ValueError(f"an {index_type} index needs the embedding dimension")
    if index_type == "ivf_fastscan":
        return {
            "nlist": nlist,
            "nprobe": _probes_to_scan(_FASTSCAN_SCANNED, nlist, count),
            "m": pq_subquantizers(dim, 2),
            "nbits": _FASTSCAN_BITS,
            "refine": REFINE,
            "trained_on": count,
        }
    nprobe = min(nlist, max(16, nlist // 64))
    return {
        "nlist": nlist,
        "nprobe": nprobe,
        "m": pq_subquantizers(dim),
        "nbits": _PQ_BITS,
        "trained_on": count,
    }


def _rows_path(index_path: Path) -> Path:
    """Where an ``ivf_fastscan`` index keeps its row -> id table, next to the faiss file."""
    return index_path.with_suffix(".rows.npy")


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
    if isinstance(index, faiss.IndexRefine):
        return "ivf_fastscan"
    if isinstance(index, faiss.IndexIVFScalarQuantizer):
        return "ivf_sq8"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivf"
    if isinstance(index, faiss.IndexIVFFlat):
        return "ivf_flat"
    return "flat"


class VectorIndex:
    """A faiss index of one type with add/remove/search by int64 id."""

    def __init__(
        self,
        index: faiss.Index,
        index_type: str,
        params: dict[str, Any],
        row_ids: np.ndarray | None = None,
    ) -> None:
        self.index = index
        self.index_type = index_type
        self.params = dict(params)
        # ``ivf_fastscan`` only: the gallery id of each scalar-code row, -1 once removed.
        self._row_ids = row_ids
        if index_type == "ivf_fastscan":
            if row_ids is None or len(row_ids) != index.ntotal:
                raise ValueError("an ivf_fastscan index needs one id per stored row")
            self.params.setdefault("refine", REFINE)
        gpu = faiss_gpu_available() and index_type != "ivf_fastscan"
        self._gpu_resources = faiss.StandardGpuResources() if gpu else None
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
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        product_codes = {"ivf": faiss.IndexIVFPQ, "ivf_fastscan": faiss.IndexIVFPQFastScan}
        if index_type in product_codes:
            ivf = product_codes[index_type](
                quantizer,
                dim,
                nlist,
                int(params["m"]),
                int(params["nbits"]),
                faiss.METRIC_INNER_PRODUCT,
            )
            # Small galleries train the codes per sub-quantiser on fewer points than faiss's
            # advice; the re-rank or refinement absorbs the coarser codes, so silence the warning.
            ivf.pq.cp.min_points_per_centroid = 1
        elif index_type == "ivf_sq8":
            ivf = faiss.IndexIVFScalarQuantizer(
                quantizer, dim, nlist, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
        else:
            ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.cp.niter = _TRAIN_ITERATIONS
        ivf.cp.min_points_per_centroid = 1
        index, row_ids = ivf, None
        if index_type == "ivf_fastscan":
            codes = faiss.IndexScalarQuantizer(
                dim, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT
            )
            index, row_ids = faiss.IndexRefine(ivf, codes), np.empty(0, np.int64)
        index.train(sample)
        return cls(index, index_type, params, row_ids)

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
        index_type = _type_of(index)
        row_ids = np.load(_rows_path(path)) if index_type == "ivf_fastscan" else None
        return cls(index, index_type, params, row_ids)

    def write(self, path: Path) -> None:
        """The faiss file at ``path`` (and, for ``ivf_fastscan``, its row table beside it)."""
        faiss.write_index(self.index, str(path))
        if self._row_ids is not None:
            with _rows_path(path).open("wb") as handle:
                np.save(handle, self._row_ids)

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
        if self.index_type == "ivf_fastscan":
            ivf = faiss.extract_index_ivf(self.index)
            rows = self._refine.refine_index
            return int(ivf.code_size) + int(rows.sa_code_size()) + 2 * _ID_BYTES  # + row number, id
        if self.index_type in IVF_TYPES:
            return int(faiss.extract_index_ivf(self.index).code_size) + _ID_BYTES
        return 4 * int(self.index.d) + _ID_BYTES

    @property
    def ntotal(self) -> int:
        """Items the index holds (removed ``ivf_fastscan`` rows do not count)."""
        if self.index_type == "ivf_fastscan":
            return int(self._refine.base_index.ntotal)
        return int(self.index.ntotal)

    @property
    def _refine(self) -> faiss.IndexRefine:
        """``ivf_fastscan``'s index: row-numbered product codes re-scored by scalar codes."""
        if not isinstance(self.index, faiss.IndexRefine):
            raise TypeError(f"an {self.index_type} index has no refine stage")
        return self.index

    @property
    def dead_share(self) -> float:
        """The share of stored rows that were removed but still take RAM (``ivf_fastscan``)."""
        if self._row_ids is None or not len(self._row_ids):
            return 0.0
        return 1.0 - self.ntotal / len(self._row_ids)

    def set_nprobe(self, nprobe: int) -> None:
        """How many lists an IVF search visits (more: higher recall, slower)."""
        if self.index_type not in IVF_TYPES:
            raise ValueError(f"nprobe applies to IVF indexes, this one is {self.index_type!r}")
        if nprobe <= 0:
            raise ValueError(f"nprobe must be positive, got {nprobe}")
        self.params["nprobe"] = int(nprobe)
        faiss.extract_index_ivf(self.index).nprobe = int(nprobe)
        self._gpu_index = None

    def set_refine(self, refine: int) -> None:
        """How many candidates per result ``ivf_fastscan`` re-scores with its 8-bit codes."""
        if self.index_type != "ivf_fastscan":
            raise ValueError(
                f"refine applies to ivf_fastscan indexes, this one is {self.index_type!r}"
            )
        if refine < 1:
            raise ValueError(f"refine must be at least 1, got {refine}")
        self.params["refine"] = int(refine)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(ids):
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.asarray(ids, dtype=np.int64)
        self._gpu_index = None
        if self._row_ids is None:
            self.index.add_with_ids(vectors, ids)
            return
        # Product codes carry the row number of the item's scalar code; rows are only appended.
        rows = np.arange(len(self._row_ids), len(self._row_ids) + len(ids), dtype=np.int64)
        self._refine.base_index.add_with_ids(vectors, rows)
        self._refine.refine_index.add(vectors)
        self.index.ntotal = self._refine.refine_index.ntotal
        self._row_ids = np.concatenate([self._row_ids, ids])

    def remove(self, ids: np.ndarray) -> int:
        if not len(ids):
            return 0
        self._gpu_index = None
        ids = np.asarray(ids, dtype=np.int64)
        if self._row_ids is None:
            return int(self.index.remove_ids(faiss.IDSelectorBatch(ids)))
        rows = np.flatnonzero(np.isin(self._row_ids, ids) & (self._row_ids >= 0))
        removed = int(self._refine.base_index.remove_ids(faiss.IDSelectorBatch(rows)))
        self._row_ids[rows] = -1
        return removed

    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ``(scores, ids)``, ``-1`` ids where fewer exist; ``allowed`` restricts ids.

        A filtered IVF search widens ``nprobe`` until every query has ``min(k, len(allowed))``
        results, so a rare label still gets its full ``k``.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self._row_ids is not None:
            return self._search_rows(queries, k, allowed, self._row_ids)
        if allowed is None:
            return self._searchable(k).search(queries, k)
        selector = faiss.IDSelectorBatch(np.asarray(allowed, dtype=np.int64))
        if self.index_type == "flat":
            # faiss's stubs omit the keyword constructor of its SearchParameters classes.
            params = faiss.SearchParameters(sel=selector)  # type: ignore[call-arg]
            return _numpy_search(self.index, queries, k, params)
        return self._widening_search(queries, k, min(k, len(allowed)), selector)

    def _widening_search(
        self, queries: np.ndarray, k: int, wanted: int, selector: faiss.IDSelector | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """An IVF search that quadruples ``nprobe`` until each query has ``wanted`` results."""
        nlist = int(self.params["nlist"])
        nprobe = int(self.params["nprobe"])
        while True:
            # faiss's stubs omit the keyword constructor of its SearchParameters classes.
            params: faiss.SearchParameters
            params = faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)  # type: ignore[call-arg]
            if self._row_ids is not None:
                params = faiss.IndexRefineSearchParameters(  # type: ignore[call-arg]
                    k_factor=float(self.params["refine"]), base_index_params=params
                )
            scores, ids = _numpy_search(self.index, queries, k, params)
            if nprobe >= nlist or (ids >= 0).sum(axis=1).min() >= wanted:
                return scores, ids
            nprobe = min(nlist, nprobe * 4)

    def _search_rows(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None, row_ids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """``ivf_fastscan``: search by row number, then map rows to ids with ``row_ids``."""
        selector = None
        wanted = min(k, self.ntotal)
        if allowed is not None:
            rows = np.flatnonzero(np.isin(row_ids, np.asarray(allowed, dtype=np.int64)))
            selector = faiss.IDSelectorBatch(rows.astype(np.int64))
            wanted = min(k, len(rows))
        scores, rows = self._widening_search(queries, k, wanted, selector)
        return scores, np.where(rows >= 0, row_ids[np.maximum(rows, 0)], -1)

    def _searchable(self, k: int) -> faiss.Index:
        """The GPU copy when there is a GPU and ``k`` is within its limit, else the CPU index."""
        if self._gpu_resources is None or k > _GPU_MAX_K:
            return self.index
        if self._gpu_index is None:
            options = faiss.GpuClonerOptions()
            # 64 sub-quantisers' lookup tables exceed a block's shared memory in float32; for an
            # IVF-PQ index the cloner's ``useFloat16`` is its lookup tables' precision.
            options.useFloat16 = self.index_type == "ivf"
            self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self.index, options)
            if self.index_type in IVF_TYPES:
                faiss.GpuParameterSpace().set_index_parameter(
                    self._gpu_index, "nprobe", int(self.params["nprobe"])
                )
        return self._gpu_index
