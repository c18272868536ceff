"""The SQLite record of a gallery's items: metadata, exact embedding and GSP weights grid.

This database is the system of record: every add, update and remove is one transaction (WAL
journal, so readers never block the writer), and the faiss index is rebuilt from it whenever it
is stale. Ids come from ``AUTOINCREMENT`` and are therefore never reused, even after deletes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index.format import APPLICATION_ID, FORMAT_VERSION, database_format
from index.limits import stored_label, stored_metadata
from index.sha_runs import RUNS_TABLE, ShaRuns, keys_of

__all__ = ["ItemRecord", "ItemRow", "MetadataStore"]

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    source TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    label TEXT,
    added_at TEXT NOT NULL,
    extra TEXT NOT NULL,
    embedding BLOB NOT NULL,
    weights BLOB NOT NULL,
    weights_h INTEGER NOT NULL,
    weights_w INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS items_label ON items(label);
{RUNS_TABLE};
PRAGMA application_id = {APPLICATION_ID};
PRAGMA user_version = {FORMAT_VERSION};
"""
_META_COLUMNS = "id, source, sha256, label, added_at, extra, weights, weights_h, weights_w"
# SQLite's default limit on bound parameters is 999 on old builds; stay under it.
_CHUNK = 900


@dataclass(frozen=True)
class ItemRecord:
    """One gallery item as stored; ``weights`` is the GSP weights grid at its native (h, w)."""

    id: int
    source: str
    sha256: str
    label: str | None
    added_at: str
    extra: dict[str, Any]
    weights: np.ndarray


@dataclass(frozen=True)
class ItemRow:
    """What :meth:`MetadataStore.insert` writes for a new item."""

    source: str
    sha256: str
    label: str | None
    added_at: str
    extra: dict[str, Any]
    embedding: np.ndarray
    weights: np.ndarray


def _storable_ids(ids: Sequence[int]) -> list[int]:
    """The ids SQLite can hold (64-bit signed); any other id names no item, so a lookup or
    delete of it finds nothing instead of overflowing."""
    return [int(i) for i in ids if -(2**63) <= int(i) < 2**63]


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _record(row: tuple) -> ItemRecord:
    """A stored row as a record; label and metadata are re-checked (see :mod:`index.limits`)."""
    item_id, source, sha256, label, added_at, extra, weights, h, w = row
    grid = np.frombuffer(weights, dtype=np.float16).reshape(h, w).astype(np.float32)
    return ItemRecord(
        item_id, source, sha256, stored_label(label), added_at, stored_metadata(extra), grid
    )


