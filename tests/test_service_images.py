"""Upload decoding: every accepted mode becomes upright RGB; every bad upload is a clear 4xx."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from app.service.images import ImageRejected, decode_image
from tests.conftest import bomb_png, encode

LIMITS = {"max_bytes": 2_000_000, "max_pixels": 4_000_000}


def decode(data: bytes, content_type: str | None = "image/png", **limits: int):
    return decode_image(data, content_type=content_type, **{**LIMITS, **limits})


@pytest.mark.parametrize(
    ("mode", "fmt", "colour"),
    [
        ("CMYK", "JPEG", (0, 255, 255, 0)),
        ("P", "PNG", 3),
        ("LA", "PNG", (128, 255)),
        ("RGBA", "PNG", (10, 200, 30, 255)),
        ("L", "PNG", 77),
        ("RGB", "WEBP", (10, 200, 30)),
    ],
)
def test_modes_become_rgb(mode: str, fmt: str, colour: object) -> None:
    decoded = decode(encode(Image.new(mode, (20, 10), colour), fmt))
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (20, 10)
    assert decoded.format == fmt


def test_upload_digest_is_of_the_bytes_and_only_computed_when_asked() -> None:
    data = encode(Image.new("RGB", (20, 10), (1, 2, 3)), "PNG")
    decoded = decode(data)
    assert "sha256" not in vars(decoded)  # a search never pays for hashing the upload
    assert decoded.sha256 == hashlib.sha256(data).hexdigest()
    assert "sha256" not in repr(decoded) and "data" not in repr(decoded)


def _photo(width: int, height: int) -> Image.Image:
    """Smooth random colour, like a photo: JPEG's DCT scaling matters for it."""
    rng = np.random.default_rng(7)
    small = Image.fromarray(rng.integers(0, 256, (height // 40, width // 40, 3), dtype=np.uint8))
    return small.resize((width, height), Image.Resampling.BICUBIC)


def test_large_jpeg_decodes_reduced_with_the_indexers_pixels_and_its_true_size() -> None:
    from index.images import decode_image as indexer_decode

    data = encode(_photo(1600, 1200), "JPEG", quality=90)
    decoded = decode(data, "image/jpeg", min_side=256)
    assert decoded.size == (1600, 1200)
    assert decoded.image.size == (400, 300)  # 1/4 scale: the smallest keeping 256 on both sides
    indexed = indexer_decode(data, 256).convert("RGB")
    assert np.array_equal(np.asarray(decoded.image), np.asarray(indexed))
    assert decode(data, "image/jpeg").image.size == (1600, 1200)  # no min_side: full size
    png = decode(encode(_photo(1600, 1200), "PNG"), min_side=256)
    assert png.image.size == png.size == (1600, 1200)  # only JPEG has a reduced decode


@pytest.mark.parametrize("orientation", range(1, 9))
def test_size_is_upright_for_every_exif_orientation(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(_photo(1600, 1200), "JPEG", exif=exif.tobytes())
    decoded = decode(data, "image/jpeg", min_side=256)
    with Image.open(io.BytesIO(data)) as full:
        upright = ImageOps.exif_transpose(full).size
    assert decoded.size == upright
    assert decoded.image.size == (upright[0] // 4, upright[1] // 4)


def test_transparent_pixels_are_white() -> None:
    decoded = decode(encode(Image.new("RGBA", (4, 4), (255, 0, 0, 0)), "PNG"))
    assert decoded.image.getpixel((1, 1)) == (255, 255, 255)


def test_sixteen_bit_greyscale_is_rescaled_not_clipped() -> None:
    values = np.full((8, 8), 32768, dtype=np.uint16)
    decoded = decode(encode(Image.fromarray(values), "PNG"))
    red, green, blue = decoded.image.getpixel((0, 0))
    assert red == green == blue
    assert 120 <= red <= 135  # half of the 16-bit range, not saturated at 255


def test_multi_frame_gif_uses_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    decoded = decode(data, "image/gif")
    assert decoded.frames == 2
    red, _green, blue = decoded.image.getpixel((4, 4))
    assert red > 200 and blue < 50


def test_exif_orientation_is_applied() -> None:
    wide = Image.new("RGB", (40, 20), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    decoded = decode(encode(wide, "JPEG", exif=exif.tobytes()), "image/jpeg")
    assert decoded.image.size == (20, 40)


@pytest.mark.parametrize(
    ("data", "content_type", "status", "code"),
    [
        (b"", "image/png", 400, "empty_upload"),
        (b"hello, this is text", "image/png", 400, "not_an_image"),
        (b"GIF89a", "image/gif", 400, "not_an_image"),
        (b"\x89PNG\r\n\x1a\n", "text/plain", 415, "unsupported_media_type"),
    ],
)
def test_bad_uploads_are_rejected(data: bytes, content_type: str, status: int, code: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        decode(data, content_type)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_truncated_jpeg_is_rejected() -> None:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    data = encode(Image.fromarray(noise), "JPEG")
    with pytest.raises(ImageRejected) as caught:
        decode(data[: len(data) // 2], "image/jpeg")
    assert caught.value.status == 400


def test_size_and_pixel_limits() -> None:
    small = encode(Image.new("RGB", (64, 64)), "PNG")
    with pytest.raises(ImageRejected) as caught:
        decode(small, max_bytes=len(small) - 1)
    assert caught.value.status == 413
    with pytest.raises(ImageRejected) as caught:
        decode(bomb_png(50_000, 50_000))
    assert (caught.value.status, caught.value.code) == (413, "too_many_pixels")


def test_pillow_bomb_limit_applies_even_with_a_generous_setting() -> None:
    with pytest.raises(ImageRejected) as caught:
        decode(bomb_png(100_000, 100_000), max_pixels=10**12)
    assert caught.value.status == 413
