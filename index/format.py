"""The gallery's on-disk format: its version, which versions this code opens, and the steps
that upgrade older galleries (``gsp index upgrade``, carried out by :mod:`index.upgrade`).

Two parts carry the version: the snapshot's manifest (``format_version``) and the database
(SQLite ``user_version``, beside an ``application_id`` that marks it as a gsp gallery's).

Changing what is on disk means one new :class:`Migration` at the end of ``MIGRATIONS``, which
raises ``FORMAT_VERSION`` by one; the upgrade command then runs it. Keep the previous version
in ``READ_COMPATIBLE`` only if the new code still reads the old layout; a writer always needs
the current format.

History:

1. the first format (the database unstamped);
2. the database stamped with ``application_id`` and ``user_version``;
3. sha256 lookups through sorted runs (:mod:`index.sha_runs`) instead of a unique index,
   whose random updates made adding cost grow with the gallery.
"""

from __future__ import annotations

import shlex
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from index.errors import GalleryCorruptError, GalleryFormatError
from index.sha_runs import write_first_run

__all__ = [
    "APPLICATION_ID",
    "FORMAT_VERSION",
    "MIGRATIONS",
    "READ_COMPATIBLE",
    "Migration",
    "check_openable",
    "check_readable",
    "database_format",
    "upgrade_command",
]

# "GSPR": SQLite keeps it in the file header, so tools (``file``) and this code can tell a
# gallery's database from any other SQLite file.
APPLICATION_ID = 0x47535052


@dataclass(frozen=True)
class Migration:
    """The step from format ``target - 1`` to ``target``.

    ``database`` changes the database inside the one transaction that also records ``target``
    as its ``user_version``, so a step whose transaction committed is never run twice. The
    manifest is then rewritten with the new version as a fresh snapshot (index files carried
    over), which completes the step; a kill anywhere in between leaves a gallery that the
    upgrade command, run again, finishes.
    """

    target: int
    summary: str
    database: Callable[[sqlite3.Connection], None]


def _stamp_application_id(db: sqlite3.Connection) -> None:
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")


_ITEMS_COLUMNS = (
    "id, source, sha256, label, added_at, extra, embedding, weights, weights_h, weights_w"
)


def _sha256_runs(db: sqlite3.Connection) -> None:
    """Rebuild ``items`` without its unique sha256 index (SQLite cannot drop it in place),
    keeping the id sequence so ids stay never reused, and write the runs."""
    sequence = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
    db.execute(
        "CREATE TABLE items_v3 (id INTEGER PRIMARY KEY AUTOINCREMENT, source TEXT NOT NULL,"
        " sha256 TEXT NOT NULL, label TEXT, added_at TEXT NOT NULL, extra TEXT NOT NULL,"
        " embedding BLOB NOT NULL, weights BLOB NOT NULL, weights_h INTEGER NOT NULL,"
        " weights_w INTEGER NOT NULL)"
    )
    db.execute(f"INSERT INTO items_v3 ({_ITEMS_COLUMNS}) SELECT {_ITEMS_COLUMNS} FROM items")
    db.execute("DROP TABLE items")
    db.execute("ALTER TABLE items_v3 RENAME TO items")
    db.execute("CREATE INDEX items_label ON items(label)")
    if sequence is not None:
        db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'items'", (sequence[0],))
    write_first_run(db)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "stamp the database as a gsp gallery's", _stamp_application_id),
    Migration(3, "look sha256 up in sorted runs, not a unique index", _sha256_runs),
)
FORMAT_VERSION = 1 + len(MIGRATIONS)
# Older formats this code still opens read-only (a writer needs FORMAT_VERSION).
READ_COMPATIBLE = frozenset({1, 2})


def upgrade_command(directory: Path) -> str:
    return f"gsp index upgrade --gallery {shlex.quote(str(directory))}"


def database_format(db: sqlite3.Connection) -> int:
    """The format a gallery database records; format 1 recorded none."""
    application_id = db.execute("PRAGMA application_id").fetchone()[0]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if application_id == APPLICATION_ID:
        return int(version)
    if application_id == 0 and version == 0:
        return 1
    raise GalleryCorruptError(
        f"the database is not a gsp gallery's (SQLite application_id {application_id:#x})"
    )


def check_readable(directory: Path, version: object) -> int:
    """The manifest's format version, if this code knows it; raises otherwise."""
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise GalleryCorruptError(f"gallery {directory}: format version {version!r} is invalid")
    if version > FORMAT_VERSION:
        raise GalleryFormatError(
            f"gallery {directory} has format {version}, newer than this gsp-retrieval reads "
            f"(up to {FORMAT_VERSION}): open it with the newer version that wrote it"
        )
    return version


def check_openable(
    directory: Path, manifest_version: int, database_version: int, *, writable: bool
) -> None:
    """Refuse a gallery this code cannot open as asked, naming the command that upgrades it.

    The older of the two parts decides: after a kill during an upgrade the database may be a
    step ahead of the manifest, and the upgrade command finishes the step.
    """
    check_readable(directory, database_version)
    oldest = min(manifest_version, database_version)
    if oldest == FORMAT_VERSION or (not writable and oldest in READ_COMPATIBLE):
        return
    command = upgrade_command(directory)
    use = "written" if writable else "read"
    raise GalleryFormatError(
        f"gallery {directory} has format {oldest} and cannot be {use} by this gsp-retrieval "
        f"(format {FORMAT_VERSION}): upgrade it in place with `{command}` (safe to rerun if "
        f"interrupted; `gsp index backup --gallery {shlex.quote(str(directory))} DEST` keeps "
        "a copy first)",
        command,
    )
