"""Procedural demo scenes: one class-bearing object among clutter, drawn with PIL and numpy.

Each scene has a textured, cluttered background, several distractors drawn from a nuisance set
(flat-coloured simple shapes, strokes, dot clusters) and exactly one object of one of the
``CLASSES``, each with its own shape, colours and texture, at a random position and scale
covering a minority of the image.  The object is drawn last, so it is never occluded, and its
tight bounding box is recorded.  Everything is deterministic given ``(seed, index)``, so a
scene can be regenerated alone and galleries are reproducible.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["CLASSES", "Scene", "SceneConfig", "generate_scenes", "render_scene"]

Box = tuple[int, int, int, int]
Painter = Callable[[np.random.Generator, int], tuple[Image.Image, Image.Image]]


@dataclass(frozen=True)
class SceneConfig:
    """Parameters of a scene set; their hash keys the demo cache."""

    image_size: int = 256
    min_object_fraction: float = 0.22
    max_object_fraction: float = 0.38
    min_distractors: int = 4
    max_distractors: int = 7
    scenes_per_background: int = 4

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, got {self.image_size}")
        if not 0 < self.min_object_fraction <= self.max_object_fraction < 1:
            raise ValueError(
                "object fractions must satisfy 0 < min <= max < 1, got "
                f"{self.min_object_fraction}, {self.max_object_fraction}"
            )
        if not 0 <= self.min_distractors <= self.max_distractors:
            raise ValueError("distractor counts must satisfy 0 <= min <= max")
        if not 1 <= self.scenes_per_background <= len(CLASSES):
            raise ValueError(
                f"scenes_per_background must lie in [1, {len(CLASSES)}], "
                f"got {self.scenes_per_background}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Scene:
    """A rendered scene: the RGB image, its class and the object's tight box ``(x0, y0, x1, y1)``.

    The box is in pixels, ``x1``/``y1`` exclusive.
    """

    image: Image.Image
    label: int
    class_name: str
    box: Box


# -- textures and object painters ----------------------------------------------------------------
# Each painter draws its object on a transparent square canvas of side ``size`` and returns the
# RGB layer and its mask; the caller rotates, places and composites it.


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.meshgrid(np.arange(size), np.arange(size))


def _two_tone(pattern: np.ndarray, first: tuple[int, int, int], second: tuple[int, int, int]):
    colours = np.where(pattern[..., None], np.array(first), np.array(second))
    return Image.fromarray(colours.astype(np.uint8), "RGB")


def _jitter(rng: np.random.Generator, colour: tuple[int, int, int], amount: int = 18):
    shifted = np.clip(np.array(colour) + rng.integers(-amount, amount + 1, 3), 0, 255)
    return tuple(int(v) for v in shifted)


def _polygon_mask(size: int, points: list[tuple[float, float]]) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return mask


def _regular_polygon(
    size: int, sides: int, inner: float | None = None
) -> list[tuple[float, float]]:
    """Vertices of a regular polygon (or a star when ``inner`` is given) filling the canvas."""
    centre, radius = size / 2, size * 0.48
    count = sides * 2 if inner else sides
    points = []
    for k in range(count):
        angle = -math.pi / 2 + 2 * math.pi * k / count
        r = radius * (inner if inner and k % 2 else 1.0)
        points.append((centre + r * math.cos(angle), centre + r * math.sin(angle)))
    return points


def _checker_disc(rng: np.random.Generator, size: int):
    xs, ys = _grid(size)
    cell = max(2, size // 6)
    layer = _two_tone(
        (xs // cell + ys // cell) % 2 == 0, _jitter(rng, (220, 30, 30)), (245, 245, 245)
    )
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((1, 1, size - 2, size - 2), fill=255)
    return layer, mask


def _hazard_square(rng: np.random.Generator, size: int):
    xs, ys = _grid(size)
    period = max(4, size // 4)
    layer = _two_tone(((xs + ys) % period) < period / 2, _jitter(rng, (250, 205, 20)), (20, 20, 20))
    inset = size // 10
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((inset, inset, size - inset, size - inset), fill=255)
    return layer, mask


def _dotted_star(rng: np.random.Generator, size: int):
    xs, ys = _grid(size)
    period = max(4, size // 7)
    dots = ((xs % period - period / 2) ** 2 + (ys % period - period / 2) ** 2) < (period / 4) ** 2
    layer = _two_tone(dots, (255, 255, 255), _jitter(rng, (30, 60, 210)))
    return layer, _polygon_mask(size, _regular_polygon(size, 5, inner=0.45))


def _bullseye(rng: np.random.Generator, size: int):
    xs, ys = _grid(size)
    radius = np.hypot(xs - size / 2, ys - size / 2)
    band = max(2, size // 10)
    layer = _two_tone((radius // band) % 2 == 0, _jitter(rng, (250, 130, 0)), (255, 255, 255))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).ellipse((1, 1, size - 2, size - 2), fill=255)
    return layer, mask


def _honeycomb_hexagon(rng: np.random.Generator, size: int):
    xs, ys = _grid(size)
    period = max(4, size // 6)
    lines = (xs % period < period / 5) | ((ys + xs // 2) % period < period / 5)
    layer = _two_tone(lines, (15, 70, 20), _jitter(rng, (60, 200, 70)))
    return layer, _polygon_mask(size, _regular_polygon(size, 6))


def _heart_points(size: int) -> list[tuple[float, float]]:
    points = []
    for k in range(48):
        t = 2 * math.pi * k / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        points.append((size / 2 + x * size / 34, size / 2 - y * size / 34 + size * 0.04))
    return points


def _spotted_heart(rng: np.random.Generator, size: int):
    xs, ys = _grid(size)
    period = max(4, size // 5)
    spots = (
        ((xs + (ys // period) * period // 2) % period - period / 2) ** 2
        + (ys % period - period / 2) ** 2
    ) < (period / 3) ** 2
    layer = _two_tone(spots, (250, 220, 250), _jitter(rng, (150, 30, 170)))
    return layer, _polygon_mask(size, _heart_points(size))


def _gradient_crescent(rng: np.random.Generator, size: int):
    xs, ys = _grid(size)
    shade = (xs + ys) / (2 * size)
    base = np.array(_jitter(rng, (20, 210, 220)))
    colours = base[None, None, :] * (0.55 + 0.45 * shade[..., None])
    layer = Image.fromarray(np.clip(colours, 0, 255).astype(np.uint8), "RGB")
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    draw.ellipse((1, 1, size - 2, size - 2), fill=255)
    draw.ellipse((size * 0.3, -size * 0.05, size * 1.1, size * 0.8), fill=0)
    return layer, mask


def _brick_triangle(rng: np.random.Generator, size: int):
    xs, ys = _grid(size)
    row = max(3, size // 8)
    offset = (ys // row) % 2 * row
    mortar = (ys % row < max(1, row // 5)) | ((xs + offset) % (2 * row) < max(1, row // 5))
    layer = _two_tone(mortar, (225, 215, 200), _jitter(rng, (160, 60, 35)))
    points = [(size / 2, size * 0.04), (size * 0.97, size * 0.94), (size * 0.03, size * 0.94)]
    return layer, _polygon_mask(size, points)


CLASSES: tuple[tuple[str, Painter], ...] = (
    ("checker-disc", _checker_disc),
    ("hazard-square", _hazard_square),
    ("dotted-star", _dotted_star),
    ("bullseye", _bullseye),
    ("honeycomb-hexagon", _honeycomb_hexagon),
    ("spotted-heart", _spotted_heart),
    ("cyan-crescent", _gradient_crescent),
    ("brick-triangle", _brick_triangle),
)


# -- background and distractors -------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Values in [0, 1]: a coarse random grid upsampled bicubically."""
    grid = (rng.random((cells, cells)) * 255).astype(np.uint8)
    image = Image.fromarray(grid, "L").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.float32) / 255.0


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A muted two-colour noise field with a faint texture of strokes: clutter, not objects."""
    low = rng.integers(60, 150, 3)
    high = np.clip(low + rng.integers(-50, 70, 3), 30, 200)
    mix = _smooth_noise(rng, size, int(rng.integers(3, 7)))[..., None]
    fine = _smooth_noise(rng, size, int(rng.integers(16, 40)))[..., None]
    colours = low * (1 - mix) + high * mix + (fine - 0.5) * 40
    image = Image.fromarray(np.clip(colours, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(10, 25))):
        x, y = rng.integers(0, size, 2)
        dx, dy = rng.integers(-size // 5, size // 5, 2)
        shade = tuple(int(v) for v in np.clip(low + rng.integers(-40, 40, 3), 0, 255))
        draw.line(
            (int(x), int(y), int(x + dx), int(y + dy)), fill=shade, width=int(rng.integers(1, 4))
        )
    return image


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    red, green, blue = (int(v) for v in rng.integers(20, 236, 3))
    return red, green, blue


def _distractor(rng: np.random.Generator, draw: ImageDraw.ImageDraw, size: int) -> None:
    """One nuisance shape: flat colour, no texture, shapes that no class uses."""
    extent = int(size * rng.uniform(0.10, 0.26))
    x, y = (int(v) for v in rng.integers(0, size - extent, 2))
    colour = _random_colour(rng)
    kind = int(rng.integers(0, 5))
    if kind == 0:  # ellipse, flat
        draw.ellipse((x, y + extent // 4, x + extent, y + extent * 3 // 4), fill=colour)
    elif kind == 1:  # plus sign
        third = extent // 3
        draw.rectangle((x + third, y, x + 2 * third, y + extent), fill=colour)
        draw.rectangle((x, y + third, x + extent, y + 2 * third), fill=colour)
    elif kind == 2:  # outline rectangle
        draw.rectangle((x, y, x + extent, y + extent * 2 // 3), outline=colour, width=3)
    elif kind == 3:  # zig-zag stroke
        points = [(x + extent * k / 4, y + (extent if k % 2 else 0)) for k in range(5)]
        draw.line(points, fill=colour, width=int(rng.integers(2, 5)))
    else:  # cluster of small dots
        for _ in range(8):
            cx, cy = (int(v) for v in rng.integers(0, extent, 2))
            draw.ellipse((x + cx, y + cy, x + cx + 5, y + cy + 5), fill=colour)


# -- scenes -------------------------------------------------------------------------------------


def _rng(*parts: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, ("gsp-demo", *parts))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def render_scene(
    config: SceneConfig, seed: int, index: int, label: int, draw_object: bool = True
) -> Scene:
    """Render scene ``index`` of the set ``seed`` with an object of class ``label``.

    Consecutive groups of ``config.scenes_per_background`` scenes share their background and
    distractors (with different classes, as scenes are interleaved by class): the clutter then
    carries no class information and pooling it only hurts, which is what GSP learns to avoid.
    ``draw_object=False`` renders the same scene without its object (same background,
    distractors and box), which shows exactly which pixels the object changes.
    """
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must lie in [0, {len(CLASSES)}), got {label}")
    clutter = _rng("background", seed, index // config.scenes_per_background)
    size = config.image_size
    image = _background(clutter, size)
    draw = ImageDraw.Draw(image)
    for _ in range(int(clutter.integers(config.min_distractors, config.max_distractors + 1))):
        _distractor(clutter, draw, size)
    image = image.filter(ImageFilter.GaussianBlur(radius=0.6))

    rng = _rng("object", seed, index)

    name, painter = CLASSES[label]
    side = max(8, round(size * rng.uniform(config.min_object_fraction, config.max_object_fraction)))
    layer, mask = painter(rng, side)
    angle = float(rng.uniform(-30, 30))
    layer = layer.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True)
    mask = mask.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True)
    mask = mask.point(lambda v: 255 if v >= 128 else 0)
    x = int(rng.integers(0, size - mask.width + 1))
    y = int(rng.integers(0, size - mask.height + 1))
    left, top, right, bottom = mask.getbbox() or (0, 0, mask.width, mask.height)
    box = (x + left, y + top, x + right, y + bottom)
    if draw_object:
        image.paste(layer, (x, y), mask)
    return Scene(image=image, label=label, class_name=name, box=box)


def generate_scenes(config: SceneConfig, seed: int, per_class: int) -> Iterator[Scene]:
    """``per_class`` scenes of every class, classes interleaved, deterministic given ``seed``."""
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    for index in range(per_class * len(CLASSES)):
        yield render_scene(config, seed, index, index % len(CLASSES))
