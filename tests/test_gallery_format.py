"""Format versions: a format-1 gallery (written by the format-1 code, tests/fixtures) opens
read-only, is refused for writing with the command that upgrades it, and that command upgrades
it in place, resumably; newer and foreign formats are refused."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from app.demo.prepare import upgrade_cached
from index.errors import GalleryCorruptError, GalleryFormatError
from index.format import APPLICATION_ID, FORMAT_VERSION, MIGRATIONS
from index.gallery import Gallery, ItemInput
from index.layout import CURRENT, DATABASE, SNAPSHOTS
from index.limits import UNREADABLE_METADATA
from index.manifest import load_manifest
from index.upgrade import upgrade_gallery
from tests.fixtures import make_gallery

FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPO_ROOT = FIXTURES.parents[1]
GSP = Path(sys.executable).parent / "gsp"


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A private copy of the format-1 fixture (opening a gallery may write beside its files)."""
    target = tmp_path / "gallery-v1"
    shutil.copytree(FIXTURES / "gallery-v1", target, symlinks=True)
    return target


def stamps(gallery: Path) -> tuple[int, int]:
    """The database's ``(application_id, user_version)``."""
    with contextlib.closing(sqlite3.connect(gallery / DATABASE)) as db:
        return (
            db.execute("PRAGMA application_id").fetchone()[0],
            db.execute("PRAGMA user_version").fetchone()[0],
        )


def manifest_version(gallery: Path) -> int:
    return load_manifest(gallery)[1].format_version


def contents(gallery: Gallery) -> list[tuple]:
    return [(r.id, r.source, r.label, r.extra) for r in gallery.get_many(range(1, 10))]


def test_new_galleries_carry_the_current_format_in_manifest_and_database(tmp_path: Path) -> None:
    Gallery.create(
        tmp_path / "g", model_fingerprint="m", preprocessing={"image_size": 8}, embedding_dim=4
    ).close()
    assert manifest_version(tmp_path / "g") == FORMAT_VERSION == 1 + len(MIGRATIONS)
    assert stamps(tmp_path / "g") == (APPLICATION_ID, FORMAT_VERSION)