class MetadataStore:
    """A thin typed layer over one SQLite file; the caller serialises writes."""

    def __init__(
        self, path: Path, *, read_only: bool = False, create: bool = False, immutable: bool = False
    ) -> None:
        """``immutable``: read-only, for a file that nothing will ever change (a published
        gallery): SQLite then takes no locks, which network filesystems do not honour."""
        self.path = path
        if read_only or immutable:
            flags = "mode=ro&immutable=1" if immutable else "mode=ro"
            self._db = sqlite3.connect(f"file:{path}?{flags}", uri=True, check_same_thread=False)
        else:
            mode = "rwc" if create else "rw"
            self._db = sqlite3.connect(
                f"file:{path}?mode={mode}", uri=True, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if create:
                self._db.executescript(_SCHEMA)
                self._db.commit()
        self._db.execute("SELECT 1 FROM items LIMIT 1").fetchall()
        # Formats before 3 (read-only here) kept a unique index on sha256 instead of runs.
        has_runs = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'sha_runs'"
        ).fetchone()
        self._sha_runs = ShaRuns(self._db) if has_runs else None

    def close(self) -> None:
        self._db.close()

    def format_version(self) -> int:
        """The gallery format this database records (see :mod:`index.format`)."""
        return database_format(self._db)

    def labels(self) -> dict[str | None, int]:
        rows = self._db.execute("SELECT label, COUNT(*) FROM items GROUP BY label ORDER BY label")
        return dict(rows.fetchall())

    def ids(self, label: str | None = None) -> np.ndarray:
        if label is None:
            rows = self._db.execute("SELECT id FROM items ORDER BY id")
        else:
            rows = self._db.execute("SELECT id FROM items WHERE label = ? ORDER BY id", (label,))
        return np.fromiter((r[0] for r in rows), dtype=np.int64)

    def find_sha256(self, hashes: Sequence[str]) -> dict[str, int]:
        """The id of each hash already stored (see :mod:`index.sha_runs`)."""
        found: dict[str, int] = {}
        if self._sha_runs is None:
            for chunk in _chunks(list(hashes)):
                marks = ",".join("?" * len(chunk))
                query = f"SELECT sha256, id FROM items WHERE sha256 IN ({marks})"
                found.update(self._db.execute(query, tuple(chunk)).fetchall())
            return found
        wanted = set(hashes)
        self._sha_runs.refresh()
        candidates = self._sha_runs.candidates(keys_of(list(wanted)))
        for chunk in _chunks(candidates):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT sha256, id FROM items WHERE id IN ({marks})"
            found.update(r for r in self._db.execute(query, tuple(chunk)) if r[0] in wanted)
        return found

    def all_sha256(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT sha256 FROM items")}

    def insert(self, rows: Sequence[ItemRow]) -> list[int]:
        """Insert new items in one transaction and one batched statement; return their ids in
        order. ``AUTOINCREMENT`` gives the rows of one transaction consecutive ids after the
        table's sequence, so they are read from it rather than row by row. The caller has
        checked with :meth:`find_sha256` that no hash is stored yet."""
        if self._sha_runs is None:
            raise RuntimeError("a gallery database before format 3 is read-only")
        if not rows:
            return []
        runs = self._sha_runs
        runs.refresh()
        values = []
        for row in rows:
            grid = np.ascontiguousarray(row.weights, dtype=np.float16)
            values.append(
                (
                    row.source,
                    row.sha256,
                    row.label,
                    row.added_at,
                    json.dumps(row.extra),
                    np.ascontiguousarray(row.embedding, dtype=np.float32).tobytes(),
                    grid.tobytes(),
                    grid.shape[0],
                    grid.shape[1],
                )
            )
        with self._db:
            before = self._sequence()
            self._db.executemany(
                "INSERT INTO items (source, sha256, label, added_at, extra, embedding, weights,"
                " weights_h, weights_w) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )
            after = self._sequence()
            if after - before != len(values):  # another writer: never, the gallery is locked
                raise RuntimeError(f"inserted {len(values)} rows but ids moved {after - before}")
            ids = np.arange(before + 1, after + 1, dtype=np.int64)
            written = runs.write(keys_of([row.sha256 for row in rows]), ids)
        runs.adopt(written)
        return ids.tolist()

    def _sequence(self) -> int:
        """The last id ``AUTOINCREMENT`` handed out (0 before the first insert)."""
        row = self._db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
        return int(row[0]) if row else 0

    def update_metadata(
        self, updates: Sequence[tuple[int, str, str | None, dict[str, Any]]]
    ) -> None:
        """Replace source, label and extra of existing items: ``(id, source, label, extra)``."""
        with self._db:
            self._db.executemany(
                "UPDATE items SET source = ?, label = ?, extra = ? WHERE id = ?",
                [(source, label, json.dumps(extra), i) for i, source, label, extra in updates],
            )

    def delete(self, ids: Sequence[int]) -> list[int]:
        """Delete items; returns the ids that existed."""
        existing: list[int] = []
        with self._db:
            for chunk in _chunks(_storable_ids(ids)):
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT id FROM items WHERE id IN ({marks})", tuple(chunk))
                existing.extend(r[0] for r in rows)
                self._db.execute(f"DELETE FROM items WHERE id IN ({marks})", tuple(chunk))
        return existing

    def records(self, ids: Sequence[int]) -> dict[int, ItemRecord]:
        found: dict[int, ItemRecord] = {}
        for chunk in _chunks(_storable_ids(ids)):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT {_META_COLUMNS} FROM items WHERE id IN ({marks})"
            for row in self._db.execute(query, tuple(chunk)):
                record = _record(row)
                found[record.id] = record
        return found

    def embeddings(self, ids: Sequence[int], dim: int) -> dict[int, np.ndarray]:
        found: dict[int, np.ndarray] = {}
        for chunk in _chunks(_storable_ids(ids)):
            marks = ",".join("?" * len(chunk))
            query = f"SELECT id, embedding FROM items WHERE id IN ({marks})"
            for item_id, blob in self._db.execute(query, tuple(chunk)):
                found[item_id] = np.frombuffer(blob, dtype=np.float32, count=dim).copy()
        return found

    def iter_embeddings(
        self, dim: int, batch: int = 50_000, ids: np.ndarray | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(ids, embeddings)`` in id order, ``batch`` rows at a time (all, or ``ids``)."""
        if ids is not None:
            for start in range(0, len(ids), batch):
                wanted = ids[start : start + batch].tolist()
                found = self.embeddings(wanted, dim)
                yield np.asarray(wanted, np.int64), np.stack([found[i] for i in wanted])
            return
        last = -1
        while True:
            rows = self._db.execute(
                "SELECT id, embedding FROM items WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            block = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(-1, dim)
            yield np.fromiter((r[0] for r in rows), np.int64, len(rows)), block
            last = rows[-1][0]

    def data_version(self) -> int:
        """A number that changes whenever another connection commits to the database."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def checkpoint(self) -> None:
        """Fold the WAL into the main file so the database on disk is self-contained."""
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
