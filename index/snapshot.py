"""Atomic snapshots of a directory's derived files behind a ``current`` symlink.

A save writes a fresh temporary directory, fsyncs every file and the directory, renames it to a
new snapshot name (rename onto a name that does not exist is atomic) and then swaps the
``current`` symlink with ``os.replace``. A kill at any moment therefore leaves ``current``
pointing at a complete snapshot: either the previous one or the new one.

Snapshot files are never modified after the rename, so a save whose files did not change
carries them into the new snapshot by hard link (:func:`carry_files`): its cost is that of what
changed, not of the whole directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from index.errors import GalleryCorruptError, GalleryNotFoundError

__all__ = [
    "CURRENT",
    "LINK_PREFIX",
    "SNAPSHOTS",
    "carry_files",
    "clean_stale",
    "current_snapshot",
    "fsync_path",
    "write_snapshot",
]

CURRENT = "current"
SNAPSHOTS = "snapshots"
# The new ``current`` link is made under this prefix beside it, then renamed over it.
LINK_PREFIX = f".{CURRENT}-"
_TMP_PREFIX = ".tmp-"
# The previous snapshot is kept so a reader that resolved ``current`` just before a swap can still
# open its files.
_KEEP = 2


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def current_snapshot(directory: Path) -> Path:
    """The snapshot directory ``current`` points at; raises when there is none or it is dangling."""
    pointer = directory / CURRENT
    if not pointer.is_symlink():
        if not directory.exists():
            raise GalleryNotFoundError(f"no gallery at {directory}: the directory does not exist")
        raise GalleryNotFoundError(f"no gallery at {directory}: {CURRENT!r} pointer is missing")
    target = directory / os.readlink(pointer)
    if not target.is_dir():
        raise GalleryCorruptError(f"gallery {directory}: {CURRENT!r} points at missing {target}")
    return target


def carry_files(snapshot: Path, tmp: Path, *, leave: frozenset[str] = frozenset()) -> None:
    """Put ``snapshot``'s files, except those named in ``leave``, into the snapshot being written
    in ``tmp``: hard links where the file system allows, copies elsewhere."""
    for source in snapshot.iterdir():
        if source.name in leave or not source.is_file():
            continue
        try:
            os.link(source, tmp / source.name)
        except OSError:
            shutil.copyfile(source, tmp / source.name)


def write_snapshot(directory: Path, write_files: Callable[[Path], None]) -> Path:
    """Write a new snapshot with ``write_files(tmp_dir)`` and make it current atomically."""
    snapshots = directory / SNAPSHOTS
    snapshots.mkdir(parents=True, exist_ok=True)
    tmp = snapshots / f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        write_files(tmp)
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_path(tmp)
        final = snapshots / f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}"
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(snapshots)
    link = directory / f"{LINK_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    link.symlink_to(Path(SNAPSHOTS) / final.name)
    os.replace(link, directory / CURRENT)
    fsync_path(directory)
    _prune(snapshots, keep=final)
    return final


def _snapshot_dirs(snapshots: Path) -> list[Path]:
    return sorted(p for p in snapshots.iterdir() if p.is_dir() and not p.name.startswith("."))


def _prune(snapshots: Path, keep: Path) -> None:
    """Delete snapshots older than the newest ``_KEEP`` (never the one just made current)."""
    for old in _snapshot_dirs(snapshots)[:-_KEEP]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)


def clean_stale(directory: Path) -> None:
    """Remove temporaries left by killed saves (only those whose writing process is gone)."""
    candidates = [
        *directory.glob(f"{LINK_PREFIX}*"),
        *(directory / SNAPSHOTS).glob(f"{_TMP_PREFIX}*"),
    ]
    for path in candidates:
        parts = path.name.lstrip(".").split("-")
        pid = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
        if pid is not None and _pid_alive(pid):
            continue
        if path.is_symlink() or path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        else:
            shutil.rmtree(path, ignore_errors=True)
    current = directory / CURRENT
    if current.is_symlink() and (directory / SNAPSHOTS).is_dir():
        _prune(directory / SNAPSHOTS, keep=directory / os.readlink(current))
