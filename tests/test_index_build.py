"""The bulk indexing job on real files: formats, bad files, duplicates, labels, resume."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.build import build_gallery
from index.gallery import Gallery
from tests.conftest import gallery_of_another_model, image_bytes, write_images

FORMATS = {
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
    "tif": "TIFF",
    "gif": "GIF",
}


class ForwardCounter:
    """Counts the images each ``EmbeddingNet.forward`` call embeds; can interrupt a run."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, interrupt_on_call: int | None = None):
        from model.net import EmbeddingNet

        self.images = 0
        self.calls = 0
        original = EmbeddingNet.forward

        def counted(net, images, *args, **kwargs):
            self.calls += 1
            if self.calls == interrupt_on_call:
                raise KeyboardInterrupt
            self.images += len(images)
            return original(net, images, *args, **kwargs)

        monkeypatch.setattr(EmbeddingNet, "forward", counted)


def test_every_format_is_indexed_and_every_bad_file_reported(
    tmp_path: Path, checkpoint: Path
) -> None:
    images = tmp_path / "images"
    for number, (ext, fmt) in enumerate(FORMATS.items()):
        write_images(images / "good", range(number, number + 1), ext, fmt)
    (images / "good" / "copy.JPG").write_bytes(image_bytes(0, "JPEG"))  # same bytes as 0000.jpg
    bad = images / "bad"
    bad.mkdir()
    (bad / "empty.jpg").write_bytes(b"")
    full = image_bytes(99, "JPEG", size=(200, 160))
    (bad / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (bad / "text.jpg").write_text("this is not an image\n")
    ico = io.BytesIO()
    Image.new("RGB", (16, 16)).save(ico, "ICO")
    (bad / "icon.png").write_bytes(ico.getvalue())
    (images / "notes.txt").write_text("ignored: not an image extension")

    report = build_gallery(
        images, checkpoint, tmp_path / "g", batch_size=4, workers=0, progress=False
    )

    assert (report.total_files, report.indexed, report.duplicates, report.failed) == (13, 8, 1, 4)
    reasons = {
        Path(line["path"]).name: line["reason"]
        for line in map(json.loads, report.failures_path.read_text().splitlines())
    }
    assert set(reasons) == {"empty.jpg", "truncated.jpg", "text.jpg", "icon.png"}
    assert "empty" in reasons["empty.jpg"]
    assert "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["text.jpg"]
    assert "unsupported image format ICO" in reasons["icon.png"]
    with Gallery.open(tmp_path / "g") as gallery:
        assert len(gallery) == 8
        record = gallery.get(1)
        assert record.weights.ndim == 2 and record.weights.shape[0] >= 1
        assert np.linalg.norm(gallery.embedding(1)) == pytest.approx(1.0, abs=1e-4)
        # an image's own embedding finds it first
        assert gallery.search(gallery.embedding(5)[None], k=1)[0][0].id == 5


def test_an_interrupted_build_resumes_embedding_only_what_is_missing(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_images(tmp_path / "images", range(10))
    first = ForwardCounter(monkeypatch, interrupt_on_call=2)
    with pytest.raises(KeyboardInterrupt):
        build_gallery(
            tmp_path / "images", checkpoint, tmp_path / "g", batch_size=4, workers=0, progress=False
        )
    assert first.images == 4
    resumed = ForwardCounter(monkeypatch)
    report = build_gallery(
        tmp_path / "images", checkpoint, tmp_path / "g", batch_size=4, workers=1, progress=False
    )
    assert (resumed.images, report.indexed, report.already_indexed) == (6, 6, 4)
    write_images(tmp_path / "images" / "more", range(10, 13))
    again = ForwardCounter(monkeypatch)
    report = build_gallery(
        tmp_path / "images", checkpoint, tmp_path / "g", batch_size=4, workers=0, progress=False
    )
    assert (again.images, report.indexed, report.already_indexed) == (3, 3, 10)
    assert report.gallery_count == 13


def test_labels_come_from_first_level_subfolders(tmp_path: Path, checkpoint: Path) -> None:
    write_images(tmp_path / "images" / "cats", range(3))
    write_images(tmp_path / "images" / "dogs" / "puppies", range(3, 5))
    write_images(tmp_path / "images", range(5, 6))
    build_gallery(
        tmp_path / "images",
        checkpoint,
        tmp_path / "g",
        batch_size=8,
        workers=0,
        labels_from_subfolders=True,
        progress=False,
    )
    with Gallery.open(tmp_path / "g") as gallery:
        assert gallery.labels() == {None: 1, "cats": 3, "dogs": 2}
        query = gallery.embedding(1)[None]
        assert {gallery.get(m.id).label for m in gallery.search(query, k=2, label="dogs")[0]} == {
            "dogs"
        }


def test_a_gallery_of_another_model_is_refused(tmp_path: Path, checkpoint: Path) -> None:
    from index.errors import GalleryMismatchError

    write_images(tmp_path / "images", range(2))
    gallery_of_another_model(tmp_path / "g", "another-model")
    with pytest.raises(GalleryMismatchError, match="another-model"):
        build_gallery(tmp_path / "images", checkpoint, tmp_path / "g", workers=0, progress=False)
