"""Upload decoding: every accepted mode becomes upright RGB; every bad upload is a clear 4xx."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
import pytest
from PIL import Image, ImageOps

from app.service.images import ImageRejected, configure_pillow, decode_file, decode_image
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
    assert "has 2500000000 pixels" in caught.value.message
    assert "at most 4000000 pixels (GSP_MAX_PIXELS)" in caught.value.message


def test_pillow_bomb_limit_applies_even_with_a_generous_setting_and_quotes_ours() -> None:
    with pytest.raises(ImageRejected) as caught:
        decode(bomb_png(100_000, 100_000), max_pixels=10**12)
    assert (caught.value.status, caught.value.code) == (413, "too_many_pixels")
    assert "1000000000000 pixels (GSP_MAX_PIXELS)" in caught.value.message
    assert "decompression bomb" not in caught.value.message  # Pillow's wording, not ours


def test_a_generous_setting_raises_pillows_own_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    configure_pillow(3_000_000)
    assert Image.MAX_IMAGE_PIXELS == 3_000_000
    configure_pillow(10)  # never lowered: other formats keep Pillow's backstop
    assert Image.MAX_IMAGE_PIXELS == 3_000_000


def _flat_jpeg(width: int, height: int, **options: object) -> bytes:
    """A JPEG of one colour: even tens of megapixels compress to little."""
    return encode(Image.new("RGB", (width, height), (90, 140, 200)), "JPEG", **options)


def test_a_48_megapixel_phone_photo_is_accepted_at_the_default_limit() -> None:
    data = _flat_jpeg(8064, 6048, quality=80)
    decoded = decode(data, "image/jpeg", max_bytes=len(data), max_pixels=40_000_000, min_side=256)
    assert decoded.size == (8064, 6048)
    assert decoded.image.size == (1008, 756)  # 1/8 scale: what is held in memory
    assert decoded.image.getpixel((500, 300)) == pytest.approx((90, 140, 200), abs=3)


def test_jpeg_limit_is_on_decoded_pixels_and_pillows_check_does_not_fire_first(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Scaled down from a 200 MP photo under a 40 MP limit: 6 MP under a 1 MP limit, with
    Pillow's own bomb limit (as an error, as the service sets it) below the photo too."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        data = _flat_jpeg(3000, 2000)
        decoded = decode(data, "image/jpeg", max_pixels=1_000_000, min_side=128)
        assert (decoded.size, decoded.image.size) == ((3000, 2000), (375, 250))
        with pytest.raises(ImageRejected) as caught:  # no reduced decode asked: full size
            decode(data, "image/jpeg", max_pixels=1_000_000)
        assert caught.value.code == "too_many_pixels"
        assert "3000x2000" in caught.value.message and "GSP_MAX_PIXELS" in caught.value.message
        with pytest.raises(ImageRejected) as caught:  # other formats: the header's size
            decode(encode(Image.new("RGB", (3000, 2000)), "PNG"), max_pixels=1_000_000)
        assert caught.value.code == "too_many_pixels"


def test_progressive_jpeg_counts_its_full_size() -> None:
    data = _flat_jpeg(3000, 2000, progressive=True)
    with pytest.raises(ImageRejected) as caught:
        decode(data, "image/jpeg", max_pixels=1_000_000, min_side=128)
    assert caught.value.code == "too_many_pixels" and "progressive" in caught.value.message
    assert decode(data, "image/jpeg", max_pixels=6_000_000, min_side=128).size == (3000, 2000)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims ``width`` x ``height``."""
    data = bytearray(_flat_jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_a_jpeg_too_large_even_at_one_eighth_scale_is_refused() -> None:
    with pytest.raises(ImageRejected) as caught:
        decode(_jpeg_claiming(65_000, 65_000), "image/jpeg", max_pixels=40_000_000, min_side=256)
    assert (caught.value.status, caught.value.code) == (413, "too_many_pixels")
    assert "decodes at 8125x8125 at best" in caught.value.message


def _corrupted(data: bytes, how: str) -> bytes:
    damaged = bytearray(data)
    middle = len(damaged) // 2
    if how == "zeros":
        damaged[middle : middle + 200] = bytes(200)
    else:  # an end-of-image marker in the middle of the scan
        damaged[middle : middle + 2] = b"\xff\xd9"
    return bytes(damaged)


@pytest.mark.parametrize("how", ["zeros", "early_end"])
def test_corrupt_jpeg_data_is_rejected_though_pillow_decodes_it(how: str, tmp_path) -> None:
    data = _corrupted(encode(_photo(320, 240), "JPEG", quality=90), how)
    with Image.open(io.BytesIO(data)) as lenient:
        lenient.load()  # what made the service answer 200 before
    with pytest.raises(ImageRejected) as caught:
        decode(data, "image/jpeg")
    assert (caught.value.status, caught.value.code) == (400, "bad_image")
    assert "corrupt" in caught.value.message
    stored = tmp_path / "stored.jpg"  # a gallery file: as lenient as the indexer that read it
    stored.write_bytes(data)
    assert decode_file(stored, max_pixels=1_000_000).size == (320, 240)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGB"])
def test_intact_jpegs_of_every_colour_space_pass_the_strict_check(mode: str) -> None:
    image = _photo(160, 120).convert(mode)
    assert decode(encode(image, "JPEG"), "image/jpeg").size == (160, 120)
