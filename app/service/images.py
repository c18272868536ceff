"""Upload decoding and validation: bytes from a client become a safe RGB image or a 4xx error.

Policy (documented in the API): zero-byte, non-image, truncated and undecodable uploads are
400, and so is a JPEG whose compressed data is corrupt (libjpeg's "Corrupt JPEG data" warnings,
which Pillow silently decodes past, are errors here); a declared content type that is not an
image is 415; more bytes than ``max_upload_bytes`` is 413, and so is an image that would hold
more than ``max_pixels`` (``GSP_MAX_PIXELS``) pixels in memory. That limit guards memory, not
the photo's size: a baseline JPEG decodes at a reduced DCT scale (1/2 to 1/8) when the caller
gives the smallest side it needs, exactly as the indexer decodes gallery files, so a 48 or
200 megapixel phone photo is held at a few megapixels and accepted, while a PNG claiming
50,000 x 50,000 pixels, or a JPEG whose smallest decode is still over the limit, is refused
before any pixel is decoded. A progressive JPEG is counted at its full size, since libjpeg
keeps every DCT coefficient of the whole image. Pillow's own whole-image bomb check, which
would refuse a 200 megapixel photo on open, is bypassed for JPEGs and raised to the service's
limit for the rest (:func:`configure_pillow`).

Multi-frame images (GIF, APNG, TIFF, WebP) use their first frame. EXIF orientation is applied.
Every mode becomes 8-bit RGB: alpha is composited on white, 16-bit and float greyscale are
rescaled, CMYK and palettes are converted (:func:`model.transforms.to_rgb`, the same
conversion the indexer used).
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import simplejpeg
from PIL import ExifTags, Image, JpegImagePlugin, UnidentifiedImageError

from index.images import draft_at_least
from model.transforms import to_rgb

__all__ = [
    "PIXELS_SETTING",
    "DecodedImage",
    "ImageRejected",
    "configure_pillow",
    "decode_file",
    "decode_image",
    "thumbnail",
]

ACCEPTED_CONTENT_TYPES = ("image/", "application/octet-stream")
PIXELS_SETTING = "GSP_MAX_PIXELS"  # named in every pixel-limit message
# EXIF orientations that turn the stored image by 90 degrees (transpose, rotations, transverse).
_SWAPS_SIDES = {5, 6, 7, 8}
_JPEG_START = b"\xff\xd8\xff"
# Pillow mode -> simplejpeg colour space for the strict check (anything else decodes as RGB).
_STRICT_COLOURSPACE = {"L": "GRAY", "CMYK": "CMYK"}


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


def configure_pillow(max_pixels: int) -> None:
    """Process-wide and once: Pillow's bomb warning becomes an exception, and Pillow's own
    limit is raised to ``max_pixels`` when the service allows more, so that for every format
    the service's setting is the one that decides.

    ``warnings.catch_warnings`` per call would race between the decoding threads.
    """
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        Image.MAX_IMAGE_PIXELS = max_pixels


def check_content_type(content_type: str | None) -> None:
    """Reject a declared type that cannot be an image; a missing type is allowed."""
    if not content_type:
        return
    base = content_type.split(";", 1)[0].strip().lower()
    if not base.startswith(ACCEPTED_CONTENT_TYPES):
        raise ImageRejected(415, "unsupported_media_type", f"content type {base!r} is not an image")


def _too_many_pixels(detail: str, max_pixels: int) -> ImageRejected:
    return ImageRejected(
        413,
        "too_many_pixels",
        f"{detail}; the service decodes at most {max_pixels} pixels ({PIXELS_SETTING})",
    )


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """The image's header, nothing decoded yet. A JPEG is opened by its plugin directly, past
    Pillow's whole-image bomb check: what it costs is decided after the reduced-scale draft."""
    try:
        if data.startswith(_JPEG_START):
            return JpegImagePlugin.jpeg_factory(io.BytesIO(data))
        return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's message names its own limit; only the image's pixel count is kept.
        count = re.search(r"(\d+) pixels", str(error))
        detail = f"the image has {count.group(1)} pixels" if count else "the image is too large"
        raise _too_many_pixels(detail, max_pixels) from None
    except UnidentifiedImageError:
        raise ImageRejected(400, "not_an_image", "the upload is not a recognised image") from None
    except Exception as error:  # Pillow plugins raise many types on malformed headers
        raise ImageRejected(400, "bad_image", f"the image header is invalid: {error}") from None


