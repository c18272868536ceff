"""model/transforms.py: every PIL mode reaches the network as correct RGB, at the right size."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from model.config import Preprocessing
from model.transforms import (
    Normalise,
    eval_crop,
    eval_transform,
    to_rgb,
    to_uint8_tensor,
    train_transform,
)

SMALL = Preprocessing(image_size=32, resize_size=40, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))


def _expected(rgb: tuple[int, int, int], preprocessing: Preprocessing) -> torch.Tensor:
    values = torch.tensor(rgb, dtype=torch.float32) / 255.0
    return (values - torch.tensor(preprocessing.mean)) / torch.tensor(preprocessing.std)


def _pixel(image: Image.Image) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(image)[0, 0])


def test_eval_transform_shape_dtype_and_normalisation() -> None:
    out = eval_transform(SMALL)(Image.new("RGB", (90, 60), (200, 100, 50)))
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32
    expected = _expected((200, 100, 50), SMALL)
    assert torch.allclose(out, expected[:, None, None].expand(3, 32, 32), atol=1e-5)


def test_eval_transform_resizes_short_side_then_centre_crops() -> None:
    # 80 x 40 (w x h): the short side already equals resize_size, so the 32-px centre crop keeps
    # columns 24..55 of the original: 16 red columns then 16 blue ones.
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 40))
    out = eval_transform(SMALL)(image)
    red, blue = _expected((255, 0, 0), SMALL), _expected((0, 0, 255), SMALL)
    assert torch.allclose(out[:, 16, 15], red, atol=1e-5)
    assert torch.allclose(out[:, 16, 16], blue, atol=1e-5)
    # A portrait image is scaled so its width becomes resize_size before cropping.
    tall = eval_transform(SMALL)(Image.new("RGB", (20, 100), (10, 20, 30)))
    assert tall.shape == (3, 32, 32)


@pytest.mark.parametrize(
    ("image", "rgb"),
    [
        (Image.new("L", (8, 8), 128), (128, 128, 128)),
        (Image.new("1", (8, 8), 1), (255, 255, 255)),
        (Image.new("CMYK", (8, 8), (0, 0, 0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (8, 8), (255, 0, 0, 0)), (0, 255, 255)),
        (Image.new("RGBA", (8, 8), (10, 20, 30, 0)), (255, 255, 255)),  # transparent → white
        (Image.new("RGBA", (8, 8), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("RGBA", (8, 8), (0, 0, 0, 128)), (127, 127, 127)),  # half over white
        (Image.new("LA", (8, 8), (50, 255)), (50, 50, 50)),
        (Image.new("I;16", (8, 8), 65535), (255, 255, 255)),
        (Image.new("I;16", (8, 8), 32896), (128, 128, 128)),  # scaled, not clipped to 255
        (Image.new("I", (8, 8), 1000), (4, 4, 4)),  # 16-bit range in a 32-bit image
        (Image.new("I", (8, 8), 200), (200, 200, 200)),  # already 8-bit range
        (Image.new("F", (8, 8), 0.5), (128, 128, 128)),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else None,
)
def test_to_rgb_converts_every_mode(image: Image.Image, rgb: tuple[int, int, int]) -> None:
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert converted.size == image.size
    assert _pixel(converted) == rgb


def test_to_rgb_palette_with_and_without_transparency() -> None:
    palette_image = Image.new("P", (4, 4), 1)
    palette_image.putpalette([0, 0, 0, 12, 34, 56] + [0] * 762)
    assert _pixel(to_rgb(palette_image)) == (12, 34, 56)
    palette_image.info["transparency"] = 1
    assert _pixel(to_rgb(palette_image)) == (255, 255, 255)


def test_to_rgb_applies_exif_orientation() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white strip on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif.tobytes())
    with Image.open(io.BytesIO(buffer.getvalue())) as stored:
        upright = to_rgb(stored)
    assert upright.size == (20, 40)
    pixels = np.asarray(upright)
    assert pixels[2, 10].min() > 200  # the white strip is now along the top
    assert pixels[-2, 10].max() < 50


def test_transforms_accept_any_mode_end_to_end() -> None:
    for image in (Image.new("L", (50, 50), 9), Image.new("I;16", (50, 50), 3000)):
        assert eval_transform(SMALL)(image).shape == (3, 32, 32)
        assert train_transform(SMALL)(image).shape == (3, 32, 32)


def _noise(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGBA").convert(mode)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "P", "CMYK"])
@pytest.mark.parametrize("size", [(90, 60), (20, 100), (32, 32), (17, 9)])
def test_split_eval_transform_equals_the_whole_bit_for_bit(
    mode: str, size: tuple[int, int]
) -> None:
    """Crop to uint8 here, normalise a batch later (as the service does): the same tensor."""
    images = [_noise(mode, size, seed) for seed in range(3)]
    crop, normalise = eval_crop(SMALL), Normalise(SMALL)
    uint8 = [to_uint8_tensor(crop(image)) for image in images]
    assert all(one.dtype == torch.uint8 and one.shape == (32, 32, 3) for one in uint8)
    split = normalise(torch.stack(uint8))
    whole = torch.stack([eval_transform(SMALL)(image) for image in images])
    assert split.dtype == torch.float32 and split.is_contiguous()
    assert torch.equal(split, whole)


def test_normalise_rejects_float_or_misshapen_batches() -> None:
    normalise = Normalise(SMALL)
    with pytest.raises(ValueError, match="uint8"):
        normalise(torch.zeros(1, 8, 8, 3))
    with pytest.raises(ValueError, match="uint8"):
        normalise(torch.zeros(8, 8, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        normalise(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))  # channels first


def test_to_rgb_rejects_non_images() -> None:
    with pytest.raises(TypeError, match="PIL image"):
        to_rgb(np.zeros((4, 4, 3), dtype=np.uint8))  # type: ignore[arg-type]


def test_train_transform_shape_dtype_and_randomness() -> None:
    torch.manual_seed(0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    transform = train_transform(SMALL)
    outputs = [transform(image) for _ in range(4)]
    assert all(o.shape == (3, 32, 32) and o.dtype == torch.float32 for o in outputs)
    assert not torch.equal(outputs[0], outputs[1])  # random crops differ


def test_train_transform_whole_image_keeps_layout_and_flip_mirrors() -> None:
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    image.paste((0, 0, 255), (32, 0, 64, 64))  # blue right half
    keep = train_transform(
        SMALL, random_resized_crop_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0), flip=False
    )
    red, blue = _expected((255, 0, 0), SMALL), _expected((0, 0, 255), SMALL)
    for _ in range(3):
        out = keep(image)
        assert torch.allclose(out[:, 16, 2], red, atol=1e-5)
        assert torch.allclose(out[:, 16, 29], blue, atol=1e-5)
    torch.manual_seed(1)
    flipping = train_transform(SMALL, random_resized_crop_scale=(1.0, 1.0), aspect_ratio=(1.0, 1.0))
    left_colours = {
        bool(torch.allclose(flipping(image)[:, 16, 2], blue, atol=1e-5)) for _ in range(20)
    }
    assert left_colours == {True, False}  # both orientations occur


@pytest.mark.parametrize(
    "kwargs",
    [
        {"random_resized_crop_scale": (0.0, 1.0)},
        {"random_resized_crop_scale": (0.8, 0.5)},
        {"random_resized_crop_scale": (0.5, 1.5)},
        {"aspect_ratio": (2.0, 1.0)},
        {"color_jitter": -0.1},
    ],
)
def test_train_transform_rejects_bad_options(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        train_transform(SMALL, **kwargs)


def test_color_jitter_changes_colours_only_when_asked() -> None:
    image = Image.new("RGB", (40, 40), (120, 80, 40))
    whole = {"random_resized_crop_scale": (1.0, 1.0), "aspect_ratio": (1.0, 1.0), "flip": False}
    plain = train_transform(SMALL, **whole)(image)
    assert torch.allclose(
        plain, _expected((120, 80, 40), SMALL)[:, None, None].expand_as(plain), atol=1e-5
    )
    torch.manual_seed(0)
    jittered = train_transform(SMALL, color_jitter=0.4, **whole)(image)
    assert not torch.allclose(plain, jittered, atol=1e-3)
