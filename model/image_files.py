"""Which files are images: the one extension list behind every folder walk (training data sets
in model/data/, the indexer's ``index.images.find_images``), so that a folder indexes the same
files it trains on."""

from __future__ import annotations

__all__ = ["IMAGE_EXTENSIONS", "is_image_name"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_name(name: str) -> bool:
    """Whether a file called ``name`` is read as an image (by its extension, in any case)."""
    return name.lower().endswith(IMAGE_EXTENSIONS)
