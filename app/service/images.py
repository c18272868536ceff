"""Upload decoding and validation: bytes from a client become a safe RGB image or a 4xx error.

Policy (documented in the API): zero-byte, non-image, truncated and undecodable uploads are
400; a declared content type that is not an image is 415; more bytes than ``max_upload_bytes``
or more pixels than ``max_pixels`` (checked from the header, before decoding) is 413. Pillow's
decompression-bomb warning is an error too. Multi-frame images (GIF, APNG, TIFF, WebP) use
their first frame. EXIF orientation is applied. A large JPEG decodes at a reduced scale when
the caller gives the smallest side it needs, exactly as the indexer decodes gallery files.
Every mode becomes 8-bit RGB: alpha is composited on white, 16-bit and float greyscale are
rescaled, CMYK and palettes are converted (:func:`model.transforms.to_rgb`, the same
conversion the indexer used).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from PIL import ExifTags, Image, UnidentifiedImageError

from index.images import draft_at_least
from model.transforms import to_rgb

__all__ = [
    "DecodedImage",
    "ImageRejected",
    "decode_file",
    "decode_image",
    "thumbnail",
    "treat_decompression_bombs_as_errors",
]

ACCEPTED_CONTENT_TYPES = ("image/", "application/octet-stream")
# EXIF orientations that turn the stored image by 90 degrees (transpose, rotations, transverse).
_SWAPS_SIDES = {5, 6, 7, 8}


class ImageRejected(Exception):
    """An upload that is not an acceptable image; ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # 8-bit RGB, orientation applied; a large JPEG at a reduced scale
    format: str  # Pillow's format name, e.g. "JPEG"
    frames: int
    size: tuple[int, int]  # (width, height) of the upload itself, upright
    data: bytes = field(repr=False)  # the upload as received

    @cached_property
    def sha256(self) -> str:
        """Of the uploaded bytes; computed when first asked (gallery writes), since hashing a
        multi-megabyte photo costs milliseconds that a search never needs."""
        return hashlib.sha256(self.data).hexdigest()


def treat_decompression_bombs_as_errors() -> None:
    """Make Pillow's bomb warning an exception, process-wide and once (thread-safe to read).

    ``warnings.catch_warnings`` per call would race between the decoding threads.
    """
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


def check_content_type(content_type: str | None) -> None:
    """Reject a declared type that cannot be an image; a missing type is allowed."""
    if not content_type:
        return
    base = content_type.split(";", 1)[0].strip().lower()
    if not base.startswith(ACCEPTED_CONTENT_TYPES):
        raise ImageRejected(415, "unsupported_media_type", f"content type {base!r} is not an image")


def decode_image(
    data: bytes,
    *,
    content_type: str | None,
    max_bytes: int,
    max_pixels: int,
    min_side: int | None = None,
) -> DecodedImage:
    """Validate and decode one upload; raises :class:`ImageRejected` with the reason.

    With ``min_side`` a JPEG decodes at the smallest scale that keeps both sides at least that
    long (:func:`index.images.draft_at_least`), as the indexer decodes gallery files.
    """
    check_content_type(content_type)
    if not data:
        raise ImageRejected(400, "empty_upload", "the uploaded file is empty (zero bytes)")
    if len(data) > max_bytes:
        raise ImageRejected(
            413, "upload_too_large", f"upload is {len(data)} bytes; the limit is {max_bytes}"
        )
    try:
        opened = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(413, "too_many_pixels", f"image rejected: {error}") from None
    except UnidentifiedImageError:
        raise ImageRejected(400, "not_an_image", "the upload is not a recognised image") from None
    except Exception as error:  # Pillow plugins raise many types on malformed headers
        raise ImageRejected(400, "bad_image", f"the image header is invalid: {error}") from None
    width, height = opened.size
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise ImageRejected(
            413,
            "too_many_pixels",
            f"image is {width}x{height} pixels; the limit is {max_pixels} pixels",
        )
    try:
        if (opened.getexif().get(ExifTags.Base.Orientation) or 1) in _SWAPS_SIDES:
            width, height = height, width
        if min_side is not None:
            draft_at_least(opened, min_side)
        frames = int(getattr(opened, "n_frames", 1) or 1)
        opened.seek(0)
        opened.load()
        rgb = to_rgb(opened)  # EXIF orientation, alpha over white, 16-bit rescaled
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected(413, "too_many_pixels", f"image rejected: {error}") from None
    except Exception as error:  # truncated or corrupt data, whatever the plugin raises
        raise ImageRejected(
            400, "bad_image", f"the image could not be decoded (truncated?): {error}"
        ) from None
    image_format = opened.format or "UNKNOWN"
    return DecodedImage(
        image=rgb, format=image_format, frames=frames, size=(width, height), data=data
    )


def decode_file(path: Path, *, max_pixels: int, min_side: int | None = None) -> DecodedImage:
    """Decode a gallery item's file as :func:`decode_image` decodes an upload, under the pixel
    limit only (the file's size was never an upload's to limit)."""
    data = path.read_bytes()
    return decode_image(
        data,
        content_type=None,
        max_bytes=max(len(data), 1),
        max_pixels=max_pixels,
        min_side=min_side,
    )


def thumbnail(image: Image.Image, size: int) -> Image.Image:
    """A copy no larger than ``size`` on its long side (aspect kept)."""
    copy = image.copy()
    copy.thumbnail((size, size), Image.Resampling.BILINEAR)
    return copy
