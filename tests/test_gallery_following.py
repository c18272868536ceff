"""Readers in other processes: ``Gallery.refresh`` takes in a writer's commits, ``disk_state``
says when to re-open, and ``gsp index publish`` makes whole read-only versions for replicas."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from index.errors import GalleryError, GalleryReadOnlyError
from index.gallery import Gallery, disk_state
from index.layout import DATABASE
from index.publish import gallery_changes, is_publication, publish_gallery, published_gallery
from tests.test_gallery import create, grids, items, unit_vectors

REPO = Path(__file__).resolve().parents[1]


def _top_ids(gallery: Gallery, queries: np.ndarray) -> list[int]:
    return [row[0].id if row else -1 for row in gallery.search(queries, k=1)]


def test_refresh_takes_in_a_writers_adds_and_removes_without_a_snapshot(tmp_path: Path) -> None:
    vectors = unit_vectors(40)
    with create(tmp_path / "g") as writer:
        writer.add(vectors[:10], grids(10), items(0, 10))
        writer.save()
        with Gallery.open(tmp_path / "g", read_only=True) as reader:
            assert not reader.refresh()  # nothing committed since the open
            writer.add(vectors[10:40], grids(30), items(10, 40))  # no save: database only
            assert _top_ids(reader, vectors[35:36]) != [36]
            assert reader.refresh() and len(reader) == 40
            assert _top_ids(reader, vectors[35:36]) == [36]
            writer.remove([36, 3])
            assert reader.refresh() and len(reader) == 38
            assert _top_ids(reader, vectors[35:36]) != [36]
            assert _top_ids(reader, vectors[2:3]) != [3]
            assert not reader.refresh()
            assert _top_ids(reader, vectors) == _top_ids(writer, vectors)
        assert not writer.refresh()  # a writer is its own source of truth


def test_disk_state_changes_with_a_new_snapshot_or_a_rebuilt_database(tmp_path: Path) -> None:
    with create(tmp_path / "g") as writer:
        first = disk_state(tmp_path / "g")
        writer.add(unit_vectors(3), grids(3), items(0, 3))
        assert disk_state(tmp_path / "g") == first  # commits alone: refresh, no re-open
        writer.save()
        assert disk_state(tmp_path / "g") != first
    assert disk_state(tmp_path / "missing") == ("", 0)


def test_publish_makes_whole_immutable_versions_and_keeps_the_previous(tmp_path: Path) -> None:
    vectors = unit_vectors(20)
    with create(tmp_path / "g") as writer:
        writer.add(vectors[:10], grids(10), items(0, 10))  # unsaved: the copy has them all
        first = publish_gallery(tmp_path / "g", tmp_path / "pub")
        writer.add(vectors[10:], grids(10), items(10, 20))
        second = publish_gallery(tmp_path / "g", tmp_path / "pub")
    assert first.copy.items == 10 and second.copy.items == 20
    assert published_gallery(tmp_path / "pub") == second.version
    assert first.version.is_dir()  # a replica that resolved it just before still opens it
    assert is_publication(tmp_path / "pub") and not is_publication(tmp_path / "g")
    for version, count in ((first.version, 10), (second.version, 20)):
        with sqlite3.connect(version / DATABASE) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert not (version / (DATABASE + "-wal")).exists()
        with Gallery.open(version, immutable=True) as replica:
            assert replica.read_only and len(replica) == count
            assert _top_ids(replica, vectors[:count]) == list(range(1, count + 1))
            with pytest.raises(GalleryReadOnlyError):
                replica.remove([1])
    third = publish_gallery(tmp_path / "g", tmp_path / "pub")
    assert not first.version.exists() and second.version.is_dir() and third.version.is_dir()


def test_publish_refuses_a_destination_holding_anything_else(tmp_path: Path) -> None:
    create(tmp_path / "g").close()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(GalleryError, match="something other than publications"):
        publish_gallery(tmp_path / "g", tmp_path / "other")
    with pytest.raises(GalleryError):
        publish_gallery(tmp_path / "g", tmp_path / "g")  # a gallery is no publication
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_gallery_changes_sees_commits_and_snapshots(tmp_path: Path) -> None:
    with create(tmp_path / "g") as writer:
        before = gallery_changes(tmp_path / "g")
        assert gallery_changes(tmp_path / "g") == before
        writer.add(unit_vectors(2), grids(2), items(0, 2))
        assert gallery_changes(tmp_path / "g") != before


def test_the_publish_command(tmp_path: Path) -> None:
    create(tmp_path / "g").close()
    command = [sys.executable, "-m", "app.cli", "index", "publish", "--gallery"]
    done = subprocess.run(
        [*command, str(tmp_path / "g"), str(tmp_path / "pub")],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"published gallery {tmp_path / 'g'} as ")
    assert published_gallery(tmp_path / "pub") is not None
    refused = subprocess.run(
        [*command, str(tmp_path / "g"), str(tmp_path / "g"), "--every", "0"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and "--every must be positive" in refused.stderr
