"""The gallery's dedupe lookup by sha256, kept as a few sorted runs instead of one B-tree.

A unique index over random hashes dirties about one database page per added item once the
gallery is large, so adding cost grows with the gallery. Here each insert writes its items'
hash keys as one new sorted run (a BLOB row of ``sha_runs``), merging it with the smaller runs
first (a binary counter: each key is rewritten about log2(gallery / batch) times, 16 bytes
each time), so adding costs in proportion to what was added. A key is the hash's first 64 bits;
a hit names candidate ids that the caller confirms against the items table, which also leaves
out removed items (their keys stay in the runs, 16 bytes each: dropping them at a merge would
cost a probe of the items table per key).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

import numpy as np

__all__ = ["RUNS_TABLE", "ShaRuns", "keys_of", "write_first_run"]

RUNS_TABLE = (
    "CREATE TABLE IF NOT EXISTS sha_runs (run INTEGER PRIMARY KEY AUTOINCREMENT,"
    " keys BLOB NOT NULL, ids BLOB NOT NULL)"
)


def keys_of(hashes: Sequence[str]) -> np.ndarray:
    """The lookup key of each hex sha256: its first 64 bits."""
    return np.fromiter((int(h[:16], 16) for h in hashes), dtype=np.uint64, count=len(hashes))


def _sorted(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(keys, kind="stable")
    return keys[order], ids[order]


def _merged(
    old: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted runs as one, in time linear in their length (``old``'s entries first among
    equal keys)."""
    (old_keys, old_ids), (new_keys, new_ids) = old, new
    at = np.searchsorted(old_keys, new_keys, "right") + np.arange(len(new_keys))
    keys = np.empty(len(old_keys) + len(new_keys), np.uint64)
    ids = np.empty(len(keys), np.int64)
    from_old = np.ones(len(keys), bool)
    from_old[at] = False
    keys[at], ids[at] = new_keys, new_ids
    keys[from_old], ids[from_old] = old_keys, old_ids
    return keys, ids


def _store(db: sqlite3.Connection, keys: np.ndarray, ids: np.ndarray) -> int:
    cursor = db.execute(
        "INSERT INTO sha_runs (keys, ids) VALUES (?, ?)",
        (keys.astype("<u8").tobytes(), ids.astype("<i8").tobytes()),
    )
    assert cursor.lastrowid is not None
    return int(cursor.lastrowid)


def write_first_run(db: sqlite3.Connection) -> None:
    """One run over every item (a migration's step, inside its transaction)."""
    db.execute(RUNS_TABLE)
    rows = db.execute("SELECT sha256, id FROM items").fetchall()
    if rows:
        keys = keys_of([r[0] for r in rows])
        _store(db, *_sorted(keys, np.fromiter((r[1] for r in rows), np.int64, len(rows))))


class ShaRuns:
    """One connection's copy of the runs; run numbers are never reused, so a copy is brought
    up to date by loading the runs it lacks and dropping those gone."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._runs: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def refresh(self) -> None:
        known = list(self._runs)
        marks = ",".join("?" * len(known)) or "NULL"
        rows = self._db.execute(
            f"SELECT run, CASE WHEN run IN ({marks}) THEN NULL ELSE keys END,"
            f" CASE WHEN run IN ({marks}) THEN NULL ELSE ids END FROM sha_runs",
            known + known,
        ).fetchall()
        runs = {}
        for run, keys, ids in rows:
            if keys is None:
                runs[run] = self._runs[run]
            else:
                runs[run] = (np.frombuffer(keys, "<u8"), np.frombuffer(ids, "<i8"))
        self._runs = runs

    def candidates(self, keys: np.ndarray) -> list[int]:
        """Ids whose hash shares a key with one of ``keys`` (after :meth:`refresh`)."""
        keys = np.sort(keys)  # sorted queries let searchsorted walk each run once
        found: list[int] = []
        for run_keys, run_ids in self._runs.values():
            low = np.searchsorted(run_keys, keys)
            hits = np.flatnonzero(run_keys[np.minimum(low, len(run_keys) - 1)] == keys)
            for key, start in zip(keys[hits], low[hits], strict=True):
                stop = np.searchsorted(run_keys, key, "right")
                found.extend(run_ids[start:stop].tolist())
        return found

    def write(self, keys: np.ndarray, ids: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Write ``keys`` as a new run, merged with every run no larger than it (inside the
        caller's transaction, after :meth:`refresh`); returns the runs to :meth:`adopt` once
        that transaction has committed."""
        keys, ids = _sorted(keys, ids)
        runs = dict(self._runs)
        for run in sorted(runs, key=lambda r: len(runs[r][0])):
            if len(runs[run][0]) > len(keys):
                break
            keys, ids = _merged(runs.pop(run), (keys, ids))
            self._db.execute("DELETE FROM sha_runs WHERE run = ?", (run,))
        runs[_store(self._db, keys, ids)] = (keys, ids)
        return runs

    def adopt(self, runs: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        self._runs = runs
