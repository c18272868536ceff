"""Pictures the API serves: thumbnails of gallery files and heatmap overlays as PNG."""

from __future__ import annotations

import base64
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from app.service.images import decode_file, thumbnail
from app.service.schemas import Heatmap

__all__ = [
    "centre_crop",
    "heatmap_model",
    "inline_heatmap",
    "overlay_png",
    "png_data_url",
    "thumbnail_jpeg",
]

_GRID_DECIMALS = 4


@lru_cache(maxsize=1024)
def _thumbnail_jpeg(path: str, mtime_ns: int, size: int, max_pixels: int) -> bytes:
    decoded = decode_file(Path(path), max_pixels=max_pixels, min_side=size)
    buffer = io.BytesIO()
    thumbnail(decoded.image, size).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def thumbnail_jpeg(path: Path, size: int, max_pixels: int) -> bytes:
    """JPEG thumbnail of a gallery file, cached by path and modification time.

    Raises :class:`~app.service.images.ImageRejected` when the file is not a usable image.
    """
    return _thumbnail_jpeg(str(path), path.stat().st_mtime_ns, size, max_pixels)


def centre_crop(image: Image.Image, fraction: float) -> Image.Image:
    """The centred square the network saw: side ``fraction`` of the short side."""
    width, height = image.size
    side = max(1, round(min(width, height) * fraction))
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def overlay_png(image: Image.Image, weights: np.ndarray, opacity: float) -> bytes:
    """PNG of ``weights`` drawn over ``image`` (see :func:`app.heatmap.overlay_heatmap`)."""
    from app.heatmap import overlay_heatmap

    buffer = io.BytesIO()
    overlay_heatmap(image, np.asarray(weights, dtype=np.float32), opacity=opacity).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def png_data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def heatmap_model(weights: np.ndarray, overlay_url: str | None) -> Heatmap:
    """The JSON form of a weights grid; non-finite values become 0 so the JSON stays valid."""
    grid = np.nan_to_num(np.asarray(weights, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    if grid.ndim != 2:
        raise ValueError(f"heatmap weights must be a 2-D grid, got shape {grid.shape}")
    return Heatmap(
        height=int(grid.shape[0]),
        width=int(grid.shape[1]),
        grid=np.round(grid, _GRID_DECIMALS).tolist(),
        overlay_url=overlay_url,
    )


def inline_heatmap(square: Image.Image | None, weights: np.ndarray) -> Heatmap:
    """A weights grid as JSON with its overlay on ``square`` inlined as a PNG data URL (none
    when ``square`` is None)."""
    overlay = None if square is None else png_data_url(overlay_png(square, weights, 0.5))
    return heatmap_model(weights, overlay)
