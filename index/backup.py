"""``gsp index backup`` and ``restore``: a consistent copy of a gallery, taken while it is
served and written.

A copy opens every file of the snapshot ``current`` points at (open files survive a writer
pruning that snapshot; it is read again if ``current`` moved meanwhile), then copies the
database through SQLite's online backup API (a point-in-time copy that does not block the
writer), then the uploaded images (each written once, under its content's name). The snapshot
may be a little older than the database; opening the copy reconciles its index with its
database, as after any crash.

The copy is written with the creation protocol of :mod:`index.layout`, so it is a gallery
itself (it opens, serves and copies back) and a kill while writing it leaves an interrupted
creation that the next run clears. Restoring is the same copy in the other direction: into an
empty directory, or with ``replace`` over a gallery that no process is writing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from index.errors import GalleryError
from index.format import check_readable, database_format
from index.layout import (
    CURRENT,
    DATABASE,
    MANIFEST,
    UPLOADS,
    finish_creation,
    gallery_snapshot,
    lock_for_creation,
    release_writer_lock,
)
from index.manifest import Manifest
from index.snapshot import fsync_path, write_snapshot

__all__ = ["CopyReport", "copy_gallery"]

# Times the source's snapshot is read again when a writer replaced it while it was being opened.
_SNAPSHOT_ATTEMPTS = 20


@dataclass(frozen=True)
class CopyReport:
    source: Path
    destination: Path
    items: int
    format_version: int
    uploads: int

    def summary(self) -> str:
        return (
            f"copied gallery {self.source} to {self.destination}: {self.items} items, "
            f"{self.uploads} uploaded images, format {self.format_version}"
        )


def copy_gallery(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    replace: bool = False,
) -> CopyReport:
    """Copy the gallery ``source`` into ``destination``, which must not exist, be empty or hold
    an interrupted creation; ``replace`` lets it hold a gallery, replaced only once ``source``
    has been found readable. ``source`` may be served and written meanwhile; ``destination``
    is locked as a writer would lock it.
    """
    source, destination = Path(source), Path(destination)
    _refuse_overlap(source, destination)
    if not replace and (destination / CURRENT).is_symlink():
        raise GalleryError(
            f"{destination} already holds a gallery; replacing it needs `--replace` (replace=True)"
        )
    with _pinned_snapshot(source) as (manifest, files), _read_only(source / DATABASE) as db:
        check_readable(source, database_format(db))
        lock_fd = lock_for_creation(destination, replace=replace)
        try:
            items = _copy_database(db, destination / DATABASE)
            uploads = _copy_uploads(source / UPLOADS, destination / UPLOADS)
            write_snapshot(destination, lambda tmp: _write_files(files, tmp))
            finish_creation(destination)
        finally:
            release_writer_lock(lock_fd)
    return CopyReport(source, destination, items, manifest.format_version, uploads)


def _refuse_overlap(source: Path, destination: Path) -> None:
    a, b = source.resolve(), destination.resolve()
    if a == b or a.is_relative_to(b) or b.is_relative_to(a):
        raise GalleryError(f"cannot copy gallery {source} to {destination}: one holds the other")


@contextlib.contextmanager
def _pinned_snapshot(directory: Path) -> Iterator[tuple[Manifest, dict[str, BinaryIO]]]:
    """The current snapshot's manifest and open files, all from one snapshot."""
    for _ in range(_SNAPSHOT_ATTEMPTS):
        snapshot = gallery_snapshot(directory)
        files: dict[str, BinaryIO] = {}
        try:
            try:
                for path in snapshot.iterdir():
                    files[path.name] = path.open("rb")
                pinned = directory / os.readlink(directory / CURRENT) == snapshot
            except FileNotFoundError:  # pruned or replaced meanwhile: read the new one
                pinned = False
            if pinned and MANIFEST in files:
                text = files[MANIFEST].read().decode("utf-8")
                yield Manifest.from_json(text, directory), files
                return
        finally:
            for handle in files.values():
                handle.close()
    raise GalleryError(
        f"gallery {directory}: its snapshot changed {_SNAPSHOT_ATTEMPTS} times while it was "
        "being read; try again"
    )


@contextlib.contextmanager
def _read_only(database: Path) -> Iterator[sqlite3.Connection]:
    if not database.is_file():
        raise GalleryError(f"{database} is missing")
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        yield db
    finally:
        db.close()


def _copy_database(source: sqlite3.Connection, target: Path) -> int:
    """A point-in-time copy in one step (a paged copy restarts whenever the writer commits)."""
    copy = sqlite3.connect(target)
    try:
        source.backup(copy)
        copy.execute("PRAGMA journal_mode=WAL")
        items = copy.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    finally:
        copy.close()
    fsync_path(target)
    return int(items)


def _copy_uploads(source: Path, target: Path) -> int:
    """Copy the uploaded images, skipping files still being written (dot-named) or removed."""
    if not source.is_dir():
        return 0
    target.mkdir()
    copied = 0
    for path in sorted(source.iterdir()):
        if path.name.startswith(".") or not path.is_file():
            continue
        with contextlib.suppress(FileNotFoundError):
            shutil.copyfile(path, target / path.name)
            fsync_path(target / path.name)
            copied += 1
    fsync_path(target)
    return copied


def _write_files(files: dict[str, BinaryIO], target: Path) -> None:
    for name, handle in files.items():
        handle.seek(0)
        with (target / name).open("wb") as out:
            shutil.copyfileobj(handle, out)
