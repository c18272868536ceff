"""Backup and restore: a consistent copy of a gallery, taken while another process writes it,
that is itself a gallery; restore into a new directory or over a gallery; kills leave nothing
that a rerun cannot finish."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from app.cli import main
from index.backup import copy_gallery
from index.errors import GalleryError, GalleryLockedError, GalleryNotFoundError
from index.gallery import Gallery, ItemInput
from index.layout import CREATING, CURRENT, FAILURES_FILE, SNAPSHOTS, UPLOADS
from tests.test_gallery import _SAVER, DIM, REPO_ROOT, create, grids, items, unit_vectors
from tests.test_gallery_creation import stored_items

GSP = Path(sys.executable).parent / "gsp"


def served_gallery(directory: Path, count: int = 20) -> list[int]:
    """A gallery as the service leaves it: uploaded images under ``uploads/``, one of them
    still being written, and a failure report beside it."""
    uploads = directory / UPLOADS
    inputs = []
    with create(directory) as gallery:
        uploads.mkdir()
        for item in items(0, count, lambda i: "odd" if i % 2 else "even"):
            (uploads / f"{item.sha256}.png").write_bytes(item.sha256.encode())
            inputs.append(ItemInput(f"uploads/{item.sha256}.png", item.sha256, item.label))
        ids = gallery.add(unit_vectors(count), grids(count), inputs).ids
        gallery.save()
    (uploads / ".next.png.123.partial").write_bytes(b"half")
    (directory / FAILURES_FILE).write_text("{}\n")
    return ids


def snapshot_of(gallery: Gallery) -> list[tuple]:
    return [(r.id, r.source, r.label, r.sha256) for r in gallery.get_many(range(1, 10_000))]


def test_a_backup_is_a_gallery_and_restores_into_new_or_replaced_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, backup = tmp_path / "g", tmp_path / "backups" / "monday"
    served_gallery(source)
    with Gallery.open(source, read_only=True) as gallery:
        before = snapshot_of(gallery)
    assert main(["index", "backup", "--gallery", str(source), str(backup)]) == 0
    assert "20 items, 20 uploaded images" in capsys.readouterr().out
    assert sorted(p.name for p in (backup / UPLOADS).iterdir()) == sorted(
        p.name for p in (source / UPLOADS).iterdir() if not p.name.startswith(".")
    )
    assert not (backup / FAILURES_FILE).exists() and not (backup / CREATING).exists()
    with Gallery.open(backup, read_only=True) as copy:
        assert snapshot_of(copy) == before
        assert copy.search(unit_vectors(20)[3:4], k=1)[0][0].id == 4

    with Gallery.open(source) as gallery:  # the original moves on after the backup
        gallery.remove([1, 2])
        gallery.add(unit_vectors(1, seed=9), grids(1), items(50, 51))
        gallery.save()
    assert main(["index", "restore", str(backup), "--gallery", str(source)]) == 1
    assert "--replace" in capsys.readouterr().err
    assert main(["index", "restore", str(backup), "--gallery", str(source), "--replace"]) == 0
    with Gallery.open(source) as restored:
        assert snapshot_of(restored) == before
        assert (source / restored.get(4).source).read_bytes() == restored.get(4).sha256.encode()
    assert main(["index", "restore", str(backup), "--gallery", str(tmp_path / "fresh")]) == 0
    with Gallery.open(tmp_path / "fresh", read_only=True) as fresh:
        assert snapshot_of(fresh) == before


def test_copies_are_refused_where_they_would_destroy_or_recurse(tmp_path: Path) -> None:
    source = tmp_path / "g"
    served_gallery(source, count=3)
    with pytest.raises(GalleryError, match="one holds the other"):
        copy_gallery(source, source / "backup")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"a user's file")
    with pytest.raises(GalleryError, match="not a gallery's"):
        copy_gallery(source, tmp_path / "photos")
    with pytest.raises(GalleryNotFoundError):  # not a backup: the gallery is left as it was
        copy_gallery(tmp_path / "nothing", source, replace=True)
    with Gallery.open(source) as gallery:
        copy_gallery(source, tmp_path / "other")  # a backup while a writer holds it is fine
        with pytest.raises(GalleryLockedError):  # a restore over it is not
            copy_gallery(tmp_path / "other", source, replace=True)
        assert len(gallery) == 3


def test_backups_taken_while_another_process_writes_are_consistent(tmp_path: Path) -> None:
    source = tmp_path / "g"
    start = 2000
    with create(source) as gallery:
        gallery.add(unit_vectors(start), grids(start), items(0, start))
        gallery.save()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    writer = subprocess.Popen(
        [sys.executable, "-c", _SAVER.format(dim=DIM), str(source)],
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert writer.stdout.readline() == b"saving\n"
        counts = []
        for number in range(3):
            backup = tmp_path / f"backup-{number}"
            report = copy_gallery(source, backup)
            with Gallery.open(backup) as copy:  # reconciles its index with its database
                assert len(copy) == report.items == stored_items(backup) > start
                latest = report.items  # ids are 1, 2, ... and the writer never removes
                queries = np.stack([copy.embedding(latest), unit_vectors(start)[7]])
                assert [row[0].id for row in copy.search(queries, k=1)] == [latest, 8]
            counts.append(report.items)
            time.sleep(0.2)
        assert counts == sorted(counts) and counts[-1] > counts[0]  # the writer kept going
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    assert (
        main(
            ["index", "restore", str(tmp_path / "backup-1"), "--gallery", str(source), "--replace"]
        )
        == 0
    )
    with Gallery.open(source) as restored:
        assert len(restored) == counts[1]


@pytest.mark.parametrize("stage", ["lock file made", "database copied", "snapshot begun"])
def test_a_backup_killed_at_any_stage_is_finished_by_a_rerun(stage: str, tmp_path: Path) -> None:
    source, backup = tmp_path / "g", tmp_path / "b"
    served_gallery(source, count=200)
    reached = {
        "lock file made": lambda: (backup / "writer.lock").exists(),
        "database copied": lambda: stored_items(backup) > 0,
        "snapshot begun": lambda: (backup / SNAPSHOTS).exists(),
    }[stage]
    process = subprocess.Popen([str(GSP), "index", "backup", "--gallery", str(source), str(backup)])
    deadline = time.monotonic() + 120
    while process.poll() is None and not reached():
        assert time.monotonic() < deadline
    process.send_signal(signal.SIGKILL)
    process.wait()
    if not (backup / CURRENT).is_symlink():  # else the kill came after the copy was complete
        with pytest.raises(GalleryNotFoundError, match="creation has not finished"):
            Gallery.open(backup, read_only=True)
        assert main(["index", "backup", "--gallery", str(source), str(backup)]) == 0
    with Gallery.open(backup) as copy:
        assert len(copy) == 200
    assert not (backup / CREATING).exists()
