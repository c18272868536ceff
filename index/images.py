"""Finding image files and decoding them quickly and strictly, with a reason for every failure."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from model.image_files import is_image_name

__all__ = [
    "ImageDecodeError",
    "check_image_header",
    "decode_image",
    "draft_at_least",
    "find_images",
]

# PIL format names accepted whatever the extension says (MPO is a multi-picture JPEG).
_FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF"}


class ImageDecodeError(ValueError):
    """A file that is not a usable image; the message is the reason written to the report."""


def find_images(root: str | os.PathLike[str]) -> Iterator[Path]:
    """Every file under ``root`` with an image extension (any case), in a stable sorted order."""
    base = Path(root)
    if not base.is_dir():
        raise NotADirectoryError(f"image folder {base} does not exist or is not a directory")
    for directory, subdirs, files in os.walk(base):
        subdirs.sort()
        for name in sorted(files):
            if is_image_name(name):
                yield Path(directory) / name


def draft_at_least(image: Image.Image, min_side: int) -> None:
    """Before loading: let a JPEG decode at the smallest DCT scale (1/2, 1/4, 1/8) whose sides
    stay at least ``min_side``. Several times faster for photos, and, called wherever a file is
    decoded for the network (indexer, command line, service), the same pixels everywhere."""
    if image.format in ("JPEG", "MPO"):
        image.draft("RGB", (min_side, min_side))


def _opened(data: bytes) -> Image.Image:
    """``data`` opened lazily (header only), a supported format and not a decompression bomb."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as error:
        raise ImageDecodeError("not an image (unrecognised content)") from error
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"too large to decode safely: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"truncated or corrupt image: {error}") from error
    if image.format not in _FORMATS:
        raise ImageDecodeError(f"unsupported image format {image.format}")
    return image


def check_image_header(data: bytes) -> None:
    """Raise :class:`ImageDecodeError` unless ``data``'s header is that of an image
    :func:`decode_image` would take (for files another decoder, the GPU's, decodes)."""
    _opened(data)


def decode_image(data: bytes, min_side: int) -> Image.Image:
    """Decode ``data`` (first frame of an animation), JPEGs at a reduced scale when they are much
    larger than ``min_side`` (PIL ``draft``: DCT scaling, several times faster, no quality loss
    after the resize to ``min_side`` that follows)."""
    image = _opened(data)
    try:
        draft_at_least(image, min_side)
        image.seek(0)
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageDecodeError(f"too large to decode safely: {error}") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise ImageDecodeError(f"truncated or corrupt image: {error}") from error
    return image
