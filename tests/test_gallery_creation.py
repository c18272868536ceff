"""Atomic gallery creation: a kill at any moment of a build leaves either no gallery (a rerun
starts it again) or one that opens and that a rerun completes; nothing is ever wedged."""

from __future__ import annotations

import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from app.cli import main
from index.errors import GalleryCorruptError, GalleryError, GalleryNotFoundError
from index.gallery import Gallery
from index.layout import CREATING, CURRENT, DATABASE, LOCK_FILE, SNAPSHOTS
from tests.conftest import write_images
from tests.test_gallery import create, grids, items, unit_vectors

GSP = Path(sys.executable).parent / "gsp"
IMAGES = 12


def stored_items(gallery: Path) -> int:
    """Items the gallery's database has committed, read as another process would."""
    try:
        uri = f"file:{gallery / DATABASE}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            return int(db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
    except sqlite3.Error:  # not created yet, or its table not yet
        return 0


def complete_with(minimum: int) -> Callable[[Path], bool]:
    return lambda g: (g / CURRENT).is_symlink() and stored_items(g) >= minimum


# The stages of a build, as the directory shows them, in the order a build passes them (the
# lock file and the creation marker come microseconds apart, too close to tell by polling).
STAGES: dict[str, Callable[[Path], bool]] = {
    "lock file made": lambda g: (g / LOCK_FILE).exists(),
    "database created": lambda g: (g / DATABASE).exists(),
    "first snapshot begun": lambda g: (g / SNAPSHOTS).exists(),
    "current pointer set": lambda g: (g / CURRENT).is_symlink(),
    "half the images committed": complete_with(IMAGES // 2),
}


def kill_when(command: list[str], gallery: Path, reached: Callable[[Path], bool]) -> None:
    """Start ``command``, poll the gallery directory and SIGKILL the process once ``reached``."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    try:
        while not (gallery.is_dir() and reached(gallery)):
            if process.poll() is not None:
                pytest.fail(f"it ended before the stage: {process.stderr.read().decode()}")
            assert time.monotonic() < deadline, "the stage never came"
            time.sleep(0.0002)
        process.send_signal(signal.SIGKILL)
        assert process.wait() == -signal.SIGKILL  # killed, not finished
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_a_build_killed_at_any_stage_leaves_a_gallery_that_opens_or_none_and_reruns(
    stage: str, tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    write_images(images, range(IMAGES))
    gallery = tmp_path / "g"
    build = [
        "index", "build", "--images", str(images), "--out", str(gallery),
        "--checkpoint", str(checkpoint), "--batch-size", "1", "--workers", "0", "--no-progress",
    ]  # fmt: skip
    kill_when([str(GSP), *build], gallery, STAGES[stage])
    committed = stored_items(gallery)

    if main(["index", "info", str(gallery)]) == 0:  # a gallery: it opens for writing too
        with Gallery.open(gallery) as reopened:
            assert len(reopened) == committed
    else:  # no gallery yet, and said so
        assert "creation has not finished" in capsys.readouterr().err
        assert committed == 0
    capsys.readouterr()

    assert main(build) == 0
    report = capsys.readouterr().out
    assert f"{IMAGES - committed} indexed, {committed} already in the gallery" in report
    assert main(["index", "info", str(gallery), "--json"]) == 0
    assert f'"items": {IMAGES},' in capsys.readouterr().out
    assert not (gallery / CREATING).exists()
    assert not [p for p in (gallery / SNAPSHOTS).iterdir() if p.name.startswith(".")]


def test_an_interrupted_creation_is_named_and_cleared_by_the_next(tmp_path: Path) -> None:
    gallery = tmp_path / "g"
    gallery.mkdir()
    (gallery / LOCK_FILE).touch()  # what a kill right after the lock left
    with pytest.raises(GalleryNotFoundError, match="creation has not finished"):
        Gallery.open(gallery, read_only=True)
    (gallery / CREATING).touch()
    (gallery / DATABASE).write_bytes(b"half a database")
    (gallery / SNAPSHOTS / ".tmp-1-x").mkdir(parents=True)
    with pytest.raises(GalleryNotFoundError, match="creation has not finished"):
        Gallery.open(gallery)
    with create(gallery) as created:
        created.add(unit_vectors(2), grids(2), items(0, 2))
        created.save()
    assert sorted(p.name for p in gallery.iterdir()) == [CURRENT, DATABASE, SNAPSHOTS, LOCK_FILE]
    with Gallery.open(gallery) as reopened:
        assert len(reopened) == 2


def test_creation_refuses_what_it_did_not_leave(tmp_path: Path) -> None:
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"a user's file")
    with pytest.raises(GalleryError, match=r"not a gallery's \(cat.jpg\)"):
        create(foreign)
    assert [p.name for p in foreign.iterdir()] == ["cat.jpg"]

    with create(tmp_path / "g") as gallery:
        gallery.add(unit_vectors(3), grids(3), items(0, 3))
        gallery.save()
    with pytest.raises(GalleryError, match="already holds one"):
        create(tmp_path / "g")
    (tmp_path / "g" / CURRENT).unlink()  # damaged: data, but neither pointer nor marker
    with pytest.raises(GalleryCorruptError, match="may be a damaged gallery"):
        create(tmp_path / "g")
    assert stored_items(tmp_path / "g") == 3  # left alone for a restore
