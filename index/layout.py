"""A gallery directory's file names, its writer lock, and the protocol that creates it in place.

Layout::

    GALLERY/
      items.sqlite        the system of record (SQLite, WAL): metadata, exact embedding and
                          GSP weights grid per item
      current -> snapshots/<name>
      snapshots/<name>/   manifest.json, index.faiss, ids.npy (ids the index holds)
      uploads/            images the service stored, named by content (items' sources are
                          relative to GALLERY)
      writer.lock         flock held by the one process that has the gallery open for writing
      creating            present only while the gallery is being created or replaced

The directory may be a mounted volume, so a finished gallery cannot be renamed into place.
``current`` is the commit point instead: creation takes the writer lock, writes the
``creating`` marker before anything else, then the database and a first snapshot, points
``current`` at that snapshot and only then removes the marker. A directory without ``current``
is therefore no gallery. One that holds only the lock file, or the marker beside files this
protocol writes, is an interrupted creation, which the next creation clears and starts again;
anything else (a file that is not a gallery's, or a gallery's files without the marker) is
refused rather than deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from index.errors import GalleryCorruptError, GalleryError, GalleryLockedError, GalleryNotFoundError
from index.snapshot import CURRENT, LINK_PREFIX, SNAPSHOTS, current_snapshot, fsync_path
from index.snapshot import clean_stale as clean_stale_snapshots

__all__ = [
    "CREATING",
    "CURRENT",
    "DATABASE",
    "FAILURES_FILE",
    "IDS_FILE",
    "INDEX_FILE",
    "LOCK_FILE",
    "MANIFEST",
    "SNAPSHOTS",
    "UPLOADS",
    "acquire_writer_lock",
    "clean_stale",
    "finish_creation",
    "gallery_snapshot",
    "lock_for_creation",
    "release_writer_lock",
]

DATABASE = "items.sqlite"
MANIFEST = "manifest.json"
INDEX_FILE = "index.faiss"
IDS_FILE = "ids.npy"
LOCK_FILE = "writer.lock"
CREATING = "creating"
UPLOADS = "uploads"
# The bulk indexing job's failure report, written beside a gallery by default.
FAILURES_FILE = "build-failures.jsonl"
_DATABASE_FILES = {DATABASE + suffix for suffix in ("", "-wal", "-shm", "-journal")}
_GALLERY_FILES = {
    *_DATABASE_FILES,
    CURRENT,
    SNAPSHOTS,
    UPLOADS,
    LOCK_FILE,
    CREATING,
    FAILURES_FILE,
}


def acquire_writer_lock(directory: Path) -> int:
    """Take the gallery's writer lock (creating the lock file), or raise
    :class:`GalleryLockedError` at once when another process holds it."""
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as error:
        os.close(fd)
        raise GalleryLockedError(
            f"gallery {directory} is open for writing by another process; open it read_only=True"
        ) from error
    return fd


def release_writer_lock(fd: int | None) -> None:
    if fd is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def gallery_snapshot(directory: Path) -> Path:
    """The snapshot ``current`` points at; a creation that has not finished is named as such."""
    if directory.is_dir() and not (directory / CURRENT).is_symlink():
        entries = set(os.listdir(directory))
        if CREATING in entries or entries == {LOCK_FILE}:
            raise GalleryNotFoundError(
                f"no gallery at {directory} yet: its creation has not finished (it is under way, "
                "or was interrupted: rerunning the command that creates it, such as "
                "`gsp index build`, starts it again)"
            )
    return current_snapshot(directory)


def lock_for_creation(directory: Path, *, replace: bool = False) -> int:
    """Make ``directory`` a gallery under creation and return the writer lock's descriptor:
    what an interrupted creation left there is cleared, and with ``replace`` the gallery it
    holds is taken down (which only an owner of the lock may do).

    Raises :class:`GalleryError` when the directory holds files that are not a gallery's (it is
    then left untouched, without even a lock file) or, without ``replace``, a gallery; and
    :class:`GalleryCorruptError` when it holds a gallery's files without ``current`` or the
    marker, which may be a damaged gallery worth restoring.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _check_creatable(directory, replace)
    fd = acquire_writer_lock(directory)
    try:
        entries = _check_creatable(directory, replace)  # again, now that no one else writes
        _write_marker(directory)
        if CURRENT in entries:
            (directory / CURRENT).unlink()  # from here on the old gallery no longer opens
            fsync_path(directory)
        for name in sorted(entries - {LOCK_FILE, CREATING, CURRENT}):
            path = directory / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        fsync_path(directory)
    except BaseException:
        release_writer_lock(fd)
        raise
    return fd


def _check_creatable(directory: Path, replace: bool) -> set[str]:
    """The directory's entries, if a creation may clear them; raises otherwise."""
    entries = set(os.listdir(directory))
    foreign = sorted(name for name in entries if not _is_gallery_file(name))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise GalleryError(
            f"cannot create a gallery in {directory}: it holds files that are not a "
            f"gallery's ({shown})"
        )
    if replace:
        return entries
    if (directory / CURRENT).is_symlink():
        raise GalleryError(f"cannot create a gallery in {directory}: it already holds one")
    if entries - {LOCK_FILE, CREATING} and CREATING not in entries:
        raise GalleryCorruptError(
            f"{directory} holds a gallery's files but neither a {CURRENT!r} pointer nor the "
            f"{CREATING!r} marker of an interrupted creation, so it may be a damaged gallery and "
            "is left alone: restore it from a backup "
            f"(`gsp index restore BACKUP --gallery {directory} --replace`) or delete it"
        )
    return entries


def finish_creation(directory: Path) -> None:
    """Once ``current`` exists, remove the creation marker: the gallery is complete."""
    if (directory / CURRENT).is_symlink():
        with contextlib.suppress(FileNotFoundError):
            (directory / CREATING).unlink()
            fsync_path(directory)


def clean_stale(directory: Path) -> None:
    """With the writer lock held on a complete gallery: remove what killed saves left, and the
    creation marker when a kill came between ``current`` and the marker's removal."""
    clean_stale_snapshots(directory)
    finish_creation(directory)


def _is_gallery_file(name: str) -> bool:
    return name in _GALLERY_FILES or name.startswith(LINK_PREFIX)


def _write_marker(directory: Path) -> None:
    marker = directory / CREATING
    marker.write_text(f"pid {os.getpid()}\n", encoding="utf-8")
    fsync_path(marker)
    fsync_path(directory)
