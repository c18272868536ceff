"""A gallery: a directory of image embeddings that survives crashes and refuses foreign models.

The directory's layout and the protocol that creates it atomically are in :mod:`index.layout`,
its format version and upgrades in :mod:`index.format`.

The SQLite database is the system of record (each add/remove is a transaction); the faiss index
is derived from it and saved as an atomic snapshot. On open the index is reconciled with the
database — items added after the last snapshot are inserted from their stored exact embeddings,
removed ones dropped — so a kill at any moment, during a save included, leaves a loadable and
consistent gallery that has lost at most the call in flight.

That reconciliation also keeps saves cheap: a save rewrites the index only once the changes
since it was last written exceed :data:`REWRITE_SHARE` of it (or it was rebuilt); otherwise
the new snapshot carries the index files by hard link and the next open replays the rest from
the database. A save's cost is thus in proportion to what was added, amortised.

Other processes may hold the gallery open read-only while one writes it:
:meth:`Gallery.refresh` takes in what the writer committed since (the database is shared, the
in-memory index is brought in line), and :func:`disk_state` says when the files themselves
were replaced (a new snapshot, a rebuild in place), which calls for opening it again.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from index.errors import GalleryCorruptError, GalleryReadOnlyError
from index.format import check_openable
from index.layout import (
    CURRENT,
    DATABASE,
    IDS_FILE,
    INDEX_FILE,
    MANIFEST,
    acquire_writer_lock,
    clean_stale,
    finish_creation,
    lock_for_creation,
    release_writer_lock,
)
from index.limits import check_label, check_metadata
from index.manifest import (
    Manifest,
    canonical_preprocessing,
    check_compatible,
    load_manifest,
    utc_now,
)
from index.metadata import ItemRecord, ItemRow, MetadataStore
from index.snapshot import carry_files, current_snapshot, write_snapshot
from index.vectors import (
    COMPACT_THRESHOLD,
    DEAD_ROWS_REBUILD,
    INDEX_TYPES,
    IVF_MIN_ITEMS,
    IVF_TYPES,
    LARGE_THRESHOLD,
    RERANK,
    RETRAIN_GROWTH,
    VectorIndex,
    resolve_index_type,
)

__all__ = [
    "IDS_FILE",
    "AddResult",
    "Gallery",
    "ItemInput",
    "ItemRecord",
    "Manifest",
    "Match",
    "disk_state",
]

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_NORM_TOLERANCE = 1e-3
# Index parameters chosen by the user, kept when the index is rebuilt or retrained.
_SETTINGS = ("large_threshold", "compact_threshold", "rerank")
# Queries re-ranked per matrix product (bounds the candidates x dim scratch array).
_RERANK_CHUNK = 128
# A save rewrites the index file once adds and removes since it was written exceed this share
# of the vectors it holds: each rewrite is paid for by as many changes as the file held (at most
# one vector written per vector added, as in a gallery of 1,000), and an open replays at most
# half the gallery from the database. 0.25 cost 4 vector writes per vector added (bench/bulk.py).
REWRITE_SHARE = 1.0


@dataclass(frozen=True)
class ItemInput:
    """What the caller knows about an image being added; ``label`` and ``extra`` (metadata)
    are bounded by :mod:`index.limits`."""

    source: str
    sha256: str
    label: str | None = None
    extra: dict[str, Any] | None = None


@dataclass(frozen=True)
class AddResult:
    """``ids[i]`` is the id of input ``i`` (the existing id when it was a duplicate);
    ``duplicates`` lists the input positions whose sha256 was already indexed (or repeated
    earlier in the same call) and so were not indexed again."""

    ids: list[int]
    duplicates: list[int] = field(default_factory=list)

    @property
    def added(self) -> int:
        return len(self.ids) - len(self.duplicates)


@dataclass(frozen=True)
class Match:
    """One search hit; ``rank`` starts at 1, ``score`` is the cosine similarity."""

    id: int
    score: float
    rank: int


class Gallery:
    """Create with :meth:`create`, load with :meth:`open`; one lock makes it thread-safe."""

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        store: MetadataStore,
        vectors: VectorIndex,
        *,
        read_only: bool,
        lock_fd: int | None,
    ) -> None:
        self.directory = directory
        self.manifest = manifest
        self.read_only = read_only
        self._store = store
        self._vectors = vectors
        self._lock = threading.RLock()
        self._lock_fd = lock_fd
        # What the current snapshot's index file holds, and the changes made since.
        self._index_on_disk: int | None = None  # None: no usable file, the next save writes
        self._index_changes = 0
        # Ids the index held at the last reconcile, and the database's commit counter then:
        # what :meth:`refresh` compares against.
        self._synced_ids = np.zeros(0, dtype=np.int64)
        self._data_version = store.data_version()

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        model_fingerprint: str,
        preprocessing: Any,
        embedding_dim: int,
        index_type: str = "auto",
        large_threshold: int = LARGE_THRESHOLD,
        compact_threshold: int = COMPACT_THRESHOLD,
        rerank: int = RERANK,
    ) -> Gallery:
        """A new, empty gallery in ``directory``, which must not exist, be empty or hold an
        interrupted creation (cleared first; see :mod:`index.layout`).

        ``index_type``: ``auto`` (exact until ``large_threshold`` items, then ``ivf_fastscan``
        (``ivf_sq8`` where faiss searches on a GPU), and ``ivf`` from ``compact_threshold`` items
        on), ``flat``, ``ivf_fastscan`` (IVF with 4-bit product codes re-scored by 8-bit scalar
        codes), ``ivf_sq8`` (IVF with 8-bit scalar codes), ``ivf`` (IVF-PQ with exact re-rank)
        or ``ivf_flat`` (IVF with full vectors), the IVF types as soon as there are enough
        vectors to train them. ``rerank``: an ``ivf`` search re-scores ``rerank``·k candidates
        with their exact embeddings.
        """
        if index_type not in INDEX_TYPES:
            raise ValueError(f"unknown index type {index_type!r}; choose one of {INDEX_TYPES}")
        _check_rerank(rerank)
        if not 0 < large_threshold <= compact_threshold:
            raise ValueError(
                "need 0 < large_threshold <= compact_threshold, got "
                f"{large_threshold} and {compact_threshold}"
            )
        if embedding_dim <= 0:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if not model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty string")
        vectors = VectorIndex.flat(embedding_dim)
        manifest = Manifest(
            model_fingerprint=model_fingerprint,
            preprocessing=canonical_preprocessing(preprocessing),
            embedding_dim=int(embedding_dim),
            index_type="flat",
            index_params={
                "large_threshold": int(large_threshold),
                "compact_threshold": int(compact_threshold),
                "rerank": int(rerank),
                "bytes_per_item": vectors.bytes_per_item,
            },
            requested_index_type=index_type,
        )
        path = Path(directory)
        lock_fd = lock_for_creation(path)
        store = None
        try:
            store = MetadataStore(path / DATABASE, create=True)
            gallery = cls(path, manifest, store, vectors, read_only=False, lock_fd=lock_fd)
            gallery.save()  # points ``current`` at the first snapshot: the commit point
        except BaseException:
            if store is not None:
                store.close()
            release_writer_lock(lock_fd)
            raise
        finish_creation(path)
        return gallery

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        expected_fingerprint: str | None = None,
        expected_preprocessing: Any | None = None,
        read_only: bool = False,
        immutable: bool = False,
    ) -> Gallery:
        """Load a gallery, refusing one built by another model or preprocessing.

        A gallery in an older format opens read-only when this code still reads it
        (``index.format.READ_COMPATIBLE``); otherwise, and for writing, it is refused with the
        command that upgrades it.

        Raises :class:`GalleryNotFoundError`, :class:`GalleryCorruptError`,
        :class:`GalleryFormatError`, :class:`GalleryMismatchError` (naming both fingerprints)
        or :class:`GalleryLockedError`.

        ``immutable`` (read-only implied) is for a published gallery that nothing writes: its
        database is read without locks (see :mod:`index.publish`).
        """
        read_only = read_only or immutable
        path = Path(directory)
        snapshot, manifest = load_manifest(path)
        check_compatible(manifest, expected_fingerprint, expected_preprocessing)
        lock_fd = None if read_only else acquire_writer_lock(path)
        store = None
        try:
            if not (path / DATABASE).is_file():
                raise GalleryCorruptError(f"gallery {path}: {DATABASE} is missing")
            store = MetadataStore(path / DATABASE, read_only=read_only, immutable=immutable)
            check_openable(
                path, manifest.format_version, store.format_version(), writable=not read_only
            )
            if not read_only:
                clean_stale(path)
            try:
                vectors = VectorIndex.read(snapshot / INDEX_FILE, manifest.index_params)
                indexed = np.load(snapshot / IDS_FILE)
            except (RuntimeError, OSError, ValueError) as error:
                raise GalleryCorruptError(
                    f"gallery {path}: cannot read the index: {error}"
                ) from error
            manifest.index_type = vectors.index_type
            gallery = cls(path, manifest, store, vectors, read_only=read_only, lock_fd=lock_fd)
            gallery._reconcile(indexed)
        except BaseException:
            if store is not None:
                store.close()
            release_writer_lock(lock_fd)
            raise
        return gallery

    def close(self) -> None:
        """Release the database and the writer lock (does not save; call :meth:`save` first)."""
        with self._lock:
            self._store.close()
            release_writer_lock(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> Gallery:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def search_device(self) -> str:
        """``gpu`` when faiss sees a GPU (unfiltered searches run there), else ``cpu``."""
        return "gpu" if self._vectors.on_gpu else "cpu"

    def __len__(self) -> int:
        return self.manifest.count

    # ------------------------------------------------------------------ writes
    def add(
        self,
        embeddings: np.ndarray,
        weights: Sequence[np.ndarray],
        items: Sequence[ItemInput],
        *,
        on_duplicate: Literal["skip", "update"] = "skip",
    ) -> AddResult:
        """Index new images; an already-indexed sha256 is never indexed twice.

        ``on_duplicate="skip"`` leaves the stored item untouched; ``"update"`` replaces its
        source, label and extra with the new input's (the embedding is content-derived and kept).
        A label or metadata over the limits of :mod:`index.limits` raises
        :class:`~index.errors.InvalidItemError` before anything is written.
        """
        self._check_writable()
        if on_duplicate not in ("skip", "update"):
            raise ValueError(f"on_duplicate must be 'skip' or 'update', got {on_duplicate!r}")
        embeddings = self._validated_embeddings(embeddings, len(items))
        if len(weights) != len(items):
            raise ValueError(f"got {len(weights)} weight grids for {len(items)} items")
        for position, item in enumerate(items):
            if not _SHA256.match(item.sha256):
                raise ValueError(f"item {position}: sha256 must be 64 lowercase hex digits")
            if np.asarray(weights[position]).ndim != 2:
                raise ValueError(f"item {position}: weights must be a 2-D (h, w) grid")
            check_label(position, item.label)
            check_metadata(position, item.extra)
        with self._lock:
            existing = self._store.find_sha256([item.sha256 for item in items])
            first_seen: dict[str, int] = {}
            new_positions, duplicates, updates = [], [], []
            for position, item in enumerate(items):
                if item.sha256 in existing or item.sha256 in first_seen:
                    duplicates.append(position)
                    if item.sha256 in existing and on_duplicate == "update":
                        updates.append(
                            (existing[item.sha256], item.source, item.label, item.extra or {})
                        )
                else:
                    first_seen[item.sha256] = position
                    new_positions.append(position)
            now = utc_now()
            rows = [
                ItemRow(
                    source=items[p].source,
                    sha256=items[p].sha256,
                    label=items[p].label,
                    added_at=now,
                    extra=dict(items[p].extra or {}),
                    embedding=embeddings[p],
                    weights=np.asarray(weights[p]),
                )
                for p in new_positions
            ]
            new_ids = self._store.insert(rows)
            if updates:
                self._store.update_metadata(updates)
            self._vectors.add(np.asarray(new_ids, np.int64), embeddings[new_positions])
            self._index_changes += len(new_ids)
            self.manifest.count += len(new_ids)
            self._maybe_rebuild()
            id_of = dict(existing)
            id_of.update(zip((items[p].sha256 for p in new_positions), new_ids, strict=True))
            return AddResult(ids=[id_of[item.sha256] for item in items], duplicates=duplicates)

    def remove(self, ids: Sequence[int]) -> int:
        """Delete items by id; returns how many existed. Ids are never reused."""
        self._check_writable()
        with self._lock:
            removed = self._store.delete(list(ids))
            self._vectors.remove(np.asarray(removed, np.int64))
            self._index_changes += len(removed)
            self.manifest.count -= len(removed)
            self._maybe_rebuild()
            return len(removed)

    def save(self) -> None:
        """Write the manifest, and the index when due (see :data:`REWRITE_SHARE`), as a new
        snapshot, atomically; the database is current."""
        self._check_writable()
        with self._lock:
            self.manifest.updated_at = utc_now()
            self._store.checkpoint()
            written = self._index_on_disk
            rewrite = written is None or self._index_changes > REWRITE_SHARE * max(written, 1)
            ids = self._store.ids() if rewrite else None
            carried = None if rewrite else current_snapshot(self.directory)

            def write(tmp: Path) -> None:
                if ids is None:
                    assert carried is not None
                    carry_files(carried, tmp, leave=frozenset({MANIFEST}))
                else:
                    self._vectors.write(tmp / INDEX_FILE)
                    np.save(tmp / IDS_FILE, ids)
                (tmp / MANIFEST).write_text(self.manifest.to_json(), encoding="utf-8")

            write_snapshot(self.directory, write)
            if ids is not None:
                self._index_on_disk, self._index_changes = len(ids), 0

    # ------------------------------------------------------------------ reads
    def search(self, queries: np.ndarray, k: int, label: str | None = None) -> list[list[Match]]:
        """The ``k`` best matches per query row; with ``label``, only items of that label
        (still ``k`` results whenever the label has at least ``k`` items).

        Scores are exact cosines, except on ``ivf_fastscan`` and ``ivf_sq8`` where they come
        from 8-bit codes (within about 1e-3): an ``ivf`` (PQ) index only proposes ``rerank``·k
        candidates, which are re-scored with their exact embeddings read from the database in
        one query.
        """
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        queries = self._validated_embeddings(np.atleast_2d(queries), None)
        with self._lock:
            allowed = None
            if label is not None:
                allowed = self._store.ids(label)
                if not len(allowed):
                    return [[] for _ in range(len(queries))]
            if self._vectors.ntotal == 0:
                return [[] for _ in range(len(queries))]
            if self._vectors.approximate:
                rerank = int(self.manifest.index_params.get("rerank", RERANK))
                _, candidates = self._vectors.search(queries, k * rerank, allowed)
                scores, ids = self._rerank(queries, candidates, k)
            else:
                scores, ids = self._vectors.search(queries, k, allowed)
        return [
            _matches(row_ids, row_scores) for row_ids, row_scores in zip(ids, scores, strict=True)
        ]

    def configure_search(
        self, *, nprobe: int | None = None, rerank: int | None = None, refine: int | None = None
    ) -> None:
        """Trade recall for speed: IVF lists visited, candidates per result re-ranked from the
        database (``ivf``) or re-scored with the in-RAM 8-bit codes (``ivf_fastscan``).

        Saved with the next snapshot; a retrain resets ``nprobe`` and ``refine`` to the defaults
        for its size.
        """
        if rerank is not None:
            _check_rerank(rerank)
        with self._lock:
            if nprobe is not None:
                self._vectors.set_nprobe(nprobe)
                self.manifest.index_params["nprobe"] = int(nprobe)
            if refine is not None:
                self._vectors.set_refine(refine)
                self.manifest.index_params["refine"] = int(refine)
            if rerank is not None:
                self.manifest.index_params["rerank"] = int(rerank)

    def get(self, item_id: int) -> ItemRecord | None:
        with self._lock:
            return self._store.records([item_id]).get(int(item_id))

    def get_many(self, ids: Sequence[int]) -> list[ItemRecord]:
        """Records in the order of ``ids``; unknown ids are left out."""
        with self._lock:
            found = self._store.records(list(ids))
        return [found[int(i)] for i in ids if int(i) in found]

    def embedding(self, item_id: int) -> np.ndarray | None:
        """The exact stored embedding (not reconstructed from the index)."""
        with self._lock:
            return self._store.embeddings([item_id], self.manifest.embedding_dim).get(int(item_id))

    def find_sha256(self, sha256: str) -> int | None:
        with self._lock:
            return self._store.find_sha256([sha256]).get(sha256)

    def known_sha256(self) -> set[str]:
        """Every indexed content hash (the bulk job's resume check)."""
        with self._lock:
            return self._store.all_sha256()

    def labels(self) -> dict[str | None, int]:
        """Item count per label (``None`` for unlabelled items)."""
        with self._lock:
            return self._store.labels()

    def refresh(self) -> bool:
        """Read-only galleries: take in the items another process added or removed since the
        last look; returns whether anything changed.

        One ``PRAGMA`` when nothing did; otherwise the stored ids are compared with the index's
        (a scan of the id column: about 0.1 s per million items) and the difference applied.
        Searches wait on the gallery's lock meanwhile, so each sees the gallery before or after.
        """
        if not self.read_only:
            return False
        with self._lock:
            version = self._store.data_version()
            if version == self._data_version:
                return False
            self._data_version = version
            before = self._synced_ids
            self._reconcile(before)
            return not np.array_equal(before, self._synced_ids)

    # ------------------------------------------------------------------ internals
    def _check_writable(self) -> None:
        if self.read_only:
            raise GalleryReadOnlyError(f"gallery {self.directory} is open read-only")

    def _validated_embeddings(self, embeddings: np.ndarray, count: int | None) -> np.ndarray:
        array = np.asarray(embeddings, dtype=np.float32)
        dim = self.manifest.embedding_dim
        if array.ndim != 2 or array.shape[1] != dim:
            raise ValueError(f"embeddings must have shape (n, {dim}), got {array.shape}")
        if count is not None and len(array) != count:
            raise ValueError(f"got {len(array)} embeddings for {count} items")
        if not np.isfinite(array).all():
            raise ValueError("embeddings contain NaN or infinity")
        norms = np.linalg.norm(array, axis=1)
        if len(array) and np.abs(norms - 1.0).max() > _NORM_TOLERANCE:
            raise ValueError("embeddings must be L2-normalised (the index uses inner product)")
        return np.ascontiguousarray(array)

    def _rerank(
        self, queries: np.ndarray, candidates: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The top ``k`` of each row's candidate ids by exact inner product with the stored
        embeddings (one database read for the whole batch); ``-1`` pads missing results."""
        dim = self.manifest.embedding_dim
        wanted = np.unique(candidates[candidates >= 0])
        found = self._store.embeddings(wanted.tolist(), dim)
        matrix = np.zeros((len(wanted) + 1, dim), dtype=np.float32)  # last row: padding
        known = np.zeros(len(wanted) + 1, dtype=bool)
        for row, item_id in enumerate(wanted.tolist()):
            vector = found.get(item_id)
            if vector is not None:
                matrix[row], known[row] = vector, True
        rows = np.where(candidates >= 0, np.searchsorted(wanted, candidates), len(wanted))
        exact = np.empty(candidates.shape, dtype=np.float32)
        for start in range(0, len(queries), _RERANK_CHUNK):
            stop = start + _RERANK_CHUNK
            block = matrix[rows[start:stop]]  # (queries, candidates, dim)
            exact[start:stop] = np.matmul(block, queries[start:stop, :, None])[:, :, 0]
        exact[~known[rows]] = -np.inf
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores = np.take_along_axis(exact, order, axis=1)
        ids = np.where(np.isfinite(scores), np.take_along_axis(candidates, order, axis=1), -1)
        return scores, ids

    def _reconcile(self, indexed: np.ndarray) -> None:
        """Bring the loaded index in line with the database after a crash or an unsaved session.

        When the database has outgrown the saved index type, the index is rebuilt straight from
        the database instead of first being patched.
        """
        stored = self._store.ids()
        self.manifest.count = len(stored)
        self._synced_ids = stored
        wanted = self._needed_rebuild()
        if wanted is not None:
            self._rebuild(wanted)
            return
        missing = np.setdiff1d(stored, indexed, assume_unique=True)
        extra = np.setdiff1d(indexed, stored, assume_unique=True)
        self._index_on_disk, self._index_changes = len(indexed), len(missing) + len(extra)
        self._vectors.remove(extra)
        dim = self.manifest.embedding_dim
        for ids, vectors in self._store.iter_embeddings(dim, ids=missing):
            self._vectors.add(ids, vectors)
        if self._vectors.ntotal != len(stored):
            raise GalleryCorruptError(
                f"gallery {self.directory}: index holds {self._vectors.ntotal} vectors but the "
                f"database {len(stored)} items"
            )

    def _needed_rebuild(self) -> str | None:
        """The index type to rebuild as when the gallery has outgrown the current one, or None."""
        count = self.manifest.count
        params = self.manifest.index_params
        wanted = resolve_index_type(
            self.manifest.requested_index_type,
            count,
            int(params.get("large_threshold", LARGE_THRESHOLD)),
            int(params.get("compact_threshold", COMPACT_THRESHOLD)),
        )
        current = self._vectors.index_type
        if self._vectors.dead_share > DEAD_ROWS_REBUILD:
            # Reclaim the removed rows' RAM; a nearly empty gallery goes back to exact search.
            return current if wanted == "flat" and count >= IVF_MIN_ITEMS else wanted
        if current in IVF_TYPES:
            # Never back to flat after removals (no flapping); retrain once grown well past,
            # as whatever IVF type the size now calls for.
            trained_on = int(params.get("trained_on", 1))
            if count < RETRAIN_GROWTH * trained_on:
                return None
            return wanted if wanted in IVF_TYPES else current
        return wanted if wanted != current else None

    def _maybe_rebuild(self) -> None:
        wanted = self._needed_rebuild()
        if wanted is not None:
            self._rebuild(wanted)

    def _rebuild(self, index_type: str) -> None:
        """Rebuild the index from the stored exact embeddings, streaming them from SQLite."""
        dim = self.manifest.embedding_dim
        count = self.manifest.count
        sample = None
        if index_type in IVF_TYPES:
            ids = self._store.ids()
            size = VectorIndex.training_size(count, index_type)
            chosen = np.sort(np.random.default_rng(0).choice(ids, size=size, replace=False))
            sample = np.concatenate([v for _, v in self._store.iter_embeddings(dim, ids=chosen)])
        rebuilt = VectorIndex.build(
            index_type, dim, count, sample, self._store.iter_embeddings(dim)
        )
        self._vectors = rebuilt
        self._index_on_disk = None
        settings = {
            key: self.manifest.index_params[key]
            for key in _SETTINGS
            if key in self.manifest.index_params
        }
        self.manifest.index_type = index_type
        self.manifest.index_params = {
            **settings,
            **rebuilt.params,
            "bytes_per_item": rebuilt.bytes_per_item,
        }


def _check_rerank(rerank: int) -> None:
    if int(rerank) < 1:
        raise ValueError(f"rerank must be at least 1, got {rerank}")


def _matches(ids: np.ndarray, scores: np.ndarray) -> list[Match]:
    """One query's hits, dropping faiss's ``-1`` padding when fewer than ``k`` exist."""
    found = [(int(i), float(s)) for i, s in zip(ids, scores, strict=True) if i >= 0]
    return [Match(id=i, score=s, rank=rank) for rank, (i, s) in enumerate(found, 1)]


def disk_state(directory: str | os.PathLike[str]) -> tuple[str, int]:
    """The snapshot ``current`` names and the database file's inode: a reader whose gallery
    was opened at another state should open it again (a new snapshot may carry new search
    settings or index type; a new inode is a gallery rebuilt or restored in place)."""
    path = Path(directory)
    try:
        return os.readlink(path / CURRENT), os.stat(path / DATABASE).st_ino
    except OSError:
        return "", 0
