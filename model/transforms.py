"""Image → network input: one preprocessing for training, evaluation, indexing and the service.

Every transform starts with :func:`to_rgb`, so whatever PIL mode an upload or a file decodes to
(L, P, CMYK, RGBA, 16-bit greyscale, ...) reaches the network as 8-bit RGB in its upright
orientation, and the service embeds an image exactly as the indexer did.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import transforms as T

from model.config import Preprocessing

__all__ = [
    "Normalise",
    "ToRGB",
    "eval_crop",
    "eval_transform",
    "to_rgb",
    "to_uint8_tensor",
    "train_transform",
]

Transform = Callable[[Image.Image], torch.Tensor]

# Transparent pixels are shown over white, as browsers and image viewers do.
_BACKGROUND = (255, 255, 255)
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


def _integer_to_8bit(image: Image.Image) -> Image.Image:
    """Greyscale deeper than 8 bits (I;16*, I): scale the 16-bit range down, do not clip it."""
    values = np.asarray(image).astype(np.int64)
    if image.mode == "I" and values.max(initial=0) <= 255 and values.min(initial=0) >= 0:
        return Image.fromarray(values.astype(np.uint8), mode="L")
    scaled = np.clip(values, 0, 65535) / 257.0
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def _float_to_8bit(image: Image.Image) -> Image.Image:
    """Float greyscale (F): values in [0, 1] are fractions, anything larger is already 0-255."""
    values = np.nan_to_num(np.asarray(image, dtype=np.float64))
    if values.max(initial=0.0) <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8), mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an upright 8-bit RGB copy of ``image``, whatever its mode.

    EXIF orientation is applied (phone photos), alpha is composited over white (rather than
    dropping it, which exposes arbitrary colours under transparent pixels), palettes are expanded
    with their transparency, and 16-bit / 32-bit greyscale is rescaled rather than clipped at 255.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
        mode = image.mode
    if mode.startswith("I;16") or mode == "I":
        image, mode = _integer_to_8bit(image), "L"
    elif mode == "F":
        image, mode = _float_to_8bit(image), "L"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {error}") from error


class ToRGB:
    """:func:`to_rgb` as a picklable transform (DataLoader workers may be spawned)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return to_rgb(image)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _to_normalised_tensor(preprocessing: Preprocessing) -> list[Callable]:
    return [T.ToTensor(), T.Normalize(mean=preprocessing.mean, std=preprocessing.std)]


def _crop_steps(preprocessing: Preprocessing) -> list[Callable]:
    return [
        ToRGB(),
        T.Resize(preprocessing.resize_size, interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(preprocessing.image_size),
    ]


def eval_crop(preprocessing: Preprocessing) -> Callable[[Image.Image], Image.Image]:
    """The geometric half of :func:`eval_transform`: RGB, short side to ``resize_size``, centre
    crop. Still an 8-bit image, so a service can ship 4x fewer bytes and normalise on the device.
    """
    return T.Compose(_crop_steps(preprocessing))


def to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as an ``(H, W, 3)`` uint8 tensor in its own layout: one copy of the
    pixels and no tensor kernel, so a request thread never starts a CPU kernel thread pool."""
    return torch.from_numpy(np.array(image, dtype=np.uint8))


class Normalise:
    """The numeric half of :func:`eval_transform`, for a ``(B, H, W, 3)`` uint8 batch on any
    device: the ``(B, 3, H, W)`` float32 input, computed with torchvision's operations in
    torchvision's order (divide by 255, subtract the mean, divide by the deviation), so it
    equals ``eval_transform``'s bit for bit."""

    def __init__(self, preprocessing: Preprocessing, device: torch.device | str = "cpu") -> None:
        self._mean = torch.tensor(preprocessing.mean, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(preprocessing.std, device=device).view(1, 3, 1, 1)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8 or batch.dim() != 4 or batch.shape[3] != 3:
            raise ValueError(
                f"expected a (B, H, W, 3) uint8 batch, got {tuple(batch.shape)} {batch.dtype}"
            )
        channels_first = batch.permute(0, 3, 1, 2)
        # One kernel converts and transposes into the contiguous layout the indexer's had.
        inputs = torch.empty(channels_first.shape, dtype=torch.float32, device=batch.device)
        return inputs.copy_(channels_first).div_(255).sub_(self._mean).div_(self._std)


def eval_transform(preprocessing: Preprocessing) -> Transform:
    """Deterministic input: RGB, short side to ``resize_size``, centre crop, normalise."""
    return T.Compose([*_crop_steps(preprocessing), *_to_normalised_tensor(preprocessing)])


def train_transform(
    preprocessing: Preprocessing,
    random_resized_crop_scale: tuple[float, float] = (0.16, 1.0),
    flip: bool = True,
    aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    color_jitter: float = 0.0,
) -> Transform:
    """Augmented input of the same size and normalisation as :func:`eval_transform`.

    ``random_resized_crop_scale`` is the area fraction range of the random crop (the metric
    learning default 0.16-1); ``(1.0, 1.0)`` with ``aspect_ratio=(1.0, 1.0)`` keeps a square image
    whole, which is what collage training needs to keep its grid intact. ``color_jitter`` > 0
    jitters brightness, contrast and saturation by that amount.
    """
    low, high = random_resized_crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(
            "random_resized_crop_scale must satisfy 0 < low <= high <= 1, "
            f"got {random_resized_crop_scale}"
        )
    if not 0.0 < aspect_ratio[0] <= aspect_ratio[1]:
        raise ValueError(f"aspect_ratio must satisfy 0 < low <= high, got {aspect_ratio}")
    if color_jitter < 0:
        raise ValueError(f"color_jitter must be >= 0, got {color_jitter}")
    steps: list[Callable] = [
        ToRGB(),
        T.RandomResizedCrop(
            preprocessing.image_size,
            scale=(low, high),
            ratio=aspect_ratio,
            interpolation=T.InterpolationMode.BILINEAR,
        ),
    ]
    if flip:
        steps.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(
            T.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter)
        )
    steps.extend(_to_normalised_tensor(preprocessing))
    return T.Compose(steps)
