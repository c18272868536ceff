"""Overlaying a GSP weights grid on its image, for the CLI contact sheet and the service."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image

__all__ = ["overlay_heatmap"]


def overlay_heatmap(
    image: Image.Image, weights: np.ndarray, opacity: float = 0.5, colormap: str = "jet"
) -> Image.Image:
    """``image`` (RGB) blended with ``weights`` (h, w) upsampled to its size and coloured.

    Weights are scaled to [0, 1] by their maximum (a constant grid renders uniformly), so the
    picture shows where the pooling looked, not the grid's absolute mass.
    """
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be in [0, 1], got {opacity}")
    grid = np.asarray(weights, dtype=np.float32)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"weights must be a non-empty 2-D grid, got shape {grid.shape}")
    grid = np.nan_to_num(np.clip(grid, 0.0, None))
    peak = float(grid.max())
    grid = grid / peak if peak > 0 else grid
    base = image.convert("RGB")
    upsampled = Image.fromarray(grid).resize(base.size, Image.Resampling.BILINEAR)
    colours = colormaps[colormap](np.clip(np.asarray(upsampled), 0.0, 1.0))[..., :3]
    heat = Image.fromarray((colours * 255).astype(np.uint8), mode="RGB")
    return Image.blend(base, heat, opacity)