def _check_pixels(opened: Image.Image, size: tuple[int, int], max_pixels: int) -> None:
    """Refuse an image that would hold more than ``max_pixels`` in memory: its decoded size
    (after any draft), or its full size for a progressive JPEG (whole-image coefficients)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageRejected(400, "bad_image", f"the image claims a size of {width}x{height}")
    decoded_width, decoded_height = opened.size
    if opened.format in ("JPEG", "MPO") and opened.info.get("progressive"):
        if width * height > max_pixels:
            raise _too_many_pixels(
                f"the image is a progressive JPEG of {width}x{height} pixels, all held while "
                "decoding",
                max_pixels,
            )
    elif decoded_width * decoded_height > max_pixels:
        reduced = (decoded_width, decoded_height) != (width, height)
        raise _too_many_pixels(
            f"the image is {width}x{height} pixels"
            + (f" and decodes at {decoded_width}x{decoded_height} at best" if reduced else ""),
            max_pixels,
        )


def _check_jpeg_data(data: bytes, mode: str) -> None:
    """400 for corrupt compressed data, found by a strict libjpeg-turbo pass at its smallest
    scale (Pillow decodes past such errors without a word, so a damaged photo would be
    searched). Every coefficient is still entropy-decoded, so corruption anywhere is found."""
    try:
        simplejpeg.decode_jpeg(  # a 1-pixel minimum: the smallest DCT scale, 1/8
            data,
            colorspace=_STRICT_COLOURSPACE.get(mode, "RGB"),
            min_width=1,
            min_height=1,
            strict=True,
        )
    except ValueError as error:
        raise ImageRejected(400, "bad_image", f"the JPEG data is corrupt: {error}") from None


def decode_image(
    data: bytes,
    *,
    content_type: str | None,
    max_bytes: int,
    max_pixels: int,
    min_side: int | None = None,
    strict: bool = True,
) -> DecodedImage:
    """Validate and decode one upload; raises :class:`ImageRejected` with the reason.

    With ``min_side`` a JPEG decodes at the smallest scale that keeps both sides at least that
    long (:func:`index.images.draft_at_least`), as the indexer decodes gallery files, and the
    pixel limit applies to that scale. ``strict`` refuses JPEGs with corrupt data.
    """
    check_content_type(content_type)
    if not data:
        raise ImageRejected(400, "empty_upload", "the uploaded file is empty (zero bytes)")
    if len(data) > max_bytes:
        raise ImageRejected(
            413, "upload_too_large", f"upload is {len(data)} bytes; the limit is {max_bytes}"
        )
    opened = _open(data, max_pixels)
    width, height = opened.size
    try:
        if min_side is not None:
            draft_at_least(opened, min_side)
        _check_pixels(opened, (width, height), max_pixels)
        # After the check: reading a PNG's EXIF may decode the whole image.
        if (opened.getexif().get(ExifTags.Base.Orientation) or 1) in _SWAPS_SIDES:
            width, height = height, width
        if strict and opened.format in ("JPEG", "MPO"):
            _check_jpeg_data(data, opened.mode)
        frames = int(getattr(opened, "n_frames", 1) or 1)
        opened.seek(0)
        opened.load()
        rgb = to_rgb(opened)  # EXIF orientation, alpha over white, 16-bit rescaled
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise _too_many_pixels(f"the image is {width}x{height} pixels", max_pixels) from None
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
    limit only (the file's size was never an upload's to limit), and as leniently as the
    indexer that embedded it (no strict JPEG check)."""
    data = path.read_bytes()
    return decode_image(
        data,
        content_type=None,
        max_bytes=max(len(data), 1),
        max_pixels=max_pixels,
        min_side=min_side,
        strict=False,
    )


def thumbnail(image: Image.Image, size: int) -> Image.Image:
    """A copy no larger than ``size`` on its long side (aspect kept)."""
    copy = image.copy()
    copy.thumbnail((size, size), Image.Resampling.BILINEAR)
    return copy
