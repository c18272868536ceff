"""``gsp index upgrade``: bring a gallery in an older on-disk format to the current one, in place.

Each step of :data:`index.format.MIGRATIONS` that the gallery lacks runs under the writer lock:
first its database part, in one transaction that also records the step's version, then a new
snapshot whose manifest carries that version (the index files are carried over unchanged). Both
are atomic, and the database part is skipped when the database already records the version,
so a kill at any moment leaves a gallery that opens (read-only in its older format, or in the
newer one) and that the command, run again, finishes.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from index.format import FORMAT_VERSION, MIGRATIONS, Migration, check_readable, database_format
from index.layout import (
    DATABASE,
    MANIFEST,
    acquire_writer_lock,
    clean_stale,
    release_writer_lock,
)
from index.manifest import Manifest, load_manifest, utc_now
from index.snapshot import carry_files, write_snapshot

__all__ = ["UpgradeReport", "upgrade_gallery"]


@dataclass(frozen=True)
class UpgradeReport:
    """``steps`` are the summaries of the steps this run completed (none when up to date)."""

    directory: Path
    from_version: int
    to_version: int
    steps: tuple[str, ...]

    def summary(self) -> str:
        if not self.steps:
            return f"gallery {self.directory} is in format {self.to_version}: nothing to upgrade"
        done = "; ".join(self.steps)
        return (
            f"gallery {self.directory} upgraded from format {self.from_version} to "
            f"{self.to_version} ({done})"
        )


def upgrade_gallery(directory: str | os.PathLike[str]) -> UpgradeReport:
    """Run the upgrade steps the gallery lacks; safe to rerun, and a no-op when up to date.

    Raises :class:`~index.errors.GalleryLockedError` while another process writes the gallery
    (readers may keep it open) and :class:`~index.errors.GalleryFormatError` for a format newer
    than this code's.
    """
    path = Path(directory)
    load_manifest(path)  # a missing gallery is named before any lock file is made
    lock_fd = acquire_writer_lock(path)
    try:
        clean_stale(path)
        snapshot, manifest = load_manifest(path)
        db = sqlite3.connect(f"file:{path / DATABASE}?mode=rw", uri=True, isolation_level=None)
        try:
            stored = check_readable(path, database_format(db))
            start = min(manifest.format_version, stored)
            done = []
            for step in MIGRATIONS:
                if step.target <= start:
                    continue
                if stored < step.target:
                    _migrate_database(db, step)
                    stored = step.target
                if manifest.format_version < step.target:
                    manifest.format_version = step.target
                    manifest.updated_at = utc_now()
                    snapshot = _rewrite_manifest(path, snapshot, manifest)
                done.append(step.summary)
        finally:
            db.close()
    finally:
        release_writer_lock(lock_fd)
    return UpgradeReport(path, start, FORMAT_VERSION, tuple(done))


def _migrate_database(db: sqlite3.Connection, step: Migration) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        step.database(db)
        db.execute(f"PRAGMA user_version = {int(step.target)}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _rewrite_manifest(directory: Path, snapshot: Path, manifest: Manifest) -> Path:
    """A new current snapshot: the old one's files (hard-linked where the file system allows;
    snapshot files are never modified) and the new manifest."""

    def write(tmp: Path) -> None:
        carry_files(snapshot, tmp, leave=frozenset({MANIFEST}))
        (tmp / MANIFEST).write_text(manifest.to_json(), encoding="utf-8")

    return write_snapshot(directory, write)
