"""Publishing a gallery as whole read-only versions, for api replicas on other machines.

SQLite's locking and memory-mapped files are not safe on network filesystems (NFS, SMB, most
cloud file shares), so replicas on several machines must not open a gallery that a writer is
changing. The writer's machine publishes instead: each publication is a complete, consistent
copy of the gallery (:func:`index.backup.copy_gallery`, taken while the gallery is served and
written), written once into a fresh directory and never changed afterwards, then made current
by the same atomic snapshot protocol a gallery uses for its index (:mod:`index.snapshot`)::

    DEST/
      current -> snapshots/<name>
      snapshots/<name>/   a complete gallery (items.sqlite, its own current snapshot, uploads/)

Replicas open ``current``'s gallery with ``immutable`` (SQLite takes no locks on a file nobody
changes) and open the next one when ``current`` moves. The previous publication is kept, so a
replica that resolved ``current`` just before a swap still opens it; a replica must therefore
move on within one publication interval. Every publication costs a full copy of the gallery.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from index.backup import CopyReport, copy_gallery
from index.errors import GalleryError
from index.layout import DATABASE
from index.snapshot import CURRENT, clean_stale, current_snapshot, fsync_path, write_snapshot

__all__ = [
    "PublishReport",
    "gallery_changes",
    "is_publication",
    "publish_gallery",
    "published_gallery",
]


@dataclass(frozen=True)
class PublishReport:
    copy: CopyReport
    version: Path
    seconds: float

    def summary(self) -> str:
        return (
            f"published gallery {self.copy.source} as {self.version} ({self.copy.items} items, "
            f"{self.copy.uploads} uploaded images) in {self.seconds:.1f} s"
        )


def is_publication(directory: Path) -> bool:
    """Whether ``directory`` holds published versions (its current snapshot is a gallery)."""
    try:
        return (current_snapshot(directory) / DATABASE).is_file()
    except GalleryError:
        return False


def published_gallery(directory: Path) -> Path | None:
    """The gallery directory of the current publication in ``directory``, None when
    ``directory`` is not a publication (a plain gallery, or nothing yet)."""
    return current_snapshot(directory) if is_publication(directory) else None


def publish_gallery(
    source: str | os.PathLike[str], destination: str | os.PathLike[str]
) -> PublishReport:
    """Copy the gallery ``source`` (it may be served and written meanwhile) into a new version
    under ``destination`` and make it current atomically; ``destination`` must be new, empty
    or an earlier publication."""
    started = time.perf_counter()
    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    if any(destination.iterdir()) and not is_publication(destination):
        raise GalleryError(
            f"cannot publish into {destination}: it holds something other than publications"
        )
    clean_stale(destination)
    reports: list[CopyReport] = []

    def write(version: Path) -> None:
        reports.append(copy_gallery(source, version))
        _seal(version / DATABASE)

    version = write_snapshot(destination, write)
    return PublishReport(reports[0], version, time.perf_counter() - started)


def gallery_changes(directory: str | os.PathLike[str]) -> tuple[int, ...]:
    """Sizes and modification times of the gallery's database files and ``current``: equal
    values mean nothing was written in between (a publisher's cheap "changed?" check)."""
    path = Path(directory)
    values: list[int] = []
    for name in (DATABASE, DATABASE + "-wal", CURRENT):
        try:
            info = os.stat(path / name, follow_symlinks=False)
        except FileNotFoundError:
            values += [-1, -1]
        else:
            values += [info.st_size, info.st_mtime_ns]
    return tuple(values)


def _seal(database: Path) -> None:
    """Leave the database a single self-contained file (no WAL), as an immutable reader wants."""
    db = sqlite3.connect(database)
    try:
        db.execute("PRAGMA journal_mode=DELETE")
    finally:
        db.close()
    fsync_path(database)
