"""Saves that cost what changed: the index file is carried by hard link until the changes since
it was written pass REWRITE_SHARE of it, and a reopened gallery holds every item either way."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from index.gallery import REWRITE_SHARE, Gallery, ItemInput
from index.layout import IDS_FILE, INDEX_FILE
from index.snapshot import current_snapshot

DIM = 16


def add(gallery: Gallery, start: int, count: int) -> np.ndarray:
    vectors = np.random.default_rng(start).standard_normal((count, DIM)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    items = [
        ItemInput(f"{i}.jpg", hashlib.sha256(b"%d" % i).hexdigest())
        for i in range(start, start + count)
    ]
    gallery.add(vectors, [np.zeros((2, 2), np.float32)] * count, items)
    return vectors


def index_inode(directory: Path) -> int:
    return (current_snapshot(directory) / INDEX_FILE).stat().st_ino


def test_small_saves_carry_the_index_and_a_reopen_replays_the_rest(tmp_path: Path) -> None:
    directory = tmp_path / "gallery"
    gallery = Gallery.create(
        directory, model_fingerprint="m", preprocessing={}, embedding_dim=DIM, index_type="flat"
    )
    add(gallery, 0, 100)
    gallery.save()
    written = index_inode(directory)
    small = int(REWRITE_SHARE * 100)
    later = add(gallery, 100, small)
    gallery.save()
    assert index_inode(directory) == written  # carried: the same file, linked
    assert len(np.load(current_snapshot(directory) / IDS_FILE)) == 100
    gallery.remove([1])
    gallery.save()  # small + 1 changes: more than the share, so the index is written
    assert index_inode(directory) != written
    assert len(np.load(current_snapshot(directory) / IDS_FILE)) == 100 + small - 1
    add(gallery, 1000, 3)
    gallery.save()
    gallery.close()

    with Gallery.open(directory) as reopened:
        assert len(reopened) == 100 + small - 1 + 3
        hits = reopened.search(later, k=1)
        assert [row[0].id for row in hits] == list(range(101, 101 + small))
        assert reopened.find_sha256(hashlib.sha256(b"1001").hexdigest()) is not None
        assert reopened.find_sha256(hashlib.sha256(b"0").hexdigest()) is None  # id 1


def test_a_save_after_a_rebuild_writes_the_new_index(tmp_path: Path) -> None:
    directory = tmp_path / "gallery"
    with Gallery.create(
        directory,
        model_fingerprint="m",
        preprocessing={},
        embedding_dim=DIM,
        large_threshold=1000,
        compact_threshold=1000,
        index_type="auto",
    ) as gallery:
        add(gallery, 0, 990)
        gallery.save()
        add(gallery, 990, 20)  # past large_threshold: rebuilt as an IVF index
        assert gallery.manifest.index_type != "flat"
        gallery.save()
        manifest_type = gallery.manifest.index_type
    with Gallery.open(directory) as reopened:
        assert reopened.manifest.index_type == manifest_type
        assert len(reopened) == 1010
