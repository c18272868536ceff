"""The service's coalesced snapshots: an acknowledged write is durable without one."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.service.main import create_app
from app.service.store import GalleryStore
from index.gallery import IDS_FILE, Gallery
from index.manifest import load_manifest
from index.snapshot import CURRENT, current_snapshot
from tests.test_service_support import API_KEY, ServiceAssets, png_bytes

AUTH = {"X-API-Key": API_KEY}


@pytest.fixture
def own_gallery(service_assets: ServiceAssets, tmp_path: Path) -> Path:
    """A private copy of the service's gallery, so writes here leave other tests' data alone."""
    target = tmp_path / "gallery"
    shutil.copytree(service_assets.gallery_full, target, symlinks=True)
    return target


def saved_count(gallery: Path) -> int:
    """The item count the current snapshot records (its index files may be carried from an
    earlier snapshot, see ``index.gallery.REWRITE_SHARE``; the database holds the items)."""
    return load_manifest(gallery)[1].count


def _upload(client: TestClient, colour: tuple[int, int, int]) -> dict:
    files = [("images", ("c.png", png_bytes(Image.new("RGB", (64, 64), colour)), "image/png"))]
    response = client.post("/v1/gallery", files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()["items"][0]


def test_an_acknowledged_add_survives_a_restart_without_a_snapshot(
    service_assets: ServiceAssets, own_gallery: Path
) -> None:
    snapshot_before = os.readlink(own_gallery / CURRENT)
    with TestClient(create_app(service_assets.settings(gallery=own_gallery))) as client:
        added = _upload(client, (250, 240, 10))
        # No snapshot was written for this add (the policy defers it) ...
        assert os.readlink(own_gallery / CURRENT) == snapshot_before
        saved_ids = np.load(current_snapshot(own_gallery) / IDS_FILE)
        assert added["id"] not in saved_ids
        # ... yet what is on disk now, opened as a restarted process would, has the item,
        # searchable through the index rebuilt from the database.
        with Gallery.open(own_gallery, read_only=True) as restarted:
            record = restarted.get(added["id"])
            assert record is not None and record.sha256 == added["sha256"]
            embedding = restarted.embedding(added["id"])
            assert restarted.search(embedding[None], k=1)[0][0].id == added["id"]
        deleted = client.delete(f"/v1/gallery/{added['id']}", headers=AUTH)
        assert deleted.status_code == 200
        with Gallery.open(own_gallery, read_only=True) as restarted:
            assert restarted.get(added["id"]) is None
            assert all(m.id != added["id"] for m in restarted.search(embedding[None], k=3)[0])
    # Shutdown writes the pending snapshot.
    assert os.readlink(own_gallery / CURRENT) != snapshot_before
    assert added["id"] not in np.load(current_snapshot(own_gallery) / IDS_FILE)


def test_snapshots_are_written_every_n_writes_and_after_the_interval(
    service_assets: ServiceAssets, own_gallery: Path
) -> None:
    with Gallery.open(own_gallery, read_only=True) as gallery:
        manifest = gallery.manifest
    store = GalleryStore(
        own_gallery,
        model_fingerprint=manifest.model_fingerprint,
        preprocessing=manifest.preprocessing,
        image_roots=[],
        save_every=2,
        save_interval=3600,
    )

    def remove(item_id: int) -> None:
        def write(gallery: Gallery) -> None:  # what the API's delete does
            assert gallery.remove([item_id]) == 1
            gallery.save()

        store.call(write)

    try:
        first = os.readlink(own_gallery / CURRENT)
        count = saved_count(own_gallery)
        remove(1)
        assert store.unsaved_writes == 1 and os.readlink(own_gallery / CURRENT) == first
        remove(2)
        assert store.unsaved_writes == 0
        second = os.readlink(own_gallery / CURRENT)
        assert second != first
        assert saved_count(own_gallery) == count - 2
        store.save_interval = 0.05
        remove(3)
        deadline = time.monotonic() + 10
        while store.unsaved_writes and time.monotonic() < deadline:
            time.sleep(0.02)
            store.call(len)  # the timer's flush runs on the gallery thread; queue behind it
        assert store.unsaved_writes == 0 and os.readlink(own_gallery / CURRENT) != second
        assert saved_count(own_gallery) == count - 3
    finally:
        store.close()


def test_bad_save_policy_is_rejected(own_gallery: Path) -> None:
    with pytest.raises(ValueError, match="save_every"):
        GalleryStore(
            own_gallery, model_fingerprint="x", preprocessing={}, image_roots=[], save_every=0
        )


def test_the_snapshot_cadence_comes_from_the_settings(
    service_assets: ServiceAssets, own_gallery: Path
) -> None:
    settings = service_assets.settings(gallery=own_gallery, gallery_save_every=1)
    with TestClient(create_app(settings)) as client:
        snapshot_before = os.readlink(own_gallery / CURRENT)
        count = saved_count(own_gallery)
        _upload(client, (10, 240, 250))
        assert os.readlink(own_gallery / CURRENT) != snapshot_before  # written at once
        assert saved_count(own_gallery) == count + 1
