"""Marked regions of a region search: the form's JSON and mask pictures, checked, and their
coverage of the network's feature-map grid."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
from pydantic import ValidationError

from app.service.dependencies import ApiError
from app.service.schemas import Regions
from index.limits import nests_deeper
from model.config import Preprocessing
from model.explain import image_mask_to_feature_mask, rectangles_to_mask

__all__ = [
    "MAX_REGIONS_BYTES",
    "MAX_REGIONS_DEPTH",
    "MarkedRegions",
    "check_aspect",
    "parse_regions",
]

_ASPECT_TOLERANCE = 0.02
# Bounds checked on the text, before it is parsed: a region spec is an object of lists of
# four numbers (3 levels), so anything far larger or deeper is hostile, not a bigger query.
MAX_REGIONS_BYTES = 16 * 1024
MAX_REGIONS_DEPTH = 8


def parse_regions(text: str | None) -> Regions:
    """The ``regions`` form field (empty: nothing marked); 400 ``bad_regions`` when malformed."""
    if text is None or not text.strip():
        return Regions()
    size = len(text.encode("utf-8", errors="replace"))
    if size > MAX_REGIONS_BYTES:
        raise ApiError(
            400, "bad_regions", f"regions is {size} bytes; the limit is {MAX_REGIONS_BYTES} bytes"
        )
    if nests_deeper(text, MAX_REGIONS_DEPTH):
        raise ApiError(
            400, "bad_regions", f"regions is nested deeper than {MAX_REGIONS_DEPTH} levels"
        )
    try:
        return Regions.model_validate(json.loads(text))
    except json.JSONDecodeError as error:
        raise ApiError(400, "bad_regions", f"regions is not valid JSON: {error}") from None
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'regions'}: {e['msg']}" for e in error.errors()
        )
        raise ApiError(
            400,
            "bad_regions",
            'regions must look like {"favour": [[x0, y0, x1, y1], ...], "ignore": [...], '
            f'"units": "fraction" | "pixels"}}: {problems}',
        ) from None


def check_aspect(mask: np.ndarray, size: tuple[int, int], name: str) -> None:
    """A mask picture must have the query's aspect ratio (400 ``bad_mask``)."""
    width, height = size
    mask_height, mask_width = mask.shape
    if abs(mask_width / mask_height - width / height) > _ASPECT_TOLERANCE * width / height:
        raise ApiError(
            400,
            "bad_mask",
            f"{name} is {mask_width}x{mask_height}; it must have the query's aspect ratio "
            f"({width}x{height})",
        )


@dataclass(frozen=True)
class MarkedRegions:
    """What a region search marked on its query image of ``image_size`` (width, height):
    rectangles and optional image-space masks in [0, 1], to favour and to ignore."""

    spec: Regions
    image_size: tuple[int, int]
    favour_mask: np.ndarray | None
    ignore_mask: np.ndarray | None
    preprocessing: Preprocessing

    def __call__(self, map_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The (favour, ignore) coverage of each location of a ``map_size`` feature map;
        raises ``ExplainError`` for rectangles outside the image."""
        return self._coverage(self.spec.favour, self.favour_mask, map_size), self._coverage(
            self.spec.ignore, self.ignore_mask, map_size
        )

    def _coverage(
        self, rectangles: list[list[float]], mask: np.ndarray | None, map_size: tuple[int, int]
    ) -> torch.Tensor:
        coverage = torch.zeros(map_size)
        if rectangles:
            coverage = rectangles_to_mask(
                rectangles,
                self.image_size,
                map_size,
                self.preprocessing,
                self.spec.units == "pixels",
            )
        if mask is not None:
            coverage = torch.maximum(
                coverage, image_mask_to_feature_mask(mask, map_size, self.preprocessing)
            )
        return coverage