def test_a_format_1_gallery_opens_read_only_and_is_refused_for_writing(
    v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (manifest_version(v1), stamps(v1)) == (1, (0, 0))
    with Gallery.open(v1, read_only=True) as gallery:
        assert len(gallery) == make_gallery.COUNT
        hits = gallery.search(make_gallery.embeddings(), k=1)
        assert [row[0].id for row in hits] == list(range(1, make_gallery.COUNT + 1))
        records = contents(gallery)
    assert records[0] == (1, "img/0.jpg", "even", {"n": 0})
    assert UNREADABLE_METADATA in records[-1][3]  # the item stored nested 500 deep

    with pytest.raises(GalleryFormatError) as refused:
        Gallery.open(v1)
    assert refused.value.command == f"gsp index upgrade --gallery {v1}"
    assert f"`gsp index upgrade --gallery {v1}`" in str(refused.value)

    assert main(["index", "remove", str(v1), "1"]) == 1
    assert f"gsp index upgrade --gallery {v1}" in capsys.readouterr().err
    assert main(["index", "info", str(v1)]) == 0
    info = capsys.readouterr().out
    assert "format_version         1" in info and f"gsp index upgrade --gallery {v1}" in info


def test_the_upgrade_keeps_every_item_and_is_a_no_op_when_rerun(
    v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with Gallery.open(v1, read_only=True) as gallery:
        before = contents(gallery)
    assert main(["index", "upgrade", "--gallery", str(v1)]) == 0
    assert f"upgraded from format 1 to {FORMAT_VERSION}" in capsys.readouterr().out
    assert main(["index", "upgrade", "--gallery", str(v1)]) == 0
    assert "nothing to upgrade" in capsys.readouterr().out
    assert (manifest_version(v1), stamps(v1)) == (FORMAT_VERSION, (APPLICATION_ID, FORMAT_VERSION))
    with Gallery.open(v1, expected_fingerprint=make_gallery.FINGERPRINT) as gallery:
        assert contents(gallery) == before
        hits = gallery.search(make_gallery.embeddings(), k=1)
        assert [row[0].id for row in hits] == list(range(1, make_gallery.COUNT + 1))
        vector = np.eye(make_gallery.DIM, dtype=np.float32)[:1]
        sha = make_gallery.sha256_of(99)
        new_id = gallery.add(vector, [np.ones((3, 3))], [ItemInput("new", sha)]).ids[0]
        gallery.save()
    with Gallery.open(v1) as gallery:
        assert gallery.search(vector, k=1)[0][0].id == new_id == make_gallery.COUNT + 1


def test_an_upgrade_stopped_between_database_and_manifest_is_finished_by_a_rerun(
    v1: Path,
) -> None:
    step = MIGRATIONS[0]
    with contextlib.closing(sqlite3.connect(v1 / DATABASE, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        step.database(db)
        db.execute(f"PRAGMA user_version = {step.target}")
        db.execute("COMMIT")
    assert (manifest_version(v1), stamps(v1)[1]) == (1, 2)
    with Gallery.open(v1, read_only=True) as gallery:
        assert len(gallery) == make_gallery.COUNT
    with pytest.raises(GalleryFormatError, match="has format 1"):
        Gallery.open(v1)
    report = upgrade_gallery(v1)
    assert (report.from_version, report.to_version) == (1, FORMAT_VERSION)
    assert report.steps == tuple(step.summary for step in MIGRATIONS)
    Gallery.open(v1).close()


def test_the_sha256_runs_step_keeps_dedupe_and_never_reuses_an_id(v1: Path) -> None:
    last = make_gallery.COUNT
    with contextlib.closing(sqlite3.connect(v1 / DATABASE, isolation_level=None)) as db:
        db.execute("DELETE FROM items WHERE id = ?", (last,))  # the highest id, gone
    upgrade_gallery(v1)
    with contextlib.closing(sqlite3.connect(v1 / DATABASE)) as db:
        indexes = db.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'items'").fetchall()
        assert ("sqlite_autoindex_items_1",) not in indexes
    with Gallery.open(v1) as gallery:
        assert gallery.find_sha256(make_gallery.sha256_of(0)) == 1
        assert gallery.find_sha256(make_gallery.sha256_of(last - 1)) is None
        vectors = np.eye(make_gallery.DIM, dtype=np.float32)[:2]
        items = [ItemInput("old", make_gallery.sha256_of(0)), ItemInput("new", "ab" * 32)]
        result = gallery.add(vectors, [np.ones((3, 3))] * 2, items)
        assert result.duplicates == [0]
        assert result.ids == [1, last + 1]


def _stamped(gallery: Path) -> bool:
    try:
        return stamps(gallery)[1] >= 2
    except sqlite3.OperationalError:  # the upgrade holds the write lock this moment
        return False


def _upgrade_stages(gallery: Path) -> dict[str, Callable[[], bool]]:
    start = os.readlink(gallery / CURRENT)
    snapshots = len(list((gallery / SNAPSHOTS).iterdir()))
    return {
        "database stamped": lambda: _stamped(gallery),
        "new snapshot begun": lambda: len(list((gallery / SNAPSHOTS).iterdir())) > snapshots,
        "current moved": lambda: os.readlink(gallery / CURRENT) != start,
    }


@pytest.mark.parametrize("stage", ["database stamped", "new snapshot begun", "current moved"])
def test_an_upgrade_killed_at_any_stage_opens_and_finishes_when_rerun(
    stage: str, v1: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reached = _upgrade_stages(v1)[stage]
    process = subprocess.Popen(
        [str(GSP), "index", "upgrade", "--gallery", str(v1)], stdout=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while process.poll() is None and not reached():
        assert time.monotonic() < deadline
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()
    with Gallery.open(v1, read_only=True) as gallery:  # whatever the kill left opens
        assert len(gallery) == make_gallery.COUNT
    assert main(["index", "upgrade", "--gallery", str(v1)]) == 0
    capsys.readouterr()
    assert (manifest_version(v1), stamps(v1)) == (FORMAT_VERSION, (APPLICATION_ID, FORMAT_VERSION))
    with Gallery.open(v1) as gallery:
        assert len(gallery) == make_gallery.COUNT


def test_newer_and_foreign_formats_are_refused(tmp_path: Path) -> None:
    gallery = tmp_path / "g"
    Gallery.create(gallery, model_fingerprint="m", preprocessing={}, embedding_dim=4).close()
    with contextlib.closing(sqlite3.connect(gallery / DATABASE)) as db:
        db.execute(f"PRAGMA user_version = {FORMAT_VERSION + 1}")
    for read_only in (True, False):
        with pytest.raises(GalleryFormatError, match="newer than this gsp-retrieval reads"):
            Gallery.open(gallery, read_only=read_only)
    with pytest.raises(GalleryFormatError, match="newer"):
        upgrade_gallery(gallery)
    with contextlib.closing(sqlite3.connect(gallery / DATABASE)) as db:
        db.execute("PRAGMA application_id = 1234")
    with pytest.raises(GalleryCorruptError, match="not a gsp gallery's"):
        Gallery.open(gallery, read_only=True)


def test_the_fixture_script_writes_the_current_format(tmp_path: Path) -> None:
    """What freezes the current format as the next fixture when the format changes."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    script = FIXTURES / "make_gallery.py"
    subprocess.run([sys.executable, str(script), str(tmp_path / "g")], check=True, env=env)
    assert manifest_version(tmp_path / "g") == FORMAT_VERSION
    with Gallery.open(tmp_path / "g", read_only=True) as gallery:
        assert len(gallery) == make_gallery.COUNT


def test_the_demo_upgrades_a_gallery_an_older_version_cached(v1: Path, tmp_path: Path) -> None:
    upgrade_cached(tmp_path / "nothing-cached-yet")
    assert not (tmp_path / "nothing-cached-yet").exists()
    upgrade_cached(v1)
    Gallery.open(v1).close()
